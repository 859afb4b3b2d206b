"""A deterministic validation loss: held-out pictures scored at fixed noise and timesteps, comparable across runs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studio.conditioning import PromptEmbeddings
from training.data import (
    DatasetItem,
    DatasetReport,
    SkippedFile,
    assign_bucket,
    image_to_tensor,
    open_image,
    size_conditioning,
)

# The draws do not depend on the run's seed, so runs with different seeds are scored on the same noise.
VALIDATION_SEED = 1_000_003
TIMESTEPS_PER_IMAGE = 4
HELD_OUT = "held out to measure the validation loss"


def hold_out(report: DatasetReport, count: int) -> tuple[DatasetReport, list[DatasetItem]]:
    """Take `count` pictures, evenly spaced in file-name order, out of `report` (the same ones every run)."""
    items = report.items
    if count <= 0:
        return report, []
    if count >= len(items):
        raise ValueError(
            f"validation_images ({count}) must leave at least one picture to train on; {report.root} has {len(items)}"
        )
    picks = {(2 * k + 1) * len(items) // (2 * count) for k in range(count)}
    held = [item for index, item in enumerate(items) if index in picks]
    kept = [item for index, item in enumerate(items) if index not in picks]
    skipped = [*report.skipped, *(SkippedFile(item.path, HELD_OUT) for item in held)]
    return dataclasses.replace(report, items=kept, skipped=skipped), held


@dataclass
class ValidationSet:
    """Held-out pictures as latents, each with the noise and timesteps it is always scored at."""

    captions: list[str]
    latents: list[torch.Tensor]  # per picture [C, h, w]: the scaled VAE posterior mean (no sampling)
    noise: list[torch.Tensor]  # per picture [K, C, h, w]
    timesteps: list[torch.Tensor]  # per picture [K], one in each K-th of the schedule
    time_ids: list[torch.Tensor]  # per picture SDXL's size conditioning [6]; empty for other families


def build_validation_set(
    items: list[DatasetItem],
    buckets: list[tuple[int, int]],
    vae,
    num_train_timesteps: int,
    *,
    sdxl: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> ValidationSet:
    """Encode the pictures once (centre crop, no flip) and draw their noise and timesteps, seeded by picture index."""
    vset = ValidationSet([], [], [], [], [])
    scaling = vae.config.scaling_factor
    for index, item in enumerate(items):
        bucket = assign_bucket(item.width, item.height, buckets)
        pixels = image_to_tensor(open_image(item.path), bucket, True, False, None)
        with torch.no_grad():
            mean = vae.encode(pixels[None].to(device, dtype)).latent_dist.mean[0].float().cpu()
        generator = torch.Generator().manual_seed(VALIDATION_SEED + index)
        offsets = torch.rand(TIMESTEPS_PER_IMAGE, generator=generator)
        strata = (torch.arange(TIMESTEPS_PER_IMAGE) + offsets) * num_train_timesteps / TIMESTEPS_PER_IMAGE
        vset.captions.append(item.caption)
        vset.latents.append(mean * scaling)
        vset.noise.append(torch.randn((TIMESTEPS_PER_IMAGE, *mean.shape), generator=generator))
        vset.timesteps.append(strata.long().clamp(max=num_train_timesteps - 1))
        if sdxl:
            conditioning = size_conditioning((item.width, item.height), bucket, True, False, None)
            vset.time_ids.append(torch.tensor(conditioning.time_ids, dtype=torch.float32))
    return vset


@contextlib.contextmanager
def evaluating(models: list[torch.nn.Module]) -> Iterator[None]:
    """Put `models` in eval mode (no LoRA dropout) inside, and back in the mode each was in after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def validation_loss(
    vset: ValidationSet,
    unet,
    encode: Callable[[list[str]], PromptEmbeddings],
    noise_scheduler,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Mean squared error of the prediction against its target over every picture and timestep (lower is better)."""
    velocity = noise_scheduler.config.prediction_type == "v_prediction"
    total = 0.0
    with torch.no_grad():
        for index, caption in enumerate(vset.captions):
            noise, timesteps = vset.noise[index].to(device), vset.timesteps[index].to(device)
            count = len(timesteps)
            latents = vset.latents[index].to(device).expand(count, -1, -1, -1)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise_scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
            text = encode([caption])
            hidden = text.hidden.to(device, dtype).expand(count, -1, -1)
            added = None
            if vset.time_ids:
                time_ids = vset.time_ids[index].to(device, dtype).expand(count, -1)
                added = {"text_embeds": text.pooled.to(device, dtype).expand(count, -1), "time_ids": time_ids}
            with autocast():
                pred = unet(noisy.to(dtype), timesteps, hidden, added_cond_kwargs=added).sample
            total += F.mse_loss(pred.float(), target.float()).item()
    return total / len(vset.captions)
