"""Compare tab: one labelled image grid over adapter weight x checkpoint x seed, saved as one PNG."""

from __future__ import annotations

import datetime as dt
from typing import Any

import gradio as gr
from PIL.PngImagePlugin import PngInfo

from studio import atomic
from studio.compare import comparison_grid
from studio.generate import SAMPLERS, GenerationRequest
from studio.library import Workspace
from studio.ui.common import ModelCache, number_list, real_number, reports_errors, whole_number


def checkpoint_choices(workspace: Workspace, adapter: str) -> list[str]:
    """Labels of the checkpoints of `adapter` that can go in a grid (oldest first, then "final")."""
    if not adapter:
        return []
    return [label for label, _ in workspace.checkpoints(adapter)]


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
    found = dict(workspace.checkpoints(adapter))
    labels = list(checkpoints or []) or ["final"]
    missing = [label for label in labels if label not in found]
    if missing:
        raise ValueError(f"adapter {adapter!r} has no checkpoint {missing[0]!r} (have: {', '.join(found) or 'none'})")
    weight_list = number_list(weights, "weights")
    seed_list = number_list(seeds, "seeds", int)
    request = GenerationRequest(
        prompt=prompt or "",
        negative_prompt=negative or "",
        steps=whole_number(steps, "steps", 1, 150),
        cfg=real_number(cfg, "CFG scale", 1, 30),
        sampler=sampler,
    )
    with models.lock:
        grid, row_labels = comparison_grid(
            models.get(base),
            request,
            {label: found[label] for label in labels},
            weight_list,
            seed_list,
            stack=models.stack(base),
        )
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
