"""Library tab: adapter cards, import any LoRA file, CivitAI export as a download, merge, rename, delete."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio import atomic, sidecars
from studio.adapters import file_hashes, parse_adapter, read_metadata
from studio.compose import match_adapter
from studio.library import Workspace, safe_name, sanitize_filename
from studio.merge import merge_adapters
from studio.ui.common import ModelCache, error_text, real_number, reports_errors, uploaded_paths, whole_number

CARD_HEADERS = ["adapter", "trigger", "base", "rank", "alpha", "steps", "images", "date", "AutoV3"]
SIDECAR_UPLOADS = (".json", ".png")  # A1111's NAME.json and NAME.preview.png, uploaded with the adapter


def card(workspace: Workspace, name: str) -> dict[str, str]:
    """The facts an adapter card shows, from the file's header (no tensors are loaded)."""
    path = workspace.existing_adapter(name)
    meta = read_metadata(path)
    started = meta.get("ss_training_finished_at") or meta.get("ss_training_started_at")
    date = meta.get("modelspec.date", "")[:10]
    if not date and started:
        try:
            date = dt.datetime.fromtimestamp(float(started)).date().isoformat()
        except ValueError:
            date = ""
    return {
        "adapter": name,
        "trigger": sidecars.trigger(path, meta),
        "base": meta.get("ss_sd_model_name") or meta.get("ss_base_model_version", ""),
        "rank": meta.get("ss_network_dim", ""),
        "alpha": meta.get("ss_network_alpha", ""),
        "steps": meta.get("ss_steps", ""),
        "images": meta.get("ss_num_train_images", ""),
        "date": date,
        "AutoV3": meta.get("sshs_model_hash", "")[:12],
    }


def cards_table(workspace: Workspace) -> list[list[str]]:
    """One row per adapter with its card facts."""
    rows = []
    for name in workspace.list_adapters():
        try:
            facts = card(workspace, name)
        except Exception as exc:  # a damaged file still gets a row saying so
            facts = {"adapter": name, "trigger": error_text(exc)}
        rows.append([facts.get(h, "") for h in CARD_HEADERS])
    return rows or [[""] * len(CARD_HEADERS)]


def _placeholder(workspace: Workspace) -> Path:
    path = workspace.root / ".cache" / "no_preview.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            Image.new("RGB", (128, 128), (200, 200, 200)).save(tmp, format="PNG")
    return path


def card_gallery(workspace: Workspace) -> list[tuple[str, str]]:
    """(preview image, caption) per adapter; a grey square where no preview was set."""
    items = []
    for name in workspace.list_adapters():
        preview = workspace.preview_path(name)
        items.append((str(preview if preview.is_file() else _placeholder(workspace)), name))
    return items


@reports_errors(outputs=2, status=1)
def details(workspace: Workspace, name: str) -> tuple[Any, str]:
    """(preview image, Markdown card with every fact and hash) of one adapter."""
    facts = card(workspace, name)
    path = workspace.existing_adapter(name)
    hashes = file_hashes(path)
    meta = read_metadata(path)
    lines = [f"### {name}", ""]
    lines += [f"- **{key}**: {value}" for key, value in facts.items() if key != "adapter" and value]
    lines += [
        f"- **hashes**: AutoV1 `{hashes['AutoV1']}`, AutoV2 `{hashes['AutoV2']}`, AutoV3 `{hashes['AutoV3'][:12]}`",
        f"- **SHA256**: `{hashes['SHA256']}`",
        f"- **file**: `{path.name}` ({path.stat().st_size / 1024:.1f} KiB)",
        f"- **captions/dataset metadata in file**: {'yes' if 'ss_tag_frequency' in meta else 'no'}",
        f"- **preferred weight** (A1111's, in `{sidecars.json_path(path).name}`): {sidecars.preferred_weight(path):g}",
        f"- use it in a prompt: `<lora:{name}:0.8>`",
    ]
    preview = workspace.preview_path(name)
    return (str(preview) if preview.is_file() else None), "\n".join(lines)


@reports_errors(outputs=1, status=0)
def import_adapter(models: ModelCache, workspace: Workspace, base: str, files: Any, name: str) -> str:
    """Validate an uploaded LoRA, check it against the base model, and add it to the library with its A1111 sidecars."""
    paths = uploaded_paths(files)
    adapters = [p for p in paths if p.suffix.lower() not in SIDECAR_UPLOADS]
    if not adapters:
        raise ValueError("choose a .safetensors LoRA file to import (its .json and .preview.png may come with it)")
    if len(adapters) > 1:
        raise ValueError("import one adapter at a time (with its .json and .preview.png, if any)")
    source = adapters[0]
    parsed = parse_adapter(source)  # refuses pickles, unreadable files and files with no LoRA in them
    target_name = safe_name(name) if (name or "").strip() else Path(sanitize_filename(source.name)).stem
    target = workspace.adapter_path(target_name)
    if target.exists():
        raise ValueError(f"an adapter named {target_name!r} already exists; give another name")
    try:
        matched = match_adapter(parsed, models.get(base))
        unmatched, checked = matched.unmatched, f"{len(matched.patches)} module(s) match the base model"
    except ValueError as exc:
        if "matches nothing" in str(exc) or "is a LoRA for" in str(exc):
            raise
        unmatched, checked = list(parsed.unknown_keys), f"not checked against a base model ({exc})"
    _, warnings = workspace.import_adapter(source, target_name, [p for p in paths if p != source])
    fields, _ = sidecars.stored_fields(target)
    kept = f"trigger `{fields.get('activation text') or '-'}`, preferred weight {fields.get('preferred weight', 1):g}"
    kept += ", preview" if workspace.preview_path(target_name).is_file() else ", no preview"
    lines = [f"Imported **{target_name}** ({parsed.format} format, {len(parsed.modules)} modules); {checked}; {kept}."]
    lines += [f"- Warning: {warning}" for warning in warnings]
    if unmatched:
        lines.append(f"**{len(unmatched)} key(s) not used** (they would do nothing):")
        lines += [f"- `{key}`" for key in unmatched[:50]]
        if len(unmatched) > 50:
            lines.append(f"- ... and {len(unmatched) - 50} more")
    return "\n".join(lines)


@reports_errors(outputs=2, status=1)
def export(workspace: Workspace, name: str, include_dataset_metadata: bool) -> tuple[str | None, str]:
    """Write a CivitAI-ready copy with A1111's sidecars beside it and offer it as a download; (file, summary)."""
    source = workspace.existing_adapter(name)
    suffix = "" if include_dataset_metadata else "_private"
    target = workspace.exports_dir / f"{safe_name(name)}{suffix}.safetensors"
    metadata, warnings = sidecars.export_with_sidecars(
        source, target, include_dataset_metadata=include_dataset_metadata
    )
    hashes = file_hashes(target)
    beside = [p.name for p in (sidecars.json_path(target), sidecars.preview_path(target)) if p.is_file()]
    summary = (
        f"Exported **{metadata.get('modelspec.title', name)}** - trigger "
        f"`{metadata.get('modelspec.trigger_phrase', '')}`, rank {metadata.get('ss_network_dim')}, "
        f"alpha {metadata.get('ss_network_alpha')}; caption/dataset metadata "
        f"{'included' if include_dataset_metadata else 'left out'}"
        f"{'; cover image embedded' if 'ssmd_cover_images' in metadata else ''}. "
        f"AutoV2 `{hashes['AutoV2']}`, AutoV3 `{hashes['AutoV3'][:12]}`. "
        f"A1111 sidecars beside it in `{target.parent}`: {', '.join(f'`{n}`' for n in beside)}"
    )
    summary += "".join(f"\n\nWarning: {warning}" for warning in warnings)
    return str(target), summary


def parse_merge_inputs(text: str) -> list[tuple[str, float]]:
    """'a:0.7, b:0.5' -> [("a", 0.7), ("b", 0.5)] (weight 1 when left out)."""
    inputs = []
    for part in [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]:
        name, _, weight = part.partition(":")
        inputs.append((name.strip(), real_number(weight, f"weight of {name.strip()}") if weight else 1.0))
    if len(inputs) < 2:
        raise ValueError("give at least two adapters to merge, like 'inky:0.7, dots:0.5'")
    return inputs


@reports_errors(outputs=1, status=0)
def merge(workspace: Workspace, spec: str, output: str, rank: Any) -> str:
    """Merge library adapters at weights into a new library adapter (exact, or SVD to `rank` if not 0)."""
    inputs = [(workspace.existing_adapter(n), w) for n, w in parse_merge_inputs(spec)]
    target = workspace.adapter_path(output)
    if target.exists():
        raise ValueError(f"an adapter named {output!r} already exists; choose another name")
    rank = whole_number(rank, "rank", 0, 1024)
    report = merge_adapters(inputs, target, rank=rank or None, title=safe_name(output))
    sidecars.write_sidecars(target)
    how = "exact (ranks concatenated)" if not rank else f"SVD to rank {rank}"
    return (
        f"Merged into **{output}**: {report.modules} modules, {how}, max rank {report.max_rank}; "
        f"relative error max {report.relative_error_max:.4f}, mean {report.relative_error_mean:.4f}."
    )


@reports_errors(outputs=1, status=0)
def rename(workspace: Workspace, name: str, new_name: str) -> str:
    """Rename an adapter (file, title in the file, preview)."""
    workspace.rename_adapter(name, new_name)
    return f"Renamed **{name}** to **{safe_name(new_name)}**."


@reports_errors(outputs=1, status=0)
def delete(workspace: Workspace, name: str, confirmed: bool) -> str:
    """Delete an adapter, only when the user confirmed."""
    workspace.existing_adapter(name)
    if not confirmed:
        raise ValueError(f"tick 'yes, delete {name}' to confirm")
    workspace.delete_adapter(name)
    return f"Deleted **{name}**."


def build(workspace: Workspace, models: ModelCache, base_box: gr.Textbox) -> dict:
    """Lay out the Library tab; return its refresh outputs."""
    gallery = gr.Gallery(
        fit_columns=False,
        object_fit="contain",
        value=card_gallery(workspace),
        label="Adapters",
        columns=6,
        height=220,
        elem_id="lib-cards",
    )
    table = gr.Dataframe(
        value=cards_table(workspace), headers=CARD_HEADERS, interactive=False, label="Cards", elem_id="lib-table"
    )
    with gr.Row():
        adapter = gr.Dropdown(choices=workspace.list_adapters(), label="Adapter", elem_id="lib-adapter")
        refresh = gr.Button("Refresh", size="sm", elem_id="lib-refresh")
    status = gr.Markdown(elem_id="lib-status")
    with gr.Row():
        preview = gr.Image(label="Preview", type="filepath", interactive=False, height=200)
        facts = gr.Markdown(elem_id="lib-details")
    with gr.Tab("Export"):
        include = gr.Checkbox(label="Include caption and dataset-folder metadata", value=False, elem_id="lib-include")
        export_button = gr.Button("Export for CivitAI", variant="primary", elem_id="lib-export")
        download = gr.File(label="Download", interactive=False, elem_id="lib-download")
    with gr.Tab("Import"):
        upload = gr.File(
            label=".safetensors LoRA (with its A1111 NAME.json and NAME.preview.png, if you have them)",
            file_types=[".safetensors", *SIDECAR_UPLOADS],
            file_count="multiple",
            type="filepath",
        )
        import_name = gr.Textbox(label="Name in the library (default: the file name)")
        import_button = gr.Button("Import")
    with gr.Tab("Merge"):
        merge_spec = gr.Textbox(label="Adapters and weights", placeholder="inky:0.7, dots:0.5")
        with gr.Row():
            merge_name = gr.Textbox(label="New adapter name")
            merge_rank = gr.Number(label="Rank (0: exact)", value=0, precision=0)
        merge_button = gr.Button("Merge")
    with gr.Tab("Rename / delete"):
        with gr.Row():
            new_name = gr.Textbox(label="New name")
            rename_button = gr.Button("Rename")
        with gr.Row():
            confirm = gr.Checkbox(label="Yes, delete this adapter", value=False)
            delete_button = gr.Button("Delete", variant="stop")

    def refreshed():
        names = workspace.list_adapters()
        return card_gallery(workspace), cards_table(workspace), gr.update(choices=names)

    listing = [gallery, table, adapter]
    adapter.change(lambda n: details(workspace, n) if n else (None, ""), adapter, [preview, facts])
    refresh.click(refreshed, None, listing)
    export_button.click(lambda n, i: export(workspace, n, i), [adapter, include], [download, status])
    import_button.click(
        lambda f, n, b: import_adapter(models, workspace, b, f, n), [upload, import_name, base_box], status
    ).then(refreshed, None, listing)
    merge_button.click(lambda s, o, r: merge(workspace, s, o, r), [merge_spec, merge_name, merge_rank], status).then(
        refreshed, None, listing
    )
    rename_button.click(lambda n, m: rename(workspace, n, m), [adapter, new_name], status).then(
        refreshed, None, listing
    )
    delete_button.click(lambda n, c: delete(workspace, n, c), [adapter, confirm], status).then(
        lambda: False, None, confirm
    ).then(refreshed, None, listing)
    return {"refresh": refreshed, "refresh_outputs": listing}
