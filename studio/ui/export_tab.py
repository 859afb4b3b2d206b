"""Export tab: a CivitAI-ready copy of an adapter as a download, optionally without dataset metadata."""

from __future__ import annotations

import gradio as gr

from studio.adapters import export_adapter, file_hashes
from studio.library import Workspace, safe_name


def export(workspace: Workspace, name: str, include_dataset_metadata: bool) -> tuple[str | None, str]:
    """Write the export and return (file path for download, Markdown summary)."""
    try:
        if not name:
            raise ValueError("choose an adapter to export")
        source = workspace.adapter_path(name)
        if not source.is_file():
            raise ValueError(f"no adapter named {name!r} in the workspace")
        suffix = "" if include_dataset_metadata else "_private"
        target = workspace.exports_dir / f"{safe_name(name)}{suffix}.safetensors"
        metadata = export_adapter(source, target, include_dataset_metadata=include_dataset_metadata)
    except ValueError as exc:
        return None, f"**Error:** {exc}"
    hashes = file_hashes(target)
    summary = (
        f"**{metadata.get('modelspec.title', name)}** - trigger `{metadata.get('modelspec.trigger_phrase', '')}`, "
        f"rank {metadata.get('ss_network_dim')}, alpha {metadata.get('ss_network_alpha')}\n\n"
        f"AutoV2 `{hashes['AutoV2']}` - AutoV3 `{hashes['AutoV3'][:12]}`"
    )
    return str(target), summary


def build(workspace: Workspace) -> None:
    """Lay out the Export tab inside the current Blocks."""
    with gr.Row():
        adapter = gr.Dropdown(choices=workspace.list_adapters(), label="Adapter", allow_custom_value=False)
        refresh = gr.Button("Refresh list")
    include = gr.Checkbox(label="Include caption and dataset-folder metadata", value=False)
    go = gr.Button("Export", variant="primary")
    summary = gr.Markdown()
    download = gr.File(label="Download")
    refresh.click(lambda: gr.Dropdown(choices=workspace.list_adapters()), None, adapter)
    go.click(lambda n, i: export(workspace, n, i), [adapter, include], [download, summary])
