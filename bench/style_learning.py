"""Does style learning work? Train the default `style` preset on each demo style set and measure it.

    python bench/style_learning.py [--styles ink,halftone,poster] [--prompts 40] [--no-full] [--grid PATH]

For each style: trains a LoRA through the library (the same code path as `studio train --base demo --preset style`),
then draws held-out prompts (color/shape pairs that are not in the style set) with the trigger word, with the adapter
and without it (the base model), and the style set's own captions (memorization). Scores: the style score (a strict
classifier of the style's whole combination of looks, trained only on ground-truth renders) and content accuracy
(the shapes-world evaluator); trainable parameters, file size, wall time. Full fine-tuning of the UNet on the same
data is the reference the LoRA paper compares with. Writes a before/after grid (base, adapter, true renders of the
same scenes) and prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import full_finetune, machine  # noqa: E402
from bench.style_common import (  # noqa: E402
    STYLE_DIR,
    add_training_args,
    base_with_adapter,
    held_out_prompts,
    score,
    score_images,
    train_adapter,
    training_overrides,
    training_prompts,
)
from sample_data.evaluate_demo import generate_scenes  # noqa: E402
from sample_data.evaluator import load_content_evaluator, load_style_classifier  # noqa: E402
from sample_data.shapes import ARTIST_STYLES, random_scene, render, to_array  # noqa: E402
from studio.models import load_base  # noqa: E402

GRID_COLUMNS = 6


def true_renders(prompts, style: str) -> np.ndarray:
    """The style's ground-truth pictures of the prompts' content (placed and sized at random)."""
    return np.stack(
        [
            to_array(render(random_scene(random.Random(k), style, p.color, p.shape, p.background)))
            for k, p in enumerate(prompts)
        ]
    )


def write_grid(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """A labelled grid: one row of pictures per (label, images), scaled up 2x."""
    from PIL import Image, ImageDraw

    cell, label_width = 128, 150
    grid = Image.new("RGB", (label_width + GRID_COLUMNS * (cell + 4), len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + 4)
        for line, text in enumerate(label.split("\n")):
            draw.text((6, y + cell // 2 - 14 + 14 * line), text, fill=(0, 0, 0))
        for c, image in enumerate(images[:GRID_COLUMNS]):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + c * (cell + 4), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def measure_style(style: str, args, evaluator, overrides: dict) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Base, LoRA (and full fine-tuning) on one style: the figures and this style's rows of the grid."""
    style_dir = STYLE_DIR / style
    classifier = load_style_classifier(style)
    triggered, plain = held_out_prompts(args.prompts, True), held_out_prompts(args.prompts, False)
    memorized = training_prompts(style_dir, True)
    base = load_base("demo")
    base_triggered = generate_scenes(base, triggered)
    result = {
        "base": score(base, plain, evaluator, classifier),
        "base_with_trigger": score_images(base_triggered, triggered, evaluator, classifier),
        "base_memorization": score(base, memorized, evaluator, classifier),
    }
    del base
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / f"{style}.safetensors"
        config, trained, seconds = train_adapter(args.preset, style_dir, output, **overrides)
        adapted, stack, name = base_with_adapter(trained.output)
        adapter_triggered = generate_scenes(adapted, triggered)
        unet_te = trained.total_parameters - trained.trainable_parameters
        result["lora"] = {
            **score_images(adapter_triggered, triggered, evaluator, classifier),
            "memorization": score(adapted, memorized, evaluator, classifier),
            "trainable_parameters": trained.trainable_parameters,
            "trainable_percent_of_unet_and_text_encoder": round(100 * trained.trainable_parameters / unet_te, 3),
            "adapter_file_bytes": trained.output.stat().st_size,
            "train_seconds": round(seconds, 1),
            "steps": trained.steps,
            "config": {
                k: config.to_dict()[k]
                for k in ("rank", "alpha", "unet_targets", "max_train_steps", "batch_size", "unet_lr", "lr_scheduler")
            },
        }
        stack.set_weight(name, 0.0)
        result["lora"]["at_weight_0"] = score(adapted, triggered, evaluator, classifier)
        del adapted, stack
    base_content = result["base"]["content"]
    result["lora"]["content_drop_points"] = {
        k: round(100 * (base_content[k] - result["lora"]["content"][k]), 1) for k in ("color", "shape", "background")
    }
    rows = [
        (f"{style}\nbase model", base_triggered),
        (f"{style}\nwith the LoRA", adapter_triggered),
        (f"{style}\ntrue renders", true_renders(triggered, style)),
    ]
    if not args.no_full:
        full = load_base("demo")
        full_seconds = full_finetune(full, config, trained.steps, lr=args.full_lr)
        full_params = sum(p.numel() for p in full.unet.parameters())
        result["full_finetune"] = {
            **score(full, triggered, evaluator, classifier),
            "trainable_parameters": full_params,
            "train_seconds": round(full_seconds, 1),
            "lr": args.full_lr,
        }
        result["lora_vs_full"] = {
            "style_score_gap": round(result["full_finetune"]["style_score"] - result["lora"]["style_score"], 4),
            "parameter_ratio_percent": round(100 * trained.trainable_parameters / full_params, 3),
        }
    return result, rows


def main() -> None:
    """Train, generate, score each style; write the grid; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", default=",".join(ARTIST_STYLES), help="comma-separated style sets")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts per style")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference")
    parser.add_argument("--full-lr", type=float, default=5e-4, help="learning rate of the full fine-tuning reference")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "style_learning.png", help="before/after grid")
    parser.add_argument("--threads", type=int, default=2)
    add_training_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    evaluator = load_content_evaluator()
    overrides = training_overrides(args)
    result = {"prompts": args.prompts, "preset": args.preset, "overrides": overrides, "machine": machine()}
    grid = []
    for style in args.styles.split(","):
        result[style], rows = measure_style(style, args, evaluator, overrides)
        grid += rows
        print(json.dumps({style: result[style]}), file=sys.stderr, flush=True)
    if args.grid:
        write_grid(grid, args.grid)
        result["grid"] = str(args.grid)
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
