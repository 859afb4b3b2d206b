"""Builds the studio's Gradio Blocks app and serves it."""

from __future__ import annotations

import gradio as gr

from studio.jobs import JobRunner
from studio.library import Workspace
from studio.models import resolve_spec
from studio.ui import export_tab, train_tab


def describe_base(spec: str) -> str:
    """A one-line status of the chosen base model (found or not, and what kind)."""
    try:
        kind, location = resolve_spec(spec)
    except ValueError as exc:
        return f"**Base model:** {exc}"
    return f"**Base model:** `{spec}` ({kind.replace('_', ' ')}: {location})"


def build_app(workspace: Workspace, base: str = "demo", runner: JobRunner | None = None) -> gr.Blocks:
    """The whole UI, bound to one workspace and one training slot."""
    runner = runner or JobRunner()
    with gr.Blocks(title="LoRA style studio") as app:
        gr.Markdown("# LoRA style studio")
        with gr.Row():
            base_box = gr.Textbox(value=base, label="Base model (demo, a diffusers folder, a .safetensors, a hub id)")
            base_status = gr.Markdown(describe_base(base))
        base_box.change(describe_base, base_box, base_status)
        with gr.Tab("Train"):
            train_tab.build(runner, workspace, base_box)
        with gr.Tab("Export"):
            export_tab.build(workspace)
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
) -> None:
    """Serve the UI (localhost only unless another host is given)."""
    ws = Workspace(workspace)
    app = build_app(ws, base)
    app.queue(max_size=32).launch(
        server_name=host, server_port=port, auth=parse_auth(auth), share=share, allowed_paths=[str(ws.root)]
    )
