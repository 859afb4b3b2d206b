"""The DreamBooth-style LoRA training loop (Ruiz et al. 2022, arXiv:2208.12242) on accelerate."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from studio import atomic, sidecars
from studio.adapters import kohya_state_dict, save_adapter, training_metadata
from studio.conditioning import PromptEmbeddings, check_clip_skip, encode_prompts, prompt_arguments
from studio.models import BaseModel, load_base
from training import metrics
from training.config import TrainConfig
from training.data import (
    DatasetItem,
    DatasetReport,
    Sample,
    assign_bucket,
    batch_schedule,
    drops_caption,
    image_size,
    image_to_tensor,
    make_buckets,
    open_image,
    sample_rng,
    scan_dataset,
    size_conditioning,
    without_trigger,
)
from training.lora import (
    count_parameters,
    inject_lora,
    load_lora_state,
    lora_parameters,
    lora_state,
    used_text_encoder_layers,
)
from training.validation import build_validation_set, evaluating, hold_out, validation_loss

logger = logging.getLogger(__name__)
STATE_FORMAT = 1
# Options that must not change when a run is resumed (they change what the saved state means).
RESUME_INVARIANTS = (
    "rank",
    "alpha",
    "unet_targets",
    "train_text_encoder",
    "text_encoder_targets",
    "clip_skip",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "ema_decay",
    "validation_images",
)


class TrainingCancelled(Exception):
    """Raised inside the loop when the caller asked to stop; a resumable checkpoint has been written."""


@dataclass
class TrainProgress:
    """One progress report: what phase the run is in, and step, loss, learning rate and ETA while training."""

    phase: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    elapsed_seconds: float = 0.0
    eta_seconds: float | None = None
    message: str = ""
    samples: list[Path] = field(default_factory=list)


@dataclass
class TrainPlan:
    """The arithmetic of a run, shown before it starts: images, batches, steps, epochs."""

    num_images: int
    num_class_images: int
    repeats: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    images_seen: int
    processes: int = 1  # data-parallel processes; each step's batch is split across them

    def describe(self) -> str:
        """One readable paragraph of the plan."""
        extra = f" + {self.num_class_images} class images" if self.num_class_images else ""
        spread = f", each batch split over {self.processes} processes" if self.processes > 1 else ""
        return (
            f"{self.num_images} images{extra} x {self.repeats} repeat(s) -> {self.batches_per_epoch} batches/epoch, "
            f"{self.steps_per_epoch} optimizer steps/epoch; {self.total_steps} steps over {self.epochs} epoch(s), "
            f"{self.images_seen} images seen{spread}"
        )


@dataclass
class TrainResult:
    """What a finished run produced."""

    output: Path
    steps: int
    losses: list[float]
    checkpoints: list[Path]
    report: DatasetReport
    plan: TrainPlan
    trainable_parameters: int
    total_parameters: int
    module_counts: dict[str, int]
    seconds: float
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at checkpoints and end
    best_checkpoint: Path | None = None  # the adapter file with the lowest validation loss


ProgressCallback = Callable[[TrainProgress], None]


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """Turn "auto" into bf16 / fp16 on CUDA and "no" (fp32) on CPU; fp16 needs CUDA, bf16 also runs on CPUs."""
    if choice != "auto":
        if choice == "fp16" and device.type != "cuda":
            raise ValueError(f"mixed_precision 'fp16' needs a CUDA GPU; use 'bf16', 'no' or 'auto' on {device.type}")
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_pred: bool):
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556)."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_pred else clipped / snr


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: `path` itself, or the newest one under `path`/checkpoints."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step-*/state.pt")) if path.is_dir() else []
    if not candidates:
        raise ValueError(f"no resumable checkpoint found in {path}")
    return candidates[-1].parent


def launched_rank() -> int:
    """This process's rank as set by torchrun, `accelerate launch` or mpirun (0 when not launched distributed)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)


def make_accelerator(mixed_precision: str, log_with: str = "", logging_dir: Path | None = None):
    """The Accelerator of this process: DDP over NCCL on GPUs, or over gloo on CPUs when launched with N processes;
    `log_with` names accelerate's tracker (TensorBoard) that writes under `logging_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, get_int_from_env

    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if world == 1:
        from accelerate.state import AcceleratorState

        # accelerate keeps one state per process and refuses a second run's different mixed precision; a single
        # process (the UI's worker) trains run after run, so each starts afresh (as accelerate's own tests do)
        AcceleratorState._reset_state(reset_partial_state=True)
    # accelerate only goes data-parallel on CPUs when told to (cpu=True); without it each process trains alone
    cpu = world > 1 and not torch.cuda.is_available()
    # rank 0 alone renders class images and samples while the others wait at a barrier: give it hours, not minutes
    init = InitProcessGroupKwargs(timeout=timedelta(hours=3))
    trackers = {}
    if log_with:
        metrics.check_tracker(log_with)
        trackers = {"log_with": log_with, "project_config": ProjectConfiguration(logging_dir=str(logging_dir))}
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[init], **trackers)


def end_distributed() -> None:
    """Tear down the process group a distributed run set up (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_rows(count: int, rank: int, world: int) -> tuple[list[int], bool]:
    """The rows of a `count`-sample global batch that process `rank` of `world` trains on, and whether they count.

    Rows are contiguous and near-equal. A process left without rows (a short last batch) gets row 0 at loss
    weight 0 (False), so that every process still runs the forward and backward passes DDP synchronises."""
    start, stop = count * rank // world, count * (rank + 1) // world
    return (list(range(start, stop)), True) if stop > start else ([0], False)


class Trainer:
    """Runs one training config end to end: data, class images, LoRA, loop, checkpoints, samples, export."""

    # Speed switches, on by default; bench/train_speed.py turns each one off to measure its share.
    use_sdpa: bool = True
    foreach_optimizer: bool = True
    keep_freed_memory: bool = True

    def __init__(
        self,
        config: TrainConfig,
        *,
        base: BaseModel | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        if not config.data_dir:
            raise ValueError("data_dir is empty: give the folder of training images")
        if not config.output:
            raise ValueError("output is empty: give the .safetensors file to write")
        self.config = config
        self._base = base
        self._progress = progress or (lambda event: None)
        self._should_stop = should_stop or (lambda: False)
        self.work_dir = config.resolved_work_dir
        # under torchrun / accelerate launch only rank 0 reports progress and writes files
        self.is_main_process = launched_rank() == 0
        self.num_processes = 1
        self._trained: list[torch.nn.Parameter] = []  # the adapter weights the optimizer trains (set by run)
        self._ema = None  # their moving average (diffusers' EMAModel), when the config asks for one
        self.validation_items: list[DatasetItem] = []  # the pictures of the validation loss (set by scan)
        self._validation = None  # their latents, noise and timesteps (main process, set by run)
        self._metrics: metrics.MetricsLog | None = None

    # ----------------------------------------------------------------- planning
    def scan(self) -> DatasetReport:
        """Validate the data folder (less held-out pictures) and any validation folder; raise if nothing is usable."""
        cfg = self.config
        report = scan_dataset(cfg.data_dir, cfg.trigger, cfg.instance_prompt)
        if not report.items:
            raise ValueError(f"no usable training images in {cfg.data_dir}\n{report.summary()}")
        report, self.validation_items = hold_out(report, cfg.validation_images)
        if cfg.validation_dir.strip():
            held = scan_dataset(cfg.validation_dir, cfg.trigger, cfg.instance_prompt)
            if not held.items:
                raise ValueError(f"no usable validation images in {cfg.validation_dir}\n{held.summary()}")
            self.validation_items = held.items
        return report

    def plan(self, report: DatasetReport, num_batches: int | None = None) -> TrainPlan:
        """Steps and epochs for `report` under this config."""
        cfg = self.config
        instances = len(report.items) * cfg.repeats
        class_count = instances if cfg.prior_preservation else 0
        if num_batches is None:  # without buckets assigned, assume every batch is full
            num_batches = math.ceil((instances + class_count) / (cfg.batch_size * self.num_processes))
        steps_per_epoch = max(1, math.ceil(num_batches / cfg.gradient_accumulation_steps))
        total = cfg.max_train_steps or cfg.epochs * steps_per_epoch
        epochs = math.ceil(total / steps_per_epoch)
        return TrainPlan(
            num_images=len(report.items),
            num_class_images=cfg.num_class_images if cfg.prior_preservation else 0,
            repeats=cfg.repeats,
            batches_per_epoch=num_batches,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            epochs=epochs,
            images_seen=total * cfg.batch_size * cfg.gradient_accumulation_steps * self.num_processes,
            processes=self.num_processes,
        )

    # ----------------------------------------------------------------- class images
    def ensure_class_images(self, base: BaseModel) -> list[Path]:
        """Generate (once) and return the prior-preservation class images, cached on disk by prompt and model."""
        cfg = self.config
        key = hashlib.sha256(f"{base.name}|{cfg.class_prompt}|{self.resolution}".encode()).hexdigest()[:12]
        folder = Path(cfg.class_dir) if cfg.class_dir else self.work_dir / "class_images" / key
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "class_images.json"
        if not manifest.exists():
            info = {"prompt": cfg.class_prompt, "base": base.name, "resolution": self.resolution}
            atomic.write_text(manifest, json.dumps(info, indent=1))
        paths = [folder / f"class_{i:05d}.png" for i in range(cfg.num_class_images)]
        missing = [p for p in paths if not p.is_file()]
        pipe = base.pipeline
        for done, path in enumerate(missing):
            self._emit("class_images", message=f"generating class image {done + 1}/{len(missing)}")
            seed = cfg.seed * 100_003 + int(path.stem.split("_")[1])
            image = pipe(
                **prompt_arguments(base, cfg.class_prompt, clip_skip=cfg.clip_skip),
                num_inference_steps=cfg.sample_steps,
                guidance_scale=cfg.sample_cfg,
                height=self.resolution,
                width=self.resolution,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            with atomic.atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        return paths

    # ----------------------------------------------------------------- the run
    def run(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train, checkpoint and export; resume from a checkpoint folder (or a run folder) if given."""
        with keep_freed_memory(self.keep_freed_memory):
            return self._run(resume_from)

    def _run(self, resume_from: str | Path | None) -> TrainResult:
        from accelerate.utils import set_seed

        cfg = self.config
        started = time.time()
        report = self.scan()

        probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_mixed_precision(cfg.mixed_precision, probe_device)
        accelerator = make_accelerator(precision, cfg.log_with, self.work_dir)
        self.is_main_process, self.num_processes = accelerator.is_main_process, accelerator.num_processes
        rank, world = accelerator.process_index, accelerator.num_processes
        with accelerator.main_process_first():  # rank 0 tidies half-written checkpoints before the others look
            resume_state = self._load_resume_state(resume_from) if resume_from else None
        device = accelerator.device
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        set_seed(cfg.seed)

        self._emit("loading", message=f"loading base model {cfg.base}")
        base = self._base or load_base(
            cfg.base, torch_dtype=weight_dtype, device=device, prediction_type=cfg.prediction_type or None
        )
        pipe, family = base.pipeline, base.family
        check_clip_skip(family, cfg.clip_skip)
        scheduler = pipe.scheduler
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"base model prediction type {prediction_type!r} is not supported for training")

        self.resolution = cfg.resolution or base.native_size
        class_paths = []
        if cfg.prior_preservation:
            with accelerator.main_process_first():  # rank 0 renders them; the others then find them on disk
                class_paths = self.ensure_class_images(base)
        samples, sources = self._build_samples(report, class_paths, cfg.bucket_step or family.bucket_step)
        # each step trains on one global batch of batch_size x processes, split across the processes
        global_batch = cfg.batch_size * world
        num_batches = len(batch_schedule(samples, global_batch, cfg.seed, 0))
        plan = self.plan(report, num_batches)
        self._emit("planned", total_steps=plan.total_steps, message=plan.describe())

        unet, vae = pipe.unet, pipe.vae
        text_encoders = base.text_encoders
        tokenizers = base.tokenizers
        vae.requires_grad_(False)
        trained_tes = text_encoders if cfg.train_text_encoder else []
        with torch.random.fork_rng(devices=[]):
            # the LoRA init draws from torch's global RNG: seed it here so nothing else in the process
            # (a UI thread building layers, a generation) can change the starting weights
            torch.manual_seed(cfg.seed)
            module_counts = inject_lora(
                unet, trained_tes, cfg.lora_spec, used_text_encoder_layers(family, trained_tes, cfg.clip_skip)
            )
        for te in text_encoders:
            if te not in trained_tes:
                te.requires_grad_(False)
        for model in [unet, *trained_tes]:
            for param in lora_parameters(model):
                param.data = param.data.float()  # LoRA in fp32 over a half-precision base
        trainable, total = count_parameters([unet, *text_encoders])
        set_attention(unet, sdpa=self.use_sdpa)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for te in trained_tes:
                te.gradient_checkpointing_enable()

        optimizer = self._make_optimizer(unet, trained_tes)
        self._trained = [p for group in optimizer.param_groups for p in group["params"]]
        self._ema = None
        if cfg.ema_decay:
            from diffusers.training_utils import EMAModel

            self._ema = EMAModel(self._trained, decay=cfg.ema_decay)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=plan.total_steps,
        )
        unet, optimizer = accelerator.prepare(unet, optimizer)
        wrapped = {id(te): accelerator.prepare(te) for te in trained_tes}
        trained_tes = list(wrapped.values())
        # trained text encoders run through their DDP wrappers, or their gradients are not averaged across processes
        text_encoders = [wrapped.get(id(te), te) for te in text_encoders]

        noise_rng = torch.Generator("cpu").manual_seed(cfg.seed)
        global_step, micro_step, losses = 0, 0, []
        if resume_state is not None:
            global_step, micro_step, losses = self._restore(
                resume_state,
                accelerator.unwrap_model(unet),
                [accelerator.unwrap_model(te) for te in trained_tes],
                optimizer,
                lr_scheduler,
                noise_rng,
            )
            self._emit(
                "resumed", step=global_step, total_steps=plan.total_steps, message=f"resumed at step {global_step}"
            )

        text_cache = (
            self._text_embedding_cache(
                family,
                [
                    *{s.caption for s in samples},
                    *self._preservation_prompts([s.caption for s in samples]),
                    *([""] if cfg.caption_dropout_rate else []),
                ],
                tokenizers,
                text_encoders,
                device,
            )
            if (not cfg.train_text_encoder and cfg.cache_text_embeddings)
            else None
        )
        latent_cache: dict[tuple[int, bool], torch.Tensor] | None = (
            {} if cfg.cache_latents and cfg.center_crop else None
        )
        if latent_cache is not None:
            self._fill_latent_cache(samples, sources, vae, latent_cache, device, weight_dtype)
        self._noise_scheduler, self._weight_dtype, self._validation = noise_scheduler, weight_dtype, None
        if self.validation_items and accelerator.is_main_process:
            self._emit("caching", message=f"encoding {len(self.validation_items)} validation picture(s)")
            self._validation = build_validation_set(
                self.validation_items,
                self._buckets,
                vae,
                noise_scheduler.config.num_train_timesteps,
                sdxl=family.is_sdxl,
                device=device,
                dtype=weight_dtype,
            )
        self._metrics = metrics.MetricsLog(
            self.work_dir,
            resume_step=global_step if resume_state is not None else None,
            accelerator=accelerator if cfg.log_with else None,
            write=accelerator.is_main_process,
            config=cfg.to_dict(),
        )

        unet.train()
        for te in trained_tes:
            te.train()
        checkpoints: list[Path] = []
        loop_started, steps_this_session = time.time(), 0
        scaling = vae.config.scaling_factor
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        accumulated = 0.0

        schedule, schedule_epoch = [], -1
        while global_step < plan.total_steps:
            epoch, position = divmod(micro_step, num_batches)
            if schedule_epoch != epoch:  # one shuffle per epoch, not per step
                schedule, schedule_epoch = batch_schedule(samples, global_batch, cfg.seed, epoch), epoch
            # every process draws the random numbers of the whole global batch and keeps its rows, so N processes
            # train exactly what one process would on the same global batch with the same seed
            count = len(schedule[position])
            rows, counted = shard_rows(count, rank, world)
            batch = [schedule[position][row] for row in rows]
            flips = [cfg.random_flip and sample_rng(cfg.seed, epoch, i).random() < 0.5 for i in batch]
            latents = self._latents(
                batch, flips, epoch, samples, sources, vae, latent_cache, noise_rng, device, weight_dtype, rows, count
            )
            latents = latents * scaling
            captions = [samples[i].caption for i in batch]
            kept_from = captions  # output preservation works from the real captions, dropped or not
            if cfg.caption_dropout_rate:
                captions = [
                    "" if drops_caption(cfg.seed, epoch, i, cfg.caption_dropout_rate) else c
                    for i, c in zip(batch, captions, strict=True)
                ]
            if text_cache is not None:
                text = stack_embeddings([text_cache[c] for c in captions], device)
            else:
                with torch.set_grad_enabled(cfg.train_text_encoder):
                    text = self._encode_text(family, captions, tokenizers, text_encoders, device)
            added_cond = None
            if family.is_sdxl:  # SDXL's pooled text embedding and size/crop conditioning (arXiv:2307.01952)
                time_ids = self._time_ids(batch, flips, epoch, samples).to(device, weight_dtype)
                added_cond = {"text_embeds": text.pooled.to(weight_dtype), "time_ids": time_ids}

            noise = torch.randn((count, *latents.shape[1:]), generator=noise_rng)[rows].to(device)
            if cfg.noise_offset:
                offset = torch.randn((count, latents.shape[1], 1, 1), generator=noise_rng)[rows]
                noise = noise + cfg.noise_offset * offset.to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=noise_rng)
            timesteps = timesteps[rows].to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)

            model_input, steps_in = noisy.to(weight_dtype), timesteps
            hidden, cond = text.hidden.to(weight_dtype), added_cond
            if cfg.preservation_weight:
                kept, kept_cond, reference = self._preservation_targets(
                    accelerator,
                    unet,
                    trained_tes,
                    text_encoders,
                    family,
                    tokenizers,
                    text_cache,
                    kept_from,
                    model_input,
                    timesteps,
                    added_cond,
                    device,
                    weight_dtype,
                )
                # one forward pass for both: the training captions and the preservation prompts, same noisy latents
                model_input, steps_in = torch.cat([model_input, model_input]), torch.cat([timesteps, timesteps])
                hidden = torch.cat([hidden, kept])
                if cond is not None:
                    cond = {key: torch.cat([cond[key], kept_cond[key]]) for key in cond}
            with accelerator.autocast():
                pred = unet(model_input, steps_in, hidden, added_cond_kwargs=cond).sample
            pred, kept_pred = pred[: len(noisy)], pred[len(noisy) :]
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if cfg.preservation_weight:
                kept_loss = F.mse_loss(kept_pred.float(), reference.float(), reduction="none").mean(dim=(1, 2, 3))
                per_sample = per_sample + cfg.preservation_weight * kept_loss
            if cfg.min_snr_gamma:
                per_sample = per_sample * min_snr_weights(
                    alphas_cumprod, timesteps, cfg.min_snr_gamma, prediction_type == "v_prediction"
                )
            weights = torch.tensor([samples[i].weight if counted else 0.0 for i in batch], device=device)
            # this process's share of the global-batch mean; DDP averages the gradients over the processes
            loss = (per_sample * weights).sum() * (world / count)
            accelerator.backward(loss / cfg.gradient_accumulation_steps)
            accumulated += loss.item() / cfg.gradient_accumulation_steps
            micro_step += 1
            if micro_step % cfg.gradient_accumulation_steps:
                continue

            if cfg.max_grad_norm:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if self._ema is not None:
                self._ema.step(self._trained)
            global_step += 1
            steps_this_session += 1
            if world > 1:  # the global-batch loss, the same number on every process
                accumulated = accelerator.reduce(torch.tensor(accumulated, device=device), "mean").item()
            losses.append(accumulated)
            accumulated = 0.0

            elapsed = time.time() - loop_started
            eta = elapsed / steps_this_session * (plan.total_steps - global_step)
            self._emit(
                "training",
                step=global_step,
                total_steps=plan.total_steps,
                epoch=epoch + 1,
                loss=losses[-1],
                lr=lr_scheduler.get_last_lr()[0],
                eta=eta,
                started=started,
            )

            epoch_done = micro_step % num_batches == 0
            due = (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0) or (
                cfg.checkpoint_every_epochs and epoch_done and (epoch + 1) % cfg.checkpoint_every_epochs == 0
            )
            stop = self._should_stop()
            if world > 1:  # every process must agree, or the others wait forever at the next step
                stop = bool(accelerator.reduce(torch.tensor(float(stop), device=device), "sum").item())
            if (due or stop) and global_step < plan.total_steps:
                checkpoints.append(
                    self._checkpoint(
                        base,
                        unet,
                        trained_tes,
                        optimizer,
                        lr_scheduler,
                        noise_rng,
                        global_step,
                        micro_step,
                        losses,
                        report,
                        plan,
                        started,
                        accelerator,
                    )
                )
            if stop:
                self._metrics.close()
                raise TrainingCancelled(f"training stopped at step {global_step}; resume from {self.work_dir}")
            if global_step < plan.total_steps:
                self._metrics.train_step(global_step, losses)

        accelerator.wait_for_everyone()
        output = Path(cfg.output)
        final_samples: list[Path] = []
        if accelerator.is_main_process:
            with self._averaged_weights():
                tensors = kohya_state_dict(
                    family, accelerator.unwrap_model(unet), [accelerator.unwrap_model(te) for te in trained_tes]
                )
                metadata = self._metadata(base, report, plan, global_step, started, prediction_type)
                save_adapter(output, tensors, metadata, dtype=cfg.save_dtype)
                try:  # A1111's NAME.json beside it; the adapter is what matters if that cannot be written
                    sidecars.write_sidecars(output)
                except (OSError, ValueError) as exc:
                    logger.warning("wrote %s but not its A1111 sidecar: %s", output, exc)
                final_samples = self._samples(base, unet, trained_tes, output.with_name(output.stem + "_samples"))
                final_loss = self._validation_loss(base, unet, trained_tes, accelerator)
            self._metrics.record(global_step, losses, final_loss, checkpoint=metrics.FINAL)
        self._metrics.close()
        accelerator.wait_for_everyone()  # the others return only once the adapter is on disk
        seconds = time.time() - started
        records = self._metrics.records
        best = metrics.best_record(records)  # the adapter to use when the last steps over-trained
        self._emit(
            "done",
            step=global_step,
            total_steps=plan.total_steps,
            loss=losses[-1] if losses else None,
            message=f"wrote {output}",
            started=started,
            samples=final_samples,
        )
        return TrainResult(
            output=output,
            steps=global_step,
            losses=losses,
            checkpoints=checkpoints,
            report=report,
            plan=plan,
            trainable_parameters=trainable,
            total_parameters=total,
            module_counts=module_counts,
            seconds=seconds,
            validation_losses=metrics.validation_losses(records),
            best_checkpoint=metrics.adapter_of(best, self.work_dir, output) if best else None,
        )

    # ----------------------------------------------------------------- helpers
    def _validation_loss(self, base, unet, trained_tes, accelerator) -> float | None:
        """The validation loss of the weights as they are saved (the average, with an EMA); None without pictures."""
        if self._validation is None:
            return None
        device = accelerator.device
        models = [accelerator.unwrap_model(m) for m in (unet, *trained_tes)]

        def encode(captions: list[str]) -> PromptEmbeddings:
            return self._encode_text(base.family, captions, base.tokenizers, base.text_encoders, device)

        with evaluating(models):
            return validation_loss(
                self._validation,
                models[0],
                encode,
                self._noise_scheduler,
                device=device,
                dtype=self._weight_dtype,
                autocast=accelerator.autocast,
            )

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """With an EMA, swap the averaged adapter weights in (to save and sample), and the trained ones back after."""
        if self._ema is None:
            yield
            return
        self._ema.store(self._trained)
        self._ema.copy_to(self._trained)
        try:
            yield
        finally:
            self._ema.restore(self._trained)

    def _emit(
        self,
        phase: str,
        *,
        step: int = 0,
        total_steps: int = 0,
        epoch: int = 0,
        loss=None,
        lr=None,
        eta=None,
        message: str = "",
        started: float | None = None,
        samples=None,
    ) -> None:
        if not self.is_main_process:
            return
        elapsed = time.time() - started if started else 0.0
        self._progress(
            TrainProgress(
                phase=phase,
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                loss=loss,
                lr=lr,
                elapsed_seconds=elapsed,
                eta_seconds=eta,
                message=message,
                samples=list(samples or []),
            )
        )

    def _build_samples(self, report: DatasetReport, class_paths: list[Path], bucket_step: int):
        cfg = self.config
        if cfg.enable_bucket:
            buckets = make_buckets(
                self.resolution, bucket_step, min(cfg.min_bucket_resolution, self.resolution), cfg.max_bucket_resolution
            )
        else:
            buckets = [(self.resolution, self.resolution)]
        self._buckets = buckets
        samples: list[Sample] = []
        source_of: list[int] = []
        for _ in range(cfg.repeats):
            for index, item in enumerate(report.items):
                bucket = assign_bucket(item.width, item.height, buckets)
                samples.append(Sample(item.path, item.caption, bucket, size=(item.width, item.height)))
                source_of.append(index)
        if class_paths:
            instance_count = len(samples)
            for k in range(instance_count):
                index = k % len(class_paths)
                samples.append(
                    Sample(
                        class_paths[index],
                        cfg.class_prompt,
                        (self.resolution, self.resolution),
                        weight=cfg.prior_loss_weight,
                        is_class=True,
                        size=image_size(class_paths[index]),
                    )
                )
                source_of.append(len(report.items) + index)
        self._bucket_counts: dict[str, int] = {}
        for sample in samples:
            name = f"{sample.bucket[0]}x{sample.bucket[1]}"
            self._bucket_counts[name] = self._bucket_counts.get(name, 0) + 1
        return samples, source_of

    def _fill_latent_cache(self, samples, sources, vae, cache, device, dtype) -> None:
        """Encode every image (and its mirror image when flipping) once, before the first step, as kohya's
        cache_latents does: every step then costs the same, so the ETA is right from the start."""
        first_index: dict[int, int] = {}
        for index, source in enumerate(sources):
            first_index.setdefault(source, index)
        flips = (False, True) if self.config.random_flip else (False,)
        todo = [(index, flip) for index in first_index.values() for flip in flips]
        for done, (index, flip) in enumerate(todo):
            if done % 32 == 0:
                self._emit("caching", message=f"encoding latents {done + 1}-{min(done + 32, len(todo))}/{len(todo)}")
            self._dist_params(index, flip, 0, samples, sources, vae, cache, device, dtype)

    def _dist_params(self, index, flip, epoch, samples, sources, vae, cache, device, dtype) -> torch.Tensor:
        """The VAE posterior (mean and log-variance) of one sample, from the cache when it holds it."""
        cfg = self.config
        key = (sources[index], flip)
        if cache is not None and key in cache:
            return cache[key]
        sample = samples[index]
        pixels = image_to_tensor(
            open_image(sample.path), sample.bucket, cfg.center_crop, flip, sample_rng(cfg.seed, epoch, index)
        )
        with torch.no_grad():
            dist_params = vae.encode(pixels[None].to(device, dtype)).latent_dist.parameters[0].float().cpu()
        if cache is not None:
            cache[key] = dist_params
        return dist_params

    def _latents(self, batch, flips, epoch, samples, sources, vae, cache, noise_rng, device, dtype, rows, count):
        """Latents sampled from the VAE posterior of `batch`, which is `rows` of a `count`-sample global batch."""
        params = [
            self._dist_params(index, flip, epoch, samples, sources, vae, cache, device, dtype)
            for index, flip in zip(batch, flips, strict=True)
        ]
        stacked = torch.stack(params)
        mean, logvar = stacked.chunk(2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        sample = mean + std * torch.randn((count, *mean.shape[1:]), generator=noise_rng)[rows]
        return sample.to(device)

    def _preservation_prompts(self, captions: list[str]) -> list[str]:
        """What each caption becomes for output preservation: without its trigger word, or the empty prompt."""
        cfg = self.config
        if not cfg.preservation_weight:
            return []
        if cfg.preservation_prompt == "blank":
            return ["" for _ in captions]
        return [without_trigger(c, cfg.trigger) for c in captions]

    def _preservation_targets(
        self,
        accelerator,
        unet,
        trained_tes,
        text_encoders,
        family,
        tokenizers,
        text_cache,
        captions,
        noisy,
        timesteps,
        added_cond,
        device,
        dtype,
    ) -> tuple[torch.Tensor, dict | None, torch.Tensor]:
        """The preservation prompts' conditioning (through any trained text encoder) and the base model's prediction
        for them on the batch's noisy latents, adapters off."""
        prompts = self._preservation_prompts(captions)
        adapted = [accelerator.unwrap_model(m) for m in (unet, *trained_tes)]

        def conditioning(grad: bool) -> tuple[torch.Tensor, dict | None]:
            if text_cache is not None:
                text = stack_embeddings([text_cache[p] for p in prompts], device)
            else:
                with torch.set_grad_enabled(grad):
                    text = self._encode_text(family, prompts, tokenizers, text_encoders, device)
            extra = None if added_cond is None else {**added_cond, "text_embeds": text.pooled.to(dtype)}
            return text.hidden.to(dtype), extra

        with torch.no_grad(), adapters_disabled(adapted), accelerator.autocast():
            hidden, extra = conditioning(False)
            reference = unet(noisy, timesteps, hidden, added_cond_kwargs=extra).sample
        if trained_tes:  # the adapted text encoders read the prompts differently from the base ones
            hidden, extra = conditioning(True)
        return hidden, extra, reference

    def _encode_text(self, family, captions, tokenizers, text_encoders, device) -> PromptEmbeddings:
        """The captions' conditioning as the family's pipeline computes it at generation (with the clip skip)."""
        return encode_prompts(family, tokenizers, text_encoders, captions, self.config.clip_skip, device)

    def _text_embedding_cache(self, family, captions, tokenizers, text_encoders, device) -> dict[str, PromptEmbeddings]:
        """Each distinct caption's conditioning (hidden states, and SDXL's pooled embedding), on the CPU."""
        captions = sorted(set(captions))
        cache = {}
        with torch.no_grad():
            for start in range(0, len(captions), 16):
                chunk = captions[start : start + 16]
                text = self._encode_text(family, chunk, tokenizers, text_encoders, device)
                for row, caption in enumerate(chunk):
                    pooled = text.pooled[row].cpu() if text.pooled is not None else None
                    cache[caption] = PromptEmbeddings(text.hidden[row].cpu(), pooled)
        return cache

    def _time_ids(self, batch, flips, epoch, samples) -> torch.Tensor:
        """SDXL `time_ids` rows of `batch`: what the resize-and-crop did to each image (its pixels' draws)."""
        cfg = self.config
        rows = []
        for index, flip in zip(batch, flips, strict=True):
            sample = samples[index]
            size = sample.size or sample.bucket
            rng = sample_rng(cfg.seed, epoch, index)
            rows.append(size_conditioning(size, sample.bucket, cfg.center_crop, flip, rng).time_ids)
        return torch.tensor(rows, dtype=torch.float32)

    def _make_optimizer(self, unet, trained_tes):
        cfg = self.config
        groups = [{"params": lora_parameters(unet), "lr": cfg.unet_lr}]
        te_params = [p for te in trained_tes for p in lora_parameters(te)]
        if te_params:
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr})
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(
                groups,
                betas=betas,
                eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay,
                foreach=self.foreach_optimizer,
            )
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ValueError(
                    "optimizer 'adamw8bit' needs bitsandbytes: pip install 'lora-style-studio[gpu]'"
                ) from None
            return bnb.optim.AdamW8bit(groups, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("optimizer 'prodigy' needs prodigyopt: pip install 'lora-style-studio[prodigy]'") from None
        return Prodigy(groups, betas=betas, weight_decay=cfg.weight_decay)

    def _metadata(self, base, report, plan, steps, started, prediction_type):
        cfg = self.config
        title = cfg.output_name or Path(cfg.output).stem
        training = {
            "training_started_at": started,
            "training_finished_at": time.time(),
            "steps": steps,
            "epoch": plan.epochs,
            "num_train_images": len(report.items) * cfg.repeats,
            "num_reg_images": plan.num_class_images,
            "num_batches_per_epoch": plan.batches_per_epoch,
            "num_epochs": plan.epochs,
            "max_train_steps": plan.total_steps,
            "batch_size_per_device": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "learning_rate": cfg.unet_lr,
            "unet_lr": cfg.unet_lr,
            "text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else 0.0,
            "lr_scheduler": cfg.lr_scheduler,
            "lr_warmup_steps": cfg.lr_warmup_steps,
            "optimizer": cfg.optimizer,
            "seed": cfg.seed,
            "min_snr_gamma": cfg.min_snr_gamma,
            "noise_offset": cfg.noise_offset,
            "ema_decay": cfg.ema_decay,
            "caption_dropout_rate": cfg.caption_dropout_rate,
            "prior_loss_weight": cfg.prior_loss_weight,
            "mixed_precision": cfg.mixed_precision,
            "sd_model_name": base.name,
            "clip_skip": "None" if base.family.is_sdxl else str(cfg.clip_skip),
            "enable_bucket": str(cfg.enable_bucket),
            "bucket_info": json.dumps({"buckets": self._bucket_counts}),
            "training_comment": "trained with lora-style-studio",
        }
        dataset = {
            "tag_frequency": report.tag_frequency(),
            "dataset_dirs": {report.root.name: {"n_repeats": cfg.repeats, "img_count": len(report.items)}},
        }
        network_args = {"unet_targets": cfg.unet_targets, "dropout": cfg.dropout}
        if cfg.train_text_encoder:
            network_args["text_encoder_targets"] = cfg.text_encoder_targets
        if cfg.unet_targets == "locon":
            # kohya's names for the conv layers' rank and alpha, which its tools read back (strings, as kohya's)
            network_args.update(conv_dim=str(cfg.rank), conv_alpha=f"{cfg.alpha:g}")
        return training_metadata(
            base.family,
            rank=cfg.rank,
            alpha=cfg.alpha,
            network_args=network_args,
            title=title,
            prediction_type=prediction_type,
            resolution=self.resolution,
            trigger_phrase=cfg.trigger,
            training=training,
            dataset=dataset,
        )

    def _samples(self, base, unet, trained_tes, folder: Path) -> list[Path]:
        cfg = self.config
        if not cfg.sample_prompts:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        models = [unet, *trained_tes]
        for model in models:
            model.eval()
        paths = []
        try:
            for index, prompt in enumerate(cfg.sample_prompts):
                image = base.pipeline(
                    **prompt_arguments(base, prompt, clip_skip=cfg.clip_skip),
                    num_inference_steps=cfg.sample_steps,
                    guidance_scale=cfg.sample_cfg,
                    height=self.resolution,
                    width=self.resolution,
                    generator=torch.Generator("cpu").manual_seed(cfg.sample_seed + index),
                ).images[0]
                path = folder / f"sample_{index:02d}.png"
                with atomic.atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(path)
        finally:
            for model in models:
                model.train()
        return paths

    def _checkpoint(
        self,
        base,
        unet,
        trained_tes,
        optimizer,
        lr_scheduler,
        noise_rng,
        global_step,
        micro_step,
        losses,
        report,
        plan,
        started,
        accelerator,
    ) -> Path:
        cfg = self.config
        target = self.work_dir / "checkpoints" / f"step-{global_step:06d}"
        if not accelerator.is_main_process:
            return target
        unwrapped = accelerator.unwrap_model(unet)
        tes = [accelerator.unwrap_model(te) for te in trained_tes]
        with atomic.atomic_dir(target) as tmp:
            with self._averaged_weights():
                tensors = kohya_state_dict(base.family, unwrapped, tes)
                metadata = self._metadata(
                    base, report, plan, global_step, started, base.pipeline.scheduler.config.prediction_type
                )
                save_adapter(tmp / "adapter.safetensors", tensors, metadata, dtype=cfg.save_dtype)
                self._samples(base, unet, trained_tes, tmp / "samples")
                val_loss = self._validation_loss(base, unet, trained_tes, accelerator)
            state = {
                "format": STATE_FORMAT,
                "global_step": global_step,
                "micro_step": micro_step,
                "losses": list(losses),
                "lora": {
                    "unet": lora_state(unwrapped),
                    **{f"text_encoder_{i}": lora_state(te) for i, te in enumerate(tes)},
                },
                "optimizer": optimizer.state_dict(),
                "ema": self._ema.state_dict() if self._ema is not None else None,
                "lr_scheduler": lr_scheduler.state_dict(),
                "noise_rng": noise_rng.get_state(),
                "torch_rng": torch.get_rng_state(),
                "config": cfg.to_dict(),
            }
            torch.save(state, tmp / "state.pt")
            cfg.save(tmp / "config.toml")
        samples = sorted((target / "samples").glob("*.png")) if (target / "samples").is_dir() else []
        self._metrics.record(global_step, losses, val_loss, checkpoint=target.name)
        scored = f"; validation loss {val_loss:.4f}" if val_loss is not None else ""
        warning = metrics.overtraining_warning(self._metrics.records)
        self._emit(
            "checkpoint",
            step=global_step,
            total_steps=plan.total_steps,
            message=f"saved {target}{scored}" + (f"\nwarning: {warning}" if warning else ""),
            samples=samples,
            started=started,
        )
        best = metrics.best_record(self._metrics.records)  # kept however old, with the newest keep_checkpoints
        old = sorted((self.work_dir / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]
        for folder in (f for f in old if best is None or f.name != best["checkpoint"]):
            shutil.rmtree(folder, ignore_errors=True)
        return target

    def _load_resume_state(self, resume_from) -> dict:
        folder = find_checkpoint(resume_from)
        if folder.parent.name == "checkpoints" and self.is_main_process:  # half-written checkpoints of a killed run
            atomic.remove_stale(folder.parent, older_than=0)
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint {folder} has an unknown state format {state.get('format')!r}")
        saved = state["config"]
        defaults = TrainConfig().to_dict()  # options added since the checkpoint was written had their default
        changed = [k for k in RESUME_INVARIANTS if saved.get(k, defaults[k]) != getattr(self.config, k)]
        if changed:
            raise ValueError(f"cannot resume {folder}: these options differ from the checkpoint: {', '.join(changed)}")
        return state

    def _restore(self, state, unet, trained_tes, optimizer, lr_scheduler, noise_rng):
        load_lora_state(unet, state["lora"]["unet"])
        for index, te in enumerate(trained_tes):
            load_lora_state(te, state["lora"][f"text_encoder_{index}"])
        optimizer.load_state_dict(state["optimizer"])
        if self._ema is not None:
            self._ema.load_state_dict(state["ema"])
            self._ema.to(device=self._trained[0].device)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        return state["global_step"], state["micro_step"], list(state["losses"])


# glibc mallopt parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[None]:
    """While training, let glibc keep freed memory for the next step instead of handing it back to the system.

    By default glibc serves large blocks with mmap and trims the heap as soon as they are freed, so every step
    faults its activations back in page by page: about a sixth of the CPU time of an SD-sized step in
    bench/train_speed.py (what PyTorch's CPU tuning guide works around with jemalloc or tcmalloc). The usual
    settings come back afterwards and the kept memory is released. Does nothing off glibc."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def adapters_disabled(models: list) -> Iterator[None]:
    """Run the wrapped code on the base weights: every model's LoRA adapter is off inside, on again after."""
    for model in models:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models:
            model.enable_adapters()


def stack_embeddings(cached: list[PromptEmbeddings], device: torch.device) -> PromptEmbeddings:
    """One batch of conditioning from per-caption cache entries."""
    hidden = torch.stack([entry.hidden for entry in cached]).to(device)
    pooled = torch.stack([entry.pooled for entry in cached]).to(device) if cached[0].pooled is not None else None
    return PromptEmbeddings(hidden, pooled)


def set_attention(unet, sdpa: bool = True) -> None:
    """Use PyTorch's fused scaled-dot-product attention (or, with sdpa=False, diffusers' classic matmul-softmax
    processor) in every attention layer of `unet` that runs a standard processor; custom processors are kept."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = unet.attn_processors
    if processors and all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in processors.values()):
        unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Run `config` to completion (keyword arguments go to `Trainer`; `resume_from` to `Trainer.run`)."""
    resume_from = kwargs.pop("resume_from", None)
    return Trainer(config, **kwargs).run(resume_from=resume_from)
