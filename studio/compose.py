"""An adapter stack on a pipeline: match files to modules, weight per component, enable/disable, fuse exactly."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from studio.adapters import (
    LoraModule,
    ParsedAdapter,
    kohya_te_name,
    parse_adapter,
    sgm_module_path,
    te_kohya_name,
)
from studio.infotext import civitai_lora_name
from studio.models import BaseModel


@dataclass
class MatchedAdapter:
    """A parsed adapter matched against one base model: (component, module path) -> module, plus what did not fit."""

    parsed: ParsedAdapter
    patches: dict[tuple[str, str], LoraModule]
    unmatched: list[str]

    @property
    def name(self) -> str:
        """The adapter's name (its file stem)."""
        return self.parsed.name

    def components(self) -> set[str]:
        """The pipeline components this adapter touches (unet, text_encoder)."""
        return {component for component, _ in self.patches}


def _adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and "lora_" not in path:
            yield path.replace(".base_layer", ""), module


def module_lookup(base: BaseModel) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya module name -> (component attribute, module path, module) for every Linear/Conv2d of the base."""
    table = base.extra.get("kohya_lookup")
    if table is not None:
        return table
    table, aliases = {}, {}
    family, config = base.family, base.unet.config
    for path, module in _adaptable_modules(base.unet):
        found = ("unet", path, module)
        sgm_path = sgm_module_path(config, path)
        names = {"diffusers": "lora_unet_" + path.replace(".", "_")}
        if sgm_path is not None:
            names["sgm"] = "lora_unet_" + sgm_path.replace(".", "_")
        if family.kohya_unet_naming not in names:
            continue  # no kohya name exists for it, so no file can address it
        table[names.pop(family.kohya_unet_naming)] = found
        # Files in the wild also name UNet modules the other way (diffusers-format SDXL files, LDM-named SD1 files).
        aliases.update(dict.fromkeys(names.values(), found))
    for index, attr in enumerate(family.text_encoder_attrs):
        for path, module in _adaptable_modules(getattr(base.pipeline, attr)):
            found = (attr, path, module)
            table[kohya_te_name(family, index, path)] = found
            if index == 0:  # diffusers-format files call the first text encoder lora_te_ in every family
                aliases[te_kohya_name("lora_te_", path)] = found
    for name, found in aliases.items():
        table.setdefault(name, found)
    base.extra["kohya_lookup"] = table
    return table


def _fits(module: nn.Module, lora: LoraModule) -> str | None:
    """Why `lora` does not fit `module`, or None if it does."""
    weight = module.weight
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    if lora.down.shape[1] != in_dim or lora.up.shape[0] != out_dim:
        lora_shape = f"{lora.up.shape[0]}x{lora.down.shape[1]}"
        return f"shape {lora_shape} does not match the module's {out_dim}x{in_dim}"
    if isinstance(module, nn.Conv2d) and tuple(lora.down.shape[2:]) != tuple(weight.shape[2:]):
        return f"kernel {tuple(lora.down.shape[2:])} does not match the module's {tuple(weight.shape[2:])}"
    if isinstance(module, nn.Linear) and lora.down.dim() != 2:
        return "a conv LoRA on a linear layer"
    return None


def match_adapter(parsed: ParsedAdapter, base: BaseModel) -> MatchedAdapter:
    """Match a parsed adapter to `base`; refuse another family or a file that matches nothing (nothing is touched)."""
    if parsed.family is not None and parsed.family != base.family.lineage:
        raise ValueError(
            f"{parsed.path.name} is a LoRA for {parsed.family.upper()} models; the base model is {base.family.label}"
        )
    lookup = module_lookup(base)
    patches, unmatched = {}, list(parsed.unknown_keys)
    for name, lora in parsed.modules.items():
        found = lookup.get(name)
        if found is None:
            unmatched.append(f"{name} (no such module in the base model)")
            continue
        component, path, module = found
        problem = _fits(module, lora)
        if problem:
            unmatched.append(f"{name} ({problem})")
            continue
        patches[(component, path)] = lora
    if not patches:
        examples = "; ".join(unmatched[:3])
        raise ValueError(
            f"{parsed.path.name} matches nothing in this {base.family.label} base model "
            f"({len(unmatched)} unmatched, e.g. {examples})"
        )
    return MatchedAdapter(parsed=parsed, patches=patches, unmatched=unmatched)


def load_adapter(path: str | Path, base: BaseModel) -> MatchedAdapter:
    """Parse and match an adapter file for `base` (reads only; the pipeline is not touched)."""
    return match_adapter(parse_adapter(path), base)


@dataclass
class StackEntry:
    """One adapter in a stack: its weights per component, whether it is on, and whether PEFT layers hold it."""

    adapter: MatchedAdapter
    te_weight: float = 1.0
    unet_weight: float = 1.0
    enabled: bool = True
    installed: bool = True

    @property
    def active(self) -> bool:
        """True if the adapter is on and has a non-zero weight somewhere."""
        return self.enabled and (self.te_weight != 0 or self.unet_weight != 0)


@dataclass
class _Fusion:
    """Merged weights for one stack state: per adapted module, (its weight parameter, the merged tensor, the base
    tensor it stands in for, that tensor's in-place version counter when merged)."""

    key: tuple
    components: tuple[nn.Module, ...]  # the pipeline's UNet and text encoders when merged
    swaps: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, int]]


@dataclass
class AdapterStack:
    """Adapters installed on a base model's pipeline as PEFT layers, reweighted cheaply, fused exactly on demand.

    An adapter added with `install=False` stays data until an unfused run needs PEFT layers (`ensure_installed`);
    a fused run never does, which makes switching stacks cheap. Fused weights are cached while the stack is unchanged.
    """

    base: BaseModel
    entries: dict[str, StackEntry] = field(default_factory=dict)
    _fusion: _Fusion | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------- membership
    def add(
        self,
        adapter: MatchedAdapter,
        weight: float = 1.0,
        unet_weight: float | None = None,
        name: str | None = None,
        *,
        install: bool = True,
    ) -> str:
        """Add `adapter` under `name` (default: its file stem) with text-encoder `weight` and UNet weight.

        `install=False` defers the PEFT layers until an unfused run asks for them (see `ensure_installed`)."""
        slot = civitai_lora_name(name or adapter.name)
        if slot in self.entries:
            raise ValueError(f"an adapter named {slot!r} is already in the stack")
        _check_weight(weight)
        _check_weight(unet_weight)
        if install:
            self._install(slot, adapter)
        self.entries[slot] = StackEntry(
            adapter, weight, weight if unet_weight is None else unet_weight, installed=install
        )
        if install:
            self._activate()
        return slot

    def ensure_installed(self) -> None:
        """Give every deferred adapter its PEFT layers, so the pipeline computes the stack without fusing."""
        pending = [(name, entry) for name, entry in self.entries.items() if not entry.installed]
        for name, entry in pending:
            self._install(name, entry.adapter)
            entry.installed = True
        if pending:
            self._activate()

    def remove(self, name: str) -> None:
        """Take an adapter out of the stack and off the pipeline."""
        entry = self._entry(name)
        if entry.installed:
            for model in self._models():
                _delete_adapter(model, name)
        del self.entries[name]
        self._fusion = None
        if entry.installed:
            self._activate()

    def clear(self) -> None:
        """Remove every adapter and the PEFT wrappers: the pipeline is exactly the base model as loaded."""
        for name in list(self.entries):
            self.remove(name)
        for model in self._models():
            _strip_peft(model)

    # ------------------------------------------------------------- weights
    def set_weight(self, name: str, weight: float, unet_weight: float | None = None) -> None:
        """Reweight an adapter (text encoder `weight`, UNet `unet_weight`, default the same)."""
        entry = self._entry(name)
        _check_weight(weight)
        _check_weight(unet_weight)
        unet_weight = weight if unet_weight is None else unet_weight
        if (entry.te_weight, entry.unet_weight) == (weight, unet_weight):
            return
        entry.te_weight, entry.unet_weight = weight, unet_weight
        if entry.installed:
            self._activate()

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Switch an adapter on or off without unloading it."""
        entry = self._entry(name)
        if entry.enabled == enabled:
            return
        entry.enabled = enabled
        if entry.installed:
            self._activate()

    def active(self) -> list[tuple[str, StackEntry]]:
        """The adapters that currently change the output, in stack order."""
        return [(n, e) for n, e in self.entries.items() if e.active]

    # ------------------------------------------------------------- fusing
    @contextlib.contextmanager
    def fused(self) -> Iterator[None]:
        """Run with the active stack merged into the base weights; the exact original tensors are back after.

        The merged weights are computed once per stack state and kept while the stack is unchanged, so a repeated
        run only swaps tensors in and out; the base tensors themselves are never written to."""
        swaps = self._fuse()
        peft = any(entry.installed for entry in self.entries.values())
        try:
            with torch.no_grad():
                for param, merged, _, _ in swaps:
                    param.data = merged
            if peft:
                self._set_lora_enabled(False)
            yield
        finally:
            with torch.no_grad():
                for param, _, original, _ in swaps:
                    param.data = original
            if peft:
                self._activate()

    def _fuse(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, int]]:
        """The cached merged weights of the active stack, rebuilt if the stack or the base tensors changed."""
        key = tuple((name, id(entry.adapter), entry.te_weight, entry.unet_weight) for name, entry in self.active())
        if not self._fusion_valid(key):
            self._fusion = None  # free the old merged weights before making new ones
            swaps = [
                (self._base_layer(c, p).weight, merged, original, original._version)
                for (c, p), (merged, original) in self._merge().items()
            ]
            self._fusion = _Fusion(key, tuple(self._models()), swaps)
        return self._fusion.swaps

    def _fusion_valid(self, key: tuple) -> bool:
        fusion = self._fusion
        if fusion is None or fusion.key != key or fusion.components != tuple(self._models()):
            return False
        # the pipeline may have been moved or edited since: the cache stands only for the very same, unchanged tensors
        return all(
            param.data_ptr() == original.data_ptr() and original._version == version
            for param, _, original, version in fusion.swaps
        )

    def _merge(self) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
        """Base weight + sum of weight * (alpha / r) * up @ down over the active stack, per adapted module."""
        merged: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for _, entry in self.active():
                for (component, path), lora in entry.adapter.patches.items():
                    weight = entry.unet_weight if component == "unet" else entry.te_weight
                    if weight == 0:
                        continue
                    if (component, path) not in merged:
                        original = self._base_layer(component, path).weight.detach()
                        merged[(component, path)] = (original.to(torch.float32, copy=True), original)
                    total = merged[(component, path)][0]
                    up, down = lora.up.flatten(1).to(total), lora.down.flatten(1).to(total)
                    total.view(total.shape[0], -1).addmm_(up, down, alpha=lora.scale * weight)
            for (component, path), (total, original) in merged.items():
                if not torch.isfinite(total).all():
                    raise ValueError(f"fusing the stack gives NaN/Inf weights in {component}.{path}")
                merged[(component, path)] = (total.to(original.dtype), original)
        return merged

    # ------------------------------------------------------------- internals
    def _entry(self, name: str) -> StackEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(
                f"no adapter named {name!r} in the stack (have: {', '.join(self.entries) or 'none'})"
            ) from None

    def _models(self) -> list[nn.Module]:
        return [self.base.unet, *self.base.text_encoders]

    def _component(self, component: str) -> nn.Module:
        return getattr(self.base.pipeline, component)

    def _base_layer(self, component: str, path: str) -> nn.Module:
        # PEFT wraps a layer but keeps the original as its base layer, so the original can be remembered
        layers = self.base.extra.setdefault("base_layers", {})
        layer = layers.get((component, path))
        if layer is None:
            module = self._component(component).get_submodule(path)
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            layers[(component, path)] = layer
        return layer

    def _install(self, slot: str, adapter: MatchedAdapter) -> None:
        """Add PEFT layers for `adapter` to each component it touches; on any failure remove them all again."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        by_component: dict[str, dict[str, LoraModule]] = {}
        for (component, path), lora in adapter.patches.items():
            by_component.setdefault(component, {})[path] = lora
        installed = []
        try:
            for component, modules in by_component.items():
                model = self._component(component)
                ranks = {path: lora.rank for path, lora in modules.items()}
                config = LoraConfig(
                    r=max(ranks.values()),
                    lora_alpha=max(ranks.values()),
                    target_modules=sorted(modules),
                    rank_pattern={re.escape(p): r for p, r in ranks.items()},
                    alpha_pattern={re.escape(p): lora.alpha for p, lora in modules.items()},
                )
                with warnings.catch_warnings():  # several adapters per model is what a stack is for
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    model.add_adapter(config, adapter_name=slot)
                installed.append(model)
                state = {}
                for path, lora in modules.items():
                    state[f"{path}.lora_A.weight"] = lora.down
                    state[f"{path}.lora_B.weight"] = lora.up
                result = set_peft_model_state_dict(model, state, adapter_name=slot)
                unexpected = getattr(result, "unexpected_keys", []) or []
                if unexpected:
                    raise ValueError(f"{len(unexpected)} LoRA tensors were not taken by {component}: {unexpected[:3]}")
                self._check_scaling(model, slot, modules)
        except Exception:
            for model in installed:
                _delete_adapter(model, slot)
                if not getattr(model, "peft_config", None):  # nothing else installed: leave no empty wrappers
                    _strip_peft(model)
            self._activate()
            raise

    @staticmethod
    def _check_scaling(model: nn.Module, slot: str, modules: dict[str, LoraModule]) -> None:
        for path, lora in modules.items():
            layer = model.get_submodule(path)
            if not abs(layer.scaling[slot] - lora.scale) <= 1e-6 * max(1.0, abs(lora.scale)):  # NaN fails too
                raise ValueError(f"PEFT scaled {path} by {layer.scaling[slot]}, expected alpha/r = {lora.scale}")

    def _set_lora_enabled(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in self._models():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.enable_adapters(enabled)

    def _activate(self) -> None:
        """Make PEFT compute exactly the active adapters at their weights."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        active = dict(self.active())
        for model in self._models():
            component = "unet" if model is self.base.unet else "text_encoder"
            for module in model.modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                names = [n for n in module.lora_A if n in active]
                if not names:
                    module.enable_adapters(False)
                    continue
                module.enable_adapters(True)
                module.set_adapter(names)
                for name in names:
                    entry = active[name]
                    module.set_scale(name, entry.unet_weight if component == "unet" else entry.te_weight)
                # set_adapter marks adapters trainable; a generation stack has nothing to train
                for param in module.parameters():
                    param.requires_grad_(False)


def _strip_peft(model: nn.Module) -> None:
    """Remove every PEFT wrapper and config from `model`, leaving its original modules."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def _delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from a diffusers or transformers model, if it has it."""
    if name not in getattr(model, "peft_config", {}):
        return
    if hasattr(model, "delete_adapters"):
        model.delete_adapters(name)
    else:
        model.delete_adapter(name)


def _check_weight(weight: float | None) -> None:
    if weight is None:
        return
    if not isinstance(weight, (int, float)) or not -10.0 <= float(weight) <= 10.0 or weight != weight:
        raise ValueError(f"adapter weight must be a number between -10 and 10, got {weight!r}")
