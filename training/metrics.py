"""RUN_DIR/metrics.jsonl: training and validation loss by step, the best checkpoint, and over-training warnings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from studio import atomic

METRICS_FILE = "metrics.jsonl"
TRAIN_LOSS_EVERY = 10  # steps between records of the recent training loss (checkpoints and the end add records)
RISES_BEFORE_WARNING = 3  # validations in a row with a higher loss than the one before: over-training
FINAL = "final"  # the checkpoint name of the end-of-run record (the exported adapter)


def check_tracker(log_with: str) -> None:
    """Raise a ValueError naming the optional extra when the package `log_with` needs is not installed."""
    from accelerate.utils import is_tensorboard_available

    if log_with == "tensorboard" and not is_tensorboard_available():
        raise ValueError(
            "log_with 'tensorboard' needs the tensorboard package: pip install 'lora-style-studio[tensorboard]'"
        )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, oldest first ([] without one; a half-written last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def validation_losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, validation loss) of every record that has one."""
    return [(r["step"], float(r["val_loss"])) for r in records if isinstance(r.get("val_loss"), (int, float))]


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The checkpoint record with the lowest validation loss (the earliest of equals), or None."""
    scored = [r for r in records if isinstance(r.get("val_loss"), (int, float)) and r.get("checkpoint")]
    return min(scored, key=lambda r: (r["val_loss"], r["step"])) if scored else None


def adapter_of(record: dict[str, Any], run_dir: str | Path, output: str | Path) -> Path:
    """The adapter file a record's checkpoint names: the run's output for the final one, else the checkpoint's."""
    if record["checkpoint"] == FINAL:
        return Path(output)
    return Path(run_dir) / "checkpoints" / record["checkpoint"] / "adapter.safetensors"


def rises(records: list[dict[str, Any]]) -> int:
    """How many validations in a row, up to the last one, had a higher loss than the validation before."""
    losses = [loss for _, loss in validation_losses(records)]
    count = 0
    while count + 1 < len(losses) and losses[-1 - count] > losses[-2 - count]:
        count += 1
    return count


def overtraining_warning(records: list[dict[str, Any]], needed: int = RISES_BEFORE_WARNING) -> str:
    """A warning when the validation loss has risen at `needed` validations in a row; empty otherwise."""
    count = rises(records)
    if count < needed:
        return ""
    losses = [loss for _, loss in validation_losses(records)][-count - 1 :]
    best = best_record(records)
    where = f"; the best checkpoint is {best['checkpoint']} (step {best['step']})" if best else ""
    trend = " -> ".join(f"{loss:.4f}" for loss in losses)
    return f"validation loss has risen {count} times in a row ({trend}): the adapter is probably over-training{where}"


def best_summary(records: list[dict[str, Any]], run_dir: str | Path, output: str | Path) -> str:
    """One line naming the best checkpoint by validation loss and its adapter file; empty without validations."""
    best = best_record(records)
    if best is None:
        return ""
    adapter = adapter_of(best, run_dir, output)
    name, step, loss = best["checkpoint"], best["step"], best["val_loss"]
    return f"best checkpoint by validation loss: {name} (step {step}, {loss:.4f}): {adapter}"


class MetricsLog:
    """Keeps RUN_DIR/metrics.jsonl (rewritten atomically per record) and accelerate's trackers, on the main process."""

    def __init__(
        self,
        run_dir: Path,
        *,
        resume_step: int | None = None,
        accelerator=None,
        write: bool = True,
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(run_dir) / METRICS_FILE
        self.write = write
        self._accelerator = accelerator
        self._last_step = resume_step or 0
        # a resumed run keeps what came before its checkpoint; a new run starts a new file
        self.records = [r for r in read_metrics(run_dir) if r["step"] <= self._last_step] if resume_step else []
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._save()
            if accelerator is not None:  # TensorBoard writes to RUN_DIR/tensorboard, with the options as hparams
                accelerator.init_trackers("tensorboard", config=_scalars(config or {}))

    def record(
        self, step: int, losses: list[float], val_loss: float | None = None, checkpoint: str = ""
    ) -> dict[str, Any]:
        """Log the mean training loss since the last record, and the validation loss and checkpoint when given."""
        recent = losses[self._last_step : step] or losses[-1:]
        record: dict[str, Any] = {"step": step, "train_loss": math.fsum(recent) / len(recent) if recent else None}
        if val_loss is not None:
            record["val_loss"] = val_loss
        if checkpoint:
            record["checkpoint"] = checkpoint
        self.records.append(record)
        self._last_step = step
        if self.write:
            self._save()
            if self._accelerator is not None:
                values = {k: record[k] for k in ("train_loss", "val_loss") if record.get(k) is not None}
                self._accelerator.log(values, step=step)
        return record

    def _save(self) -> None:
        # the whole file again (a few hundred short lines at most), atomically: a killed run never leaves half a line
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def train_step(self, step: int, losses: list[float]) -> None:
        """Log the recent training loss every TRAIN_LOSS_EVERY steps (unless this step already has a record)."""
        if step % TRAIN_LOSS_EVERY == 0 and step != self._last_step:
            self.record(step, losses)

    def close(self) -> None:
        """Flush and close the trackers (keeps accelerate's process group, which `end_training` would tear down)."""
        if self._accelerator is not None and self.write:
            for tracker in self._accelerator.trackers:
                tracker.finish()
            self._accelerator = None


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """`values` as trackers take hyperparameters: numbers, strings and booleans (lists joined with ' | ')."""
    return {k: " | ".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()}
