"""Generate tab: prompt, sampler settings and an adapter stack; results are the saved PNGs with their infotext."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio import sidecars
from studio.conditioning import MAX_CLIP_SKIP
from studio.generate import MEMORY_MODES, SAMPLERS, GenerationRequest, LoraRequest, generate
from studio.library import Workspace
from studio.ui.common import ModelCache, real_number, reports_errors, whole_number

SLOTS = 4
SLOT_FIELDS = ("adapter", "weight", "enabled", "separate", "te_weight", "unet_weight")
WEIGHT_SLIDER = (-2.0, 2.0)  # the stack rows' weight slider (the separate TE / UNet boxes take -10..10)
# the Memory accordion's checkboxes: request field -> (label, what it does)
MEMORY_BOXES = {
    "vae_slicing": ("VAE slicing", "decode a batch one image at a time"),
    "vae_tiling": ("VAE tiling", "decode large images in overlapping tiles"),
    "cpu_offload": ("CPU offload", "each model waits on the CPU until it runs (needs a GPU)"),
}
MEMORY_IDS = tuple("gen-" + name.replace("_", "-") for name in MEMORY_MODES)
SETTINGS = ("prompt", "negative", "seed_mode", "seed", "steps", "cfg", "width", "height", "sampler", "batch")


def stack_requests(slot_values: list[Any]) -> list[LoraRequest]:
    """The adapter stack editor's rows (6 values per slot) as LoraRequests; empty and disabled rows are left out."""
    if len(slot_values) % len(SLOT_FIELDS):
        raise ValueError("adapter stack values are incomplete")
    requests, seen = [], set()
    for start in range(0, len(slot_values), len(SLOT_FIELDS)):
        row = dict(zip(SLOT_FIELDS, slot_values[start : start + len(SLOT_FIELDS)], strict=True))
        name = (row["adapter"] or "").strip()
        if not name or not row["enabled"]:
            continue
        if name in seen:
            raise ValueError(f"adapter {name!r} is in the stack twice")
        seen.add(name)
        if row["separate"]:
            te = real_number(row["te_weight"], f"{name} text-encoder weight", -10, 10)
            unet = real_number(row["unet_weight"], f"{name} UNet weight", -10, 10)
        else:
            te = unet = real_number(row["weight"], f"{name} weight", -10, 10)
        requests.append(LoraRequest(name, te, unet))
    return requests


def build_request(*args: Any, memory: Sequence[bool] = (False, False, False), clip_skip: Any = 1) -> GenerationRequest:
    """A GenerationRequest from the tab's settings (SETTINGS order) followed by the stack rows; `memory` holds the
    Memory checkboxes in MEMORY_MODES order, `clip_skip` the Clip skip box."""
    v = dict(zip(SETTINGS, args[: len(SETTINGS)], strict=True))
    seed = -1 if v["seed_mode"] == "random" else whole_number(v["seed"], "seed", 0, 2**32 - 1)
    return GenerationRequest(
        prompt=v["prompt"] or "",
        negative_prompt=v["negative"] or "",
        seed=seed,
        steps=whole_number(v["steps"], "steps", 1, 150),
        cfg=real_number(v["cfg"], "CFG scale", 1, 30),
        width=whole_number(v["width"], "width", 0, 2048),
        height=whole_number(v["height"], "height", 0, 2048),
        sampler=v["sampler"],
        batch=whole_number(v["batch"], "batch count", 1, 16),
        loras=stack_requests(list(args[len(SETTINGS) :])),
        **{name: bool(on) for name, on in zip(MEMORY_MODES, memory, strict=True)},
        clip_skip=whole_number(clip_skip, "clip skip", 1, MAX_CLIP_SKIP),
    )


def library_resolver(workspace: Workspace):
    """Look adapter names (from the stack or `<lora:name:w>` tags) up in the workspace library."""
    return workspace.existing_adapter


def slot_weight(workspace: Workspace, name: str | None, weight: Any) -> Any:
    """The weight a stack row takes when adapter `name` is chosen: its preferred weight (A1111's NAME.json), if new."""
    try:
        path = workspace.existing_adapter(name or "")
    except ValueError:  # no adapter chosen, or one that is gone: the row keeps its weight
        return gr.update()
    preferred = min(max(sidecars.preferred_weight(path), WEIGHT_SLIDER[0]), WEIGHT_SLIDER[1])
    return gr.update() if preferred == weight else gr.update(value=preferred)


def read_infotext(path: str | Path) -> str:
    """The A1111 `parameters` text stored in a PNG."""
    with Image.open(path) as image:
        return image.text.get("parameters", "") if hasattr(image, "text") else ""


@reports_errors(outputs=4, status=3)
def run(
    models: ModelCache,
    workspace: Workspace,
    base: str,
    *args: Any,
    memory: Sequence[bool] = (False, False, False),
    clip_skip: Any = 1,
) -> tuple:
    """Generate; (gallery items, saved paths, infotext of the first image, status)."""
    request = build_request(*args, memory=memory, clip_skip=clip_skip)
    out_dir = workspace.outputs_dir / dt.date.today().isoformat()
    with models.lock:
        model = models.get(base)
        result = generate(
            model, request, stack=models.stack(base), resolver=library_resolver(workspace), out_dir=out_dir
        )
    paths = [str(p) for p in result.paths]
    items = [(p, f"seed {s}") for p, s in zip(paths, result.seeds, strict=True)]
    status = f"Saved {len(paths)} image(s) to `{out_dir}`: " + ", ".join(f"`{Path(p).name}`" for p in paths)
    status += "".join(f"\n\nNote: {note}" for note in result.notes)
    return items, paths, read_infotext(paths[0]), status


def select_image(paths: list[str], evt: gr.SelectData) -> tuple[str, str]:
    """(infotext, path) of the gallery image the user clicked."""
    if not paths or evt.index is None or evt.index >= len(paths):
        return "", ""
    path = paths[evt.index]
    return read_infotext(path), path


@reports_errors(outputs=1, status=0)
def set_preview(workspace: Workspace, adapter: str, image: str, paths: list[str]) -> str:
    """Make the selected (default: first) generated image the preview of `adapter`."""
    image = image or (paths[0] if paths else "")
    if not image:
        raise ValueError("generate an image first, then click it")
    if not adapter:
        raise ValueError("choose the adapter whose preview this image becomes")
    workspace.set_preview(adapter, image)
    return f"`{Path(image).name}` is now the preview of **{adapter}**."


def build(workspace: Workspace, models: ModelCache, base_box: gr.Textbox) -> dict:
    """Lay out the Generate tab; return the adapter dropdowns to refresh when the library changes."""
    s: dict[str, gr.components.Component] = {}
    s["prompt"] = gr.Textbox(label="Prompt (accepts <lora:name:weight>)", lines=2, elem_id="gen-prompt")
    s["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
    with gr.Row():
        s["seed_mode"] = gr.Radio(["random", "fixed"], value="fixed", label="Seed", elem_id="gen-seed-mode")
        s["seed"] = gr.Number(label="Seed value", value=1, precision=0, elem_id="gen-seed")
        s["steps"] = gr.Number(label="Steps", value=20, precision=0, elem_id="gen-steps")
        s["cfg"] = gr.Number(label="CFG scale", value=7.0, elem_id="gen-cfg")
        s["sampler"] = gr.Dropdown(list(SAMPLERS), value="Default", label="Sampler", elem_id="gen-sampler")
    with gr.Row():
        s["width"] = gr.Number(label="Width (0: model's native)", value=0, precision=0, elem_id="gen-width")
        s["height"] = gr.Number(label="Height (0: model's native)", value=0, precision=0, elem_id="gen-height")
        s["batch"] = gr.Number(label="Batch count", value=1, precision=0, elem_id="gen-batch")
        clip_skip = gr.Number(
            label="Clip skip (SD 1.x/2.x; 2: penultimate layer)",
            value=1,
            precision=0,
            minimum=1,
            maximum=MAX_CLIP_SKIP,
            elem_id="gen-clip-skip",
        )
    slots: list[dict[str, gr.components.Component]] = []
    rows = []
    shown = gr.State(1)
    with gr.Group():
        gr.Markdown("**Adapter stack** - pick adapters from the library; each has its own weight")
        for index in range(SLOTS):
            with gr.Row(visible=index == 0) as row:
                slot = {
                    "adapter": gr.Dropdown(
                        choices=workspace.list_adapters(), label=f"Adapter {index + 1}", elem_id=f"gen-adapter-{index}"
                    ),
                    "weight": gr.Slider(
                        *WEIGHT_SLIDER, value=1.0, step=0.05, label="Weight", elem_id=f"gen-weight-{index}"
                    ),
                    "enabled": gr.Checkbox(value=True, label="Enabled"),
                    "separate": gr.Checkbox(value=False, label="Separate TE / UNet weights"),
                    "te_weight": gr.Number(value=1.0, label="Text-encoder weight"),
                    "unet_weight": gr.Number(value=1.0, label="UNet weight"),
                }
            slots.append(slot)
            rows.append(row)
        with gr.Row():
            add = gr.Button("Add adapter", size="sm", elem_id="gen-add-adapter")
            clear = gr.Button("Clear stack", size="sm")
    with gr.Accordion("Memory (for 8-12 GB GPUs)", open=False, elem_id="gen-memory"), gr.Row():
        memory = [
            gr.Checkbox(False, label=MEMORY_BOXES[name][0], info=MEMORY_BOXES[name][1], elem_id=elem_id)
            for name, elem_id in zip(MEMORY_MODES, MEMORY_IDS, strict=True)
        ]
    go = gr.Button("Generate", variant="primary", elem_id="gen-run")
    status = gr.Markdown(elem_id="gen-status")
    paths = gr.State([])
    selected = gr.State("")
    with gr.Row():
        gallery = gr.Gallery(
            fit_columns=False,
            object_fit="contain",
            label="Results (the saved PNG files)",
            columns=4,
            height=360,
            elem_id="gen-gallery",
        )
        with gr.Column():
            info = gr.Textbox(label="Parameters (A1111 infotext)", lines=6, elem_id="gen-infotext")
            preview_for = gr.Dropdown(choices=workspace.list_adapters(), label="Adapter", elem_id="gen-preview-for")
            preview = gr.Button("Set selected image as the adapter's preview", elem_id="gen-set-preview")

    stack_inputs = [slot[f] for slot in slots for f in SLOT_FIELDS]
    inputs = [base_box, *(s[f] for f in SETTINGS), *stack_inputs, *memory, clip_skip]
    extra = len(memory) + 1  # the Memory checkboxes, then the Clip skip box
    go.click(
        lambda *v: run(models, workspace, *v[:-extra], memory=v[-extra:-1], clip_skip=v[-1]),
        inputs,
        [gallery, paths, info, status],
    ).then(lambda: "", None, selected)
    gallery.select(select_image, paths, [info, selected])
    for slot in slots:
        slot["adapter"].input(
            lambda n, w: slot_weight(workspace, n, w), [slot["adapter"], slot["weight"]], slot["weight"]
        )
    preview.click(lambda a, i, p: set_preview(workspace, a, i, p), [preview_for, selected, paths], status)
    add.click(
        lambda n: (min(n + 1, SLOTS), *[gr.update(visible=i < n + 1) for i in range(SLOTS)]),
        shown,
        [shown, *rows],
    )
    clear.click(
        lambda: (1, *[gr.update(visible=i == 0) for i in range(SLOTS)], *[None] * SLOTS),
        None,
        [shown, *rows, *(slot["adapter"] for slot in slots)],
    )
    return {"adapter_dropdowns": [slot["adapter"] for slot in slots] + [preview_for]}
