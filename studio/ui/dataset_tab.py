"""Dataset tab: upload images / a zip / a folder into a workspace dataset, validate, preview crops, edit captions."""

from __future__ import annotations

import random
import statistics

import gradio as gr

from studio import atomic
from studio.library import Workspace, example_styles, safe_name
from studio.models import SD1
from studio.ui.common import ModelCache, reports_errors, uploaded_paths, whole_number
from training.config import TrainConfig
from training.data import DatasetReport, assign_bucket, crop_box, make_buckets, open_image, scan_dataset

REPORT_HEADERS = ["file", "status", "details"]
CAPTION_HEADERS = ["file", "caption"]
THUMB_SIDE = 160


def scan(workspace: Workspace, name: str) -> DatasetReport:
    """The validation report of a workspace dataset with its saved trigger word and class noun."""
    folder = workspace.existing_dataset(name)
    settings = workspace.dataset_settings(name)
    trigger = settings["trigger"]
    return scan_dataset(folder, trigger, f"{trigger} {settings['class_noun']}".strip())


def buckets_for(resolution: int, bucket_step: int = SD1.bucket_step) -> list[tuple[int, int]]:
    """The aspect-ratio buckets training at `resolution` uses (the trainer's defaults; the family's bucket step)."""
    defaults = TrainConfig()
    return make_buckets(
        resolution, bucket_step, min(defaults.min_bucket_resolution, resolution), defaults.max_bucket_resolution
    )


def native_size_of(models: ModelCache | None) -> int:
    """The loaded base model's own image size (what training at resolution 0 uses), else SD 1.x's 512."""
    loaded = models.loaded if models is not None else None
    return loaded.native_size if loaded is not None else 512


def bucket_step_of(models: ModelCache | None) -> int:
    """The loaded base model's bucket step (SDXL: 32 px), else SD 1.x's 64 px."""
    loaded = models.loaded if models is not None else None
    return loaded.family.bucket_step if loaded is not None else SD1.bucket_step


def report_rows(report: DatasetReport, resolution: int, bucket_step: int = SD1.bucket_step) -> list[list[str]]:
    """One row per file: kept (with size, bucket and any note such as a near-duplicate) or skipped (with the reason)."""
    buckets = buckets_for(resolution, bucket_step)
    rows = []
    for item in report.items:
        bucket = assign_bucket(item.width, item.height, buckets)
        size = f"{item.width}x{item.height} -> bucket {bucket[0]}x{bucket[1]}"
        details = "; ".join([size, *report.notes_for(item.path)])
        rows.append([item.path.name, "kept", details])
    rows += [[s.path.name, "skipped", s.reason] for s in report.skipped]
    return sorted(rows)


def thumbnails(report: DatasetReport, resolution: int, bucket_step: int = SD1.bucket_step) -> list[tuple[str, str]]:
    """(thumbnail path, caption) per kept image: exactly the centre crop training will use, scaled down."""
    buckets = buckets_for(resolution, bucket_step)
    thumbs = report.root / ".thumbs"
    thumbs.mkdir(exist_ok=True)
    out = []
    for item in report.items:
        bucket = assign_bucket(item.width, item.height, buckets)
        target = thumbs / f"{item.path.stem}_{bucket[0]}x{bucket[1]}.png"
        if not target.is_file() or target.stat().st_mtime < item.path.stat().st_mtime:
            image = open_image(item.path)
            scaled, (left, top) = crop_box(image.size, bucket, True, random.Random(0))
            crop = image.resize(scaled).crop((left, top, left + bucket[0], top + bucket[1]))
            crop.thumbnail((THUMB_SIDE, THUMB_SIDE))
            with atomic.atomic_path(target) as tmp:
                crop.save(tmp, format="PNG")
        cut = "no crop" if (item.width, item.height) == bucket else f"cropped to {bucket[0]}x{bucket[1]}"
        out.append((str(target), f"{item.path.name}: {item.width}x{item.height}, {cut}"))
    return out


def statistics_text(report: DatasetReport, resolution: int, bucket_step: int = SD1.bucket_step) -> str:
    """Dataset statistics as Markdown: counts, sizes, buckets, captions, most frequent tags."""
    items = report.items
    lines = [f"**{len(items)} image(s) kept, {len(report.skipped)} file(s) skipped**"]
    duplicates = [s for s in report.skipped if s.reason.startswith("exact duplicate")]
    if duplicates or report.notes:
        lines.append(
            f"{len(duplicates)} exact duplicate(s) skipped, {len(report.notes)} near-duplicate(s) kept: "
            + ", ".join(f"`{n.path.name}` ({n.reason})" for n in report.notes)
        )
    if not items:
        return "\n\n".join(lines + ["Upload images to see statistics."])
    widths = [i.width for i in items]
    heights = [i.height for i in items]
    buckets = buckets_for(resolution, bucket_step)
    counts: dict[str, int] = {}
    for item in items:
        b = assign_bucket(item.width, item.height, buckets)
        counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + 1
    sidecars = sum(1 for i in items if i.path.with_suffix(".txt").is_file())
    words = statistics.mean(len(i.caption.replace(",", " ").split()) for i in items)
    tags = next(iter(report.tag_frequency().values()), {})
    top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    lines += [
        f"- sizes: width {min(widths)}-{max(widths)} (median {statistics.median(widths):g}), "
        f"height {min(heights)}-{max(heights)} (median {statistics.median(heights):g})",
        f"- buckets at {resolution}px (sides in steps of {bucket_step}px): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        f"- captions: {sidecars} of {len(items)} images have a .txt sidecar; {words:.1f} words on average",
        "- top tags: " + ", ".join(f"`{t}` ({n})" for t, n in top),
    ]
    return "\n".join(lines)


@reports_errors(outputs=2, status=0)
def upload(workspace: Workspace, name: str, files, folder: str) -> tuple[str, dict]:
    """Add uploaded files / zips and a server folder to dataset `name`; (import report, dataset choices)."""
    name = safe_name(name)
    paths = uploaded_paths(files)
    if not paths and not (folder or "").strip():
        raise ValueError("no images given: upload images or a .zip, or enter a folder path")
    report = workspace.import_files(name, paths)
    if (folder or "").strip():
        report.merge(workspace.import_folder(name, folder))
    lines = [f"**Dataset `{name}`: {report.summary()}.**"]
    lines += [f"- refused `{file}`: {reason}" for file, reason in report.skipped]
    return "\n".join(lines), gr.update(choices=workspace.list_datasets(), value=name)


@reports_errors(outputs=2, status=0)
def use_example(workspace: Workspace, style: str) -> tuple[str, dict]:
    """Make a bundled example style set a workspace dataset; (status, dataset choices with it selected)."""
    name, report = workspace.add_example(style)
    if report is None:
        message = f"**Dataset `{name}` is already in the workspace** (opened as it is)."
    else:
        message = (
            f"**Dataset `{name}`: {len(workspace.dataset_images(name))} image(s) with captions** from the bundled "
            f"example ({report.summary()}), trigger word `sks`. Train it with the default preset on the demo model, "
            "then generate with `sks, ...` in the prompt."
        )
    return message, gr.update(choices=workspace.list_datasets(), value=name)


@reports_errors(outputs=7, status=6)
def open_dataset(
    workspace: Workspace, name: str, resolution, bucket_step: int = SD1.bucket_step, native_size: int = 512
) -> tuple:
    """(report rows, thumbnails, trigger, class noun, caption rows, statistics, status) of a dataset.

    Resolution 0 previews at `native_size`, the base model's own size (as training at resolution 0 does)."""
    resolution = whole_number(resolution, "resolution", 0, 4096) or native_size
    whole_number(resolution, "resolution", 64, 4096)
    report = scan(workspace, name)
    settings = workspace.dataset_settings(name)
    captions = [list(row) for row in workspace.captions(name)]
    status = f"Opened dataset `{name}` ({report.root})."
    return (
        report_rows(report, resolution, bucket_step),
        thumbnails(report, resolution, bucket_step),
        settings["trigger"],
        settings["class_noun"],
        captions or [["", ""]],
        statistics_text(report, resolution, bucket_step),
        status,
    )


@reports_errors(outputs=1, status=0)
def save_settings(workspace: Workspace, name: str, trigger: str, class_noun: str) -> str:
    """Save the dataset's trigger word and class noun."""
    workspace.existing_dataset(name)
    trigger = (trigger or "").strip()
    if not trigger or " " in trigger:
        raise ValueError(f"trigger word must be one word, got {trigger!r}")
    workspace.save_dataset_settings(name, trigger=trigger, class_noun=(class_noun or "").strip())
    return f"Saved trigger word `{trigger}` for `{name}`."


@reports_errors(outputs=1, status=0)
def save_captions(workspace: Workspace, name: str, table) -> str:
    """Write the caption table as `.txt` sidecars (an empty caption removes the sidecar)."""
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    rows = [(str(r[0]), str(r[1] if r[1] is not None else "")) for r in rows if r and str(r[0]).strip()]
    if not rows:
        raise ValueError("no captions to save: the dataset has no images")
    count = workspace.save_captions(name, rows)
    return f"Saved {count} caption(s) as .txt files in `{name}`."


def dataset_choices(workspace: Workspace) -> dict:
    """A dropdown update listing the workspace's datasets."""
    return gr.update(choices=workspace.list_datasets())


def build(workspace: Workspace, models: ModelCache | None = None) -> dict:
    """Lay out the Dataset tab; return the components other tabs listen to."""
    gr.Markdown("Create a dataset (or reopen one), add images, check what training will see, and caption them.")
    with gr.Row():
        name = gr.Dropdown(
            choices=workspace.list_datasets(), label="Dataset", allow_custom_value=True, elem_id="dataset-name"
        )
        resolution = gr.Number(
            label="Resolution of the crop preview (0: the loaded model's own size; buckets follow its family)",
            value=0,
            precision=0,
            elem_id="dataset-resolution",
        )
        refresh = gr.Button("Refresh list", size="sm")
    with gr.Row():
        files = gr.File(
            label="Images or a .zip (drop many)",
            file_count="multiple",
            type="filepath",
            height=220,
            elem_id="dataset-files",
        )
        with gr.Column():
            folder = gr.Textbox(label="...or a folder on the server", placeholder="/path/to/images")
            add = gr.Button("Add to dataset", variant="primary", elem_id="dataset-add")
            open_button = gr.Button("Open / re-check", elem_id="dataset-open")
    examples = example_styles()
    if examples:
        with gr.Row():
            example = gr.Dropdown(
                choices=examples,
                value=examples[0],
                label="...or start from an example style made for the demo model",
                elem_id="dataset-example",
            )
            use = gr.Button("Use this example", elem_id="dataset-use-example")
    status = gr.Markdown(elem_id="dataset-status")
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word", value="sks", elem_id="dataset-trigger")
        class_noun = gr.Textbox(label="Class noun (captions without a .txt become 'trigger noun')", value="style")
        save_trigger = gr.Button("Save trigger word", elem_id="dataset-save-trigger")
    stats = gr.Markdown(elem_id="dataset-stats")
    with gr.Row():
        report = gr.Dataframe(
            headers=REPORT_HEADERS, label="Validation report", interactive=False, elem_id="dataset-report"
        )
        thumbs = gr.Gallery(
            fit_columns=False,
            object_fit="contain",
            label="What training sees (crop per bucket)",
            columns=6,
            height=320,
            elem_id="thumbs",
        )
    captions = gr.Dataframe(
        headers=CAPTION_HEADERS,
        label="Captions (one row per image; saved as .txt beside it)",
        interactive=True,
        static_columns=[0],
        elem_id="dataset-captions",
    )
    save_caps = gr.Button("Save captions", elem_id="dataset-save-captions")

    opened = [report, thumbs, trigger, class_noun, captions, stats, status]

    def show(n, r):
        return open_dataset(workspace, n, r, bucket_step_of(models), native_size_of(models))

    def reopen(n, r):  # after an upload or save: refresh everything but keep that action's message
        return show(n, r)[:-1]

    add.click(
        lambda n, f, d: upload(workspace, n, f, d), [name, files, folder], [status, name], show_progress="minimal"
    ).then(reopen, [name, resolution], opened[:-1])
    open_button.click(show, [name, resolution], opened)
    if examples:
        use.click(lambda s: use_example(workspace, s), example, [status, name]).then(
            reopen, [name, resolution], opened[:-1]
        )
    name.select(show, [name, resolution], opened)
    save_trigger.click(lambda n, t, c: save_settings(workspace, n, t, c), [name, trigger, class_noun], status).then(
        reopen, [name, resolution], opened[:-1]
    )
    save_caps.click(lambda n, t: save_captions(workspace, n, t), [name, captions], status)
    refresh.click(lambda: dataset_choices(workspace), None, name)
    return {"dataset": name}
