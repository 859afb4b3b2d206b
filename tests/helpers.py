"""Test helpers: small image folders and LoRA adapters with non-zero up-matrices."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "black": (10, 10, 10)}


def write_style_images(folder: Path, count: int = 4, size=(64, 64), captions: bool = True, seed: int = 0) -> Path:
    """Draw `count` outlined circles/squares with captions in `folder`; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for index in range(count):
        color = names[index % len(names)]
        shape = "circle" if index % 2 == 0 else "square"
        image = Image.new("RGB", size, (245, 245, 235))
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.randint(4, 16), rng.randint(4, 16)
        box = [x0, y0, x0 + size[0] // 2, y0 + size[1] // 2]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color], outline=(0, 0, 0), width=4)
        image.save(folder / f"img_{index:02d}.png")
        if captions:
            (folder / f"img_{index:02d}.txt").write_text(f"a {color} {shape} on a white background")
    return folder


def randomize_lora_up(models, seed: int = 0, std: float = 0.3) -> None:
    """Give every LoRA up-matrix (PEFT lora_B) random non-zero values, so the adapter is not a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_adapter(model_dir, path, *, seed=0, rank=4, alpha=2.0, targets="kohya", te_targets="attn", std=0.3):
    """Write a kohya adapter for the model in `model_dir` with random non-zero up-matrices; return its path."""
    from studio.adapters import kohya_state_dict, save_adapter, training_metadata
    from studio.models import load_base
    from training.lora import LoraSpec, inject_lora

    base = load_base(str(model_dir))
    torch.manual_seed(seed)
    inject_lora(
        base.unet,
        base.text_encoders,
        LoraSpec(rank=rank, alpha=alpha, unet_targets=targets, text_encoder_targets=te_targets),
    )
    randomize_lora_up([base.unet, *base.text_encoders], seed=seed, std=std)
    metadata = training_metadata(
        base.family, rank=rank, alpha=alpha, network_args={}, title=Path(path).stem, trigger_phrase="sks"
    )
    save_adapter(path, kohya_state_dict(base.family, base.unet, base.text_encoders), metadata, dtype="fp32")
    return Path(path)


def render(pipeline, seed=0):
    """A 3-step 32x32 image of a fixed prompt as a numpy array (tiny-model speed)."""
    return pipeline(
        "sks, a red circle",
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def hand_merge(pipeline, adapters) -> int:
    """Add sum(w * (alpha / r) * up @ down) of kohya files [(path, te_w, unet_w)] into the pipeline's weights.

    Returns how many modules were merged."""
    from safetensors.torch import load_file

    from studio.adapters import kohya_te_name, kohya_unet_name
    from studio.models import SD1

    merged = 0
    with torch.no_grad():
        for path, te_weight, unet_weight in adapters:
            tensors = load_file(str(path))
            for model, name_of, weight in (
                (pipeline.unet, lambda p: kohya_unet_name(SD1, p), unet_weight),
                (pipeline.text_encoder, lambda p: kohya_te_name(SD1, 0, p), te_weight),
            ):
                for module_path, module in model.named_modules():
                    name = name_of(module_path)
                    if f"{name}.lora_down.weight" not in tensors:
                        continue
                    down = tensors[f"{name}.lora_down.weight"].float()
                    up = tensors[f"{name}.lora_up.weight"].float()
                    alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else down.shape[0]
                    delta = weight * (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
                    module.weight += delta.reshape(module.weight.shape)
                    merged += 1
    return merged


def snapshot_tree(root, exclude=None) -> dict[str, str]:
    """Every file and link under `root` (except under `exclude`) -> SHA-256 of its bytes (or its link target)."""
    import hashlib

    root = Path(root)
    exclude = Path(exclude).resolve() if exclude is not None else None
    found = {}
    for path in sorted(root.rglob("*")):
        if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
            continue
        if path.is_symlink():
            found[str(path.relative_to(root))] = f"link -> {path.readlink()}"
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            found[str(path.relative_to(root)) + "/"] = "dir"
    return found
