"""The UI's handlers driven without a browser: every tab's happy path and the errors a user can cause."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from studio import compare
from studio.adapters import read_adapter
from studio.jobs import JobRunner, TrainingJob
from studio.library import Workspace, safe_name, sanitize_filename
from studio.ui import compare_tab, dataset_tab, generate_tab, library_tab, train_tab
from studio.ui.app import build_app, describe_base, load_model, parse_auth
from studio.ui.common import ModelCache
from tests.helpers import make_adapter, write_style_images
from training.lora import UNET_TARGET_PRESETS


def _png_bytes(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _train_args(dataset="inky", name="inky", **overrides):
    values = train_tab.default_values(dataset=dataset, name=name, preset="quick")
    values.update(steps=3, rank=4, alpha=4, resolution=64, batch_size=1, checkpoint_every=2)
    values.update(sample_prompts="sks style, a circle")
    values.update(overrides)
    return train_tab.as_args(values)


def _gen_args(prompt="sks style, a circle", stack=(), **overrides):
    settings = dict(
        prompt=prompt,
        negative="",
        seed_mode="fixed",
        seed=1,
        steps=2,
        cfg=7.0,
        width=0,
        height=0,
        sampler="Default",
        batch=1,
    )
    settings.update(overrides)
    rows = []
    for index in range(generate_tab.SLOTS):
        if index < len(stack):
            name, weight = stack[index]
            rows += [name, weight, True, False, 1.0, 1.0]
        else:
            rows += [None, 1.0, True, False, 1.0, 1.0]
    return [settings[k] for k in generate_tab.SETTINGS] + rows


@pytest.fixture(scope="module")
def studio(tiny_model_dir, tmp_path_factory):
    """A workspace with a dataset 'inky' and an adapter 'inky' trained through the Train tab's handlers."""
    root = tmp_path_factory.mktemp("studio")
    workspace = Workspace(root / "ws")
    images = write_style_images(root / "images", count=4)
    report, _ = dataset_tab.upload(workspace, "inky", sorted(images.iterdir()), "")
    assert "8 file(s) added" in report  # 4 images + 4 captions
    assert "Saved trigger word `inkstyle`" in dataset_tab.save_settings(workspace, "inky", "inkstyle", "style")
    runner = JobRunner(workspace)
    models = ModelCache()
    message = train_tab.start(runner, workspace, str(tiny_model_dir), *_train_args())
    assert "Training **inky**" in message
    assert runner.get("inky").join(timeout=300)
    return workspace, runner, models, str(tiny_model_dir)


# ---------------------------------------------------------------------------------------------------- dataset tab


def test_upload_needs_images_and_a_valid_zip(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    status, _ = dataset_tab.upload(workspace, "set", [], "")
    assert status.startswith("**Error:** no images given")
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"this is not a zip")
    status, _ = dataset_tab.upload(workspace, "set", [str(bad)], "")
    assert "broken.zip is not a valid zip file" in status
    status, _ = dataset_tab.upload(workspace, "../up", [str(bad)], "")
    assert "not allowed" in status
    status, _ = dataset_tab.upload(workspace, "set", [], str(tmp_path / "nowhere"))
    assert "folder not found" in status


def test_zip_entries_never_escape_the_dataset_folder(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/one.png", _png_bytes())
        zf.writestr("good/one.txt", "a red square")
        zf.writestr("../escape.png", _png_bytes((1, 2, 3)))
        zf.writestr("/abs/evil.png", _png_bytes((4, 5, 6)))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("notes.pdf", b"%PDF")
        zf.writestr("copy.png", _png_bytes())  # same bytes as one.png
    status, _ = dataset_tab.upload(workspace, "zipped", [str(archive)], "")
    folder = workspace.dataset_dir("zipped")
    assert sorted(p.name for p in folder.iterdir()) == ["one.png", "one.txt"]
    assert not (tmp_path / "escape.png").exists() and not (workspace.datasets_dir / "escape.png").exists()
    assert "path leaves the folder" in status and "absolute path" in status and "symbolic link" in status
    assert "not an image (.pdf)" in status and "duplicate of one.png" in status


def test_uploaded_names_are_sanitised():
    assert sanitize_filename("../../etc/pass wd.PNG") == "pass_wd.png"
    assert sanitize_filename("C:\\Users\\me\\cat photo.jpg") == "cat_photo.jpg"
    assert sanitize_filename("...") == "file"


def test_open_dataset_reports_kept_and_skipped_with_crops_and_stats(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    images = write_style_images(tmp_path / "images", count=3, size=(96, 64))
    (images / "tiny.png").write_bytes(_png_bytes(size=(20, 20)))
    (images / "broken.png").write_bytes(b"not a png at all")
    dataset_tab.upload(workspace, "mixed", [], str(images))
    rows, thumbs, trigger, noun, captions, stats, status = dataset_tab.open_dataset(workspace, "mixed", 64)
    by_file = {r[0]: r for r in rows}
    assert by_file["img_00.png"][1] == "kept" and "96x64 -> bucket 64x64" in by_file["img_00.png"][2]
    assert by_file["tiny.png"][1] == "skipped" and "too small" in by_file["tiny.png"][2]
    assert by_file["broken.png"][1] == "skipped"
    assert len(thumbs) == 3 and Image.open(thumbs[0][0]).size == (64, 64) and "cropped to 64x64" in thumbs[0][1]
    assert "3 image(s) kept, 2 file(s) skipped" in stats and "top tags" in stats
    assert ["img_00.png", "a red circle on a white background"] in captions
    assert (
        dataset_tab.open_dataset(workspace, "ghost", 64)[-1] == "**Error:** no dataset named 'ghost' in the workspace"
    )
    assert "resolution must be a whole number" in dataset_tab.open_dataset(workspace, "mixed", "big")[-1]


def test_dataset_preview_buckets_follow_the_loaded_models_family(tmp_path):
    from studio.tiny import build_tiny_pipeline

    workspace = Workspace(tmp_path / "ws")
    dataset_tab.upload(workspace, "wide", [], str(write_style_images(tmp_path / "images", count=1, size=(96, 64))))
    models = ModelCache()
    assert dataset_tab.bucket_step_of(models) == 64  # nothing loaded: SD 1.x's buckets
    models.get(str(build_tiny_pipeline(tmp_path / "xl", family="sdxl")))
    assert dataset_tab.bucket_step_of(models) == 32
    sd1_rows = dataset_tab.open_dataset(workspace, "wide", 512)[0]
    rows, *_, stats, _status = dataset_tab.open_dataset(workspace, "wide", 512, dataset_tab.bucket_step_of(models))
    bucket = rows[0][2].split("bucket ")[1].split(";")[0]
    width, height = (int(side) for side in bucket.split("x"))
    # a 3:2 picture gets a bucket SD 1.x's 64-px grid does not have, as the SDXL trainer will use
    assert width % 32 == height % 32 == 0 and (width % 64 or height % 64), bucket
    assert bucket not in sd1_rows[0][2] and "steps of 32px" in stats


def test_the_bundled_example_styles_become_datasets_previewed_at_the_models_own_size(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    status, choices = dataset_tab.use_example(workspace, "ink")
    assert "60 image(s)" in status and choices["value"] == "ink", status
    assert workspace.dataset_settings("ink")["trigger"] == "sks" and len(workspace.dataset_images("ink")) == 60
    assert workspace.captions("ink")[0][1].startswith("a ")
    again, _ = dataset_tab.use_example(workspace, "ink")
    assert "already in the workspace" in again and len(workspace.dataset_images("ink")) == 60
    assert "no example style set 'oil'" in dataset_tab.use_example(workspace, "oil")[0]
    # resolution 0 previews at the loaded model's own size (the demo model's 64 px), as training at 0 trains
    models = ModelCache()
    models.get("demo")
    rows, thumbs, *_ = dataset_tab.open_dataset(workspace, "ink", 0, native_size=dataset_tab.native_size_of(models))
    assert "64x64 -> bucket 64x64" in rows[0][2] and "no crop" in thumbs[0][1]


def test_captions_and_trigger_are_saved_beside_the_images(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    images = write_style_images(tmp_path / "images", count=2, captions=False)
    dataset_tab.upload(workspace, "caps", [], str(images))
    status = dataset_tab.save_captions(workspace, "caps", [["img_00.png", "inky, a  circle"], ["img_01.png", ""]])
    assert "Saved 2 caption(s)" in status
    folder = workspace.dataset_dir("caps")
    assert (folder / "img_00.txt").read_text() == "inky, a circle\n" and not (folder / "img_01.txt").exists()
    assert "not an image of dataset" in dataset_tab.save_captions(workspace, "caps", [["../x.png", "hi"]])
    assert "trigger word must be one word" in dataset_tab.save_settings(workspace, "caps", "two words", "style")
    dataset_tab.save_settings(workspace, "caps", "inky", "drawing")
    assert Workspace(tmp_path / "ws").dataset_settings("caps") == {"trigger": "inky", "class_noun": "drawing"}


# ---------------------------------------------------------------------------------------------------- train tab


def test_train_settings_are_validated(tmp_path, tiny_model_dir):
    workspace = Workspace(tmp_path / "ws")
    runner = JobRunner(workspace)
    base = str(tiny_model_dir)
    assert "no images: choose a dataset" in train_tab.start(runner, workspace, base, *_train_args(dataset=""))
    workspace.dataset_dir("empty").mkdir()
    assert "dataset 'empty' is empty" in train_tab.start(runner, workspace, base, *_train_args(dataset="empty"))
    write_style_images(workspace.dataset_dir("ok"), count=2)
    for overrides, expected in [
        ({"rank": 0}, "rank must be at least 1"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": "many"}, "steps must be a whole number, got 'many'"),
        ({"unet_lr": None}, "UNet learning rate must be a number"),
        ({"batch_size": -1}, "batch size must be at least 1"),
        ({"name": "../escape"}, "not allowed"),
        ({"prior": True, "class_prompt": ""}, "class_prompt is required with prior preservation"),
    ]:
        message = train_tab.start(runner, workspace, base, *_train_args(dataset="ok", **overrides))
        assert message.startswith("**Error:**") and expected in message, (overrides, message)
    assert runner.list_jobs() == []


@pytest.mark.parametrize("targets", ["attn", "locon"])
def test_plan_counts_exactly_what_training_trains(tmp_path, tiny_model_dir, targets):
    from studio.models import load_base
    from training.lora import count_parameters, inject_lora

    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("ok"), count=6)
    models = ModelCache()
    args = _train_args(dataset="ok", steps=0, epochs=2, batch_size=2, train_te=True, rank=4, targets=targets)
    text = train_tab.plan(models, workspace, str(tiny_model_dir), *args)
    config = train_tab.build_config(workspace, str(tiny_model_dir), *args)
    base = load_base(str(tiny_model_dir))
    inject_lora(base.unet, base.text_encoders, config.lora_spec)
    trainable, _ = count_parameters([base.unet, *base.text_encoders])
    assert "**6 total steps** over **2 epoch(s)**; 12 images seen" in text
    assert f"trainable parameters: **{trainable:,}**" in text
    assert "estimated time" in text and "estimated peak memory" in text and "rough estimates" in text
    assert "Plan unavailable:" in train_tab.plan(models, workspace, str(tiny_model_dir), *_train_args(dataset=""))


def test_training_runs_in_the_background_and_survives_a_restart(studio):
    workspace, runner, _, base = studio
    job = runner.get("inky")
    assert job.status == "done", job.error
    html, losses, samples, table = train_tab.job_view(runner, None)
    assert "step 3/3 (100%)" in html and "Saved adapter" in html
    assert list(losses.dropna()["step"]) == [1, 2, 3] and set(losses.dropna()["series"]) == {"train"}
    assert any("step-000002" in s for s in samples) and any("final" in s for s in samples)
    assert table[0][:2] == ["inky", "done"]
    assert workspace.list_adapters() == ["inky"]
    assert "already exists" in train_tab.start(runner, workspace, base, *_train_args())
    record = json.loads((workspace.run_dir("inky") / "job.json").read_text())
    assert record["status"] == "done" and len(record["losses"]) == 3 and Path(record["config_path"]).is_file()
    again = JobRunner(workspace)  # a server restart
    assert again.get("inky").status == "done" and again.get("inky").losses == job.losses


def test_the_loss_plot_shows_validation_marks_the_best_checkpoint_and_warns_of_overtraining(tmp_path):
    from training.config import TrainConfig

    config = TrainConfig(output=str(tmp_path / "adapters" / "ink.safetensors"), validation_images=2)
    job = TrainingJob(name="ink", config=config, run_dir=tmp_path / "run", status="done")
    job.losses = [(step, 1.0 / step) for step in range(1, 11)]
    job.run_dir.mkdir()
    frame = train_tab.loss_frame(job)  # every series from the start, empty until it has data
    assert set(frame["series"]) == set(train_tab.SERIES_COLORS) and set(frame.dropna()["series"]) == {"train"}
    assert "Best checkpoint" not in train_tab.progress_html(job)
    records = [
        {"step": 2 * i, "train_loss": 0.5, "val_loss": v, "checkpoint": f"step-{2 * i:06d}"}
        for i, v in enumerate([0.3, 0.2, 0.25, 0.3], 1)
    ]
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    frame = train_tab.loss_frame(job)
    assert list(frame[frame.series == "validation"]["step"]) == [2, 4, 6]
    assert list(frame[frame.series == "best checkpoint"]["step"]) == [4, 4]  # a vertical line at the best
    html = train_tab.progress_html(job)
    assert "Best checkpoint by validation loss: <b>step-000004</b> (step 4, 0.2000)" in html
    assert "over-training" not in html
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "tr')
    html = train_tab.progress_html(job)  # a half-written last line (a killed run) is skipped
    assert "train-overtraining" not in html, "two rises are not yet over-training"
    records.append({"step": 10, "train_loss": 0.5, "val_loss": 0.4, "checkpoint": "final"})
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html = train_tab.progress_html(job)
    assert "validation loss has risen 3 times in a row" in html and "the best checkpoint is step-000004" in html


def test_an_interrupted_job_is_shown_and_resumes(tmp_path, tiny_model_dir):
    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("ok"), count=2)
    config = train_tab.build_config(workspace, str(tiny_model_dir), *_train_args(dataset="ok", name="later", steps=2))
    job = TrainingJob(name="later", config=config, run_dir=workspace.run_dir("later"), status="running", step=1)
    job.save()  # as if the server died mid-run
    runner = JobRunner(workspace)
    assert runner.get("later").status == "interrupted"
    assert "press Resume" in train_tab.job_view(runner, None)[0]
    assert "only interrupted" in train_tab.resume(runner, "nothing") or "no training job" in train_tab.resume(
        runner, "nothing"
    )
    assert "Resuming **later**" in train_tab.resume(runner, None)
    assert runner.get("later").join(timeout=300)
    assert runner.get("later").status == "done" and workspace.list_adapters() == ["later"]
    assert "no queued or running" in train_tab.cancel(runner, None)


def test_a_second_start_queues_and_a_queued_job_can_be_cancelled(tmp_path, tiny_model_dir):
    import threading

    gate = threading.Event()

    class SlowTrainer:
        def __init__(self, config, progress, should_stop):
            self.config = config

        def run(self, resume_from=None):
            gate.wait(30)
            raise ValueError("stopped by the test")

    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("ok"), count=2)
    runner = JobRunner(workspace, trainer_factory=SlowTrainer)
    base = str(tiny_model_dir)
    assert "starting" in train_tab.start(runner, workspace, base, *_train_args(dataset="ok", name="first"))
    assert "queued (position" in train_tab.start(runner, workspace, base, *_train_args(dataset="ok", name="second"))
    assert "already queued" in train_tab.start(runner, workspace, base, *_train_args(dataset="ok", name="second"))
    assert "Cancelling **second**" in train_tab.cancel(runner, "second")
    assert runner.get("second").status == "cancelled"
    gate.set()
    assert runner.get("first").join(timeout=30)
    assert runner.get("first").status == "failed" and "stopped by the test" in runner.get("first").error


# ---------------------------------------------------------------------------------------------------- generate tab


def test_generate_with_a_stack_weight_and_a_prompt_tag(studio):
    workspace, _, models, base = studio
    items, paths, info, status = generate_tab.run(models, workspace, base, *_gen_args(stack=[("inky", 0.8)]))
    assert status.startswith("Saved 1 image(s)") and Path(paths[0]).is_file() and items[0][1] == "seed 1"
    assert "<lora:inky:0.8>" in info and "Lora hashes" in info and "Seed: 1" in info
    _, paths2, info2, _ = generate_tab.run(
        models, workspace, base, *_gen_args(prompt="sks style, a circle <lora:inky:0.8>")
    )
    assert "<lora:inky:0.8>" in info2 and "<lora:" not in info2.split("\n")[0].replace("<lora:inky:0.8>", "")
    assert Image.open(paths2[0]).tobytes() == Image.open(paths[0]).tobytes()  # same seed, same adapter weight
    assert "Set as" not in generate_tab.set_preview(workspace, "inky", paths[0], paths)
    assert workspace.preview_path("inky").read_bytes() == Path(paths[0]).read_bytes()


def test_generate_reports_bad_input(studio):
    workspace, _, models, base = studio
    cases = [
        (_gen_args(stack=[("ghost", 1.0)]), "no adapter named 'ghost'"),
        (_gen_args(prompt="a cat <lora:phantom:1>"), "no adapter named 'phantom'"),
        (_gen_args(prompt="   "), "prompt is empty"),
        (_gen_args(steps=0), "steps must be at least 1"),
        (_gen_args(cfg="strong"), "CFG scale must be a number"),
        (_gen_args(width=33), "width must be 0 (model default) or a multiple of 8"),
        (_gen_args(seed=-5), "seed must be at least 0"),
        (_gen_args(stack=[("inky", 1.0), ("inky", 0.5)]), "in the stack twice"),
    ]
    for args, expected in cases:
        status = generate_tab.run(models, workspace, base, *args)[-1]
        assert status.startswith("**Error:**") and expected in status, (expected, status)
    assert "generate an image first" in generate_tab.set_preview(workspace, "inky", "", [])
    assert "Error" in load_model(models, "no/such/dir.safetensors") or "Error" in load_model(models, "")


# ---------------------------------------------------------------------------------------------------- compare tab


def test_compare_grid_over_weights_checkpoints_and_seeds(studio):
    workspace, _, models, base = studio
    labels = compare_tab.checkpoint_choices(workspace, "inky")
    assert labels == ["step-000002", "final"]
    path, status = compare_tab.make_grid(
        models, workspace, base, "inky", labels, "0, 0.8", "1 2", "sks style", "", 2, 7, "Default"
    )
    assert status.startswith("Saved a 4 x 2 grid"), status
    grid = Image.open(path)
    cell = compare.MIN_CELL
    assert grid.size == (compare.LABEL_WIDTH + 2 * cell, compare.LABEL_HEIGHT + 4 * cell)


def test_compare_reports_bad_input(studio):
    workspace, _, models, base = studio
    args = ["sks", "", 2, 7, "Default"]
    assert "no adapter named 'ghost'" in compare_tab.make_grid(models, workspace, base, "ghost", [], "1", "1", *args)[1]
    assert "weights must be a number" in compare_tab.make_grid(models, workspace, base, "inky", [], "a", "1", *args)[1]
    assert "seeds: give at least one" in compare_tab.make_grid(models, workspace, base, "inky", [], "1", "", *args)[1]
    too_many = compare_tab.make_grid(
        models, workspace, base, "inky", [], "0 .1 .2 .3 .4 .5 .6 .7 .8", "1 2 3 4 5 6 7 8", *args
    )
    assert "the limit is 64" in too_many[1]
    missing = compare_tab.make_grid(models, workspace, base, "inky", ["step-999"], "1", "1", *args)[1]
    assert "has no checkpoint 'step-999'" in missing


# ---------------------------------------------------------------------------------------------------- library tab


def test_library_cards_export_merge_rename_delete(studio, tmp_path):
    workspace, _, _, base = studio
    rows = library_tab.cards_table(workspace)
    inky = next(r for r in rows if r[0] == "inky")
    assert inky[1] == "inkstyle" and inky[3] == "4" and inky[5] == "3" and inky[6] == "4" and len(inky[8]) == 12
    _, text = library_tab.details(workspace, "inky")
    assert "AutoV2" in text and "SHA256" in text and "<lora:inky:0.8>" in text

    path, summary = library_tab.export(workspace, "inky", False)
    exported = read_adapter(path)
    assert "ss_tag_frequency" not in exported.metadata and "left out" in summary
    assert exported.metadata["modelspec.trigger_phrase"] == "inkstyle"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in exported.tensors)
    full, _ = library_tab.export(workspace, "inky", True)
    assert "ss_tag_frequency" in read_adapter(full).metadata
    assert library_tab.export(workspace, "ghost", True)[1] == "**Error:** no adapter named 'ghost' in the library"

    make_adapter(base, tmp_path / "dots.safetensors", seed=1, rank=2)
    workspace_dots = workspace.adapters_dir / "dots.safetensors"
    workspace_dots.write_bytes((tmp_path / "dots.safetensors").read_bytes())
    assert "Merged into **blend**" in library_tab.merge(workspace, "inky:0.7, dots:0.5", "blend", 0)
    assert "at least two adapters" in library_tab.merge(workspace, "inky", "solo", 0)
    assert "weight of dots must be a number" in library_tab.merge(workspace, "inky:1, dots:x", "bad", 0)
    assert "rank must be at least 0" in library_tab.merge(workspace, "inky:1, dots:1", "bad", -1)
    assert "Renamed **blend** to **mix**" in library_tab.rename(workspace, "blend", "mix")
    assert read_adapter(workspace.adapter_path("mix")).metadata["modelspec.title"] == "mix"
    assert "already exists" in library_tab.rename(workspace, "mix", "inky")
    assert "tick 'yes, delete mix'" in library_tab.delete(workspace, "mix", False)
    assert "Deleted **mix**" in library_tab.delete(workspace, "mix", True)
    assert "mix" not in workspace.list_adapters()
    workspace_dots.unlink()


def test_import_validates_and_reports_unmatched_keys(studio, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    workspace, _, models, base = studio
    source = make_adapter(base, tmp_path / "outside.safetensors", seed=2, rank=2)
    tensors = load_file(str(source))
    tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(8, 2)
    odd = tmp_path / "odd name!.safetensors"
    save_file(tensors, str(odd))
    status = library_tab.import_adapter(models, workspace, base, [str(odd)], "")
    assert "Imported **odd_name**" in status and "1 key(s) not used" in status and "no_such_block" in status
    assert "already exists" in library_tab.import_adapter(models, workspace, base, [str(odd)], "")
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04")
    assert "pickles that can run arbitrary code" in library_tab.import_adapter(models, workspace, base, [pickle], "x")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    assert "not a readable .safetensors" in library_tab.import_adapter(models, workspace, base, [junk], "x")
    assert "choose a .safetensors" in library_tab.import_adapter(models, workspace, base, None, "")
    library_tab.delete(workspace, "odd_name", True)


# ---------------------------------------------------------------------------------------------------- app


def test_names_and_auth_are_validated():
    assert safe_name("my_style-v1.2") == "my_style-v1.2"
    for bad in ["", "../x", "a/b", "x" * 65, ".hidden", "name."]:
        with pytest.raises(ValueError):
            safe_name(bad)
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(ValueError):
        parse_auth("nopassword")


def test_app_builds_and_the_base_picker_reports(tmp_path, tiny_model_dir):
    models = ModelCache()
    app = build_app(Workspace(tmp_path / "ws"), base=str(tiny_model_dir), models=models)
    assert app is not None
    assert "not found" in describe_base(str(tmp_path / "nowhere"))
    assert "SD 1.x" in load_model(models, str(tiny_model_dir)) and "native size 32x32" in models.describe()
    assert "base model not found" in load_model(models, str(tmp_path / "nowhere"))


def test_the_pickers_prediction_type_reloads_the_model_and_reaches_training(tmp_path):
    import functools

    from safetensors.torch import load_file, save_file

    from studio.convert import save_single_file
    from studio.models import load_base
    from studio.tiny import build_tiny_pipeline
    from studio.ui.app import choose_prediction_type

    folder = build_tiny_pipeline(tmp_path / "sd2", seed=2, family="sd2")
    # an SD 2.x file without the model-spec header: nothing in it says epsilon or v-prediction
    checkpoint = tmp_path / "sd2.safetensors"
    save_file(load_file(str(save_single_file(folder, tmp_path / "with_header.safetensors"))), str(checkpoint))
    models = ModelCache(functools.partial(load_base, config_dir=str(folder)))
    first = models.get(str(checkpoint))
    assert "predicts epsilon" in models.describe()  # the config folder's scheduler decided
    assert "v_prediction from the next use" in choose_prediction_type(models, "v_prediction")
    reloaded = models.get(str(checkpoint))
    assert reloaded is not first and reloaded.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert "v-prediction" in models.describe() and models.get(str(checkpoint)) is reloaded  # no second reload
    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("ok"), count=2)
    config = train_tab.build_config(
        workspace, str(checkpoint), *_train_args(dataset="ok"), prediction_type="v_prediction"
    )
    assert config.prediction_type == "v_prediction"
    assert "prediction type must be one of" in choose_prediction_type(models, "x0")
    choose_prediction_type(models, "auto")
    assert models.get(str(checkpoint)).pipeline.scheduler.config.prediction_type == "epsilon"


def test_train_tab_passes_output_preservation_caption_dropout_and_ema_to_the_config(tmp_path, tiny_model_dir):
    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("ok"), count=2)
    args = _train_args(
        dataset="ok", preservation=1.5, preservation_prompt="blank", caption_dropout=0.1, ema=0.99, targets="locon"
    )
    config = train_tab.build_config(workspace, str(tiny_model_dir), *args)
    assert (config.preservation_weight, config.preservation_prompt, config.caption_dropout_rate) == (1.5, "blank", 0.1)
    assert (config.ema_decay, config.unet_targets) == (0.99, "locon")
    assert set(train_tab.UNET_TARGET_LABELS) == set(UNET_TARGET_PRESETS), "every UNet target preset is offered"
    with pytest.raises(ValueError, match="caption dropout"):
        train_tab.build_config(workspace, str(tiny_model_dir), *_train_args(dataset="ok", caption_dropout=1.0))
    with pytest.raises(ValueError, match="preservation"):
        train_tab.build_config(workspace, str(tiny_model_dir), *_train_args(dataset="ok", preservation=-1))
