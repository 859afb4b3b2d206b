"""Adapter files: kohya/CivitAI export from PEFT adapters, metadata, hashes, and reading them back."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from studio import atomic
from studio.models import PICKLE_SUFFIXES, ModelFamily

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Metadata that reveals the artist's captions and folder names; left out of a private export.
DATASET_METADATA_KEYS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_datasets")
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000
WHOLE_READ_BYTES = 256 << 20  # adapters up to this size are read in one piece (larger ones tensor by tensor)


def sgm_module_path(unet_config: Mapping[str, Any], module_path: str) -> str | None:
    """The SGM/LDM path of a UNet module given by its diffusers path (input_blocks.4.1...), or None if it has none."""
    layers = unet_config["layers_per_block"]
    layout = _unet_layout(
        len(unet_config["block_out_channels"]),
        layers if isinstance(layers, int) else tuple(layers),
        tuple(unet_config["up_block_types"]),
    )
    key = layout.ldm_key(module_path + ".weight")
    return key[: -len(".weight")] if key is not None else None


@lru_cache(maxsize=8)
def _unet_layout(blocks: int, layers_per_block: int | tuple[int, ...], up_block_types: tuple[str, ...]):
    """The block layout (all it depends on: block count, layers per block, up-block types), built once per shape."""
    from studio.convert import _UnetLayout

    return _UnetLayout(
        {
            "block_out_channels": [0] * blocks,
            "layers_per_block": layers_per_block,
            "up_block_types": list(up_block_types),
        }
    )


def kohya_unet_name(family: ModelFamily, module_path: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """The kohya module name of a UNet module given by its diffusers path (SGM-named for SDXL: FORMATS.md)."""
    if family.kohya_unet_naming == "sgm":
        if unet_config is None:
            raise ValueError(f"{family.label} kohya names follow the SGM layout, which needs the UNet's config")
        sgm_path = sgm_module_path(unet_config, module_path)
        if sgm_path is None:
            raise ValueError(f"UNet module {module_path} has no place in the SGM layout kohya names {family.label} by")
        module_path = sgm_path
    return "lora_unet_" + module_path.replace(".", "_")


def kohya_te_name(family: ModelFamily, index: int, module_path: str) -> str:
    """The kohya module name of a module of text encoder `index`, whatever transformers' nesting."""
    root = family.kohya_te_roots[index] if index < len(family.kohya_te_roots) else family.kohya_te_roots[0]
    return te_kohya_name(family.kohya_te_prefix(index), module_path, root)


def _peft_modules(model: torch.nn.Module, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> (down, up, alpha) for every LoRA layer of `adapter_name` in `model`."""
    from peft.tuners.lora import LoraLayer

    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        down = module.lora_A[adapter_name].weight.detach()
        up = module.lora_B[adapter_name].weight.detach()
        # kohya applies (alpha / rank) * up @ down; express PEFT's scaling (plain or rsLoRA) as that alpha
        alpha = module.scaling[adapter_name] * module.r[adapter_name]
        modules[name.removeprefix("base_model.model.")] = (down, up, float(alpha))
    return modules


def kohya_state_dict(
    family: ModelFamily,
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """The adapter `adapter_name` of the UNet and text encoders as kohya tensors (down, up, alpha per module)."""
    modules: dict[str, LoraModule] = {}
    for path, (down, up, alpha) in _peft_modules(unet, adapter_name).items():
        modules[kohya_unet_name(family, path, unet.config)] = LoraModule(down.clone(), up.clone(), alpha)
    for index, text_encoder in enumerate(text_encoders):
        for path, (down, up, alpha) in _peft_modules(text_encoder, adapter_name).items():
            modules[kohya_te_name(family, index, path)] = LoraModule(down.clone(), up.clone(), alpha)
    tensors = modules_to_tensors(modules)
    if not tensors:
        raise ValueError(f"no LoRA layers named {adapter_name!r} found in the model")
    return tensors


def payload_offset(data: bytes) -> int:
    """Byte offset where a serialised safetensors file's tensor payload starts."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    return 8 + header_len


def model_hash(data: bytes) -> str:
    """SHA-256 of the tensor payload (kohya `sshs_model_hash`, CivitAI AutoV3)."""
    return hashlib.sha256(data[payload_offset(data) :]).hexdigest()


def legacy_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """kohya `sshs_legacy_hash`: 8 hex of SHA-256 of 64 KiB at 1 MiB into the file with training metadata only."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors_save(dict(tensors), training_only)
    return hashlib.sha256(data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]


def file_hashes(path: str | Path) -> dict[str, str]:
    """The hashes CivitAI shows for a file: SHA256, AutoV1, AutoV2, AutoV3 (and A1111's 12-hex LoRA hash)."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    autov3 = model_hash(data)
    return {
        "SHA256": sha,
        "AutoV1": hashlib.sha256(data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8],
        "AutoV2": sha[:10],
        "AutoV3": autov3,
        "a1111_short": autov3[:12],
    }


def save_adapter(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: str = "fp16",
) -> dict[str, str]:
    """Write a kohya adapter atomically in `dtype`, with sshs_* hashes added; return the written metadata."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings: {', '.join(bad)}")
    cast = {k: v.detach().to("cpu", SAVE_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    for key, value in cast.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"refusing to save: tensor {key} has NaN or Inf values")
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    probe = safetensors_save(cast, meta)
    meta["sshs_model_hash"] = model_hash(probe)
    meta["sshs_legacy_hash"] = legacy_hash(cast, meta)
    atomic.write_bytes(path, safetensors_save(cast, meta))
    return meta


@dataclass
class AdapterFile:
    """An adapter read from disk: its tensors and its header metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def module_names(self) -> list[str]:
        """The kohya module names in the file (keys without .lora_down/.lora_up/.alpha)."""
        names = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in self.tensors}
        return sorted(names)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file, read from its header without loading any tensor."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path.name}: {path.suffix} files are Python pickles; only .safetensors are read")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{path.name} is not a readable .safetensors file: {exc}") from exc


def read_adapter(path: str | Path) -> AdapterFile:
    """Read a .safetensors adapter without executing anything; refuse pickle-based formats."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name}: {path.suffix} files are Python pickles that can run arbitrary code when loaded; "
            "only .safetensors adapters are accepted"
        )
    if not path.is_file():
        raise ValueError(f"adapter file not found: {path}")
    try:
        if path.stat().st_size <= WHOLE_READ_BYTES:  # one deserialisation call: 3-4x faster than tensor by tensor
            data = path.read_bytes()
            tensors = dict(sorted(safetensors_load(data).items()))  # the name order safe_open gives
            header_length = struct.unpack("<Q", data[:8])[0]
            metadata = dict(json.loads(data[8 : 8 + header_length]).get("__metadata__") or {})
        else:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{path.name} is not a readable .safetensors file: {exc}") from exc
    return AdapterFile(path=path, tensors=tensors, metadata=metadata)


def _non_finite(tensors: Iterable[torch.Tensor]) -> set[int]:
    """ids of the float tensors that hold NaN or Inf: one fused norm over all of them, exact checks of suspects only
    (a half-precision norm can overflow on finite values, so a suspect is never refused on its norm alone)."""
    floats = [t for t in tensors if t.is_floating_point() and t.numel() > 0]
    if not floats:
        return set()
    norms = torch.stack(torch._foreach_norm(floats))  # what clip_grad_norm_ uses: one call for the whole list
    suspects = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    return {id(floats[i]) for i in suspects if not floats[i].isfinite().all()}


def training_metadata(
    family: ModelFamily,
    *,
    rank: int,
    alpha: float,
    network_args: Mapping[str, object],
    title: str,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    trigger_phrase: str | None = None,
    training: Mapping[str, object] | None = None,
    dataset: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """kohya `ss_*` and SAI ModelSpec metadata for an adapter of `family` (values are strings)."""
    resolution = resolution or family.resolution
    now = dt.datetime.now(dt.timezone.utc)
    meta: dict[str, str] = {
        "ss_v2": str(family.ss_v2),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(dict(network_args)) if network_args else "None",
        "ss_output_name": title,
        "ss_resolution": f"({resolution}, {resolution})",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    for key, value in (training or {}).items():
        meta[f"ss_{key}"] = value if isinstance(value, str) else _num(value)
    for key, value in (dataset or {}).items():
        meta[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _num(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def strip_dataset_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata without the keys that reveal captions and dataset folder names."""
    return {k: v for k, v in metadata.items() if k not in DATASET_METADATA_KEYS}


def export_adapter(
    source: str | Path,
    destination: str | Path,
    *,
    include_dataset_metadata: bool = True,
    dtype: str | None = None,
    title: str | None = None,
    metadata_updates: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Re-write an adapter file as a CivitAI-ready kohya file; optionally private, retitled, recast or with new keys."""
    adapter = read_adapter(source)
    metadata = dict(adapter.metadata)
    if not include_dataset_metadata:
        metadata = strip_dataset_metadata(metadata)
    metadata.update(metadata_updates or {})
    if title:
        metadata["ss_output_name"] = title
        metadata["modelspec.title"] = title
    if dtype is None:
        first = next(iter(adapter.tensors.values()))
        dtype = {v: k for k, v in SAVE_DTYPES.items()}.get(first.dtype, "fp16")
    if Path(source).resolve() == Path(destination).resolve():
        raise ValueError("export destination is the source file; choose another path")
    return save_adapter(destination, adapter.tensors, metadata, dtype=dtype)


# ----------------------------------------------------------------------------- import: any LoRA file -> kohya modules

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LYCORIS_MARKERS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "lokr_t2", "dora_scale", ".diff", ".diff_b")


@dataclass
class LoraModule:
    """One adapted module: down [r, in, (k, k)], up [out, r, (1, 1)] and alpha; update = (alpha / r) up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The module's rank r."""
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / r."""
        return self.alpha / self.rank

    def delta(self, weight_shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """The full fp32 weight update (alpha / r) * up @ down, shaped like the module's weight."""
        update = self.up.float().flatten(1) @ self.down.float().flatten(1) * self.scale
        if weight_shape is None:
            weight_shape = (self.up.shape[0], *self.down.shape[1:])
        return update.reshape(weight_shape)


@dataclass
class ParsedAdapter:
    """An adapter file turned into data: kohya-named modules, the keys we could not interpret, and its facts."""

    path: Path
    format: str
    modules: dict[str, LoraModule]
    unknown_keys: list[str]
    metadata: dict[str, str]
    family: str | None
    payload_hash: str

    @property
    def name(self) -> str:
        """The adapter's name: its file stem."""
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """A1111's LoRA short hash (the first 12 hex of the payload SHA-256, CivitAI AutoV3)."""
        return self.payload_hash[:12]

    def ranks(self) -> list[int]:
        """Distinct ranks of the modules, sorted."""
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        """Distinct alphas of the modules, sorted."""
        return sorted({m.alpha for m in self.modules.values()})

    def counts(self) -> dict[str, int]:
        """Module counts by component prefix (unet, te, te1, te2)."""
        out: dict[str, int] = {}
        for name in self.modules:
            part = name.split("_")[1] if name.startswith("lora_") else "other"
            out[part] = out.get(part, 0) + 1
        return out


def te_kohya_name(prefix: str, path: str, root: str = "text_model.") -> str:
    """A text-encoder module's kohya name under `prefix`, with the `text_model.` level kohya expects."""
    if not path.startswith(root):
        path = root + path
    return prefix + path.replace(".", "_")


_PEFT_COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_OLD_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


_PEFT_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)


def _peft_key_to_kohya(key: str) -> tuple[str, str] | None:
    """(kohya module name, part) for a diffusers/PEFT style key, or None if it is not one."""
    match = next(((s, p) for s, p in _PEFT_SUFFIXES if key.endswith(s)), None)
    if match is None:
        return None
    suffix, part = match
    path = key[: -len(suffix)]
    component, _, rest = path.partition(".")
    if component not in _PEFT_COMPONENTS:  # very old diffusers attention-processor files have no prefix
        component, rest = "unet", path
    if ".processor." in rest:
        head, _, proc = rest.partition(".processor.")
        if proc not in _OLD_PROCESSOR:
            return None
        rest = f"{head}.{_OLD_PROCESSOR[proc]}"
    elif suffix in (".down.weight", ".up.weight"):
        return None
    prefix = _PEFT_COMPONENTS[component]
    name = prefix + rest.replace(".", "_") if component == "unet" else te_kohya_name(prefix, rest)
    return name, part


def _family_hint(modules: dict[str, LoraModule]) -> str | None:
    """sd1 / sd2 / sdxl from prefixes and widths where they are unambiguous; None when unknown (tiny models)."""
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in modules):
        return "sdxl"
    widths = {m.down.shape[1] for n, m in modules.items() if n.endswith("attn2_to_k")}
    te_widths = {m.down.shape[1] for n, m in modules.items() if n.startswith("lora_te_") and n.endswith("q_proj")}
    if 2048 in widths:
        return "sdxl"
    if 1024 in widths or 1024 in te_widths:
        return "sd2"
    if 768 in widths or 768 in te_widths:
        return "sd1"
    return None


def parse_adapter(path: str | Path) -> ParsedAdapter:
    """Read any SD LoRA file (kohya/CivitAI, diffusers/PEFT, old diffusers) into kohya-named modules."""
    adapter = read_adapter(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    formats = set()
    for key, tensor in adapter.tensors.items():
        if any(marker in key for marker in LYCORIS_MARKERS):
            unknown.append(f"{key} (LyCORIS/DoRA tensors are not supported)")
            continue
        if key.startswith(KOHYA_PREFIXES):
            name, _, rest = key.partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
            if part is None:
                unknown.append(key)
                continue
            formats.add("kohya")
        else:
            mapped = _peft_key_to_kohya(key)
            if mapped is None:
                unknown.append(key)
                continue
            name, part = mapped
            formats.add("diffusers")
        parts.setdefault(name, {})[part] = tensor
    modules: dict[str, LoraModule] = {}
    non_finite = _non_finite(adapter.tensors.values())
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            unknown += [f"{name} ({'down' if 'down' not in found else 'up'} matrix missing)"]
            continue
        problem = _module_problem(found, non_finite)
        if problem:
            raise ValueError(f"{Path(path).name} is not a LoRA adapter we can read: module {name} {problem}")
        down, up = found["down"], found["up"]
        alpha = float(found["alpha"].item()) if "alpha" in found else float(down.shape[0])
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    if not modules:
        example = ", ".join(unknown[:3]) or "no tensors"
        raise ValueError(f"{Path(path).name} is not a LoRA adapter we can read ({example})")
    data_hash = _payload_hash(Path(path))
    fmt = "+".join(sorted(formats))
    return ParsedAdapter(Path(path), fmt, modules, unknown, adapter.metadata, _family_hint(modules), data_hash)


def _module_problem(found: Mapping[str, torch.Tensor], non_finite: set[int]) -> str | None:
    """What is wrong with one module's down / up / alpha tensors (dtype, shape, NaN/Inf: ids in `non_finite`)."""
    down, up = found["down"], found["up"]
    for part, tensor in (("down", down), ("up", up)):
        if not tensor.is_floating_point():
            return f"has {part} weights of dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA weights are floats"
        if tensor.dim() not in (2, 4):
            return f"has a {tensor.dim()}-dimensional {part} matrix {tuple(tensor.shape)} (expected 2 or 4 dimensions)"
        if id(tensor) in non_finite:
            return f"has NaN or Inf values in its {part} matrix"
    if up.dim() != down.dim() or down.shape[0] != up.shape[1] or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        return f"has inconsistent shapes: down {tuple(down.shape)}, up {tuple(up.shape)}"
    alpha = found.get("alpha")
    if alpha is not None:
        if alpha.numel() != 1 or alpha.dtype == torch.bool or alpha.is_complex():
            return f"has an alpha that is not one number (shape {tuple(alpha.shape)}, dtype {alpha.dtype})"
        if id(alpha) in non_finite:
            return "has a NaN or Inf alpha"
    return None


def _payload_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + header_len)
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def modules_to_tensors(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Kohya tensors (down, up, alpha per module) for `modules`, ready for `save_adapter`."""
    tensors = {}
    for name, module in modules.items():
        tensors[f"{name}.lora_down.weight"] = module.down.float().contiguous()
        tensors[f"{name}.lora_up.weight"] = module.up.float().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return tensors
