"""Merge several adapters into one file: exactly (ranks concatenated) or by SVD to a chosen rank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.adapters import LoraModule, ParsedAdapter, modules_to_tensors, parse_adapter, save_adapter
from studio.models import FAMILIES


@dataclass
class MergeReport:
    """What a merge produced: modules, ranks, and the SVD approximation error (0 for an exact merge)."""

    output: Path
    modules: int
    max_rank: int
    relative_error_max: float
    relative_error_mean: float


def merge_modules(inputs: list[tuple[ParsedAdapter, float]], rank: int | None = None):
    """Merged kohya modules and per-module relative Frobenius errors; exact when `rank` is None."""
    names = sorted({name for adapter, _ in inputs for name in adapter.modules})
    merged: dict[str, LoraModule] = {}
    errors: list[float] = []
    for name in names:
        parts = [(adapter.modules[name], weight) for adapter, weight in inputs if name in adapter.modules]
        shapes = {(m.up.shape[0], *m.down.shape[1:]) for m, _ in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot merge {name}: the adapters disagree on its shape ({sorted(shapes)})")
        if rank is None:
            down = torch.cat([m.down.float() for m, _ in parts], dim=0)
            up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], dim=1)
            merged[name] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
            errors.append(0.0)
            continue
        delta = sum(m.delta() * w for m, w in parts)
        matrix = delta.flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = min(rank, s.shape[0])
        root = s[:keep].sqrt()
        up = (u[:, :keep] * root).reshape(delta.shape[0], keep, *([1] * (delta.dim() - 2)))
        down = (root[:, None] * vh[:keep]).reshape(keep, *delta.shape[1:])
        norm = torch.linalg.norm(matrix)
        residual = torch.linalg.norm(matrix - (u[:, :keep] * s[:keep]) @ vh[:keep])
        errors.append(float(residual / norm) if norm > 0 else 0.0)
        merged[name] = LoraModule(down=down, up=up, alpha=float(keep))
    return merged, errors


def merge_adapters(
    inputs: list[tuple[str | Path, float]],
    output: str | Path,
    *,
    rank: int | None = None,
    title: str | None = None,
    dtype: str = "fp16",
) -> MergeReport:
    """Merge adapter files at weights into one kohya file (exact, or SVD to `rank`); report the error."""
    if not inputs:
        raise ValueError("nothing to merge: give at least one adapter")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    parsed = [(parse_adapter(path), float(weight)) for path, weight in inputs]
    families = {p.family for p, _ in parsed if p.family is not None}
    if len(families) > 1:
        raise ValueError(f"cannot merge adapters of different model families: {', '.join(sorted(families))}")
    modules, errors = merge_modules(parsed, rank)
    first = parsed[0][0].metadata
    family = _merged_family(next(iter(families)), parsed[0][0].metadata) if families else None
    max_rank = max(m.rank for m in modules.values())
    title = title or Path(output).stem
    metadata = {k: v for k, v in first.items() if k.startswith("modelspec.") or k in ("ss_v2", "ss_base_model_version")}
    if family is not None:
        metadata.update(ss_v2=str(family.ss_v2), ss_base_model_version=family.ss_base_model_version)
    triggers = [p.metadata.get("modelspec.trigger_phrase") for p, _ in parsed]
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(max_rank),
            "ss_network_alpha": str(max_rank) if rank is None else str(rank),
            "ss_network_args": json.dumps(
                {
                    "merged_from": [f"{p.name}:{w:g}" for p, w in parsed],
                    "method": "concat" if rank is None else f"svd{rank}",
                }
            ),
            "ss_output_name": title,
            "modelspec.title": title,
        }
    )
    if any(triggers):
        metadata["modelspec.trigger_phrase"] = ", ".join(t for t in triggers if t)
    save_adapter(output, modules_to_tensors(modules), metadata, dtype=dtype)
    return MergeReport(
        output=Path(output),
        modules=len(modules),
        max_rank=max_rank,
        relative_error_max=max(errors),
        relative_error_mean=sum(errors) / len(errors),
    )


def _merged_family(lineage: str, metadata: dict[str, str]):
    """The family a merge of `lineage` adapters is for: the first input's own (SD 2.x 512 or 768-v), else the
    lineage's first family."""
    stated = [f for f in FAMILIES.values() if f.ss_base_model_version == metadata.get("ss_base_model_version")]
    if stated and stated[0].lineage == lineage:
        return stated[0]
    return next((f for f in FAMILIES.values() if f.lineage == lineage), None)
