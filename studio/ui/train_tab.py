"""Train tab: preset and parameters, a live plan, and background jobs (start / cancel / resume, progress, loss)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import gradio as gr

from studio.conditioning import MAX_CLIP_SKIP
from studio.jobs import JobRunner, TrainingJob
from studio.library import Workspace, safe_name
from studio.ui.common import ModelCache, real_number, reports_errors, whole_number
from training import metrics
from training.config import PRESETS, TrainConfig
from training.estimate import Device, describe_plan

# The tab's inputs, in the order handlers receive them.
FIELDS = (
    "dataset",
    "name",
    "preset",
    "rank",
    "alpha",
    "targets",
    "steps",
    "epochs",
    "unet_lr",
    "te_lr",
    "resolution",
    "batch_size",
    "train_te",
    "clip_skip",
    "prior",
    "class_prompt",
    "class_images",
    "preservation",
    "preservation_prompt",
    "caption_dropout",
    "ema",
    "seed",
    "checkpoint_every",
    "validation_images",
    "sample_prompts",
)
# The loss plot's series and their colours
SERIES_COLORS = {"train": "#4c78a8", "validation": "#f58518", "best checkpoint": "#54a24b"}
# What each UNet target preset adapts, as the tab lists them
UNET_TARGET_LABELS = {
    "cross_attn": "cross-attention",
    "attn": "all attention",
    "kohya": "kohya (LierLa)",
    "locon": "LoCon (+ convs)",
}
# Preset fields shown in the tab -> TrainConfig names
PRESET_FIELDS = {
    "rank": "rank",
    "alpha": "alpha",
    "targets": "unet_targets",
    "steps": "max_train_steps",
    "epochs": "epochs",
    "unet_lr": "unet_lr",
    "te_lr": "text_encoder_lr",
    "batch_size": "batch_size",
    "train_te": "train_text_encoder",
    "preservation": "preservation_weight",
    "preservation_prompt": "preservation_prompt",
    "caption_dropout": "caption_dropout_rate",
    "ema": "ema_decay",
}


def preset_values(preset: str, base: str = "demo") -> dict[str, Any]:
    """The tab's field values for `preset` on `base` (the preset for that model over TrainConfig's defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = TrainConfig.from_preset(preset, base=(base or "").strip())
    return {field: getattr(config, name) for field, name in PRESET_FIELDS.items()}


def default_values(base: str = "demo", **overrides: Any) -> dict[str, Any]:
    """Every field of the tab with its initial value (the style preset for `base`), with `overrides`."""
    values = {
        "dataset": "",
        "name": "my_style",
        "preset": "style",
        **preset_values("style", base),
        "resolution": 0,
        "clip_skip": 1,
        "prior": False,
        "class_prompt": "",
        "class_images": 0,
        "seed": 0,
        "checkpoint_every": 0,
        "validation_images": 0,
        "sample_prompts": "",
    }
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    return values


def as_args(values: dict[str, Any]) -> list[Any]:
    """The values in FIELDS order (how the page passes them)."""
    return [values[f] for f in FIELDS]


def build_config(workspace: Workspace, base: str, *args: Any, prediction_type: str | None = None) -> TrainConfig:
    """The TrainConfig for the tab's values and the picker's prediction type (a ValueError names any bad value)."""
    v = dict(zip(FIELDS, args, strict=True))
    if not (v["dataset"] or "").strip():
        raise ValueError("no images: choose a dataset (make one in the Dataset tab)")
    data_dir = workspace.existing_dataset(v["dataset"])
    if not workspace.dataset_images(v["dataset"]):
        raise ValueError(f"no images: dataset {v['dataset']!r} is empty; add images in the Dataset tab")
    name = safe_name(v["name"])
    settings = workspace.dataset_settings(v["dataset"])
    steps = whole_number(v["steps"], "steps", 0)
    epochs = whole_number(v["epochs"], "epochs", 0)
    every = whole_number(v["checkpoint_every"], "checkpoint interval", 0)
    prompts = [p.strip() for p in (v["sample_prompts"] or "").splitlines() if p.strip()]
    preset = v["preset"] if v["preset"] in PRESETS else "style"
    return TrainConfig.from_preset(
        preset,
        base=(base or "").strip(),
        prediction_type=prediction_type or "",
        data_dir=str(data_dir),
        output=str(workspace.adapter_path(name)),
        work_dir=str(workspace.run_dir(name)),
        output_name=name,
        trigger=settings["trigger"],
        class_noun=settings["class_noun"],
        rank=whole_number(v["rank"], "rank", 1, 1024),
        alpha=real_number(v["alpha"], "alpha", 0),
        unet_targets=v["targets"],
        max_train_steps=steps,
        epochs=epochs if steps == 0 else 0,
        unet_lr=real_number(v["unet_lr"], "UNet learning rate", 0),
        text_encoder_lr=real_number(v["te_lr"], "text-encoder learning rate", 0),
        resolution=whole_number(v["resolution"], "resolution", 0, 4096),
        batch_size=whole_number(v["batch_size"], "batch size", 1, 256),
        train_text_encoder=bool(v["train_te"]),
        clip_skip=whole_number(v["clip_skip"], "clip skip", 1, MAX_CLIP_SKIP),
        prior_preservation=bool(v["prior"]),
        class_prompt=(v["class_prompt"] or "").strip(),
        num_class_images=whole_number(v["class_images"], "class images", 0),
        preservation_weight=real_number(v["preservation"], "output preservation weight", 0),
        preservation_prompt=v["preservation_prompt"],
        caption_dropout_rate=real_number(v["caption_dropout"], "caption dropout", 0, 0.99),
        ema_decay=real_number(v["ema"], "EMA decay", 0, 0.9999),
        seed=whole_number(v["seed"], "seed", 0),
        checkpoint_every_steps=every,
        validation_images=whole_number(v["validation_images"], "validation images", 0),
        sample_prompts=prompts,
    )


# where the estimate is for: (label, Device.parse spec)
ESTIMATE_DEVICES = [
    ("this machine", "auto"),
    ("CPU", "cpu"),
    *((f"GPU {size} GB", f"gpu:{size}") for size in (6, 8, 12, 16, 24, 48, 80)),
]


def plan(models: ModelCache, workspace: Workspace, base: str, *args: Any, device: str = "auto") -> str:
    """The live plan for the current settings with a time and memory estimate for `device`, or what is wrong."""
    try:
        config = build_config(workspace, base, *args, prediction_type=models.prediction_type)
        return describe_plan(config, models.get(base), Device.parse(device))
    except Exception as exc:  # the plan is advisory: show why it cannot be computed
        from studio.ui.common import error_text

        return error_text(exc).replace("**Error:**", "**Plan unavailable:**")


@reports_errors(outputs=1, status=0)
def start(runner: JobRunner, workspace: Workspace, base: str, *args: Any, prediction_type: str | None = None) -> str:
    """Queue a run from the tab's values; it starts when the training slot is free."""
    config = build_config(workspace, base, *args, prediction_type=prediction_type)
    if workspace.adapter_path(config.output_name).exists():
        raise ValueError(f"an adapter named {config.output_name!r} already exists; choose another name")
    job = runner.submit(config)
    position = runner.queue_position(job)
    where = f"queued (position {position})" if position > 1 else "starting"
    return f"Training **{job.name}** {where}."


@reports_errors(outputs=1, status=0)
def cancel(runner: JobRunner, name: str | None) -> str:
    """Cancel the chosen job (default: the current one)."""
    job = runner.get(name) if name and runner.jobs.get(name) and runner.jobs[name].active else runner.current
    job = runner.cancel(job.name if job else None)
    return f"Cancelling **{job.name}**: it stops after the current step and keeps a checkpoint to resume from."


@reports_errors(outputs=1, status=0)
def resume(runner: JobRunner, name: str | None) -> str:
    """Resume the chosen interrupted / cancelled / failed job (default: the most recent such job)."""
    if not name:
        candidates = [j for j in runner.list_jobs() if j.status in ("interrupted", "cancelled", "failed")]
        if not candidates:
            raise ValueError("no interrupted, cancelled or failed job to resume")
        name = candidates[0].name
    job = runner.resume(name)
    return f"Resuming **{job.name}** from its newest checkpoint."


def progress_html(job: TrainingJob | None, runner: JobRunner | None = None) -> str:
    """A progress bar with step, loss and ETA for `job`."""
    if job is None:
        return "<p id='train-progress'>No training job yet.</p>"
    percent = job.percent
    parts = [f"<b>{html.escape(job.name)}</b>: {job.status}"]
    if job.status == "queued" and runner is not None and runner.queue_position(job):
        parts.append(f"position {runner.queue_position(job)} in the queue")
    if job.total_steps:
        parts.append(f"step {job.step}/{job.total_steps} ({percent:.0f}%)")
    if job.losses:
        parts.append(f"loss {job.losses[-1][1]:.4f}")
    if job.status == "running" and job.eta_seconds is not None and job.phase == "training":
        parts.append(f"ETA {job.eta_seconds:.0f} s")
    elif job.status == "running" and job.message:
        parts.append(html.escape(job.message))
    text = " - ".join(parts)
    error = f"<p class='train-error'>{html.escape(job.error)}</p>" if job.error else ""
    done = f"<p>Saved adapter <code>{html.escape(job.output.name)}</code>.</p>" if job.status == "done" else ""
    return (
        f"<div id='train-progress'><progress max='100' value='{percent:.1f}' style='width:100%'></progress>"
        f"<p>{text}</p>{error}{done}{validation_html(metrics.read_metrics(job.run_dir))}</div>"
    )


def validation_html(records: list[dict]) -> str:
    """The best checkpoint by validation loss and any over-training warning, from a run's metrics records."""
    best = metrics.best_record(records)
    if best is None:
        return ""
    name = "the final adapter" if best["checkpoint"] == metrics.FINAL else best["checkpoint"]
    text = f"<p id='train-best'>Best checkpoint by validation loss: <b>{html.escape(name)}</b>"
    text += f" (step {best['step']}, {best['val_loss']:.4f})</p>"
    warning = metrics.overtraining_warning(records)
    if warning:
        text += f"<p class='train-warning' id='train-overtraining'>&#9888; {html.escape(warning)}</p>"
    return text


def loss_frame(job: TrainingJob | None):
    """The loss plot's data: training loss per step, validation loss per checkpoint, a line at the best one.

    Every series has a row from the start (an empty one, loss NaN, until it has data): the browser keeps the
    series of the plot's first value, and would never draw one that appeared later."""
    import pandas as pd

    losses = job.losses if job else []
    rows = [(step, loss, "train") for step, loss in losses]
    records = metrics.read_metrics(job.run_dir) if job else []
    rows += [(step, loss, "validation") for step, loss in metrics.validation_losses(records)]
    best = metrics.best_record(records)
    if best is not None:  # a vertical line across the plotted range at the best checkpoint's step
        values = [loss for _, loss, _ in rows]
        rows += [(best["step"], min(values), "best checkpoint"), (best["step"], max(values), "best checkpoint")]
    first = rows[0][0] if rows else 0
    rows += [(first, math.nan, series) for series in SERIES_COLORS if series not in {row[2] for row in rows}]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def jobs_table(runner: JobRunner) -> list[list[Any]]:
    """One row per known job: name, status, steps, final loss."""
    rows = []
    for job in runner.list_jobs():
        loss = f"{job.losses[-1][1]:.4f}" if job.losses else ""
        rows.append([job.name, job.status, f"{job.step}/{job.total_steps}", loss])
    return rows or [["", "", "", ""]]


def job_view(runner: JobRunner, name: str | None) -> tuple:
    """(progress HTML, loss data, sample images, jobs table) for the chosen job (default: the current one)."""
    job = runner.jobs.get(name) if name else None
    job = job or runner.current
    samples = [p for p in (job.samples if job else []) if Path(p).is_file()]
    return progress_html(job, runner), loss_frame(job), samples, jobs_table(runner)


def build(runner: JobRunner, workspace: Workspace, models: ModelCache, base_box: gr.Textbox) -> dict:
    """Lay out the Train tab inside the current Blocks; return components other tabs use."""
    d = default_values(base_box.value or "demo")
    c: dict[str, gr.components.Component] = {}
    with gr.Row():
        c["dataset"] = gr.Dropdown(choices=workspace.list_datasets(), label="Dataset", elem_id="train-dataset")
        c["name"] = gr.Textbox(label="Adapter name", value=d["name"], elem_id="train-name")
        c["preset"] = gr.Dropdown(choices=list(PRESETS), value=d["preset"], label="Preset", elem_id="train-preset")
        refresh = gr.Button("Refresh datasets", size="sm")
    with gr.Row():
        c["rank"] = gr.Number(label="Rank", value=d["rank"], precision=0, elem_id="train-rank")
        c["alpha"] = gr.Number(label="Alpha", value=d["alpha"])
        c["targets"] = gr.Dropdown(
            choices=[(label, key) for key, label in UNET_TARGET_LABELS.items()],
            value=d["targets"],
            label="UNet layers",
            elem_id="train-targets",
        )
        c["steps"] = gr.Number(label="Steps (0: use epochs)", value=d["steps"], precision=0, elem_id="train-steps")
        c["epochs"] = gr.Number(label="Epochs (used when steps is 0)", value=d["epochs"], precision=0)
        c["batch_size"] = gr.Number(label="Batch size", value=d["batch_size"], precision=0, elem_id="train-batch")
        c["resolution"] = gr.Number(
            label="Resolution (0: model's native)", value=d["resolution"], precision=0, elem_id="train-resolution"
        )
    with gr.Row():
        c["unet_lr"] = gr.Number(label="UNet learning rate", value=d["unet_lr"])
        c["te_lr"] = gr.Number(label="Text-encoder learning rate", value=d["te_lr"])
        c["train_te"] = gr.Checkbox(label="Train text encoder", value=d["train_te"])
        c["clip_skip"] = gr.Number(
            label="Clip skip (SD 1.x/2.x; 2: penultimate layer)",
            value=d["clip_skip"],
            precision=0,
            minimum=1,
            maximum=MAX_CLIP_SKIP,
            elem_id="train-clip-skip",
        )
        c["seed"] = gr.Number(label="Seed", value=d["seed"], precision=0)
        c["checkpoint_every"] = gr.Number(
            label="Checkpoint every N steps (0: off)", value=d["checkpoint_every"], precision=0, elem_id="train-ckpt"
        )
        c["validation_images"] = gr.Number(
            label="Validation images (held out; loss at each checkpoint; 0: off)",
            value=d["validation_images"],
            precision=0,
            minimum=0,
            elem_id="train-validation-images",
        )
    with gr.Row():
        c["prior"] = gr.Checkbox(label="Prior preservation", value=d["prior"])
        c["class_prompt"] = gr.Textbox(label="Class prompt", placeholder="a painting")
        c["class_images"] = gr.Number(label="Class images", value=d["class_images"], precision=0)
    with gr.Row():
        c["preservation"] = gr.Number(
            label="Output preservation weight (keeps captions without the trigger as the base draws them; 0: off)",
            value=d["preservation"],
            elem_id="train-preservation",
        )
        c["preservation_prompt"] = gr.Dropdown(
            choices=[("caption without the trigger", "caption"), ("empty prompt", "blank")],
            value=d["preservation_prompt"],
            label="Output preservation keeps",
            elem_id="train-preservation-prompt",
        )
        c["caption_dropout"] = gr.Number(
            label="Caption dropout (share of steps on the empty prompt)",
            value=d["caption_dropout"],
            elem_id="train-caption-dropout",
        )
        c["ema"] = gr.Number(
            label="EMA decay (export a moving average of the weights, e.g. 0.99; 0: off)",
            value=d["ema"],
            elem_id="train-ema",
        )
    c["sample_prompts"] = gr.Textbox(
        label="Sample prompts (one per line; rendered at each checkpoint)", lines=2, elem_id="train-samples"
    )
    estimate_for = gr.Dropdown(
        choices=ESTIMATE_DEVICES, value="auto", label="Estimate time and memory for", elem_id="train-estimate-for"
    )
    plan_box = gr.Markdown("Choose a dataset to see the plan.", elem_id="train-plan")
    with gr.Row():
        go = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Cancel", elem_id="train-cancel")
        again = gr.Button("Resume", elem_id="train-resume")
        job_pick = gr.Dropdown(choices=[], label="Job (default: current)", allow_custom_value=True, scale=2)
    message = gr.Markdown(elem_id="train-message")
    progress = gr.HTML(progress_html(runner.current, runner), elem_id="train-progress-box")
    with gr.Row():
        loss_plot = gr.LinePlot(
            x="step",
            y="loss",
            color="series",
            color_map=SERIES_COLORS,
            label="Loss: training (blue), validation at checkpoints (orange), best checkpoint (green line)",
            height=260,
            elem_id="train-loss",
        )
        samples = gr.Gallery(
            fit_columns=False,
            object_fit="contain",
            label="Samples at checkpoints",
            columns=3,
            height=260,
            elem_id="train-samples-gallery",
        )
    jobs = gr.Dataframe(headers=["job", "status", "steps", "last loss"], label="Jobs", interactive=False)

    inputs = [base_box, *(c[f] for f in FIELDS)]
    gr.on(
        [comp.change for comp in [*inputs, estimate_for]],
        lambda *v: plan(models, workspace, *v[:-1], device=v[-1]),
        [*inputs, estimate_for],
        plan_box,
        show_progress="hidden",
        trigger_mode="always_last",
    )
    c["preset"].change(
        lambda p, b: tuple(preset_values(p, b)[f] for f in PRESET_FIELDS) if p in PRESETS else gr.skip(),
        [c["preset"], base_box],
        [c[f] for f in PRESET_FIELDS],
    )
    go.click(lambda *v: start(runner, workspace, *v, prediction_type=models.prediction_type), inputs, message)
    stop.click(lambda n: cancel(runner, n), job_pick, message)
    again.click(lambda n: resume(runner, n), job_pick, message)
    refresh.click(lambda: gr.update(choices=workspace.list_datasets()), None, c["dataset"])

    shown = gr.State(None)  # what this page already shows, so unchanged outputs are not re-sent

    def tick(name, before):
        view = job_view(runner, name)
        names = [j.name for j in runner.list_jobs()]
        now = [view[0], len(view[1]), tuple(view[2]), str(view[3]), tuple(names)]
        before = before or [None] * len(now)
        values = [view[0], view[1], view[2], view[3], gr.update(choices=names)]
        out = [value if now[i] != before[i] else gr.skip() for i, value in enumerate(values)]
        return (*out, now)

    timer = gr.Timer(1.0)
    timer.tick(tick, [job_pick, shown], [progress, loss_plot, samples, jobs, job_pick, shown], show_progress="hidden")
    return {"dataset": c["dataset"]}
