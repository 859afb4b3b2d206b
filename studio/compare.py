"""Comparison grids: one labelled image over adapter weight x checkpoint x seed (A1111's X/Y plot, built in)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from studio.compose import AdapterStack
from studio.generate import GenerationRequest, LoraRequest, generate
from studio.models import BaseModel

MAX_CELLS = 64
MIN_CELL = 128
LABEL_HEIGHT = 28
LABEL_WIDTH = 190


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str]) -> Image.Image:
    """Paste `cells[row][column]` into one image with a label above each column and left of each row."""
    if not cells or not cells[0]:
        raise ValueError("nothing to put in the grid")
    width, height = cells[0][0].size
    scale = max(1, -(-MIN_CELL // min(width, height)))  # small images are enlarged so labels fit
    cw, ch = width * scale, height * scale
    grid = Image.new("RGB", (LABEL_WIDTH + cw * len(column_labels), LABEL_HEIGHT + ch * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * cw + 6, 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((6, LABEL_HEIGHT + r * ch + 6), label, fill="black", font=font)
        for c, cell in enumerate(cells[r]):
            grid.paste(cell.resize((cw, ch), Image.Resampling.NEAREST), (LABEL_WIDTH + c * cw, LABEL_HEIGHT + r * ch))
    return grid


def comparison_grid(
    base: BaseModel,
    request: GenerationRequest,
    checkpoints: dict[str, Path],
    weights: list[float],
    seeds: list[int],
    stack: AdapterStack | None = None,
) -> tuple[Image.Image, list[str]]:
    """Render `request` for every (checkpoint, seed) row and weight column; (grid image, row labels)."""
    cells_count = len(checkpoints) * len(weights) * len(seeds)
    if not cells_count:
        raise ValueError("a grid needs at least one checkpoint, one weight and one seed")
    if cells_count > MAX_CELLS:
        raise ValueError(f"the grid would have {cells_count} images; the limit is {MAX_CELLS}")
    stack = stack if stack is not None else AdapterStack(base)
    rows, row_labels = [], []
    for label, path in checkpoints.items():
        for seed in seeds:
            row = []
            for weight in weights:
                cell = replace(request, seed=seed, batch=1, loras=[LoraRequest(str(path), weight)])
                row.append(generate(base, cell, stack=stack).images[0])
            rows.append(row)
            row_labels.append(f"{label}, seed {seed}")
    return draw_grid(rows, [f"weight {w:g}" for w in weights], row_labels), row_labels
