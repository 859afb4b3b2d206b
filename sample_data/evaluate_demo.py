"""Measure the demo model: prompt following, and how well it draws each named look on request.

    python sample_data/evaluate_demo.py [--count 200] [--look-count 24] [--base demo]

Prints one JSON object (color / shape / background accuracy on plain prompts, seconds for 4 images at 20 steps, and
for each named look asked for in the prompt: how often the look classifier finds it, how often it finds a look that
was not asked for, and the content accuracy) and writes it to sample_data/demo_model_report.json when run on the
bundled model.
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
    LOOK_NAMES,
    content_accuracy,
    load_content_evaluator,
    load_look_classifier,
    render_many,
)
from sample_data.shapes import LOOKS, scenes, with_look  # noqa: E402
from studio.generate import GenerationRequest, generate  # noqa: E402
from studio.models import load_base  # noqa: E402


def generate_scenes(base, scene_list, seed: int = 0, **request) -> np.ndarray:
    """Images (uint8 NHWC) for each scene's prompt at the default generation settings (overridable)."""
    images = []
    for index, scene in enumerate(scene_list):
        result = generate(base, GenerationRequest(prompt=scene.prompt, seed=seed + index, **request))
        images.append(np.asarray(result.images[0]))
    return np.stack(images)


def look_report(base, evaluator, count: int, seed: int = 4343) -> dict[str, dict[str, float]]:
    """Per named look asked for in the prompt: drawn (the look classifier finds it), other looks found, content.

    `found_in_true_renders` is the classifier's own ceiling on the same prompts: the share of ground-truth renders in
    which it finds the look (small shapes under a thick outline hide stripes and dots)."""
    classifier = load_look_classifier()
    report = {}
    for look in LOOKS:
        prompts = with_look(scenes(seed, count), look)
        images = generate_scenes(base, prompts)
        found = classifier.probabilities(images) > 0.5
        own = LOOK_NAMES.index(look)
        others = np.delete(found, own, axis=1)
        report[look] = {
            "drawn": round(float(found[:, own].mean()), 4),
            "found_in_true_renders": round(
                float((classifier.probabilities(render_many(prompts))[:, own] > 0.5).mean()), 4
            ),
            "other_looks_found": round(float(others.any(axis=1).mean()), 4),
            "content_all": round(content_accuracy(evaluator, images, prompts)["all"], 4),
        }
    return report


def plain_report(base, evaluator, count: int, seed: int = 4242) -> dict:
    """Content accuracy on plain prompts, and how often a look is drawn that nobody asked for."""
    prompts = scenes(seed, count)
    images = generate_scenes(base, prompts)
    found = load_look_classifier().probabilities(images) > 0.5
    return {
        "accuracy": content_accuracy(evaluator, images, prompts),
        "any_look_found": round(float(found.any(axis=1).mean()), 4),
    }


def main() -> None:
    """Score prompt following and each look, and time a 4-image generation."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--look-count", type=int, default=24, help="prompts per named look")
    parser.add_argument("--base", default="demo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = load_base(args.base)
    evaluator = load_content_evaluator()
    started = time.time()
    plain = plain_report(base, evaluator, args.count)
    timing_started = time.time()
    generate(base, GenerationRequest(prompt="a blue star on a yellow background", seed=1, batch=4))
    seconds = time.time() - timing_started
    looks = look_report(base, evaluator, args.look_count)
    report = {
        "prompts": args.count,
        "settings": {"steps": 20, "cfg": 7.0, "sampler": type(base.pipeline.scheduler).__name__},
        **plain,
        "seconds_for_4_images_20_steps": round(seconds, 2),
        "looks": looks,
        "looks_drawn_mean": round(float(np.mean([v["drawn"] for v in looks.values()])), 4),
        "seconds_total": round(time.time() - started, 1),
    }
    if args.base == "demo":
        (ROOT / "sample_data" / "demo_model_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
