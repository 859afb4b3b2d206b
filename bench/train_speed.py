"""Is our trainer faster than the obvious loop, at equal loss? And what does each optimisation buy?

    python bench/train_speed.py [--models demo,sd15] [--demo-steps 30] [--sd15-steps 3] [--rounds 2]
                                [--demo-shares no_latent_cache,no_sdpa] [--sd15-shares no_latent_cache,no_kept_memory]

Contenders, on the same data, steps, batch, resolution, seed and LoRA targets, interleaved in one run
(ours, plain, ours without one optimisation... in the first round, then ours and plain again in reverse
order) so background load hits them alike:

- ours: `training.trainer.Trainer` through the library API the CLI uses (the `style` preset);
- plain: the loop a diffusers user writes (train_text_to_image_lora.py without the CLI): PEFT LoRA on the same
  modules, every step loads its images, runs the VAE and the text encoder, default attention, torch.optim.AdamW
  with its defaults. It draws its noise from the same generator in the same order, so the per-step losses of
  the two loops can be compared one to one;
- ours with one optimisation off: latent cache, text-embedding cache, SDPA attention, foreach AdamW, and
  keeping freed memory for the next step (glibc), each in one run (on the SD1.5-shaped model only the three
  that matter at that size by default: the text encoder's 77 tokens and the optimizer's 128 small tensors are
  a rounding error next to its UNet).

Models: (a) the bundled demo model on sample_data/styles/ink at its native 64 px, batch 4; (b) a UNet, text
encoder and VAE built from the real SD1.5 configs with random weights, at 256 px, batch 1, on 2 ink images.
Every run is a fresh process (the same model weights, built from a seed), so no run inherits another's memory
or allocator state. Seconds per step are the mean over steps 2..N (step 1 warms up), as wall-clock time and
as the process's CPU time (steadier when other jobs share the machine). The last line is one JSON object;
`speedup` (plain / ours, wall clock) is the SD1.5-shaped model's, `speedup_demo` the demo model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import INK, emit, load_model, machine, mean, peak_rss_bytes, run_child, subset  # noqa: E402
from studio.models import BaseModel  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import Sample, batch_schedule, image_to_tensor, open_image, scan_dataset  # noqa: E402
from training.lora import unet_targets  # noqa: E402
from training.trainer import Trainer  # noqa: E402

VARIANTS = ("no_latent_cache", "no_text_cache", "no_sdpa", "no_foreach", "no_kept_memory")
SETTINGS = {  # model -> (resolution, batch size, images)
    "demo": (64, 4, 60),
    "sd15": (256, 1, 2),
}


@dataclass
class Run:
    """One training run: when each step ended, its losses, the whole call's seconds, the evaluation loss after."""

    step_ends: list[float] = field(default_factory=list)
    step_cpu_ends: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_loss: float = 0.0

    def mark(self) -> None:
        """Note the wall-clock and CPU time at the end of a step."""
        self.step_ends.append(time.perf_counter())
        self.step_cpu_ends.append(time.process_time())

    def summary(self) -> dict:
        """Durations of steps 2..N (wall and CPU), losses, whole-run seconds."""
        return {
            "step_seconds": [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)],
            "step_cpu_seconds": [b - a for a, b in zip(self.step_cpu_ends, self.step_cpu_ends[1:], strict=False)],
            "losses": self.losses,
            "seconds": self.seconds,
            "eval_loss": self.eval_loss,
        }


def make_config(model: str, data_dir: Path, out: Path, steps: int) -> TrainConfig:
    """The `style` preset (what a user gets by default) at this model's bench size, without flips or samples."""
    resolution, batch, _ = SETTINGS[model]
    return TrainConfig.from_preset(
        "style",
        base=model,
        data_dir=str(data_dir),
        output=str(out),
        max_train_steps=steps,
        batch_size=batch,
        resolution=resolution,
        random_flip=False,
        lr_warmup_steps=steps // 5,
        mixed_precision="no",
    )


class EvalBatch:
    """A fixed evaluation: the first images of the data, fixed noise and timesteps, plain epsilon MSE."""

    def __init__(self, base: BaseModel, data_dir: Path, config: TrainConfig, images: int, draws: int = 2):
        pipe = base.pipeline
        report = scan_dataset(data_dir, config.trigger, config.instance_prompt)
        items = report.items[:images]
        size = config.resolution or base.native_size
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            pixels = torch.stack([image_to_tensor(open_image(i.path), (size, size), True, False, None) for i in items])
            self.latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [i.caption for i in items],
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.hidden = pipe.text_encoder(ids)[0]
        self.noise = [torch.randn(self.latents.shape, generator=generator) for _ in range(draws)]
        self.timesteps = [torch.randint(50, 950, (len(items),), generator=generator) for _ in range(draws)]
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(self, unet) -> float:
        """Mean denoising loss of `unet` (with whatever LoRA it carries) on the fixed batch."""
        unet.eval()
        with torch.no_grad():
            losses = []
            for noise, timesteps in zip(self.noise, self.timesteps, strict=True):
                noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
                losses.append(F.mse_loss(unet(noisy, timesteps, self.hidden).sample, noise).item())
        return mean(losses)


def run_ours(base: BaseModel, config: TrainConfig, variant: str, evaluation: EvalBatch | None) -> Run:
    """Our Trainer with every optimisation on, or with `variant` ("no_sdpa", ...) off."""

    class Variant(Trainer):
        use_sdpa = variant != "no_sdpa"
        foreach_optimizer = variant != "no_foreach"
        keep_freed_memory = variant != "no_kept_memory"

    config = config.replace(
        cache_latents=variant != "no_latent_cache", cache_text_embeddings=variant != "no_text_cache"
    )
    run = Run()

    def progress(event) -> None:
        if event.phase == "training":
            run.mark()

    started = time.perf_counter()
    result = Variant(config, base=base, progress=progress).run()
    run.seconds = time.perf_counter() - started
    run.losses = list(result.losses)
    if evaluation is not None:
        run.eval_loss = evaluation.loss(base.unet)
    return run


def run_plain(base: BaseModel, config: TrainConfig, evaluation: EvalBatch | None) -> Run:
    """The obvious PEFT LoRA loop: per step, load the images, encode them with the VAE, encode the captions."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig

    run = Run()
    started = time.perf_counter()
    pipe = base.pipeline
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    torch.manual_seed(config.seed)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    targets = unet_targets(unet, config.lora_spec)  # the very modules our trainer adapts
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=True, target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.unet_lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    steps = config.max_train_steps
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=steps
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = config.resolution or base.native_size
    report = scan_dataset(config.data_dir, config.trigger, config.instance_prompt)
    samples = [Sample(item.path, item.caption, (size, size)) for item in report.items]
    generator = torch.Generator().manual_seed(config.seed)
    unet.train()
    epoch = 0
    while len(run.losses) < steps:
        for batch in batch_schedule(samples, config.batch_size, config.seed, epoch):
            pixels = torch.stack(
                [image_to_tensor(open_image(samples[i].path), samples[i].bucket, True, False, None) for i in batch]
            )
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            ids = tokenizer(
                [samples[i].caption for i in batch],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, hidden).sample
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
            loss = (F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            run.losses.append(loss.item())
            run.mark()
            if len(run.losses) == steps:
                break
        epoch += 1
    run.seconds = time.perf_counter() - started
    if evaluation is not None:
        run.eval_loss = evaluation.loss(unet)
    return run


def child(args: dict) -> dict:
    """One run in this (fresh) process: build the model, train `contender`, report times and losses."""
    model, contender = args["model"], args["contender"]
    _, _, images = SETTINGS[model]
    base = load_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = subset(INK, images, Path(tmp) / "data")
        config = make_config(model, data_dir, Path(tmp) / "out" / "adapter.safetensors", args["steps"])
        draws = 2 if model == "demo" else 1
        evaluation = EvalBatch(base, data_dir, config, min(images, 4), draws) if args["evaluate"] else None
        before = evaluation.loss(base.unet) if evaluation is not None else None
        if contender == "plain":
            run = run_plain(base, config, evaluation)
        else:
            run = run_ours(base, config, contender, evaluation)
    return {**run.summary(), "eval_before": before, "peak_rss_bytes": peak_rss_bytes()}


def bench_model(model: str, steps: int, rounds: int, shares: list[str], log) -> dict:
    """Interleaved rounds of the contenders on one model, each in its own process; ratios and loss agreement."""
    resolution, batch, images = SETTINGS[model]
    runs: dict[str, list[dict]] = {name: [] for name in ["ours", "plain", *shares]}
    for round_index in range(rounds):
        order = ["ours", "plain", *shares] if round_index == 0 else ["ours", "plain"][:: (-1) ** round_index]
        for name in order:
            evaluate = not runs[name] and name in ("ours", "plain")
            run = run_child(
                "bench.train_speed",
                {"model": model, "contender": name, "steps": steps, "evaluate": evaluate},
            )
            runs[name].append(run)
            log(
                f"{model} round {round_index + 1} {name}: {mean(run['step_seconds']):.3f} s/step "
                f"({mean(run['step_cpu_seconds']):.3f} s CPU), run {run['seconds']:.1f} s"
            )
    per_step = {name: mean([s for run in rs for s in run["step_seconds"]]) for name, rs in runs.items()}
    per_step_cpu = {name: mean([s for run in rs for s in run["step_cpu_seconds"]]) for name, rs in runs.items()}
    run_seconds = {name: mean([run["seconds"] for run in rs]) for name, rs in runs.items()}
    ours, plain = runs["ours"][0], runs["plain"][0]
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"], plain["losses"], strict=True)]
    result = {
        "steps": steps,
        "batch_size": batch,
        "resolution": resolution,
        "images": images,
        "rounds": rounds,
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "cpu_seconds_per_step": {k: round(v, 4) for k, v in per_step_cpu.items()},
        "run_seconds": {k: round(v, 2) for k, v in run_seconds.items()},
        "speedup": round(per_step["plain"] / per_step["ours"], 3),
        "speedup_cpu_time": round(per_step_cpu["plain"] / per_step_cpu["ours"], 3),
        "speedup_whole_run": round(run_seconds["plain"] / run_seconds["ours"], 3),
        "peak_rss_mib": {k: round(max(r["peak_rss_bytes"] for r in rs) / 2**20) for k, rs in runs.items()},
        "loss": {
            "per_step_ours": [round(x, 5) for x in ours["losses"]],
            "per_step_plain": [round(x, 5) for x in plain["losses"]],
            "per_step_max_relative_difference": round(max(diffs), 6),
            "eval_before": round(ours["eval_before"], 6),
            "eval_after_ours": round(ours["eval_loss"], 6),
            "eval_after_plain": round(plain["eval_loss"], 6),
            "eval_after_relative_difference": round(
                abs(ours["eval_loss"] - plain["eval_loss"]) / plain["eval_loss"], 6
            ),
        },
    }
    if shares:
        gap = per_step_cpu["plain"] - per_step_cpu["ours"]
        result["shares"] = {
            variant: {
                "seconds_per_step_without": round(per_step[variant], 4),
                "cpu_seconds_per_step_without": round(per_step_cpu[variant], 4),
                "slowdown_without": round(per_step[variant] / per_step["ours"], 3),
                "cpu_slowdown_without": round(per_step_cpu[variant] / per_step_cpu["ours"], 3),
                "share_of_cpu_gap_to_plain": (
                    round((per_step_cpu[variant] - per_step_cpu["ours"]) / gap, 3) if gap > 0 else None
                ),
            }
            for variant in shares
        }
    return result


def _variants(text: str) -> list[str]:
    if text == "all":
        return list(VARIANTS)
    chosen = [v for v in text.split(",") if v and v != "none"]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown optimisation(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return chosen


def main() -> None:
    """Benchmark each model, print the JSON (or, given one JSON argument, do one run as a child process)."""
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        emit(child(json.loads(sys.argv[1])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,sd15")
    parser.add_argument("--demo-steps", type=int, default=30)
    parser.add_argument("--sd15-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours and plain (shares run once)")
    # The defaults keep the run under 10 minutes on 2 cores; `--demo-shares all --sd15-shares ...,no_sdpa` for more.
    parser.add_argument(
        "--demo-shares", default="no_latent_cache,no_sdpa", help="optimisations to toggle on the demo model (or none)"
    )
    parser.add_argument("--sd15-shares", default="no_latent_cache,no_kept_memory")
    args = parser.parse_args()
    started = time.time()
    models = [m for m in args.models.split(",") if m]
    steps = {"demo": args.demo_steps, "sd15": args.sd15_steps}
    shares = {"demo": _variants(args.demo_shares), "sd15": _variants(args.sd15_shares)}
    result: dict = {"machine": machine()}

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    for model in models:
        result[model] = bench_model(model, steps[model], args.rounds, shares[model], log)
    for model in models:
        result[f"speedup_{model}"] = result[model]["speedup"]
    result["speedup"] = result["sd15"]["speedup"] if "sd15" in result else result[models[0]]["speedup"]
    result["target"] = ">= 1.5x at equal loss"
    result["wall_seconds"] = round(time.time() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
