"""Write an SD 1.x diffusers pipeline as one original-layout (LDM/CompVis) .safetensors checkpoint, and sniff families.

The layout is the one A1111/ComfyUI and diffusers' `from_single_file` read: the UNet under `model.diffusion_model.`
(input_blocks / middle_block / output_blocks), the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.text_model.`. The mapping is the inverse of diffusers' LDM -> diffusers conversion and
is derived from the UNet/VAE configs, so it works for any SD1-style UNet, not only SD 1.5's 4x2 block layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from studio.atomic import atomic_path
from studio.models import SD1, ModelFamily, detect_family

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _block_parts(match: re.Match) -> tuple[str, int, str, int, str]:
    """(side, block index, kind, layer index, rest) of a `_BLOCK` match."""
    side, block, kind, layer, rest = match.groups()
    return side, int(block), kind, int(layer), rest


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of `rest` ("norm1.weight", "to_out.0.bias") through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _per_block(value: int | Iterable[int], count: int, what: str) -> list[int]:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"UNet config has {len(values)} {what} for {count} blocks")
    return values


class _UnetLayout:
    """Where each diffusers UNet block lands among LDM's input_blocks / output_blocks, from the UNet config."""

    def __init__(self, config: Mapping[str, Any]):
        blocks = len(config["block_out_channels"])
        layers = _per_block(config["layers_per_block"], blocks, "layers_per_block")
        self.up_types = list(config["up_block_types"])
        # input_blocks.0 is conv_in; each down block adds its resnets(+attentions), then its downsampler if any.
        self.input_start, index = [], 1
        for block, count in enumerate(layers):
            self.input_start.append(index)
            index += count + (1 if block < blocks - 1 else 0)
        # Up blocks have one more resnet than the matching down block; the upsampler rides on the last one.
        self.up_layers = [count + 1 for count in reversed(layers)]
        self.output_start, index = [], 0
        for count in self.up_layers:
            self.output_start.append(index)
            index += count
        self.down_layers = layers

    def ldm_key(self, key: str) -> str | None:
        """The LDM name (without prefix) of the diffusers UNet parameter `key`, or None if it has no LDM place."""
        for old, new in _UNET_TOP.items():
            if key.startswith(old + "."):
                return new + key[len(old) :]
        match = _MID.fullmatch(key)
        if match:
            kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
            if kind == "resnets":
                return f"middle_block.{2 * index}.{_rename_head(rest, _UNET_RESNET)}"
            return f"middle_block.{2 * index + 1}.{rest}"
        match = _BLOCK.fullmatch(key)
        if not match:
            return None
        side, block, kind, layer, rest = _block_parts(match)
        if side == "down_blocks":
            if kind == "downsamplers":
                if not rest.startswith("conv."):
                    return None
                return f"input_blocks.{self.input_start[block] + self.down_layers[block]}.0.op.{rest[len('conv.') :]}"
            slot = 0 if kind == "resnets" else 1
            index = self.input_start[block] + layer
        else:
            if kind == "upsamplers":
                index = self.output_start[block] + self.up_layers[block] - 1
                slot = 2 if "CrossAttn" in self.up_types[block] else 1
                return f"output_blocks.{index}.{slot}.{rest}"
            slot = 0 if kind == "resnets" else 1
            index = self.output_start[block] + layer
        if kind == "resnets":
            rest = _rename_head(rest, _UNET_RESNET)
        return f"{'input_blocks' if side == 'down_blocks' else 'output_blocks'}.{index}.{slot}.{rest}"


def _vae_ldm_key(key: str, num_up_blocks: int) -> str | None:
    """The LDM name (without prefix) of the diffusers VAE parameter `key`, or None if it has no LDM place."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, _, key = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    if key.startswith(("conv_in.", "conv_out.", "conv_norm_out.")):
        return f"{part}.{_rename_head(key, _VAE_TOP)}"
    match = _MID.fullmatch(key)
    if match:
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "resnets":
            return f"{part}.mid.block_{index + 1}.{_rename_head(rest, _VAE_RESNET)}"
        return f"{part}.mid.attn_{index + 1}.{_rename_head(rest, _VAE_ATTENTION)}"
    match = _BLOCK.fullmatch(key)
    if not match:
        return None
    side, block, kind, layer, rest = _block_parts(match)
    if part == "encoder" and side == "down_blocks":
        level = f"down.{block}"
    elif part == "decoder" and side == "up_blocks":
        level = f"up.{num_up_blocks - 1 - block}"  # LDM numbers decoder levels from the lowest resolution up
    else:
        return None
    if kind == "resnets":
        return f"{part}.{level}.block.{layer}.{_rename_head(rest, _VAE_RESNET)}"
    if kind in ("downsamplers", "upsamplers") and layer == 0:
        return f"{part}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    return None


def _convert(
    state_dict: Mapping[str, torch.Tensor], rename, prefix: str, what: str, out: dict[str, torch.Tensor]
) -> None:
    unmapped = []
    for key, tensor in state_dict.items():
        new = rename(key)
        if new is None:
            unmapped.append(key)
            continue
        new = prefix + new
        if new in out:
            raise ValueError(f"{what} weights {key!r} and another both map to {new!r}")
        out[new] = tensor
    if unmapped:
        hint = " (unload or fuse LoRA adapters first)" if any("lora" in key for key in unmapped) else ""
        raise ValueError(
            f"{len(unmapped)} {what} weights have no place in an SD 1.x checkpoint{hint}: {', '.join(unmapped[:5])}"
        )


def ldm_state_dict(pipeline: Any) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text-encoder weights of an SD 1.x pipeline, renamed to the original LDM checkpoint layout."""
    family = detect_family(pipeline)
    if family is not SD1:
        raise ValueError(f"writing {family.label} models as single files is not supported yet; SD 1.x only")
    out: dict[str, torch.Tensor] = {}
    layout = _UnetLayout(pipeline.unet.config)
    _convert(pipeline.unet.state_dict(), layout.ldm_key, UNET_PREFIX, "UNet", out)

    vae_config = pipeline.vae.config
    vae: dict[str, torch.Tensor] = {}
    _convert(pipeline.vae.state_dict(), lambda k: _vae_ldm_key(k, len(vae_config.up_block_types)), "", "VAE", vae)
    for key, tensor in vae.items():
        if ".mid.attn_" in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # diffusers Linear -> LDM 1x1 conv
        out[VAE_PREFIX + key] = tensor

    def text_key(key: str) -> str:
        # transformers >= 5 flattened CLIPTextModel (no `text_model.` level); LDM checkpoints keep it.
        return key if key.startswith("text_model.") else "text_model." + key

    _convert(pipeline.text_encoder.state_dict(), text_key, TEXT_ENCODER_PREFIX, "text encoder", out)
    return out


def _load_components(model_dir: Path) -> SimpleNamespace:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not a diffusers folder (no model_index.json)")
    try:
        return SimpleNamespace(
            unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True),
            text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", use_safetensors=True),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not load the diffusers folder {model_dir}: {exc}") from exc


def save_single_file(
    model_dir_or_pipeline: str | os.PathLike | Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Atomically write an SD 1.x diffusers folder or pipeline as one LDM-layout .safetensors checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, not {path.name!r}")
    source = model_dir_or_pipeline
    if isinstance(source, (str, os.PathLike)):
        source = _load_components(Path(source))
    source = getattr(source, "pipeline", source)  # a studio.models.BaseModel
    tensors = {}
    for key, tensor in ldm_state_dict(source).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous().clone()  # own storage: safetensors refuses shared tensors
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{Path(path).name} is not a readable .safetensors checkpoint: {exc}") from exc


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", value)
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(dim, int) for dim in shape):
        return tuple(shape)
    return None


def detect_family_from_checkpoint(keys: Iterable[str] | Mapping[str, Any] | str | os.PathLike) -> ModelFamily:
    """Tell the family of an LDM-layout checkpoint from its key names (and shapes, if a mapping or file is given)."""
    if isinstance(keys, (str, os.PathLike)):
        keys = read_checkpoint_shapes(keys)
    shapes = {key: _shape(value) for key, value in keys.items()} if isinstance(keys, Mapping) else {}
    names = list(keys)

    def found(prefix: str) -> list[str]:
        return [key for key in names if key.startswith(prefix)]

    if sdxl := found("conditioner.embedders."):
        raise ValueError(
            f"SDXL checkpoints are not supported yet (found {len(sdxl)} conditioner.embedders.* keys, "
            f"e.g. {sdxl[0]!r}); this studio handles SD 1.x"
        )
    if open_clip := found("cond_stage_model.model."):
        raise ValueError(
            f"SD 2.x checkpoints are not supported yet (found {len(open_clip)} OpenCLIP cond_stage_model.model.* "
            f"keys, e.g. {open_clip[0]!r}); this studio handles SD 1.x"
        )
    widths = {
        shape[-1]
        for key, shape in shapes.items()
        if shape and key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
    }
    if widths & {1024}:
        raise ValueError("SD 2.x checkpoints are not supported yet (cross-attention keys are 1024 wide)")
    if widths & {2048, 1280}:
        raise ValueError(f"SDXL checkpoints are not supported yet (cross-attention keys are {max(widths)} wide)")
    if 768 in widths or found(TEXT_ENCODER_PREFIX):
        return SD1
    unet = found(UNET_PREFIX)
    if unet:
        raise ValueError(
            f"cannot tell the model family: {len(unet)} UNet keys but no text encoder and no 768-wide cross-attention"
        )
    sample = ", ".join(repr(key) for key in names[:3]) or "no keys"
    raise ValueError(f"not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys; found {sample})")
