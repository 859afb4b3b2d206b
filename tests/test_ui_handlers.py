"""The UI's handlers (what the Train and Export tabs call), driven without a browser."""

import pytest

from studio.adapters import read_adapter
from studio.jobs import JobRunner
from studio.library import Workspace, safe_name
from studio.ui import export_tab, train_tab
from studio.ui.app import build_app, describe_base, parse_auth
from tests.helpers import write_style_images


def _values(base, data, name="inky", steps=3, rank=4):
    return [str(base), str(data), name, "sks", "quick", steps, rank, 64, False]


def test_check_data_lists_kept_and_skipped_files(tmp_path):
    data = write_style_images(tmp_path / "data", count=2)
    (data / "oops.jpg").write_bytes(b"")
    report = train_tab.check_data(str(data), "sks")
    assert "2 image(s) kept, 1 skipped" in report and "oops.jpg" in report
    assert "Error" in train_tab.check_data(str(tmp_path / "missing"), "sks")
    assert "Enter the folder" in train_tab.check_data("", "sks")


def test_train_in_background_then_export_privately(tiny_model_dir, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    runner = JobRunner()
    data = write_style_images(tmp_path / "data", count=4)
    message = train_tab.start(runner, workspace, *_values(tiny_model_dir, data))
    assert "Started training" in message
    assert "already running" in train_tab.start(runner, workspace, *_values(tiny_model_dir, data, name="other"))
    runner.current.join(timeout=300)
    text, losses, _samples = train_tab.status(runner.current)
    assert "done" in text and "step 3/3 (100%)" in text
    assert list(losses["step"]) == [1, 2, 3]
    assert workspace.list_adapters() == ["inky"]
    assert "already exists" in train_tab.start(runner, workspace, *_values(tiny_model_dir, data))

    path, summary = export_tab.export(workspace, "inky", include_dataset_metadata=False)
    assert path.endswith("inky_private.safetensors") and "AutoV2" in summary
    assert "ss_tag_frequency" not in read_adapter(path).metadata
    assert export_tab.export(workspace, "ghost", True) == (None, "**Error:** no adapter named 'ghost' in the workspace")


def test_bad_values_and_missing_base_are_reported_not_raised(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    runner = JobRunner()
    data = write_style_images(tmp_path / "data", count=2)
    assert "rank must be at least 1" in train_tab.start(runner, workspace, *_values("demo", data, rank=0))
    assert "steps must be a whole number" in train_tab.start(runner, workspace, *_values("demo", data, steps=2.5))
    assert "not allowed" in train_tab.start(runner, workspace, *_values("demo", data, name="../escape"))
    train_tab.start(runner, workspace, *_values(tmp_path / "nowhere", data))
    runner.current.join(timeout=60)
    text, _, _ = train_tab.status(runner.current)
    assert "failed" in text and "base model not found" in text
    assert "not found" in describe_base(str(tmp_path / "nowhere"))


def test_names_and_auth_are_validated():
    assert safe_name("my_style-v1.2") == "my_style-v1.2"
    for bad in ["", "../x", "a/b", "x" * 65, ".hidden", "name."]:
        with pytest.raises(ValueError):
            safe_name(bad)
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(ValueError):
        parse_auth("nopassword")


def test_app_builds(tmp_path):
    app = build_app(Workspace(tmp_path / "ws"))
    assert app is not None
