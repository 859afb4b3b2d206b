"""Measure the demo model's prompt following: 200 random prompts at the default settings, judged by the evaluator.

    python sample_data/evaluate_demo.py [--count 200] [--base demo]

Prints one JSON object (color / shape / background accuracy, seconds for 4 images at 20 steps, and the same accuracy
for each decorated look the base model was taught, with the artist-style classifiers' scores of those pictures) and
writes it to sample_data/demo_model_report.json when run on the bundled model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_data.evaluator import (  # noqa: E402
    content_accuracy,
    load_content_evaluator,
    load_style_classifier,
    render_many,
)
from sample_data.shapes import DECORATIONS, STYLES, scenes  # noqa: E402
from studio.generate import GenerationRequest, generate  # noqa: E402
from studio.models import load_base  # noqa: E402


def generate_scenes(base, scene_list, seed: int = 0, **request) -> np.ndarray:
    """Images (uint8 NHWC) for each scene's prompt at the default generation settings (overridable)."""
    images = []
    for index, scene in enumerate(scene_list):
        result = generate(base, GenerationRequest(prompt=scene.prompt, seed=seed + index, **request))
        images.append(np.asarray(result.images[0]))
    return np.stack(images)


def decorated_looks(base, evaluator, count: int) -> dict[str, dict[str, float]]:
    """Per decorated look ("..., with stripes"): content accuracy (also on true renders) and style scores."""
    classifiers = {style: load_style_classifier(style) for style in STYLES if style != "plain"}
    looks = {}
    for look in DECORATIONS:
        prompts = scenes(4343, count, look)
        images = generate_scenes(base, prompts)
        scores = {f"{style}_score": round(float(c.probability(images).mean()), 4) for style, c in classifiers.items()}
        ceiling = content_accuracy(evaluator, render_many(prompts), prompts)["all"]  # the evaluator on true renders
        looks[look] = {**content_accuracy(evaluator, images, prompts), "all_on_renders": ceiling, **scores}
    return looks


def main() -> None:
    """Score prompt following and time a 4-image generation."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--decorated-count", type=int, default=24, help="prompts per decorated look")
    parser.add_argument("--base", default="demo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = load_base(args.base)
    evaluator = load_content_evaluator()
    prompts = scenes(4242, args.count)
    started = time.time()
    images = generate_scenes(base, prompts)
    accuracy = content_accuracy(evaluator, images, prompts)
    timing_started = time.time()
    generate(base, GenerationRequest(prompt="a blue star on a yellow background", seed=1, batch=4))
    report = {
        "prompts": args.count,
        "settings": {"steps": 20, "cfg": 7.0, "sampler": type(base.pipeline.scheduler).__name__},
        "accuracy": accuracy,
        "seconds_for_4_images_20_steps": round(time.time() - timing_started, 2),
        "decorated": decorated_looks(base, evaluator, args.decorated_count),
        "seconds_total": round(time.time() - started, 1),
    }
    if args.base == "demo":
        (ROOT / "sample_data" / "demo_model_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
