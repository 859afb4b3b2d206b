"""Compare tab: one labelled image grid over adapter weight x checkpoint x seed, saved as one PNG."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from studio import atomic
from studio.generate import SAMPLERS, GenerationRequest, LoraRequest, generate
from studio.library import Workspace
from studio.ui.common import ModelCache, number_list, real_number, reports_errors, whole_number

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


def checkpoint_choices(workspace: Workspace, adapter: str) -> list[str]:
    """Labels of the checkpoints of `adapter` that can go in a grid (oldest first, then "final")."""
    if not adapter:
        return []
    return [label for label, _ in workspace.checkpoints(adapter)]


def _checkpoint_file(workspace: Workspace, adapter: str, label: str) -> Path:
    """A uniquely named copy of a checkpoint's adapter (the stack tells adapters apart by file name)."""
    found = dict(workspace.checkpoints(adapter))
    if label not in found:
        raise ValueError(f"adapter {adapter!r} has no checkpoint {label!r} (have: {', '.join(found) or 'none'})")
    if label == "final":
        return found[label]
    target = workspace.run_dir(adapter) / "compare" / f"{adapter}-{label}.safetensors"
    if not target.is_file() or target.stat().st_mtime < found[label].stat().st_mtime:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[label], target)
    return target


@reports_errors(outputs=2, status=1)
def make_grid(
    models: ModelCache,
    workspace: Workspace,
    base: str,
    adapter: str,
    checkpoints: list[str],
    weights: str,
    seeds: str,
    prompt: str,
    negative: str,
    steps: Any,
    cfg: Any,
    sampler: str,
) -> tuple[str, str]:
    """Render every (checkpoint, seed, weight) cell, save the labelled grid PNG; (grid path, status)."""
    workspace.existing_adapter(adapter)
    checkpoints = list(checkpoints or []) or ["final"]
    weight_list = number_list(weights, "weights")
    seed_list = number_list(seeds, "seeds", int)
    cells_count = len(checkpoints) * len(weight_list) * len(seed_list)
    if cells_count > MAX_CELLS:
        raise ValueError(f"the grid would have {cells_count} images; the limit is {MAX_CELLS}")
    steps = whole_number(steps, "steps", 1, 150)
    cfg = real_number(cfg, "CFG scale", 1, 30)
    files = {label: _checkpoint_file(workspace, adapter, label) for label in checkpoints}
    rows, row_labels = [], []
    with models.lock:
        model = models.get(base)
        stack = models.stack(base)
        for label in checkpoints:
            for seed in seed_list:
                row = []
                for weight in weight_list:
                    request = GenerationRequest(
                        prompt=prompt or "",
                        negative_prompt=negative or "",
                        seed=seed,
                        steps=steps,
                        cfg=cfg,
                        sampler=sampler,
                        loras=[LoraRequest(str(files[label]), weight)],
                    )
                    row.append(generate(model, request, stack=stack).images[0])
                rows.append(row)
                row_labels.append(f"{label}, seed {seed}")
    grid = draw_grid(rows, [f"weight {w:g}" for w in weight_list], row_labels)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = workspace.outputs_dir / "grids" / f"{adapter}-{stamp}.png"
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nGrid: adapter {adapter}; rows {', '.join(row_labels)}; weights {weights}")
    with atomic.atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return str(path), f"Saved a {len(row_labels)} x {len(weight_list)} grid to `{path}`."


def build(workspace: Workspace, models: ModelCache, base_box: gr.Textbox) -> dict:
    """Lay out the Compare tab; return the adapter dropdown to refresh when the library changes."""
    with gr.Row():
        adapter = gr.Dropdown(choices=workspace.list_adapters(), label="Adapter", elem_id="cmp-adapter")
        checkpoints = gr.CheckboxGroup(choices=[], label="Checkpoints (rows)", elem_id="cmp-checkpoints")
    with gr.Row():
        weights = gr.Textbox(label="Weights (columns)", value="0, 0.5, 1", elem_id="cmp-weights")
        seeds = gr.Textbox(label="Seeds (rows)", value="1", elem_id="cmp-seeds")
        steps = gr.Number(label="Steps", value=20, precision=0, elem_id="cmp-steps")
        cfg = gr.Number(label="CFG scale", value=7.0)
        sampler = gr.Dropdown(list(SAMPLERS), value="Default", label="Sampler")
    prompt = gr.Textbox(label="Prompt", elem_id="cmp-prompt")
    negative = gr.Textbox(label="Negative prompt")
    go = gr.Button("Make grid", variant="primary", elem_id="cmp-run")
    status = gr.Markdown(elem_id="cmp-status")
    grid = gr.Image(label="Grid (saved as one PNG)", type="filepath", interactive=False, elem_id="cmp-grid")

    adapter.change(
        lambda a: gr.update(choices=checkpoint_choices(workspace, a), value=checkpoint_choices(workspace, a)),
        adapter,
        checkpoints,
    )
    inputs = [base_box, adapter, checkpoints, weights, seeds, prompt, negative, steps, cfg, sampler]
    go.click(lambda *v: make_grid(models, workspace, *v), inputs, [grid, status])
    return {"adapter_dropdowns": [adapter]}
