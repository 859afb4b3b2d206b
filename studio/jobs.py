"""Background training jobs: one runs at a time in a worker thread; progress is kept for any page to read."""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrainConfig
from training.trainer import Trainer, TrainingCancelled, TrainProgress, TrainResult


@dataclass
class TrainingJob:
    """A training run in the background: its config, live progress, and outcome."""

    config: TrainConfig
    status: str = "queued"  # queued | running | done | cancelled | failed
    events: list[TrainProgress] = field(default_factory=list)
    result: TrainResult | None = None
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def latest(self) -> TrainProgress | None:
        """The most recent progress report."""
        return self.events[-1] if self.events else None

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) pairs seen so far."""
        return [(e.step, e.loss) for e in self.events if e.phase == "training" and e.loss is not None]

    @property
    def samples(self) -> list[Path]:
        """Sample images written at checkpoints so far."""
        return [p for e in self.events for p in e.samples]

    def cancel(self) -> None:
        """Ask the run to stop after the current step (it writes a resumable checkpoint)."""
        self._stop.set()

    def start(self, resume_from: str | Path | None = None) -> None:
        """Run the job in a daemon thread."""
        self._thread = threading.Thread(target=self._run, args=(resume_from,), daemon=True, name="training")
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, resume_from) -> None:
        self.status = "running"
        try:
            trainer = Trainer(self.config, progress=self.events.append, should_stop=self._stop.is_set)
            self.result = trainer.run(resume_from=resume_from)
            self.status = "done"
        except TrainingCancelled as exc:
            self.status, self.error = "cancelled", str(exc)
        except ValueError as exc:
            self.status, self.error = "failed", str(exc)
        except Exception as exc:  # the worker must report, never die silently
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()


class JobRunner:
    """Owns the one training slot: refuses a second job while one runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current: TrainingJob | None = None

    def submit(self, config: TrainConfig, resume_from: str | Path | None = None) -> TrainingJob:
        """Start `config` now, or raise ValueError if a job is already running."""
        with self._lock:
            if self.current is not None and self.current.status in ("queued", "running"):
                raise ValueError("a training job is already running; cancel it or wait for it to finish")
            job = TrainingJob(config)
            self.current = job
            job.start(resume_from)
            return job
