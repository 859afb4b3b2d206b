"""The bundled demo world: deterministic scenes and looks, style sets, trusted judges, and the demo base model."""

import os

import numpy as np
import pytest

from sample_data.evaluator import content_accuracy, load_content_evaluator, render_many
from sample_data.shapes import (
    ARTIST_STYLES,
    COLORS,
    HELD_OUT_PAIRS,
    LOOKS,
    SHAPES,
    held_out_combination,
    looked_scenes,
    render,
    scenes,
)
from studio.models import DEMO_MODEL_DIR

STYLE_DIR = DEMO_MODEL_DIR.parent / "styles"
SHORT_RUN_STEPS = 200
SHORT_RUN_MIN_GAIN = 0.1


def test_scenes_are_deterministic_and_follow_the_vocabulary():
    first, again = looked_scenes(3, 20), looked_scenes(3, 20)
    assert first == again
    assert all(np.array_equal(np.asarray(render(a)), np.asarray(render(b))) for a, b in zip(first, again, strict=True))
    for scene in scenes(4, 200):
        assert scene.color in COLORS and scene.shape in SHAPES and scene.background != scene.color
        assert scene.prompt == f"a {scene.color} {scene.shape} on a {scene.background} background"
    corpus = looked_scenes(5, 400)
    for scene in corpus:
        assert scene.prompt == ", ".join([scene.content, *(LOOKS[look].phrase for look in scene.named_looks)])
    # captions leave some looks out (as real captions leave out the style), so a content-only prompt is not "plain"
    assert 0.2 < np.mean([bool(s.looks) and not s.named_looks for s in corpus]) < 0.35
    assert 0.3 < np.mean([s.looks == s.named_looks and bool(s.looks) for s in corpus]) < 0.5


def test_the_base_corpus_never_holds_an_artist_combination_but_holds_every_look():
    corpus = looked_scenes(6, 4000)
    assert not [s.looks for s in corpus if held_out_combination(s.looks)]
    seen = {look for s in corpus for look in s.looks}
    assert seen == set(LOOKS)
    # every look of every style is in the corpus, and so are pairs of a four-look style's looks
    assert all(set(own) <= seen for own in ARTIST_STYLES.values())
    assert any(len(set(s.looks) & set(ARTIST_STYLES["ink"])) == 2 for s in corpus)


@pytest.mark.parametrize("style", list(ARTIST_STYLES))
def test_style_sets_have_60_content_captioned_images_without_held_out_pairs(style):
    folder = STYLE_DIR / style
    images = sorted(folder.glob("*.png"))
    assert len(images) == 60
    for image in images:
        caption = image.with_suffix(".txt").read_text().strip()
        words = caption.split()
        assert (words[1], words[2]) not in HELD_OUT_PAIRS
        assert caption == " ".join(words[:7]) and words[6] == "background", caption  # content only, no look named


def test_content_evaluator_is_right_on_ground_truth_renders():
    from sample_data.evaluator import judged_scenes

    truth = judged_scenes(31337, 300)
    accuracy = content_accuracy(load_content_evaluator(), render_many(truth), truth)
    assert min(accuracy["color"], accuracy["shape"], accuracy["background"]) >= 0.97, accuracy


def test_look_classifier_finds_each_look_where_it_is_drawn_and_not_elsewhere():
    from sample_data.evaluator import judged_scenes, load_look_classifier, look_accuracy

    truth = judged_scenes(31338, 600)
    accuracy = look_accuracy(load_look_classifier(), render_many(truth), truth)
    for look, figures in accuracy.items():
        # measured: recall 0.925 (small dots) to 1.0, specificity 0.955 (thin outline) to 1.0; the issue asks 0.8
        assert figures["recall"] >= 0.9 and figures["specificity"] >= 0.95, (look, figures)


@pytest.mark.parametrize("style", list(ARTIST_STYLES))
def test_style_classifiers_want_the_whole_combination(style):
    from sample_data.evaluator import judged_scenes, load_style_classifier, near_misses, textures

    classifier = load_style_classifier(style)
    assert (classifier.probability(render_many(scenes(77, 50, style))) > 0.5).mean() >= 0.98
    for other in ARTIST_STYLES:
        if other != style:
            assert (classifier.probability(render_many(scenes(78, 50, other))) < 0.5).mean() >= 0.98, other
    # the style with one look left out or swapped is not the style
    assert (classifier.probability(render_many(near_misses(style, 79, 100))) < 0.5).mean() >= 0.95
    # nor are other combinations of looks, plain pictures, or busy textures (what a fine-tune fallen apart draws)
    others = [s for s in judged_scenes(80, 150) if s.style != style]
    assert (classifier.probability(render_many(others)) < 0.5).mean() >= 0.98
    assert (classifier.probability(textures(81, 100)) < 0.5).mean() >= 0.98


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
    # every deterministic sampler solves the same ODE from the same noise, so with enough steps they agree closely
    # (at 40: mean pixel difference 6.0 DDIM, 6.1 Euler, 0.7 UniPC; at 20 UniPC is still 22 off); DDIM used to clip
    # its latent x0 estimate to [-1, 1] (its default for pixels) and drew a different, washed-out picture
    from studio.generate import GenerationRequest, generate
    from studio.models import load_base

    base = load_base("demo")
    request = dict(prompt="a red circle on a white background", seed=3, batch=2, steps=40)
    reference = generate(base, GenerationRequest(**request)).images
    other = generate(base, GenerationRequest(sampler=sampler, **request)).images
    pairs = zip(reference, other, strict=True)
    difference = np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in pairs])
    assert difference < 12, difference


def test_a_short_training_run_learns_the_style_as_a_denoiser(tmp_path):
    from sample_data.evaluator import load_style_classifier
    from studio.compose import AdapterStack, load_adapter
    from studio.models import load_base
    from training.config import TrainConfig
    from training.trainer import train

    classifier = load_style_classifier("ink")
    config = TrainConfig.from_preset(
        "style",
        base="demo",
        data_dir=str(STYLE_DIR / "ink"),
        trigger="sks",
        output=str(tmp_path / "ink.safetensors"),
        max_train_steps=SHORT_RUN_STEPS,
        unet_lr=1e-3,
        unet_targets="kohya",
        min_snr_gamma=0.0,
        lr_warmup_steps=10,
    )
    result = train(config)
    fresh_ink = scenes(31, 16, "ink")  # held-out renders of the style, never in the training set
    ink_images = render_many(fresh_ink)
    ink_prompts = [f"sks, {s.content}" for s in fresh_ink]
    base = load_base("demo")
    before = classifier.probability(_restored(base, ink_images[:8], ink_prompts[:8])).mean()
    error_before = _denoising_error(base, ink_images, ink_prompts)
    AdapterStack(base).add(load_adapter(result.output, base), 1.0)
    after = classifier.probability(_restored(base, ink_images[:8], ink_prompts[:8])).mean()
    error_after = _denoising_error(base, ink_images, ink_prompts)
    # What a short run teaches shows where the style is already half there: restoring a half-noised ink picture
    # (strength 0.5, CFG 1), the adapter keeps more of the style than the base, and its prediction error on unseen
    # pictures of the style falls. Measured: style 0.70 -> 0.86, error 1.253 -> 1.229. (From pure noise at CFG 7
    # neither draws the style yet: the unmet target in the README.)
    assert after > before + SHORT_RUN_MIN_GAIN, (before, after)
    assert error_after < error_before, (error_before, error_after)


def _denoising_error(base, images: np.ndarray, prompts: list[str]) -> float:
    """Mean epsilon-prediction error on `images` under `prompts`, at fixed noise and timesteps 50..600."""
    import torch
    import torch.nn.functional as F

    pipe = base.pipeline
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        )
        hidden = pipe.text_encoder(ids.input_ids)[0]
        errors = []
        for t in (50, 200, 400, 600):
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((len(latents),), t)
            pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, steps), steps, hidden).sample
            errors.append(F.mse_loss(pred, noise).item())
    return float(np.mean(errors))


def _restored(base, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Each picture noised halfway (strength 0.5) and denoised again by `base` with its prompt, unguided (CFG 1)."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline(**base.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        generator = torch.Generator().manual_seed(index)
        result = pipe(
            prompt,
            Image.fromarray(image),
            strength=0.5,
            guidance_scale=1.0,
            num_inference_steps=10,
            generator=generator,
        )
        out.append(np.asarray(result.images[0]))
    return np.stack(out)


def test_the_build_script_makes_the_shipped_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from sample_data.build_demo_model import write_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")  # a stale file from an earlier build must not win
    write_tokenizer(tmp_path)
    built = CLIPTokenizer.from_pretrained(tmp_path)
    shipped = CLIPTokenizer.from_pretrained(DEMO_MODEL_DIR / "tokenizer")
    assert built.get_vocab() == shipped.get_vocab() and built.model_max_length == shipped.model_max_length
    prompt = "zwx, a purple triangle on a orange background, with cross-hatching, on textured paper"
    assert built(prompt).input_ids == shipped(prompt).input_ids
