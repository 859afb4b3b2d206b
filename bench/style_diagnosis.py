"""Why does (or doesn't) a style adapter learn? Memorization, loss per timestep band, and the base's ingredients.

    python bench/style_diagnosis.py [--style ink] [--no-ingredients] [training overrides, as bench/style_learning.py]

1. The base model's ingredients: each named look of the demo world requested in a prompt ("..., with a thick
   outline"), judged by the look classifier (trained only on ground-truth renders): how often it is drawn; and how
   much naming the look lowers the base's denoising error on true renders of it (its phrase gain: near 0, the
   words do not steer the model, and no adapter can bind them to a trigger).
2. Memorization: the style set's own captions, one picture each at seeds 0..N-1, with and without the trigger word,
   for the base model and for the trained adapter: style score and content accuracy.
3. The denoising error per timestep band on the style set (fixed noise and timesteps), before and after training:
   where in the noise schedule the adapter learns, and where it does not.
Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.style_common import (  # noqa: E402
    STYLE_DIR,
    add_training_args,
    band_losses,
    base_with_adapter,
    held_out_prompts,
    load_images,
    phrase_gains,
    score,
    score_images,
    train_adapter,
    training_overrides,
    training_prompts,
)
from sample_data.evaluate_demo import generate_scenes  # noqa: E402
from sample_data.evaluator import (  # noqa: E402
    LOOK_NAMES,
    load_content_evaluator,
    load_look_classifier,
    load_style_classifier,
)
from sample_data.shapes import ARTIST_STYLES  # noqa: E402
from studio.models import load_base  # noqa: E402


def memorization(base, style: str, evaluator, classifier, count: int | None = None) -> dict:
    """Style score, content and the style's own looks found, for the style set's own captions with and without the
    trigger word."""
    out = {}
    for key, trigger in (("with_trigger", True), ("without_trigger", False)):
        prompts = training_prompts(STYLE_DIR / style, trigger, count)
        images = generate_scenes(base, prompts)
        found = load_look_classifier().probabilities(images) > 0.5
        looks = {look: round(float(found[:, LOOK_NAMES.index(look)].mean()), 3) for look in ARTIST_STYLES[style]}
        out[key] = {**score_images(images, prompts, evaluator, classifier), "looks_found": looks}
    return out


def main() -> None:
    """Measure the base, train, measure again; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", default="ink")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts scored after training")
    parser.add_argument("--ingredients", type=int, default=16, help="prompts per named look of the base")
    parser.add_argument("--no-ingredients", action="store_true", help="skip the base's look report")
    parser.add_argument("--memorization", type=int, help="how many of the style set's captions to draw (default all)")
    parser.add_argument("--no-base", action="store_true", help="skip measuring the base model (when it is known)")
    parser.add_argument("--threads", type=int, default=2)
    add_training_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    style_dir = STYLE_DIR / args.style
    evaluator, classifier = load_content_evaluator(), load_style_classifier(args.style)
    images = load_images(style_dir)
    captions = [p.prompt for p in training_prompts(style_dir, True)]
    result = {"style": args.style, "machine": machine()}

    if not args.no_base:
        base = load_base("demo")
        if not args.no_ingredients:
            from sample_data.evaluate_demo import look_report

            result["base_ingredients"] = look_report(base, evaluator, args.ingredients)
            result["base_phrase_gains"] = phrase_gains(base)
        result["base_memorization"] = memorization(base, args.style, evaluator, classifier, args.memorization)
        result["base_band_losses"] = band_losses(base, images, captions)
        del base

    overrides = training_overrides(args)
    with tempfile.TemporaryDirectory() as tmp:
        config, trained, seconds = train_adapter(args.preset, style_dir, Path(tmp) / "a.safetensors", **overrides)
        adapted, _, _ = base_with_adapter(trained.output)
        result["adapter"] = {
            "preset": args.preset,
            "overrides": overrides,
            "train_seconds": round(seconds, 1),
            "trainable_parameters": trained.trainable_parameters,
            "final_loss": round(sum(trained.losses[-50:]) / max(1, len(trained.losses[-50:])), 4),
            "memorization": memorization(adapted, args.style, evaluator, classifier, args.memorization),
            "band_losses": band_losses(adapted, images, captions),
            "held_out_with_trigger": score(adapted, held_out_prompts(args.held_out, True), evaluator, classifier),
        }
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
