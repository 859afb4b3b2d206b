"""Does style learning work? Train the default `style` preset on a demo style set and measure it.

    python bench/style_learning.py [--style ink] [--prompts 40] [--no-full]

Trains a LoRA through the library (the same code path as `studio train`), then draws held-out prompts
(color/shape pairs that are not in the style set) with and without the adapter, and scores them:
style score (a style classifier trained on fresh renders of the style against plain renders, the other style and
busy textures, so a fine-tune fallen apart into noise does not count as styled), content accuracy
(the shapes-world evaluator), trainable parameters, adapter file size and wall time; and the same for full
fine-tuning of the UNet on the same data, as the LoRA paper compares. Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import full_finetune  # noqa: E402
from sample_data.evaluate_demo import generate_scenes  # noqa: E402
from sample_data.evaluator import content_accuracy, load_content_evaluator, load_style_classifier  # noqa: E402
from sample_data.shapes import COLORS, HELD_OUT_PAIRS, Scene, random_scene  # noqa: E402
from studio.compose import AdapterStack, load_adapter  # noqa: E402
from studio.models import load_base  # noqa: E402
from training.config import PRESETS, TrainConfig  # noqa: E402
from training.lora import UNET_TARGET_PRESETS  # noqa: E402
from training.trainer import Trainer  # noqa: E402

TRIGGER = "sks"


def held_out_scenes(count: int, seed: int = 77) -> list[Scene]:
    """Scenes whose (color, shape) pair never occurs in a style set, on random backgrounds."""
    rng = random.Random(seed)
    pairs = sorted(HELD_OUT_PAIRS)
    out = []
    for index in range(count):
        color, shape = pairs[index % len(pairs)]
        out.append(
            random_scene(rng, color=color, shape=shape, background=rng.choice([c for c in COLORS if c != color]))
        )
    return out


def with_trigger(scene_list: list[Scene]) -> list[Scene]:
    """The same scenes, captioned as the style set was trained: 'sks, a ... background'."""
    return [_Prompted(s, f"{TRIGGER}, {s.prompt}") for s in scene_list]


class _Prompted:
    """A scene with a different prompt (the evaluator still checks the scene's own attributes)."""

    def __init__(self, scene: Scene, prompt: str):
        self.scene, self.prompt = scene, prompt
        self.color, self.shape, self.background = scene.color, scene.shape, scene.background


def score(base, scene_list, evaluator, classifier) -> dict:
    """Style score and content accuracy of generations for `scene_list`."""
    images = generate_scenes(base, scene_list)
    return {
        "style_score": round(float(classifier.probability(images).mean()), 4),
        "content": {k: round(v, 4) for k, v in content_accuracy(evaluator, images, scene_list).items()},
    }


def main() -> None:
    """Train, generate, score; print JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", default="ink")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference")
    parser.add_argument("--rank", type=int, help="override the preset's LoRA rank (alpha keeps the preset's ratio)")
    parser.add_argument("--lr", type=float, help="override the preset's UNet learning rate")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--targets", choices=list(UNET_TARGET_PRESETS), help="override the preset's UNet modules")
    parser.add_argument("--min-snr-gamma", type=float, help="override the preset's min-SNR loss weighting (0: off)")
    parser.add_argument("--preservation-weight", type=float, help="override the preset's output preservation weight")
    parser.add_argument("--preservation-prompt", choices=["caption", "blank"], help="what output preservation keeps")
    parser.add_argument("--caption-dropout", type=float, help="override the preset's caption dropout rate")
    parser.add_argument("--ema-decay", type=float, help="override the preset's EMA decay of the adapter weights")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the full fine-tuning reference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = ROOT / "sample_data" / "styles" / args.style
    evaluator = load_content_evaluator()
    started = time.time()
    classifier = load_style_classifier(args.style)  # trained on fresh renders by sample_data/evaluator.py --styles
    plain = held_out_scenes(args.prompts)
    triggered = with_trigger(plain)

    base = load_base("demo")
    result = {
        "style": args.style,
        "prompts": args.prompts,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
    }
    result["base"] = score(base, plain, evaluator, classifier)
    result["base_with_trigger"] = score(base, triggered, evaluator, classifier)

    overrides = {}
    if args.rank:
        preset = PRESETS["style"]
        overrides.update(rank=args.rank, alpha=args.rank * preset["alpha"] / preset["rank"])
    if args.lr:
        overrides["unet_lr"] = args.lr
    if args.steps:
        overrides["max_train_steps"] = args.steps
    if args.targets:
        overrides["unet_targets"] = args.targets
    if args.min_snr_gamma is not None:
        overrides["min_snr_gamma"] = args.min_snr_gamma
    if args.preservation_weight is not None:
        overrides["preservation_weight"] = args.preservation_weight
    if args.preservation_prompt:
        overrides["preservation_prompt"] = args.preservation_prompt
    if args.caption_dropout is not None:
        overrides["caption_dropout_rate"] = args.caption_dropout
    if args.ema_decay is not None:
        overrides["ema_decay"] = args.ema_decay
    result["overrides"] = overrides
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig.from_preset(
            "style",
            base="demo",
            data_dir=str(data_dir),
            trigger=TRIGGER,
            output=str(Path(tmp) / f"{args.style}.safetensors"),
            **overrides,
        )
        trainer = Trainer(config)
        train_started = time.time()
        trained = trainer.run()
        lora_seconds = time.time() - train_started
        fresh = load_base("demo")
        stack = AdapterStack(fresh)
        name = stack.add(load_adapter(trained.output, fresh), 1.0)
        with_adapter = score(fresh, triggered, evaluator, classifier)
        stack.set_weight(name, 0.0)
        weight_zero = score(fresh, triggered, evaluator, classifier)
        unet_te = trained.total_parameters - trained.trainable_parameters
        result["lora"] = {
            **with_adapter,
            "at_weight_0": weight_zero,
            "trainable_parameters": trained.trainable_parameters,
            "trainable_percent_of_unet_and_text_encoder": round(100 * trained.trainable_parameters / unet_te, 3),
            "adapter_file_bytes": trained.output.stat().st_size,
            "train_seconds": round(lora_seconds, 1),
            "steps": trained.steps,
            "config": {
                k: config.to_dict()[k]
                for k in ("rank", "alpha", "unet_targets", "max_train_steps", "batch_size", "unet_lr")
            },
        }

    if not args.no_full:
        full = load_base("demo")
        full_seconds = full_finetune(full, config, trained.steps, lr=args.full_lr)
        full_prompts = triggered
        result["full_finetune"] = {
            **score(full, full_prompts, evaluator, classifier),
            "trainable_parameters": sum(p.numel() for p in full.unet.parameters()),
            "train_seconds": round(full_seconds, 1),
            "lr": args.full_lr,
            "checkpoint_bytes_fp16": 2 * sum(p.numel() for p in full.unet.parameters()),
        }
        result["lora_vs_full"] = {
            "style_score_gap": round(result["full_finetune"]["style_score"] - result["lora"]["style_score"], 4),
            "parameter_ratio_percent": round(
                100 * trained.trainable_parameters / result["full_finetune"]["trainable_parameters"], 3
            ),
        }
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
