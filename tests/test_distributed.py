"""Data-parallel training: `torchrun -m studio.cli train` on 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from studio.adapters import read_adapter
from studio.cli import main
from tests.helpers import write_style_images

REPO = Path(__file__).resolve().parents[1]

# Imported by every Python process of the launch (PYTHONPATH): an audit hook records each file the process creates,
# opens for writing, renames, or deletes under STUDIO_WRITES_ROOT, in a log named after its RANK.
WRITE_AUDIT = """
import os, sys

_root = os.environ.get("STUDIO_WRITES_ROOT")
if _root:
    _log = open(os.path.join(os.environ["STUDIO_WRITES_LOG"], "rank-" + os.environ.get("RANK", "launcher")), "a")
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(path):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_root + os.sep):
            _log.write(path + "\\n")
            _log.flush()

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & _writing:
                _record(args[0])
        elif event in ("os.rename", "os.link", "os.symlink"):
            _record(args[1])
        elif event == "os.mkdir" and not os.path.exists(args[0]):  # mkdir(exist_ok=True) of a folder writes nothing
            _record(args[0])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            if isinstance(args[0], (str, bytes, os.PathLike)):
                _record(args[0])

    sys.addaudithook(_hook)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(model_dir: Path, data: Path, config: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "train",
        *("--config", str(config), "--base", str(model_dir), "--data", str(data), "--out", str(out)),
        *("--trigger", "sks", "--seed", "7", "--steps", "4", "--batch-size", str(batch_size)),
        *("--resolution", "80", "--rank", "4", "--alpha", "4", "--targets", "kohya", "--text-encoder"),
        *("--lr", "3e-3", "--te-lr", "3e-3", "--checkpoint-every", "2", "--sample-prompt", "sks, a red circle"),
        *("--class-prompt", "a shape", "--prior-images", "2"),
    ]


def _tensors(path: Path) -> dict:
    return read_adapter(path).tensors


def printed_loss(lines: list[str]) -> str:
    """The final loss in the CLI's closing `wrote ...` line."""
    final = [line for line in lines if line.startswith("wrote ")]
    return final[0].split("final loss ")[1].split(",")[0]


def test_two_processes_train_what_one_process_trains_on_the_same_global_batch_and_only_rank_0_writes(
    tiny_model_dir, tmp_path, capsys
):
    # Landscape images land in a 96x64 bucket and the class images in the square 80x80 one, three samples each:
    # with a global batch of 2, every bucket's last batch holds one sample, so one process idles at loss weight 0.
    data = write_style_images(tmp_path / "data", count=3, size=(96, 64))
    config = tmp_path / "config.toml"
    config.write_text(
        'save_dtype = "fp32"\nsample_steps = 2\nbucket_step = 16\nmin_bucket_resolution = 64\n'
        'lr_scheduler = "constant"\nlr_warmup_steps = 0\n'
    )
    hook_dir, log_dir = tmp_path / "hook", tmp_path / "writes"
    hook_dir.mkdir()
    log_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(WRITE_AUDIT)
    two = tmp_path / "two" / "style.safetensors"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO)]),
        "STUDIO_WRITES_ROOT": str(tmp_path),
        "STUDIO_WRITES_LOG": str(log_dir),
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "studio.cli"]
    done = subprocess.run(
        launch + _train_args(tiny_model_dir, data, config, two, batch_size=1),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout.splitlines()
    assert sum(line.startswith("wrote ") for line in printed) == 1, "only rank 0 reports the result"
    assert sum("image(s) kept" in line for line in printed) == 1

    # Only rank 0 wrote anything: its log names the adapter, the checkpoint, the samples and the class images.
    written = {name.name: name.read_text().splitlines() for name in log_dir.iterdir()}
    assert not written.get("rank-1"), written.get("rank-1")
    rank0 = written["rank-0"]
    assert str(two) in rank0 and any("class_00001.png" in path for path in rank0)
    classes = next((two.parent / "style_run" / "class_images").iterdir()).relative_to(two.parent)
    files = sorted(str(p.relative_to(two.parent)) for p in two.parent.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "style.safetensors",
            "style.json",  # A1111's sidecar
            "style_samples/sample_00.png",
            "style_run/metrics.jsonl",
            "style_run/checkpoints/step-000002/adapter.safetensors",
            "style_run/checkpoints/step-000002/config.toml",
            "style_run/checkpoints/step-000002/samples/sample_00.png",
            "style_run/checkpoints/step-000002/state.pt",
            f"{classes}/class_00000.png",
            f"{classes}/class_00001.png",
            f"{classes}/class_images.json",
        ]
    )

    # One process with the same global batch (2) and seed (and the class images just made) trains the same adapter
    # and reports the same loss. The runs differ only in the order float32 sums are taken (per process, then
    # gloo's all-reduce), ~1e-7 relative in the gradients; Adam divides each gradient by its running RMS, so for the
    # few weights whose gradient is near zero that rounding becomes a visible fraction of the 3e-3 step: measured
    # 8e-6 at most after 4 steps. 1e-4 leaves a 10x margin and is 60x below what the last two steps moved (6e-3).
    (tmp_path / "one.toml").write_text(config.read_text() + f'class_dir = "{two.parent / classes}"\n')
    one = tmp_path / "one" / "style.safetensors"
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, data, tmp_path / "one.toml", one, batch_size=2)) == 0
    assert printed_loss(capsys.readouterr().out.splitlines()) == printed_loss(printed)
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    halfway = _tensors(two.parent / "style_run" / "checkpoints" / "step-000002" / "adapter.safetensors")
    assert max((b[k] - halfway[k]).abs().max().item() for k in b) > 3e-3
