"""Shared by the benchmarks: the SD1.5-shaped model with random weights, machine facts, child-process runs, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from studio.models import SD1, BaseModel  # noqa: E402
from studio.tiny import build_text_encoder, build_unet, load_sd15_config, write_char_tokenizer  # noqa: E402

INK = ROOT / "sample_data" / "styles" / "ink"


def machine() -> dict:
    """The facts a timing depends on: CPU count, torch threads, platform, load average, torch version."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }


def sd15_base(seed: int = 0, device: str = "cpu") -> BaseModel:
    """A Stable Diffusion 1.5-shaped pipeline (the real UNet, text encoder and VAE configs) with random weights.

    The tokenizer is a character-level CLIP vocabulary (the real one is not shipped); the text encoder keeps
    the real 49408-token embedding, so every parameter count is SD1.5's. device="meta" builds shapes only."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="sd15_tokenizer_"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_char_tokenizer(folder), model_max_length=77)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with torch.device("meta"):
        unet = build_unet(load_sd15_config("unet"), seed)
        vae = AutoencoderKL(**load_sd15_config("vae"))
        text_encoder = build_text_encoder(load_sd15_config("text_encoder"), seed=seed + 2)
    if device != "meta":
        for offset, model in enumerate((unet, vae, text_encoder)):
            random_init(model.to_empty(device=device), seed + offset)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(load_sd15_config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipeline=pipe, family=SD1, spec="sd15-random", name="sd15-random")


def random_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random weights in a few seconds (PyTorch's default init of SD1.5 takes half a minute):
    matrices and kernels ~ N(0, 1/(3 fan_in)) like the default uniform init, norm scales 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, (3 * param[0].numel()) ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        for name, buffer in model.named_buffers():
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model


def load_model(name: str) -> BaseModel:
    """ "demo" (the bundled demo model) or "sd15" (the SD1.5-shaped model with random weights)."""
    from studio.models import load_base

    if name == "demo":
        base = load_base("demo")
        base.pipeline.set_progress_bar_config(disable=True)
        return base
    if name == "sd15":
        return sd15_base()
    raise ValueError(f"unknown model {name!r}: use demo or sd15")


def subset(source: Path, count: int, folder: Path) -> Path:
    """Copy the first `count` images of `source` (with their captions) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(source.glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
        caption = image.with_suffix(".txt")
        if caption.is_file():
            shutil.copy(caption, folder / caption.name)
    return folder


def full_finetune(base: BaseModel, config, steps: int, lr: float) -> float:
    """Fine-tune every UNet weight on `config`'s data folder with AdamW, the text encoder frozen; returns seconds.

    The reference the LoRA is measured against: the same captions, resolution, batch size, flips, min-SNR
    weighting, gradient clipping and EMA decay as the LoRA run of `config`, on latents and text embeddings cached
    once. With an EMA, the averaged weights are left in the UNet."""
    from diffusers import DDPMScheduler

    from training.data import image_to_tensor, open_image, scan_dataset
    from training.trainer import min_snr_weights

    pipe = base.pipeline
    unet = pipe.unet
    report = scan_dataset(config.data_dir, config.trigger, config.instance_prompt)
    size = config.resolution or base.native_size
    with torch.no_grad():
        pixels = torch.stack(
            [image_to_tensor(open_image(item.path), (size, size), True, False, None) for item in report.items]
        )
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [item.caption for item in report.items],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = pipe.text_encoder(ids)[0]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.requires_grad_(True).train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()
    for _ in range(steps):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        x = latents[index]
        if config.random_flip:
            flip = torch.rand(config.batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        noise = torch.randn(x.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        pred = unet(scheduler.add_noise(x, noise, timesteps), timesteps, hidden[index]).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            loss = loss * min_snr_weights(scheduler.alphas_cumprod, timesteps, config.min_snr_gamma, v_pred=False)
        loss.mean().backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
    if ema is not None:
        ema.copy_to(params)
    unet.eval().requires_grad_(False)
    return time.time() - started


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module: str, args: dict, timeout: float = 1200) -> dict:
    """Run `python -m module` with `args` as JSON in a fresh process; its last stdout line is the JSON result.

    A fresh process per measurement keeps peak memory (VmHWM) and caches of one run out of the next."""
    command = [sys.executable, "-m", module, json.dumps(args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    return result


def mean(values: list[float]) -> float:
    """The arithmetic mean (0 for an empty list)."""
    return sum(values) / len(values) if values else 0.0


def emit(result: dict) -> None:
    """Print the result as one JSON line (the benchmark's last line)."""
    print(json.dumps(result), flush=True)
