"""Train tab: check a data folder, start / cancel a background training run, watch progress and loss."""

from __future__ import annotations

import gradio as gr

from studio.jobs import JobRunner, TrainingJob
from studio.library import Workspace
from training.config import PRESETS, TrainConfig
from training.data import scan_dataset


def check_data(data_dir: str, trigger: str) -> str:
    """The validation report of a data folder, as Markdown."""
    if not (data_dir or "").strip():
        return "Enter the folder that holds your training images."
    try:
        report = scan_dataset(data_dir.strip(), trigger.strip(), f"{trigger.strip()} style")
    except ValueError as exc:
        return f"**Error:** {exc}"
    lines = [f"**{len(report.items)} image(s) kept, {len(report.skipped)} skipped**", ""]
    lines += [f"- skipped `{s.path.name}`: {s.reason}" for s in report.skipped]
    return "\n".join(lines)


def build_config(
    workspace: Workspace,
    base: str,
    data_dir: str,
    name: str,
    trigger: str,
    preset: str,
    steps: float,
    rank: float,
    resolution: float,
    text_encoder: bool,
) -> TrainConfig:
    """The TrainConfig for the Train tab's values (raises ValueError naming a bad value)."""
    for label, value in (("steps", steps), ("rank", rank), ("resolution", resolution)):
        if value is None or float(value) != int(value):
            raise ValueError(f"{label} must be a whole number, got {value!r}")
    return TrainConfig.from_preset(
        preset,
        base=base.strip(),
        data_dir=(data_dir or "").strip(),
        output=str(workspace.adapter_path(name)),
        work_dir=str(workspace.run_dir(name)),
        output_name=name.strip(),
        trigger=trigger.strip(),
        max_train_steps=int(steps),
        epochs=0,
        rank=int(rank),
        alpha=float(rank) / 2,
        resolution=int(resolution),
        train_text_encoder=bool(text_encoder),
    )


def start(runner: JobRunner, workspace: Workspace, *values) -> str:
    """Start a run from the tab's values; a readable message either way."""
    try:
        config = build_config(workspace, *values)
        if workspace.adapter_path(config.output_name).exists():
            raise ValueError(f"an adapter named {config.output_name!r} already exists; choose another name")
        runner.submit(config)
    except ValueError as exc:
        return f"**Error:** {exc}"
    return f"Started training **{config.output_name}** ({config.max_train_steps} steps)."


def status(job: TrainingJob | None) -> tuple[str, dict, list]:
    """(progress text, loss plot data, sample image paths) of the current job."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "loss": []})
    if job is None:
        return "No training job yet.", empty, []
    event = job.latest
    text = f"**{job.status}**"
    if event is not None and event.total_steps:
        percent = 100 * event.step / event.total_steps
        text += f" - step {event.step}/{event.total_steps} ({percent:.0f}%)"
        if event.loss is not None:
            text += f", loss {event.loss:.4f}"
        if event.eta_seconds is not None and job.status == "running":
            text += f", ETA {event.eta_seconds:.0f}s"
    elif event is not None:
        text += f" - {event.message}"
    if job.error:
        text += f"\n\n{job.error}"
    if job.status == "done" and job.result is not None:
        text += f"\n\nSaved `{job.result.output.name}`."
    losses = job.losses
    frame = pd.DataFrame({"step": [s for s, _ in losses], "loss": [v for _, v in losses]}) if losses else empty
    return text, frame, [str(p) for p in job.samples]


def build(runner: JobRunner, workspace: Workspace, base_box: gr.Textbox) -> None:
    """Lay out the Train tab inside the current Blocks."""
    with gr.Row():
        data_dir = gr.Textbox(label="Image folder", placeholder="/path/to/images (with optional .txt captions)")
        name = gr.Textbox(label="Adapter name", value="my_style")
        trigger = gr.Textbox(label="Trigger word", value="sks")
    with gr.Row():
        preset = gr.Dropdown(choices=list(PRESETS), value="style", label="Preset")
        steps = gr.Number(label="Steps", value=PRESETS["style"]["max_train_steps"], precision=0)
        rank = gr.Number(label="Rank", value=PRESETS["style"]["rank"], precision=0)
        resolution = gr.Number(label="Resolution", value=512, precision=0)
        text_encoder = gr.Checkbox(label="Train text encoder", value=False)
    report = gr.Markdown()
    with gr.Row():
        check = gr.Button("Check data")
        go = gr.Button("Start training", variant="primary")
        stop = gr.Button("Cancel")
    progress = gr.Markdown("No training job yet.")
    loss_plot = gr.LinePlot(x="step", y="loss", label="Loss")
    samples = gr.Gallery(label="Samples at checkpoints", columns=4, height=200)

    values = [base_box, data_dir, name, trigger, preset, steps, rank, resolution, text_encoder]
    check.click(check_data, [data_dir, trigger], report)
    go.click(lambda *v: start(runner, workspace, *v), values, report)
    stop.click(lambda: runner.current.cancel() if runner.current else None, None, None)
    preset.change(
        lambda p: (PRESETS[p].get("max_train_steps", 1000), PRESETS[p].get("rank", 16)), preset, [steps, rank]
    )
    gr.Timer(1.0).tick(lambda: status(runner.current), None, [progress, loss_plot, samples])
