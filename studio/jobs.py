"""Background training jobs: a FIFO queue, one worker thread, progress kept on disk so restarts lose nothing."""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from studio import atomic
from training.config import TrainConfig
from training.metrics import METRICS_FILE
from training.trainer import Trainer, TrainingCancelled, TrainProgress

logger = logging.getLogger(__name__)
JOB_FILE = "job.json"
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "cancelled", "failed")
SAVE_INTERVAL = 1.0  # seconds between job.json writes while training


def job_name(config: TrainConfig) -> str:
    """The name a job is known by: the adapter's title, else its file stem."""
    return config.output_name or Path(config.output).stem


@dataclass
class TrainingJob:
    """One training run: its config, where it lives, and everything the page shows about it."""

    name: str
    config: TrainConfig
    run_dir: Path
    status: str = "queued"  # queued | running | done | cancelled | failed | interrupted
    phase: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    eta_seconds: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    resume: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _last_save: float = 0.0

    # ------------------------------------------------------------------ state
    @property
    def percent(self) -> float:
        """Progress in percent (0 before the plan is known)."""
        if self.status == "done":
            return 100.0
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        """True while the job is queued or running."""
        return self.status in ACTIVE

    @property
    def output(self) -> Path:
        """The adapter file the job writes."""
        return Path(self.config.output)

    def record(self) -> dict:
        """The job as JSON-able data (what job.json holds)."""
        return {
            "name": self.name,
            "config_path": str(self.run_dir / "config.toml"),
            "config": self.config.to_dict(),
            "status": self.status,
            "phase": self.phase,
            "message": self.message,
            "step": self.step,
            "total_steps": self.total_steps,
            "eta_seconds": self.eta_seconds,
            "losses": [list(pair) for pair in self.losses],
            "samples": list(self.samples),
            "error": self.error,
            "created": self.created,
            "finished": self.finished,
        }

    def save(self) -> None:
        """Write job.json (and the config TOML) atomically into the run folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.toml"
        if not config_path.exists():
            self.config.save(config_path)
        atomic.write_text(self.run_dir / JOB_FILE, json.dumps(self.record(), indent=1))
        self._last_save = time.time()

    @classmethod
    def load(cls, run_dir: Path) -> TrainingJob:
        """Read a job back from its run folder's job.json."""
        data = json.loads((run_dir / JOB_FILE).read_text(encoding="utf-8"))
        job = cls(name=data["name"], config=TrainConfig.from_dict(data["config"]), run_dir=run_dir)
        for key in ("status", "phase", "message", "step", "total_steps", "eta_seconds", "error", "created"):
            setattr(job, key, data.get(key, getattr(job, key)))
        job.finished = data.get("finished")
        job.losses = [(int(s), float(v)) for s, v in data.get("losses", [])]
        job.samples = list(data.get("samples", []))
        if job.status in ACTIVE:
            job.status = "interrupted"
            job.error = "the server stopped while this job was queued or running; press Resume to continue it"
        if job.status != "queued":
            job._done.set()
        return job

    def has_checkpoint(self) -> bool:
        """True if a resumable checkpoint exists in the run folder."""
        return any((self.run_dir / "checkpoints").glob("step-*/state.pt"))

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        """Ask the run to stop after the current step (the trainer writes a resumable checkpoint)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the job has finished (any outcome); True if it has."""
        return self._done.wait(timeout)

    def on_progress(self, event: TrainProgress) -> None:
        """Take one progress report from the trainer."""
        self.phase = event.phase
        if event.message:
            self.message = event.message
        if event.total_steps:
            self.total_steps = event.total_steps
        if event.phase == "resumed":
            self.losses = [pair for pair in self.losses if pair[0] <= event.step]
        if event.phase in ("training", "resumed", "checkpoint", "done"):
            self.step = event.step
        if event.phase == "training":
            self.eta_seconds = event.eta_seconds
            if event.loss is not None:
                self.losses.append((event.step, float(event.loss)))
        if event.samples:
            self._keep_samples(event.samples, f"step-{event.step:06d}")
        if event.phase != "training" or time.time() - self._last_save > SAVE_INTERVAL:
            self._save_or_log()

    def _save_or_log(self) -> None:
        """Save job.json; a failed write (disk full) is logged, never allowed to stop the run or the worker."""
        try:
            self.save()
        except OSError as exc:
            logger.error("could not save the state of job %s: %s", self.name, exc)

    def _keep_samples(self, paths: list[Path], label: str) -> None:
        """Copy sample images out of a checkpoint (old checkpoints are pruned) and remember them."""
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            target = folder / f"{label}_{Path(path).name}"
            if Path(path).is_file():
                with atomic.atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
                if str(target) not in self.samples:
                    self.samples.append(str(target))

    def _run(self, trainer_factory: Callable[..., Trainer]) -> None:
        self.status, self.error, self.finished = "running", "", None
        self._stop.clear()
        try:
            self.save()
            trainer = trainer_factory(self.config, progress=self.on_progress, should_stop=self._stop.is_set)
            resume_from = self.run_dir if self.resume and self.has_checkpoint() else None
            if resume_from is not None:  # this job owns its run folder: whatever a crash left half-written goes
                atomic.remove_stale(self.run_dir, older_than=0)
            result = trainer.run(resume_from=resume_from)
            final = result.output.with_name(result.output.stem + "_samples")
            if final.is_dir():
                self._keep_samples(sorted(final.glob("*.png")), "final")
            self.status, self.step = "done", result.steps
        except TrainingCancelled as exc:
            self.status, self.error = "cancelled", str(exc)
        except ValueError as exc:
            self.status, self.error = "failed", str(exc)
        except OSError as exc:
            self.status, self.error = "failed", f"could not read or write a file: {exc}"
        except Exception as exc:  # the worker must report, never die silently
            logger.exception("training job %s failed", self.name)
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.finished = time.time()
            self.resume = False
            self._save_or_log()
            self._done.set()


class JobRunner:
    """The server's one training slot: jobs queue FIFO and one worker thread runs them; state lives on disk."""

    def __init__(self, workspace=None, trainer_factory: Callable[..., Trainer] = Trainer):
        self.workspace = workspace
        self._trainer_factory = trainer_factory
        self._lock = threading.Condition()
        self._queue: collections.deque[TrainingJob] = collections.deque()
        self.jobs: dict[str, TrainingJob] = {}
        self._worker: threading.Thread | None = None
        if workspace is not None:
            for stale in atomic.remove_stale(workspace.runs_dir):
                logger.info("removed %s, left half-written by a process that was killed", stale)
            for path in sorted(workspace.runs_dir.glob(f"*/{JOB_FILE}")):
                try:
                    job = TrainingJob.load(path.parent)
                except (OSError, ValueError, KeyError) as exc:
                    logger.warning("ignoring unreadable job record %s: %s", path, exc)
                    continue
                job.save()
                self.jobs[job.name] = job

    # ------------------------------------------------------------------ queries
    def list_jobs(self) -> list[TrainingJob]:
        """Every known job, newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    @property
    def current(self) -> TrainingJob | None:
        """The running job, else the first queued one, else the most recent one."""
        with self._lock:
            for status in ("running", "queued"):
                for job in self.jobs.values():
                    if job.status == status:
                        return job
        jobs = self.list_jobs()
        return jobs[0] if jobs else None

    def get(self, name: str) -> TrainingJob:
        """The job called `name`; a readable error if there is none."""
        try:
            return self.jobs[name]
        except KeyError:
            raise ValueError(f"no training job named {name!r}") from None

    def queue_position(self, job: TrainingJob) -> int:
        """How many jobs run or wait before `job` starts, plus one (0 if it is not queued)."""
        with self._lock:
            place = next((i + 1 for i, j in enumerate(self._queue) if j is job), 0)
            running = any(j.status == "running" for j in self.jobs.values() if j is not job)
            return place + running if place else 0

    # ------------------------------------------------------------------ control
    def submit(self, config: TrainConfig, run_dir: str | Path | None = None) -> TrainingJob:
        """Queue `config`; it starts when the slot is free. Refuses a name that is already queued or running."""
        name = job_name(config)
        with self._lock:
            old = self.jobs.get(name)
            if old is not None and old.active:
                raise ValueError(f"a job named {name!r} is already {old.status}; cancel it or choose another name")
            job = TrainingJob(name=name, config=config, run_dir=Path(run_dir or config.resolved_work_dir))
            for stale in ("checkpoints", "samples"):  # a new run under an old name starts clean
                shutil.rmtree(job.run_dir / stale, ignore_errors=True)
            (job.run_dir / METRICS_FILE).unlink(missing_ok=True)  # its losses and best checkpoint too
            job.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(job.run_dir / "config.toml")
            job.save()
            self.jobs[name] = job
            self._enqueue(job)
        return job

    def resume(self, name: str) -> TrainingJob:
        """Queue an interrupted, cancelled or failed job again, continuing from its newest checkpoint."""
        with self._lock:
            job = self.get(name)
            if job.status not in RESUMABLE:
                raise ValueError(f"job {name!r} is {job.status}; only interrupted, cancelled or failed jobs resume")
            job.status, job.error, job.resume = "queued", "", True
            job._done.clear()
            job.save()
            self._enqueue(job)
        return job

    def cancel(self, name: str | None = None) -> TrainingJob:
        """Cancel a job (default: the current one): a queued job leaves the queue, a running one stops."""
        job = self.get(name) if name else self.current
        if job is None or not job.active:
            raise ValueError("no queued or running training job to cancel")
        with self._lock:
            if job.status == "queued" and job in self._queue:
                self._queue.remove(job)
                job.status, job.error = "cancelled", "cancelled before it started"
                job.save()
                job._done.set()
                return job
        job.cancel()
        return job

    def _enqueue(self, job: TrainingJob) -> None:
        self._queue.append(job)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, daemon=True, name="training-worker")
            self._worker.start()
        self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                job = self._queue.popleft()
                job.status = "running"
            job._run(self._trainer_factory)
