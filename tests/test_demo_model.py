"""The bundled demo world: deterministic scenes, style sets, trusted evaluators, and the demo base model."""

import os

import numpy as np
import pytest

from sample_data.evaluator import content_accuracy, load_content_evaluator, render_many
from sample_data.shapes import COLORS, HELD_OUT_PAIRS, SHAPES, STYLES, render, scenes
from studio.models import DEMO_MODEL_DIR

STYLE_DIR = DEMO_MODEL_DIR.parent / "styles"


def test_scenes_are_deterministic_and_follow_the_vocabulary():
    first, again = scenes(3, 20), scenes(3, 20)
    assert first == again
    assert all(np.array_equal(np.asarray(render(a)), np.asarray(render(b))) for a, b in zip(first, again, strict=True))
    for scene in scenes(4, 200):
        assert scene.color in COLORS and scene.shape in SHAPES and scene.background != scene.color
        assert scene.prompt == f"a {scene.color} {scene.shape} on a {scene.background} background"


@pytest.mark.parametrize("style", ["ink", "halftone"])
def test_style_sets_have_60_captioned_images_without_held_out_pairs(style):
    folder = STYLE_DIR / style
    images = sorted(folder.glob("*.png"))
    assert len(images) == 60
    for image in images:
        words = image.with_suffix(".txt").read_text().split()
        assert (words[1], words[2]) not in HELD_OUT_PAIRS


def test_content_evaluator_is_right_on_ground_truth_renders():
    truth = [s for style in STYLES for s in scenes(31337, 100, style)]
    accuracy = content_accuracy(load_content_evaluator(), render_many(truth), truth)
    assert min(accuracy["color"], accuracy["shape"], accuracy["background"]) >= 0.98, accuracy


def test_demo_model_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from studio.generate import GenerationRequest, generate
    from studio.models import load_base

    base = load_base("demo")
    assert base.name == "demo" and base.family.name == "sd1"
    image = generate(base, GenerationRequest(prompt="a red circle on a white background", seed=1, steps=10))
    pixels = np.asarray(image.images[0])
    assert pixels.shape[:2] == (64, 64) and pixels.std() > 5
    assert os.path.getsize(DEMO_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors") < 30 * 2**20


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "UniPC"])
def test_deterministic_samplers_draw_the_default_samplers_picture(sampler):
    # every deterministic sampler solves the same ODE from the same noise, so at 20 steps they agree closely; DDIM
    # used to clip its latent x0 estimate to [-1, 1] (its default for pixels) and drew a different, washed-out picture
    from studio.generate import GenerationRequest, generate
    from studio.models import load_base

    base = load_base("demo")
    request = dict(prompt="a red circle on a white background", seed=3, batch=2)
    reference = generate(base, GenerationRequest(**request)).images
    other = generate(base, GenerationRequest(sampler=sampler, **request)).images
    pairs = zip(reference, other, strict=True)
    difference = np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in pairs])
    assert difference < 12, difference


def test_a_short_training_run_on_a_style_set_raises_the_style_score(tmp_path):
    from bench.style_learning import held_out_scenes, with_trigger
    from sample_data.evaluate_demo import generate_scenes
    from sample_data.evaluator import load_style_classifier
    from studio.compose import AdapterStack, load_adapter
    from studio.models import load_base
    from training.config import TrainConfig
    from training.trainer import train

    classifier = load_style_classifier("ink")
    prompts = with_trigger(held_out_scenes(8))
    config = TrainConfig.from_preset(
        "style",
        base="demo",
        data_dir=str(STYLE_DIR / "ink"),
        trigger="sks",
        output=str(tmp_path / "ink.safetensors"),
        max_train_steps=200,
        unet_lr=1e-3,
        unet_targets="kohya",
        min_snr_gamma=0.0,
        lr_warmup_steps=10,
    )
    result = train(config)
    base = load_base("demo")
    before = classifier.probability(generate_scenes(base, prompts, steps=10)).mean()
    AdapterStack(base).add(load_adapter(result.output, base), 1.0)
    after = classifier.probability(generate_scenes(base, prompts, steps=10)).mean()
    # measured 0.00026 -> 0.0027 (200 steps): the demo model that follows prompts (issue 4) holds on to its plain look,
    # so the rise is tenfold but small; the same run at the preset's attention-only targets and lr 5e-4 gave 0.0016
    assert after > 4 * before, (before, after)
