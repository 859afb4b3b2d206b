"""LoRA's memory promise, measured: peak memory of LoRA training against full fine-tuning, trainable parameters
per preset, adapter file sizes.

    python bench/train_memory.py [--steps 2] [--resolution 256] [--skip-memory] [--skip-sizes]

Peak memory: each configuration runs in a fresh process on the SD1.5-shaped model (the real UNet, text encoder
and VAE configs, random weights), CPU fp32, 256 px, batch 1, 2 images, and reports its peak resident memory
(VmHWM): our trainer with the `style` preset (LoRA on the UNet's attention, frozen text encoder), and full
fine-tuning of every UNet weight with torch.optim.AdamW (latents and text embeddings cached the same way), each
with and without gradient checkpointing, plus the model loaded with no training as the floor both share.

Trainable parameters per LoRA target preset (training/lora.py) and per training preset (training/config.py),
counted on weightless (meta-device) models for SD1.5, and SDXL when studio/configs has its configs. Adapter
files: kohya's LierLa set (192 UNet + 72 text-encoder modules) written by our exporter at ranks 8/16/32/128 in
fp16, checked against the table in FORMATS.md. The last line is one JSON object with `memory_ratio` (LoRA peak
/ full fine-tuning peak, without checkpointing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import INK, emit, full_finetune, machine, peak_rss_bytes, run_child, sd15_base, subset  # noqa: E402
from studio.models import CONFIGS_DIR  # noqa: E402
from training.config import PRESETS, TrainConfig  # noqa: E402
from training.estimate import lora_parameter_count  # noqa: E402
from training.lora import (  # noqa: E402
    TEXT_ENCODER_TARGET_PRESETS,
    UNET_TARGET_PRESETS,
    LoraSpec,
    text_encoder_targets,
    unet_targets,
)

MIB = 2**20
# FORMATS.md section 1: SD1.5 LierLa at fp16, rank -> MiB, and its module counts
FORMATS_SIZES_MIB = {8: 9.0, 16: 18.0, 32: 36.0, 128: 144.0}
FORMATS_MODULES = {"unet": 192, "text_encoder": 72}
CONFIGURATIONS = ("loaded", "lora", "lora_checkpointing", "full", "full_checkpointing")


def style_config(data_dir: Path, out: Path, steps: int, resolution: int, checkpointing: bool) -> TrainConfig:
    """The `style` preset at the bench size."""
    return TrainConfig.from_preset(
        "style",
        base="sd15",
        data_dir=str(data_dir),
        output=str(out),
        max_train_steps=steps,
        batch_size=1,
        resolution=resolution,
        random_flip=False,
        lr_warmup_steps=0,
        mixed_precision="no",
        gradient_checkpointing=checkpointing,
    )


def child(args: dict) -> dict:
    """One configuration in this fresh process; returns its peak memory."""
    from training.trainer import Trainer

    kind = args["configuration"]
    started = time.perf_counter()
    base = sd15_base()
    built = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = subset(INK, 2, Path(tmp) / "data")
        config = style_config(
            data_dir,
            Path(tmp) / "out" / "adapter.safetensors",
            args["steps"],
            args["resolution"],
            kind.endswith("checkpointing"),
        )
        if kind.startswith("lora"):
            Trainer(config, base=base).run()
        elif kind.startswith("full"):
            full_finetune(base, config, args["steps"], lr=1e-5)
    return {
        "peak_rss_bytes": peak_rss_bytes(),
        "build_seconds": round(built - started, 2),
        "train_seconds": round(time.perf_counter() - built, 2),
    }


def meta_models(family: str):
    """Weightless UNet and text encoder(s) of a shipped model (studio/configs: sd15, sdxl_base, ...)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.tiny import load_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config(family, "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder")))]
        if (CONFIGS_DIR / family / "text_encoder_2").is_dir():
            config = CLIPTextConfig(**load_config(family, "text_encoder_2"))
            encoders.append(CLIPTextModelWithProjection(config))
    return unet, encoders


def _lora_count(model, paths: list[str], rank: int) -> int:
    return sum(lora_parameter_count(model.get_submodule(path), rank) for path in paths)


def parameter_counts(family: str, rank: int = 16) -> dict:
    """Trainable LoRA parameters and adapted modules per target preset and per training preset."""
    unet, encoders = meta_models(family)
    unet_total = sum(p.numel() for p in unet.parameters())
    te_total = sum(p.numel() for te in encoders for p in te.parameters())
    targets = {}
    for preset in UNET_TARGET_PRESETS:
        paths = unet_targets(unet, LoraSpec(rank=rank, unet_targets=preset))
        targets[f"unet:{preset}"] = {"modules": len(paths), "parameters": _lora_count(unet, paths, rank)}
    for preset in TEXT_ENCODER_TARGET_PRESETS:
        spec = LoraSpec(rank=rank, text_encoder_targets=preset)
        paths = [text_encoder_targets(te, spec) for te in encoders]
        targets[f"text_encoder:{preset}"] = {
            "modules": sum(len(p) for p in paths),
            "parameters": sum(_lora_count(te, p, rank) for te, p in zip(encoders, paths, strict=True)),
        }
    presets = {}
    for name in PRESETS:
        config = TrainConfig.from_preset(name)
        spec = config.lora_spec
        count = _lora_count(unet, unet_targets(unet, spec), spec.rank)
        if config.train_text_encoder:
            count += sum(_lora_count(te, text_encoder_targets(te, spec), spec.rank) for te in encoders)
        presets[name] = {
            "rank": spec.rank,
            "unet_targets": spec.unet_targets,
            "text_encoder_targets": spec.text_encoder_targets,
            "parameters": count,
            "percent_of_unet_and_text_encoders": round(100 * count / (unet_total + te_total), 3),
        }
    return {
        "unet_parameters": unet_total,
        "text_encoder_parameters": te_total,
        f"target_presets_rank_{rank}": targets,
        "training_presets": presets,
    }


def adapter_sizes(ranks: tuple[int, ...] = (8, 16, 32, 128)) -> dict:
    """Write kohya LierLa adapters for the SD1.5-shaped model with our exporter; sizes against FORMATS.md."""
    from studio.adapters import kohya_state_dict, save_adapter, training_metadata
    from training.lora import count_parameters, inject_lora

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in ranks:
            base = sd15_base()
            spec = LoraSpec(rank=rank, alpha=rank, unet_targets="kohya", text_encoder_targets="attn_mlp")
            counts = inject_lora(base.unet, base.text_encoders, spec)
            trainable, _ = count_parameters([base.unet, *base.text_encoders])
            path = Path(tmp) / f"lierla_r{rank}.safetensors"
            metadata = training_metadata(base.family, rank=rank, alpha=rank, network_args={}, title=path.stem)
            save_adapter(path, kohya_state_dict(base.family, base.unet, base.text_encoders), metadata, dtype="fp16")
            mib = path.stat().st_size / MIB
            expected = FORMATS_SIZES_MIB.get(rank)
            out[str(rank)] = {
                "file_mib": round(mib, 2),
                "formats_md_mib": expected,
                "matches_formats_md": expected is not None and abs(mib - expected) <= 0.02 * expected,
                "modules": counts,
                "modules_match_formats_md": counts == FORMATS_MODULES,
                "trainable_parameters": trainable,
            }
            del base
    return out


def main() -> None:
    """Measure, print the JSON (or, given one JSON argument, run one configuration as a child process)."""
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        emit(child(json.loads(sys.argv[1])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()
    started = time.time()
    result: dict = {"machine": machine(), "settings": {"steps": args.steps, "resolution": args.resolution}}

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    result["parameters"] = {"sd15": parameter_counts("sd15"), "sdxl": parameter_counts("sdxl_base")}
    if not args.skip_memory:
        peaks = {}
        for configuration in CONFIGURATIONS:
            run = run_child(
                "bench.train_memory",
                {"configuration": configuration, "steps": args.steps, "resolution": args.resolution},
            )
            peaks[configuration] = run["peak_rss_bytes"]
            log(f"{configuration}: peak {run['peak_rss_bytes'] / MIB:.0f} MiB ({run['wall_seconds']:.0f} s)")
        floor = peaks["loaded"]
        result["peak_mib"] = {k: round(v / MIB) for k, v in peaks.items()}
        result["above_loaded_model_mib"] = {k: round((v - floor) / MIB) for k, v in peaks.items() if k != "loaded"}
        result["memory_ratio"] = round(peaks["lora"] / peaks["full"], 3)
        result["memory_ratio_checkpointing"] = round(peaks["lora_checkpointing"] / peaks["full_checkpointing"], 3)
        result["target"] = "memory_ratio <= 0.333"
    if not args.skip_sizes:
        result["adapter_files"] = adapter_sizes()
        log("adapter files written and measured")
    result["wall_seconds"] = round(time.time() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
