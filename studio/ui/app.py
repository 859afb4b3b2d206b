"""Builds the studio's Gradio Blocks app (model picker + one module per tab) and serves it."""

from __future__ import annotations

import os
from collections.abc import Callable

import gradio as gr

from studio.jobs import JobRunner
from studio.library import Workspace
from studio.models import resolve_spec
from studio.ui import compare_tab, dataset_tab, generate_tab, library_tab, train_tab
from studio.ui.common import PREDICTION_TYPES, ModelCache, error_text

CSS = "#train-progress progress { height: 18px; } .train-error { color: #b00020; }"
MAX_UPLOAD_MB = 2048  # one uploaded file (a dataset zip is at most 2 GiB unpacked too)
QUEUE_SIZE = 32  # requests waiting for a worker; more are refused with "queue is full"
CONCURRENCY = 2  # requests handled at once per event (generations also share one pipeline lock)
USER_TEMP_DIR = os.environ.get("GRADIO_TEMP_DIR")  # where the user asked gradio to keep uploads, if anywhere


def describe_base(spec: str) -> str:
    """A one-line status of the chosen base model (found or not, and what kind)."""
    try:
        kind, location = resolve_spec(spec)
    except ValueError as exc:
        return f"**Base model:** {exc}"
    return f"**Base model:** `{spec}` ({kind.replace('_', ' ')}: {location})"


def load_model(models: ModelCache, spec: str) -> str:
    """Load the chosen base model now; say what is loaded (family, size) or why it failed."""
    return _then_describe(models, lambda: models.get(spec))


def choose_prediction_type(models: ModelCache, choice: str) -> str:
    """Load base models with `choice` from now on; say what is loaded and what changes."""
    return _then_describe(models, lambda: models.set_prediction_type(choice))


def _then_describe(models: ModelCache, action: Callable[[], object]) -> str:
    """Run a model-picker action; what is loaded afterwards, under the error if it failed."""
    try:
        action()
    except Exception as exc:
        return f"{error_text(exc)}\n\n{models.describe()}"
    return models.describe()


def build_app(
    workspace: Workspace,
    base: str = "demo",
    runner: JobRunner | None = None,
    models: ModelCache | None = None,
) -> gr.Blocks:
    """The whole UI, bound to one workspace, one training slot and one loaded base model."""
    runner = runner or JobRunner(workspace)
    models = models or ModelCache()
    with gr.Blocks(title="LoRA style studio") as app:
        gr.Markdown("# LoRA style studio")
        with gr.Row(equal_height=True):
            base_box = gr.Textbox(
                value=base,
                label="Base model: demo, a diffusers folder, a .safetensors checkpoint, or a hub id",
                scale=3,
                elem_id="base-model",
            )
            prediction = gr.Dropdown(
                list(PREDICTION_TYPES),
                value="auto",
                label="Prediction type (SD 2.x single files do not say)",
                scale=1,
                elem_id="base-prediction",
            )
            load = gr.Button("Load model", scale=0, elem_id="base-load")
            with gr.Column(scale=3):
                base_status = gr.Markdown(describe_base(base), elem_id="base-status")
                loaded = gr.Markdown(models.describe(), elem_id="base-loaded")
        base_box.change(describe_base, base_box, base_status)
        load.click(lambda s: load_model(models, s), base_box, loaded)
        prediction.change(lambda p: choose_prediction_type(models, p), prediction, loaded)
        with gr.Tab("Dataset", elem_id="tab-dataset") as dataset_page:
            datasets = dataset_tab.build(workspace, models)
        with gr.Tab("Train", elem_id="tab-train") as train_page:
            trained = train_tab.build(runner, workspace, models, base_box)
        with gr.Tab("Generate", elem_id="tab-generate") as generate_page:
            generated = generate_tab.build(workspace, models, base_box)
        with gr.Tab("Compare", elem_id="tab-compare") as compare_page:
            compared = compare_tab.build(workspace, models, base_box)
        with gr.Tab("Library", elem_id="tab-library") as library_page:
            library = library_tab.build(workspace, models, base_box)

        # lists that other tabs change are refreshed when a tab is opened
        dataset_lists = [datasets["dataset"], trained["dataset"]]
        adapter_lists = generated["adapter_dropdowns"] + compared["adapter_dropdowns"]
        for page in (dataset_page, train_page):
            page.select(
                lambda: tuple(gr.update(choices=workspace.list_datasets()) for _ in dataset_lists), None, dataset_lists
            )
        for page in (generate_page, compare_page):
            page.select(
                lambda: tuple(gr.update(choices=workspace.list_adapters()) for _ in adapter_lists), None, adapter_lists
            )
        library_page.select(library["refresh"], None, library["refresh_outputs"])
        app.load(lambda: models.describe(), None, loaded)
    return app


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """USER:PASS -> (user, pass); raise ValueError on a malformed value."""
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASS")
    return user, password


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    workspace: str = "workspace",
    base: str = "demo",
    auth: str | None = None,
    share: bool = False,
    max_upload_mb: int = MAX_UPLOAD_MB,
    queue_size: int = QUEUE_SIZE,
    *,
    block: bool = True,
    runner: JobRunner | None = None,
    models: ModelCache | None = None,
) -> gr.Blocks:
    """Serve the UI (localhost only and no public link unless asked); with `block=False` return the running app.

    Files are served only from the workspace, uploads are capped at `max_upload_mb`, and at most `queue_size`
    requests wait (more get a "queue is full" error). Uploads land in the workspace's .cache/gradio (unless
    GRADIO_TEMP_DIR is set) and run history stays off, so nothing is kept outside the workspace."""
    if max_upload_mb < 1 or queue_size < 1:
        raise ValueError(f"upload limit and queue size must be at least 1, got {max_upload_mb} MB and {queue_size}")
    ws = Workspace(workspace)
    # gradio keeps uploads and copies of shown files in its own folder: keep that inside the workspace too
    os.environ["GRADIO_TEMP_DIR"] = USER_TEMP_DIR or str(ws.root / ".cache" / "gradio")
    app = build_app(ws, base, runner=runner, models=models)
    app.queue(max_size=queue_size, default_concurrency_limit=CONCURRENCY).launch(
        server_name=host,
        server_port=port,
        auth=parse_auth(auth),
        share=share,
        allowed_paths=[str(ws.root)],
        max_file_size=max_upload_mb * 1024**2,
        run_history=False,
        show_error=False,
        css=CSS,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return app
