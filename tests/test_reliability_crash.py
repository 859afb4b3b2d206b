"""Reliability: a training run killed with SIGKILL resumes to the same adapter, a failed write (disk full) keeps the
previous file intact and is reported, and every file the studio writes goes through studio/atomic.py."""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from studio import atomic
from studio.adapters import export_adapter, read_adapter, save_adapter
from studio.cli import build_parser, build_train_config, main
from studio.jobs import JobRunner, TrainingJob
from studio.library import Workspace
from studio.merge import merge_adapters
from studio.ui import library_tab
from studio.ui.common import ModelCache
from tests.helpers import make_adapter, snapshot_tree, write_style_images
from training.config import TrainConfig
from training.trainer import find_checkpoint, train

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 8, 2


def _argv(model_dir, data, out) -> list[str]:
    return [
        "train",
        "--base",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "quick",
        "--steps",
        str(STEPS),
        "--rank",
        "4",
        "--alpha",
        "4",
        "--lr",
        "1e-3",
        "--te-lr",
        "1e-3",
        "--text-encoder",
        "--targets",
        "attn",
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--checkpoint-every",
        str(EVERY),
    ]


def _max_difference(a: Path, b: Path) -> float:
    x, y = read_adapter(a).tensors, read_adapter(b).tensors
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if atomic.is_temporary(p)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run of the same command: (data folder, its adapter)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_style_images(root / "data", count=4)
    config = build_train_config(build_parser().parse_args(_argv(tiny_model_dir, data, root / "straight.safetensors")))
    result = train(config)
    assert result.steps == STEPS
    return data, result.output


# ------------------------------------------------------------------------------------------------- SIGKILL


def test_studio_train_killed_with_sigkill_resumes_to_the_same_adapter(tiny_model_dir, reference, tmp_path, capsys):
    data, straight = reference
    out = tmp_path / "killed" / "lora.safetensors"
    argv = _argv(tiny_model_dir, data, out)
    kill_at = random.Random(os.getpid()).randint(EVERY + 1, STEPS - 2)  # some step after the first checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "studio.cli", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen: list[int] = []

    def watch():  # tqdm on stderr: "...| 5/12 [...]"; SIGKILL as soon as the chosen step shows
        buffer = ""
        while chunk := process.stderr.read1(4096).decode(errors="replace"):
            buffer = (buffer + chunk)[-400:]
            steps = [int(s) for s in re.findall(rf"(\d+)/{STEPS}\b", buffer)]
            if steps and steps[-1] >= kill_at and process.poll() is None:
                seen.append(steps[-1])
                process.send_signal(signal.SIGKILL)
                return

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    assert process.returncode == -signal.SIGKILL, (process.returncode, process.stdout.read().decode()[-2000:])
    assert seen and not out.exists(), "the run must have been killed before it finished"
    work_dir = out.with_name(out.stem + "_run")  # where `studio train` keeps checkpoints by default
    newest = find_checkpoint(work_dir)
    saved = int(newest.name.split("-")[1])
    assert EVERY <= saved < STEPS and saved % EVERY == 0

    capsys.readouterr()
    assert main([*argv, "--resume", str(work_dir)]) == 0
    progress = re.findall(rf"(\d+)/{STEPS}\b", capsys.readouterr().err)
    assert progress[0] == str(saved), "the run continues from its newest complete checkpoint"
    assert _max_difference(out, straight) < 1e-4, f"killed at step {seen[0]}, resumed from {saved}"
    assert not _temporaries(work_dir), "half-written checkpoints of the killed run are cleaned on resume"


# ------------------------------------------------------------------------------------------ disk full while saving


def _disk_full(monkeypatch, where: str, when) -> list[str]:
    """Make `os.replace`/`os.link` (where="replace") or `os.fsync` (where="fsync") in studio/atomic.py fail with ENOSPC
    for the paths `when(path)` picks, like a full disk; return the paths that failed."""
    failed: list[str] = []
    real_replace, real_link, real_fsync = os.replace, os.link, os.fsync

    def rename(real):
        def attempt(src, dst, *args, **kwargs):
            if where == "replace" and when(Path(dst)):
                failed.append(str(dst))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *args, **kwargs)

        return attempt

    def fsync(fd):
        target = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") else Path()
        if where == "fsync" and when(target):
            failed.append(str(target))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "replace", rename(real_replace))
    monkeypatch.setattr(atomic.os, "link", rename(real_link))
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return failed


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_reports_it(
    tiny_model_dir, reference, tmp_path, monkeypatch
):
    data, straight = reference
    out = tmp_path / "full" / "lora.safetensors"
    config = build_train_config(build_parser().parse_args(_argv(tiny_model_dir, data, out)))
    work_dir = config.resolved_work_dir
    kept: dict[str, str] = {}

    def progress(event):
        if event.phase == "checkpoint":
            kept.clear()
            kept.update(snapshot_tree(work_dir / "checkpoints"))

    resume_from = None
    # the disk fills while the 2nd checkpoint is renamed into place, then (after a resume) while the 3rd is flushed
    for step, where in ((2 * EVERY, "replace"), (3 * EVERY, "fsync")):
        with monkeypatch.context() as patch:
            failed = _disk_full(patch, where, lambda p, step=step: f"step-{step:06d}" in str(p))
            with pytest.raises(OSError) as error:
                train(config, progress=progress, resume_from=resume_from)
        assert error.value.errno == errno.ENOSPC and failed, where
        assert snapshot_tree(work_dir / "checkpoints") == kept, f"{where}: the previous checkpoint changed"
        previous = find_checkpoint(work_dir)
        assert previous.name == f"step-{step - EVERY:06d}"
        assert read_adapter(previous / "adapter.safetensors").tensors
        assert torch.load(previous / "state.pt", weights_only=True)["global_step"] == step - EVERY
        assert not _temporaries(work_dir) and not out.exists(), f"{where}: a half-written file remains"
        resume_from = work_dir
    train(config, resume_from=work_dir)  # space is freed: the run ends as if nothing had happened
    assert _max_difference(out, straight) < 1e-4


def test_disk_full_in_a_background_job_is_reported_and_the_job_resumes(
    tiny_model_dir, reference, tmp_path, monkeypatch
):
    data, straight = reference
    workspace = Workspace(tmp_path / "ws")
    config = build_train_config(
        build_parser().parse_args(_argv(tiny_model_dir, data, workspace.adapter_path("job")))
    ).replace(work_dir=str(workspace.run_dir("job")))
    _disk_full(monkeypatch, "replace", lambda p: f"step-{2 * EVERY:06d}" in str(p))
    runner = JobRunner(workspace)
    job = runner.submit(config)
    assert job.join(timeout=240)
    assert job.status == "failed" and "No space left on device" in job.error
    record = json.loads((workspace.run_dir("job") / "job.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    monkeypatch.undo()
    runner.resume("job")
    assert runner.get("job").join(timeout=240) and runner.get("job").status == "done"
    assert _max_difference(workspace.adapter_path("job"), straight) < 1e-4


def test_replacing_a_folder_that_fails_halfway_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "step-000004"
    target.mkdir()
    (target / "adapter.safetensors").write_bytes(b"old adapter")
    # the old folder is moved aside, then moving the new one in fails (once: the way back still works)
    failed = _disk_full(monkeypatch, "replace", lambda p: p == target and not failed)
    with pytest.raises(OSError, match="No space left"), atomic.atomic_dir(target) as tmp:
        (tmp / "adapter.safetensors").write_bytes(b"new adapter")
    assert failed and (target / "adapter.safetensors").read_bytes() == b"old adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_an_exclusive_write_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "style.safetensors"
    with pytest.raises(FileExistsError), atomic.atomic_path(target, exclusive=True) as tmp:
        tmp.write_bytes(b"second upload")
        target.write_bytes(b"first upload")  # another request finished first
    assert target.read_bytes() == b"first upload" and sorted(tmp_path.iterdir()) == [target]


def test_a_process_killed_between_the_two_renames_loses_nothing(tmp_path):
    # what a SIGKILL between "old folder aside" and "new folder in" leaves: only the hidden old copy
    (tmp_path / ".step-000004.old").mkdir()
    (tmp_path / ".step-000004.old" / "state.pt").write_bytes(b"the only copy")
    (tmp_path / ".step-000004.abc123.tmp").mkdir()  # the new folder, half written
    (tmp_path / ".adapter.safetensors.x1.tmp").write_bytes(b"half a file")
    removed = atomic.remove_stale(tmp_path, older_than=0)
    assert {p.name for p in removed} == {".step-000004.abc123.tmp", ".adapter.safetensors.x1.tmp"}
    assert (tmp_path / "step-000004" / "state.pt").read_bytes() == b"the only copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]
    (tmp_path / "step-000004").rename(tmp_path / ".step-000004.old")  # and atomic_dir itself recovers it first
    with atomic.atomic_dir(tmp_path / "step-000004") as tmp:
        assert (tmp_path / "step-000004" / "state.pt").read_bytes() == b"the only copy"
        (tmp / "state.pt").write_bytes(b"newer")
    assert (tmp_path / "step-000004" / "state.pt").read_bytes() == b"newer" and not _temporaries(tmp_path)


# ------------------------------------------------------------------------------------------ every writer is atomic
EXEMPT = {"studio/atomic.py", "studio/tiny.py"}  # the atomic writer itself; test-model fixtures
OWN_SAVERS = ("config", "cfg", "self.config")  # TrainConfig.save, itself atomic


def _write_target(node: ast.Call) -> str | None:
    """The destination expression of a call that writes a file, or None if the call writes nothing."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""

    def arg(index: int) -> str:
        return ast.unparse(node.args[index]) if len(node.args) > index else ""

    if name == "open" and not receiver:
        modes = [k.value for k in node.keywords if k.arg == "mode"] + node.args[1:2]
        mode = modes[0].value if modes and isinstance(modes[0], ast.Constant) else "r"
        return arg(0) if any(c in mode for c in "wax+") else None
    if name in ("write_text", "write_bytes") and receiver != "atomic":
        return receiver
    if receiver == "shutil" and name in ("copyfile", "copy", "copy2", "copytree", "move"):
        return arg(1)
    if (receiver, name) == ("torch", "save") or name == "save_file":
        return arg(1)
    if name == "save" and node.args and receiver not in OWN_SAVERS:  # PIL Image.save
        return arg(0)
    return None


def _raw_writes(path: Path) -> list[str]:
    """Calls in `path` that write a file other than a temporary of studio/atomic.py (a path named tmp)."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            target = _write_target(node)
            if target is not None and not re.search(r"\btmp\b", target):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_library_code_writes_a_file_except_through_atomic(tmp_path):
    offenders = []
    for path in sorted([*REPO.glob("studio/**/*.py"), *REPO.glob("training/**/*.py")]):
        if str(path.relative_to(REPO)) not in EXEMPT:
            offenders += _raw_writes(path)
    assert not offenders, "\n".join(offenders)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "Path(p).write_text('x')\nimage.save(path)\nwith open(p, 'w') as f: pass\ntorch.save(s, p)\n"
        "shutil.copyfile(a, b)\nwith atomic.atomic_path(p) as tmp: image.save(tmp)\nconfig.save(p)\n"
    )
    assert len(_raw_writes(probe)) == 5, "the checker must notice raw writes"


@pytest.fixture
def writers_workspace(tiny_model_dir, tmp_path):
    """A workspace with a dataset (images + captions + settings), two adapters, a preview and a job record."""
    workspace = Workspace(tmp_path / "ws")
    write_style_images(workspace.dataset_dir("set"), count=2)
    workspace.save_dataset_settings("set", trigger="inky", class_noun="style")
    make_adapter(tiny_model_dir, workspace.adapter_path("a"), seed=1, rank=2, targets="attn")
    make_adapter(tiny_model_dir, workspace.adapter_path("b"), seed=2, rank=2, targets="attn")
    workspace.set_preview("a", next(workspace.dataset_dir("set").glob("*.png")))
    config = TrainConfig(
        base=str(tiny_model_dir), data_dir=str(workspace.dataset_dir("set")), output=str(workspace.adapter_path("c"))
    )
    TrainingJob(name="c", config=config, run_dir=workspace.run_dir("c"), status="done").save()
    export_adapter(workspace.adapter_path("a"), workspace.exports_dir / "a.safetensors")
    return workspace


def _writers(workspace: Workspace, model_dir) -> dict[str, object]:
    """name -> a call that writes over (or beside) existing files of the workspace."""
    a, b = workspace.adapter_path("a"), workspace.adapter_path("b")
    job = TrainingJob.load(workspace.run_dir("c"))
    job.status, job.step = "running", 7
    image = sorted(workspace.dataset_dir("set").glob("*.png"))[1]
    models = ModelCache()
    return {
        "adapter (save_adapter)": lambda: save_adapter(a, read_adapter(b).tensors, {"x": "y"}),
        "adapter export": lambda: export_adapter(b, workspace.exports_dir / "a.safetensors"),
        "adapter merge": lambda: merge_adapters([(a, 0.5), (b, 0.5)], b),
        "adapter import": lambda: _ui(library_tab.import_adapter(models, workspace, str(model_dir), [str(b)], "b2")),
        "preview": lambda: workspace.set_preview("a", image),
        "captions": lambda: workspace.save_captions("set", [("img_00.png", "new words")]),
        "dataset settings": lambda: workspace.save_dataset_settings("set", trigger="other"),
        "dataset upload": lambda: workspace.import_files("set", [image.with_name("img_00.txt")]),
        "config": lambda: job.config.save(workspace.run_dir("c") / "config.toml"),
        "job state": lambda: job.save(),
        "adapter rename": lambda: workspace.rename_adapter("a", "a2"),
    }


def _ui(status: str) -> None:
    if status.startswith("**Error:**"):
        raise OSError(status)


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_every_writer_keeps_the_old_file_when_the_disk_is_full(writers_workspace, tiny_model_dir, monkeypatch, where):
    workspace = writers_workspace
    writers = _writers(workspace, tiny_model_dir)
    before = snapshot_tree(workspace.root)
    failed = _disk_full(monkeypatch, where, lambda p: workspace.root in p.parents)
    for name, write in writers.items():
        count = len(failed)
        with pytest.raises(OSError, match="No space left on device"):
            write()
        assert len(failed) > count, f"{name} did not write through studio/atomic.py"
        assert snapshot_tree(workspace.root) == before, f"{name} changed or left files after a failed write"
    monkeypatch.undo()
    for write in writers.values():  # with space again every write succeeds
        write()
    assert read_adapter(workspace.adapter_path("a2")).tensors and read_adapter(workspace.adapter_path("b2")).tensors
    assert not _temporaries(workspace.root)
