"""Write SD 1.x / 2.x / SDXL diffusers pipelines as one original-layout .safetensors checkpoint, and sniff families.

The layout is the one A1111/ComfyUI and diffusers' `from_single_file` read: the UNet under `model.diffusion_model.`
(input_blocks / middle_block / output_blocks, SDXL's size conditioning in `label_emb`), the VAE under
`first_stage_model.`, and the text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.text_model.`, SD 2.x's
OpenCLIP under `cond_stage_model.model.` (q/k/v fused into `in_proj`), SDXL's CLIP-L under
`conditioner.embedders.0.transformer.text_model.` and OpenCLIP bigG under `conditioner.embedders.1.model.`. The mapping
is the inverse of diffusers' LDM -> diffusers conversion and is derived from the UNet/VAE configs, so it works for any
UNet of these families, not only the released block layouts.
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
from studio.models import SD1, SD2, SD2V, SDXL, ModelFamily, detect_family, folder_prediction_type

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# Where the original implementation lives, as SAI's model spec names it (kohya writes the same for checkpoints).
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size/crop embedding
    "add_embedding.linear_2": "label_emb.0.2",
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

_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_CLIP_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")

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


def _unmapped_error(unmapped: list[str], what: str, family: ModelFamily) -> ValueError:
    hint = " (unload or fuse LoRA adapters first)" if any("lora" in key for key in unmapped) else ""
    return ValueError(
        f"{len(unmapped)} {what} weights have no place in an {family.label} checkpoint{hint}: {', '.join(unmapped[:5])}"
    )


def _add(out: dict[str, torch.Tensor], key: str, tensor: torch.Tensor, what: str, source: str) -> None:
    if key in out:
        raise ValueError(f"{what} weights {source!r} and another both map to {key!r}")
    out[key] = tensor


def _convert(
    state_dict: Mapping[str, torch.Tensor],
    rename,
    prefix: str,
    what: str,
    out: dict[str, torch.Tensor],
    family: ModelFamily = SD1,
) -> None:
    unmapped = []
    for key, tensor in state_dict.items():
        new = rename(key)
        if new is None:
            unmapped.append(key)
            continue
        _add(out, prefix + new, tensor, what, key)
    if unmapped:
        raise _unmapped_error(unmapped, what, family)


def _clip_key(key: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no `text_model.` level); LDM checkpoints keep it.
    return key if key.startswith("text_model.") else "text_model." + key


def _open_clip_key(key: str) -> str | None:
    """The OpenCLIP name of a CLIP text-model weight other than q/k/v (which OpenCLIP fuses), or None."""
    key = key.removeprefix("text_model.")
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    if key == "text_projection.weight":
        return "text_projection"
    match = _CLIP_LAYER.fullmatch(key)
    if not match:
        return None
    layer, rest = match.groups()
    renamed = _rename_head(rest, _OPEN_CLIP_LAYER)
    return None if renamed == rest else f"transformer.resblocks.{layer}.{renamed}"


def _convert_open_clip(
    state_dict: Mapping[str, torch.Tensor], prefix: str, what: str, out: dict[str, torch.Tensor], family: ModelFamily
) -> None:
    """Write a CLIPTextModel(WithProjection) as OpenCLIP: q, k, v stacked into `in_proj`, the projection transposed."""
    unmapped, qkv = [], {}
    for key, tensor in state_dict.items():
        match = _CLIP_LAYER.fullmatch(key.removeprefix("text_model."))
        attention = _CLIP_QKV.fullmatch(match.group(2)) if match else None
        if attention:
            qkv.setdefault((match.group(1), attention.group(2)), {})[attention.group(1)] = tensor
            continue
        new = _open_clip_key(key)
        if new is None:
            unmapped.append(key)
        else:
            _add(out, prefix + new, tensor.T if new == "text_projection" else tensor, what, key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{what} layer {layer} has {kind}s for only {sorted(parts)} of q, k, v")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]])
        _add(out, f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", fused, what, f"layer {layer}")
    if unmapped:
        raise _unmapped_error(unmapped, what, family)


def ldm_state_dict(pipeline: Any) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text-encoder weights of an SD 1.x / 2.x / SDXL pipeline, renamed to the original layout."""
    family = detect_family(pipeline)
    out: dict[str, torch.Tensor] = {}
    layout = _UnetLayout(pipeline.unet.config)
    _convert(pipeline.unet.state_dict(), layout.ldm_key, UNET_PREFIX, "UNet", out, family)

    num_up_blocks = len(pipeline.vae.config.up_block_types)
    vae: dict[str, torch.Tensor] = {}
    _convert(pipeline.vae.state_dict(), lambda key: _vae_ldm_key(key, num_up_blocks), "", "VAE", vae, family)
    for key, tensor in vae.items():
        if ".mid.attn_" in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # diffusers Linear -> LDM 1x1 conv
        out[VAE_PREFIX + key] = tensor

    text = pipeline.text_encoder.state_dict()
    if family.is_sdxl:
        _convert(text, _clip_key, SDXL_CLIP_PREFIX, "text encoder", out, family)
        text_2 = pipeline.text_encoder_2.state_dict()
        _convert_open_clip(text_2, SDXL_OPEN_CLIP_PREFIX, "text encoder 2", out, family)
    elif family.lineage == "sd2":
        _convert_open_clip(text, OPEN_CLIP_PREFIX, "text encoder", out, family)
    else:
        _convert(text, _clip_key, TEXT_ENCODER_PREFIX, "text encoder", out, family)
    return out


def checkpoint_metadata(family: ModelFamily, title: str) -> dict[str, str]:
    """The SAI model-spec header of a full `family` checkpoint (architecture, resolution, prediction type)."""
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{family.resolution}x{family.resolution}",
        "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon",
    }


def _load_components(model_dir: Path) -> SimpleNamespace:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not a diffusers folder (no model_index.json)")
    # detect_family reads only the scheduler's prediction_type (SD 2.x 512/epsilon vs 768/v-prediction)
    prediction_type = folder_prediction_type(model_dir) or "epsilon"
    try:
        components = SimpleNamespace(
            unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True),
            text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", use_safetensors=True),
            scheduler=SimpleNamespace(config=SimpleNamespace(prediction_type=prediction_type)),
        )
        if (model_dir / "text_encoder_2").is_dir():
            components.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                model_dir, subfolder="text_encoder_2", use_safetensors=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not load the diffusers folder {model_dir}: {exc}") from exc
    return components


def save_single_file(
    model_dir_or_pipeline: str | os.PathLike | Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Atomically write an SD 1.x/2.x/SDXL diffusers folder or pipeline as one original-layout .safetensors file."""
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
    metadata = checkpoint_metadata(detect_family(source), path.stem)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _open_checkpoint(path: str | os.PathLike, read):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{Path(path).name} is not a readable .safetensors checkpoint: {exc}") from exc


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file, read from its header only."""
    return _open_checkpoint(
        path,
        lambda handle: {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()},  # noqa: SIM118
    )


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata (`__metadata__`) of a .safetensors file's header; empty if it has none."""
    return _open_checkpoint(path, lambda handle: dict(handle.metadata() or {}))


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", value)
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(dim, int) for dim in shape):
        return tuple(shape)
    return None


def _metadata_prediction_type(metadata: Mapping[str, str]) -> str | None:
    """The prediction type ("epsilon" / "v_prediction") a checkpoint's model-spec header declares, else None."""
    declared = metadata.get("modelspec.prediction_type", "")
    if declared in ("v", "v_prediction"):
        return "v_prediction"
    if declared == "epsilon":
        return "epsilon"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith(SD2V.modelspec_architecture):
        return "v_prediction"
    if architecture.startswith(SD2.modelspec_architecture):
        return "epsilon"
    return None


def _sibling_config_prediction_type(path: str | os.PathLike) -> str | None:
    """A1111's convention: an LDM `<checkpoint name>.yaml` beside the file, `parameterization: "v"` for 768-v models."""
    try:
        text = Path(path).with_suffix(".yaml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
    return "v_prediction" if match and match.group(1) == "v" else "epsilon"  # LDM's default is "eps"


def detect_family_from_checkpoint(
    keys: Iterable[str] | Mapping[str, Any] | str | os.PathLike,
    prediction_type: str | None = None,
    fallback_prediction_type: str = "v_prediction",
) -> ModelFamily:
    """Tell the family of an LDM/SGM-layout checkpoint from its key names (and shapes, if a mapping or file is given).

    SD 2.x 512/epsilon and 768/v-prediction share every key: `prediction_type` decides, else a file's model-spec
    metadata, else an LDM `.yaml` config of the same name beside the file (A1111's convention), else
    `fallback_prediction_type`.
    """
    metadata: Mapping[str, str] = {}
    sibling_prediction_type = None
    if isinstance(keys, (str, os.PathLike)):
        metadata = read_checkpoint_metadata(keys)
        sibling_prediction_type = _sibling_config_prediction_type(keys)
        keys = read_checkpoint_shapes(keys)
    shapes = {key: _shape(value) for key, value in keys.items()} if isinstance(keys, Mapping) else {}
    names = list(keys)

    def found(prefix: str) -> list[str]:
        return [key for key in names if key.startswith(prefix)]

    def sd2() -> ModelFamily:
        chosen = (
            prediction_type
            or _metadata_prediction_type(metadata)
            or sibling_prediction_type
            or fallback_prediction_type
        )
        return SD2V if chosen == "v_prediction" else SD2

    if conditioner := found("conditioner.embedders."):
        if found(SDXL_OPEN_CLIP_PREFIX):
            return SDXL
        raise ValueError(
            f"unsupported SGM checkpoint (found {len(conditioner)} conditioner.embedders.* keys, e.g. "
            f"{conditioner[0]!r}, but no {SDXL_OPEN_CLIP_PREFIX}*): an SDXL refiner? Only SDXL base models are handled"
        )
    if found(OPEN_CLIP_PREFIX):
        return sd2()
    widths = {
        shape[-1]
        for key, shape in shapes.items()
        if shape and key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
    }
    if 2048 in widths:
        return SDXL
    if 1280 in widths:
        raise ValueError("SDXL refiner checkpoints are not supported (cross-attention keys are 1280 wide)")
    if 1024 in widths:
        return sd2()
    if 768 in widths or found(TEXT_ENCODER_PREFIX):
        return SD1
    unet = found(UNET_PREFIX)
    if unet:
        raise ValueError(
            f"cannot tell the model family: {len(unet)} UNet keys but no text encoder and no cross-attention width "
            "of a known family (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)"
        )
    sample = ", ".join(repr(key) for key in names[:3]) or "no keys"
    raise ValueError(f"not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys; found {sample})")


def sdxl_text_encoder_2_if_ambiguous(
    path: str | os.PathLike, config_dir: str | os.PathLike, torch_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """{"text_encoder_2": model} for an SDXL file whose two text encoders are equally wide, else {}.

    diffusers picks the checkpoint part for `text_encoder_2` by width and so would load CLIP-L into it when both
    are as wide (never so in released SDXL models, always in tiny test ones); here it is read from its own keys.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shapes = read_checkpoint_shapes(path)
    clip_width = shapes.get(SDXL_CLIP_PREFIX + "text_model.embeddings.position_embedding.weight", (0,))[-1]
    if clip_width != shapes.get(SDXL_OPEN_CLIP_PREFIX + "positional_embedding", (-1,))[-1]:
        return {}
    config = CLIPTextConfig.from_pretrained(Path(config_dir) / "text_encoder_2", local_files_only=True)
    model = CLIPTextModelWithProjection(config)
    state = load_file(str(path))
    model.load_state_dict(convert_open_clip_checkpoint(model, state, prefix=SDXL_OPEN_CLIP_PREFIX), strict=True)
    return {"text_encoder_2": model.to(torch_dtype).eval()}
