"""Before a run: step arithmetic, exact trainable parameters and adapter size, rough time and memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.models import BaseModel
from training.config import TrainConfig
from training.lora import text_encoder_targets, unet_targets
from training.trainer import Trainer, TrainPlan

SD15_UNET_PARAMS = 859_520_964
HEADER_BYTES = 16_384  # the JSON header with metadata, roughly
# Rough seconds per training image at 512 px for an SD 1.5-sized UNet (forward + backward); to be calibrated.
SECONDS_PER_IMAGE = {"cuda": 0.25, "cpu": 12.0}
STEP_OVERHEAD = {"cuda": 0.05, "cpu": 0.02}


@dataclass
class LoraSize:
    """Trainable LoRA parameters (exact) against the adapted models' size, and the adapted module counts."""

    lora_parameters: int
    model_parameters: int
    unet_parameters: int
    modules: dict[str, int]


def _meta_models(base: BaseModel):
    """Weightless copies (meta device) of the base's UNet and text encoders: exact shapes, no memory."""
    cached = base.extra.get("meta_models")
    if cached is not None:
        return cached
    with torch.device("meta"):
        unet = type(base.unet).from_config(base.unet.config)
        text_encoders = [type(te)(te.config) for te in base.text_encoders]
    base.extra["meta_models"] = (unet, text_encoders)
    return unet, text_encoders


def _module_params(module: torch.nn.Module, rank: int) -> int:
    if isinstance(module, torch.nn.Conv2d):
        return rank * (module.in_channels + module.out_channels)
    return rank * (module.in_features + module.out_features)


def lora_size(base: BaseModel, config: TrainConfig) -> LoraSize:
    """Exact LoRA parameter count for `config` on `base`: rank * (in + out) per targeted module."""
    unet, text_encoders = _meta_models(base)
    spec = config.lora_spec
    modules = {"unet": 0}
    count = 0
    for path in unet_targets(unet, spec):
        count += _module_params(unet.get_submodule(path), spec.rank)
        modules["unet"] += 1
    if config.train_text_encoder:
        for index, te in enumerate(text_encoders):
            key = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
            paths = text_encoder_targets(te, spec)
            modules[key] = len(paths)
            count += sum(_module_params(te.get_submodule(p), spec.rank) for p in paths)
    unet_total = sum(p.numel() for p in unet.parameters())
    total = unet_total + sum(p.numel() for te in text_encoders for p in te.parameters())
    return LoraSize(count, total, unet_total, modules)


def adapter_file_bytes(size: LoraSize, save_dtype: str) -> int:
    """Size of the exported file: the LoRA tensors in `save_dtype`, one alpha per module, and the header."""
    width = 4 if save_dtype == "fp32" else 2
    modules = sum(size.modules.values())
    return size.lora_parameters * width + modules * width + HEADER_BYTES


def estimate_seconds(plan: TrainPlan, config: TrainConfig, size: LoraSize, resolution: int, device: str) -> float:
    """A rough wall-clock estimate: images seen x per-image cost scaled by UNet size and pixel count."""
    scale = size.unet_parameters / SD15_UNET_PARAMS * (resolution / 512) ** 2
    per_image = SECONDS_PER_IMAGE[device] * scale
    if config.train_text_encoder:
        per_image *= 1.15
    return plan.images_seen * per_image + plan.total_steps * STEP_OVERHEAD[device]


def estimate_memory_bytes(config: TrainConfig, size: LoraSize, base: BaseModel, resolution: int, device: str) -> int:
    """A rough peak memory estimate: frozen weights + LoRA with AdamW state + activations."""
    frozen = sum(p.numel() for m in (base.unet, base.pipeline.vae, *base.text_encoders) for p in m.parameters())
    weight_bytes = 2 if device == "cuda" else 4
    lora = size.lora_parameters * 16  # fp32 weight, gradient and two Adam moments
    # activations: about 3 GiB per 512px image for SD 1.5 in half precision, scaled by UNet size and pixels
    per_image = 3 * 1024**3 * (size.unet_parameters / SD15_UNET_PARAMS) * (resolution / 512) ** 2 * (weight_bytes / 2)
    if config.gradient_checkpointing:
        per_image /= 4
    return int(frozen * weight_bytes + lora + per_image * config.batch_size)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def _human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_plan(config: TrainConfig, base: BaseModel) -> str:
    """The plan as Markdown: images, steps, epochs, images seen, trainable parameters, file size, estimates."""
    trainer = Trainer(config, base=base)
    report = trainer.scan()
    plan = trainer.plan(report)
    native = base.native_size
    resolution = config.resolution or native
    size = lora_size(base, config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seconds = estimate_seconds(plan, config, size, resolution, device)
    memory = estimate_memory_bytes(config, size, base, resolution, device)
    percent = 100 * size.lora_parameters / size.model_parameters
    modules = ", ".join(f"{k}: {v}" for k, v in size.modules.items())
    class_line = f" + {plan.num_class_images} class images" if plan.num_class_images else ""
    return "\n".join(
        [
            f"**Plan:** {plan.num_images} images{class_line} x {plan.repeats} repeat(s), batch {config.batch_size} "
            f"-> {plan.steps_per_epoch} steps per epoch",
            f"- **{plan.total_steps} total steps** over **{plan.epochs} epoch(s)**; {plan.images_seen} images seen",
            f"- trainable parameters: **{size.lora_parameters:,}** ({percent:.3f}% of the model's "
            f"{size.model_parameters:,}); adapted modules: {modules}",
            f"- adapter file: about **{_human_bytes(adapter_file_bytes(size, config.save_dtype))}** "
            f"({config.save_dtype})",
            f"- estimated time on this machine ({device.upper()}): **~{_human_seconds(seconds)}**; "
            f"estimated peak memory: **~{_human_bytes(memory)}** at {resolution}px "
            "(rough estimates, not yet calibrated)",
        ]
    )
