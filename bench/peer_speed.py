"""Our trainer against diffusers' own DreamBooth LoRA script, on the demo model at the same settings.

    python bench/peer_speed.py --script PATH/train_dreambooth_lora.py --python PATH/python [--steps 40,140]

The script is diffusers' examples/dreambooth/train_dreambooth_lora.py, fetched by you (it is not part of this
repository), run by an interpreter that has torchvision, which it needs (`--python`; on this machine a separate
venv with `pip install torch==2.14.1 torchvision==0.29.1` and the same diffusers, transformers, peft and accelerate).
Both trainers run in that interpreter, in fresh processes, alternating, on sample_data/styles/ink at 64 px, batch 4,
LoRA rank 16 (alpha 16) on every attention projection (the script's targets; our `attn`), AdamW at lr 1e-4 constant,
fp32, frozen text encoder (the script with --pre_compute_text_embeddings, its fastest setting), no flips, no min-SNR,
seed 0. Time per step comes from two runs of different lengths, so start-up, loading and saving cancel out; the loss
is each trainer's mean per-step loss over the longer run's last 100 steps. Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import INK, emit, machine, mean  # noqa: E402

SETTINGS = {"resolution": 64, "batch_size": 4, "rank": 16, "lr": 1e-4, "seed": 0}
OURS = """
import json, sys, time
sys.path.insert(0, {root!r})
from training.config import TrainConfig
from training.trainer import Trainer
config = TrainConfig.from_preset(
    "style", base=str({model!r}), data_dir={data!r}, output={out!r}, trigger="sks", max_train_steps={steps},
    rank={rank}, alpha={rank}, unet_targets="attn", unet_lr={lr}, lr_scheduler="constant", lr_warmup_steps=0,
    batch_size={batch_size}, resolution={resolution}, min_snr_gamma=0.0, random_flip=False, seed={seed},
    mixed_precision="no", save_dtype="fp32",
)
result = Trainer(config).run()
print(json.dumps({{"losses": result.losses}}))
"""


def run_ours(python: str, steps: int, folder: Path, data: Path) -> tuple[float, list[float]]:
    """Seconds of one whole run of our trainer (a fresh process) and its per-step losses."""
    code = OURS.format(
        root=str(ROOT),
        model=str(ROOT / "sample_data" / "demo_model"),
        data=str(data),
        out=str(folder / "ours.safetensors"),
        steps=steps,
        **SETTINGS,
    )
    started = time.perf_counter()
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"our trainer failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])["losses"]


def run_theirs(python: str, script: str, steps: int, folder: Path, data: Path) -> tuple[float, list[float]]:
    """Seconds of one whole run of diffusers' script (a fresh process) and its per-step losses (from its progress)."""
    command = [
        python,
        script,
        f"--pretrained_model_name_or_path={ROOT / 'sample_data' / 'demo_model'}",
        f"--instance_data_dir={data}",
        "--instance_prompt=sks style",
        f"--output_dir={folder / 'theirs'}",
        f"--resolution={SETTINGS['resolution']}",
        f"--train_batch_size={SETTINGS['batch_size']}",
        f"--rank={SETTINGS['rank']}",
        f"--learning_rate={SETTINGS['lr']}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--max_train_steps={steps}",
        f"--seed={SETTINGS['seed']}",
        "--mixed_precision=no",
        "--pre_compute_text_embeddings",
        "--checkpointing_steps=1000000",
        "--dataloader_num_workers=0",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"diffusers' script failed:\n{done.stderr[-3000:]}")
    losses = [float(v) for v in re.findall(r"loss=([0-9.eE+-]+)", done.stderr)]
    return seconds, losses


def main() -> None:
    """Alternate the two trainers at two run lengths; per-step time from the difference; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with torchvision and this project")
    parser.add_argument("--steps", default="40,140", help="the two run lengths")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    short, long = (int(s) for s in args.steps.split(","))
    seconds = {"ours": {short: [], long: []}, "theirs": {short: [], long: []}}
    losses: dict[str, list[float]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory() as tmp:
        # the pictures alone: diffusers' script opens every file of its folder as an image (so both trainers train on
        # the one prompt "sks style", ours for want of captions)
        data = Path(tmp) / "images"
        data.mkdir()
        for picture in sorted(INK.glob("*.png")):
            shutil.copyfile(picture, data / picture.name)
        for round_index in range(args.rounds):
            order = ["ours", "theirs"] if round_index % 2 == 0 else ["theirs", "ours"]
            for steps in (short, long):
                for who in order:
                    folder = Path(tempfile.mkdtemp(dir=tmp))
                    if who == "ours":
                        took, run_losses = run_ours(args.python, steps, folder, data)
                    else:
                        took, run_losses = run_theirs(args.python, args.script, steps, folder, data)
                    seconds[who][steps].append(took)
                    if steps == long:
                        losses[who].extend(run_losses[-100:])
                    print(f"{who} {steps} steps: {took:.1f} s", file=sys.stderr, flush=True)
    per_step = {who: (mean(s[long]) - mean(s[short])) / (long - short) for who, s in seconds.items()}
    emit(
        {
            "settings": SETTINGS,
            "steps": [short, long],
            "rounds": args.rounds,
            "seconds_per_step": {who: round(v, 4) for who, v in per_step.items()},
            "speedup": round(per_step["theirs"] / per_step["ours"], 3),
            "mean_loss_last_100_steps": {who: round(mean(v), 4) for who, v in losses.items()},
            "whole_run_seconds": {
                who: {n: [round(x, 1) for x in v] for n, v in s.items()} for who, s in seconds.items()
            },
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
