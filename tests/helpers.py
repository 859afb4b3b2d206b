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
