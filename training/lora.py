"""LoRA injection (Hu et al. 2021, arXiv:2106.09685) into a UNet and text encoder(s) through PEFT."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from studio.models import ModelFamily

ADAPTER_NAME = "default"

# UNet presets, matched against module paths inside a diffusers UNet2DConditionModel.
_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
# kohya's default "LierLa" set: every Linear / 1x1 conv inside Transformer2DModel
_LIERLA = rf"\.attn[12]\.{_ATTN_PROJ}|\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.(proj_in|proj_out)"
# what kohya's LoCon (conv_dim) adds: every layer of the ResNet blocks (3x3 convs, time projection, 1x1 shortcut)
# and the 3x3 convs of the down- and upsamplers
_RESNET = r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|\.(downsamplers|upsamplers)\.0\.conv"
UNET_TARGET_PRESETS: dict[str, str] = {
    # cross-attention only: the text-to-image interface, what style adapters classically train
    "cross_attn": rf"\.attn2\.{_ATTN_PROJ}$",
    # self- and cross-attention
    "attn": rf"\.attn[12]\.{_ATTN_PROJ}$",
    "kohya": rf"({_LIERLA})$",
    # LierLa plus the ResNet layers, at one rank for all (kohya can give the convs their own)
    "locon": rf"({_LIERLA}|{_RESNET})$",
}
TEXT_ENCODER_TARGET_PRESETS: dict[str, str] = {
    "attn": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "attn_mlp": r"(\.self_attn\.(q_proj|k_proj|v_proj|out_proj)|\.mlp\.(fc1|fc2))$",
}


@dataclass(frozen=True)
class LoraSpec:
    """Which modules get LoRA layers and their shape: rank, alpha, dropout."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    unet_targets: str = "cross_attn"
    text_encoder_targets: str | None = "attn"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.unet_targets not in UNET_TARGET_PRESETS:
            raise ValueError(f"unet_targets {self.unet_targets!r} is not one of {', '.join(UNET_TARGET_PRESETS)}")
        if self.text_encoder_targets is not None and self.text_encoder_targets not in TEXT_ENCODER_TARGET_PRESETS:
            raise ValueError(
                f"text_encoder_targets {self.text_encoder_targets!r} is not one of "
                f"{', '.join(TEXT_ENCODER_TARGET_PRESETS)} (or None to leave the text encoder alone)"
            )

    @property
    def scale(self) -> float:
        """The factor alpha / rank that multiplies up @ down."""
        return self.alpha / self.rank


def find_target_modules(model: nn.Module, pattern: str) -> list[str]:
    """Module paths in `model` whose Linear or Conv2d layer matches the preset regex `pattern`."""
    regex = re.compile(pattern)
    names = []
    for name, module in model.named_modules():
        if "lora_" in name or "base_layer" in name:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and regex.search("." + name):
            names.append(name)
    return names


def _lora_config(spec: LoraSpec, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=True,
        target_modules=targets,
    )


def unet_targets(unet: nn.Module, spec: LoraSpec) -> list[str]:
    """The UNet module paths that `spec` adapts."""
    return find_target_modules(unet, UNET_TARGET_PRESETS[spec.unet_targets])


_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def text_encoder_targets(text_encoder: nn.Module, spec: LoraSpec, used_layers: int | None = None) -> list[str]:
    """The text-encoder module paths that `spec` adapts (empty when the text encoder is not trained).

    With `used_layers`, modules of the layers past the first `used_layers` are left out: their output is never
    used (clip skip, SDXL's penultimate layer), so a LoRA there would never learn."""
    if spec.text_encoder_targets is None:
        return []
    names = find_target_modules(text_encoder, TEXT_ENCODER_TARGET_PRESETS[spec.text_encoder_targets])
    if used_layers is None:
        return names
    return [name for name in names if not _beyond(name, used_layers)]


def _beyond(module_path: str, used_layers: int) -> bool:
    match = _ENCODER_LAYER.search(module_path)
    return match is not None and int(match.group(1)) >= used_layers


def used_text_encoder_layers(
    family: ModelFamily, text_encoders: list[nn.Module], clip_skip: int = 1
) -> list[int | None]:
    """Per text encoder, how many of its layers the conditioning uses (None: all); LoRA on the rest never learns.

    SD 1.x/2.x with clip skip N stop N - 1 layers early; SDXL uses the first encoder's penultimate layer only, and
    all of the second (its pooled projection comes from the last layer)."""
    used: list[int | None] = []
    for index, text_encoder in enumerate(text_encoders):
        layers = text_encoder.config.num_hidden_layers
        if family.is_sdxl:
            used.append(layers - 1 if index < len(family.text_encoder_attrs) - 1 else None)
        else:
            used.append(layers - (clip_skip - 1) if clip_skip > 1 else None)
    return used


def inject_lora(
    unet: nn.Module,
    text_encoders: list[nn.Module],
    spec: LoraSpec,
    text_encoder_layers: list[int | None] | None = None,
) -> dict[str, int]:
    """Add a trainable LoRA adapter to the UNet (and text encoders if the spec says so); freeze the rest.

    `text_encoder_layers` gives, per text encoder, how many of its layers the conditioning uses (None: all).
    Returns the number of adapted modules per component ("unet", "text_encoder", "text_encoder_2", ...).
    """
    targets = unet_targets(unet, spec)
    if not targets:
        raise ValueError(f"unet_targets {spec.unet_targets!r} matched no module in this UNet")
    unet.requires_grad_(False)
    unet.add_adapter(_lora_config(spec, targets), adapter_name=ADAPTER_NAME)
    counts = {"unet": len(targets)}
    for index, text_encoder in enumerate(text_encoders):
        text_encoder.requires_grad_(False)
        used = text_encoder_layers[index] if text_encoder_layers else None
        te_targets = text_encoder_targets(text_encoder, spec, used)
        if te_targets:
            text_encoder.add_adapter(_lora_config(spec, te_targets), adapter_name=ADAPTER_NAME)
        counts["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = len(te_targets)
    for model in [unet, *text_encoders]:
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    return counts


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of `model` (empty if it has no adapter)."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of the LoRA parameters of `model`, keyed by parameter name."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if "lora_" in name}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA parameter values saved by `lora_state` back into `model` (names must match exactly)."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    expected = {name for name in params if "lora_" in name}
    if missing or expected - set(state):
        raise ValueError(
            f"saved LoRA state does not match the model: {len(missing)} unknown, "
            f"{len(expected - set(state))} missing parameters"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def count_parameters(models: list[nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameter counts over `models`."""
    trainable = sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for m in models for p in m.parameters())
    return trainable, total
