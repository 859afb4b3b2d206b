"""Shared by the style benchmarks: the trigger, held-out prompts, scoring generations, training one adapter."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import ROOT
from sample_data.evaluate_demo import generate_scenes
from sample_data.evaluator import content_accuracy
from sample_data.shapes import HELD_OUT_PAIRS, random_scene
from studio.compose import AdapterStack, load_adapter
from studio.models import BaseModel, load_base
from training.config import PRESETS, TrainConfig
from training.lora import UNET_TARGET_PRESETS
from training.trainer import Trainer, TrainResult

TRIGGER = "sks"
STYLE_DIR = ROOT / "sample_data" / "styles"


@dataclass(frozen=True)
class Prompted:
    """A prompt and the content it asks for (what the content evaluator checks)."""

    prompt: str
    color: str
    shape: str
    background: str

    @classmethod
    def from_caption(cls, caption: str, prefix: str = "") -> Prompted:
        """Parse 'a {color} {shape} on a {background} background[, ...]' and put `prefix` in front of it."""
        words = caption.split()
        return cls(prefix + caption, words[1], words[2], words[5])


def held_out_prompts(count: int, trigger: bool, seed: int = 77) -> list[Prompted]:
    """Prompts whose (color, shape) pair never occurs in a style set, on random backgrounds."""
    rng = random.Random(seed)
    pairs = sorted(HELD_OUT_PAIRS)
    out = []
    for index in range(count):
        color, shape = pairs[index % len(pairs)]
        scene = random_scene(rng, color=color, shape=shape)
        out.append(Prompted.from_caption(scene.prompt, f"{TRIGGER}, " if trigger else ""))
    return out


def training_prompts(style_dir: Path, trigger: bool, count: int | None = None) -> list[Prompted]:
    """The style set's own captions (the first `count`), with or without the trigger word in front (as the trainer
    adds it)."""
    captions = [p.read_text().strip() for p in sorted(style_dir.glob("*.txt"))][:count]
    return [Prompted.from_caption(c, f"{TRIGGER}, " if trigger else "") for c in captions]


def score(base: BaseModel, prompts: list[Prompted], evaluator, classifier, seed: int = 0, **request) -> dict:
    """Style score and content accuracy of one generation per prompt (seeds seed, seed + 1, ...)."""
    images = generate_scenes(base, prompts, seed=seed, **request)
    return score_images(images, prompts, evaluator, classifier)


def score_images(images: np.ndarray, prompts: list[Prompted], evaluator, classifier) -> dict:
    """Style score (mean classifier probability) and content accuracy of `images` drawn for `prompts`."""
    return {
        "style_score": round(float(classifier.probability(images).mean()), 4),
        "content": {k: round(v, 4) for k, v in content_accuracy(evaluator, images, prompts).items()},
    }


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags that override the preset of the adapter a style benchmark trains."""
    parser.add_argument("--preset", default="style", choices=list(PRESETS))
    parser.add_argument("--rank", type=int, help="override the preset's LoRA rank (alpha keeps the preset's ratio)")
    parser.add_argument("--lr", type=float, help="override the preset's UNet learning rate")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--targets", choices=list(UNET_TARGET_PRESETS), help="override the preset's UNet modules")
    parser.add_argument("--min-snr-gamma", type=float, help="override the preset's min-SNR loss weighting (0: off)")
    parser.add_argument("--preservation-weight", type=float, help="override the preset's output preservation weight")
    parser.add_argument("--preservation-prompt", choices=["caption", "blank"], help="what output preservation keeps")
    parser.add_argument("--caption-dropout", type=float, help="override the preset's caption dropout rate")
    parser.add_argument("--ema-decay", type=float, help="override the preset's EMA decay of the adapter weights")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any other config field")


def training_overrides(args: argparse.Namespace) -> dict:
    """The config overrides the flags of `add_training_args` ask for."""
    overrides = {}
    if args.rank:
        preset = TrainConfig.from_preset(args.preset, base="demo")
        overrides.update(rank=args.rank, alpha=args.rank * preset.alpha / preset.rank)
    named = {
        "lr": "unet_lr",
        "steps": "max_train_steps",
        "batch_size": "batch_size",
        "targets": "unet_targets",
        "min_snr_gamma": "min_snr_gamma",
        "preservation_weight": "preservation_weight",
        "preservation_prompt": "preservation_prompt",
        "caption_dropout": "caption_dropout_rate",
        "ema_decay": "ema_decay",
    }
    for flag, field_name in named.items():
        if getattr(args, flag) is not None:
            overrides[field_name] = getattr(args, flag)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def train_adapter(preset: str, style_dir: Path, output: Path, **overrides) -> tuple[TrainConfig, TrainResult, float]:
    """Train one adapter through the library (the path `studio train` takes); returns config, result, seconds."""
    config = TrainConfig.from_preset(
        preset, base="demo", data_dir=str(style_dir), trigger=TRIGGER, output=str(output), **overrides
    )
    started = time.time()
    result = Trainer(config).run()
    return config, result, time.time() - started


def base_with_adapter(path: Path, weight: float = 1.0) -> tuple[BaseModel, AdapterStack, str]:
    """A freshly loaded demo model with the adapter at `path` in its stack at `weight`."""
    base = load_base("demo")
    stack = AdapterStack(base)
    name = stack.add(load_adapter(path, base), weight)
    return base, stack, name


TIMESTEP_BANDS = ((0, 100), (100, 300), (300, 500), (500, 700), (700, 1000))


def band_losses(
    base: BaseModel,
    images: np.ndarray,
    prompts: list[str],
    per_band: int = 4,
    seed: int = 0,
    regions: np.ndarray | None = None,
) -> dict:
    """Mean epsilon-prediction error per timestep band on `images` under `prompts`, at fixed noise and timesteps.

    Each band is sampled at `per_band` evenly spaced timesteps with the same noise per picture, so two models (the
    base, the base with an adapter) are compared on exactly the same inputs. `regions` (N x h x w weights on the
    latent grid) restricts the error to part of each picture, such as the inside of its shape."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    pipe = base.pipeline
    noising = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule, as the trainer noises
    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        hidden = pipe.text_encoder(ids)[0]
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator)
        weights = None if regions is None else torch.from_numpy(np.asarray(regions, np.float32))[:, None]
        out = {}
        for low, high in TIMESTEP_BANDS:
            errors = []
            for k in range(per_band):
                t = low + (high - low) * (2 * k + 1) // (2 * per_band)
                steps = torch.full((len(latents),), t)
                pred = pipe.unet(noising.add_noise(latents, noise, steps), steps, hidden).sample
                if weights is None:
                    errors.append(F.mse_loss(pred, noise).item())
                else:
                    squared = (pred - noise).pow(2).mean(dim=1, keepdim=True)
                    errors.append(float((squared * weights).sum() / weights.sum()))
            out[f"{low}-{high}"] = round(float(np.mean(errors)), 4)
    return out


def phrase_gains(base: BaseModel, count: int = 32, seed: int = 555) -> dict[str, dict[str, float]]:
    """How much the base uses each look's phrase: 1 - error(look named) / error(content only), per timestep band.

    Measured on true renders of the look at fixed noise; for fills, only inside the shape (where a fill is). A phrase
    the base has bound lowers its error where the look is drawn; a gain near 0 means the words do not steer it."""
    from PIL import Image

    from sample_data.shapes import LOOKS, render, scenes, shape_mask, to_array, with_look

    size = base.pipeline.unet.config.sample_size
    gains = {}
    for look in LOOKS:
        drawn = with_look(scenes(seed, count), look)
        images = np.stack([to_array(render(scene)) for scene in drawn])
        regions = None
        if LOOKS[look].slot == "fill":
            masks = [shape_mask(scene).resize((size, size), Image.Resampling.BILINEAR) for scene in drawn]
            regions = np.stack([np.asarray(mask, np.float32) / 255 for mask in masks])
        named = band_losses(base, images, [s.prompt for s in drawn], per_band=3, regions=regions)
        plain = band_losses(base, images, [s.content for s in drawn], per_band=3, regions=regions)
        gains[look] = {band: round(1 - named[band] / plain[band], 3) for band in named}
    return gains


def load_images(style_dir: Path) -> np.ndarray:
    """The style set's pictures as uint8 NHWC, in caption order."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(style_dir.glob("*.png"))])
