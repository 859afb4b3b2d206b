"""One generation entry point: validate, apply the adapter stack (fused), sample, save PNGs with A1111 infotext."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio import atomic
from studio.compose import AdapterStack, load_adapter
from studio.conditioning import check_clip_skip, check_clip_skip_value, prompt_arguments
from studio.infotext import civitai_lora_name, format_infotext, lora_tag, parse_lora_tags
from studio.models import BaseModel

VERSION = "studio-0.1"

# sampler name -> (diffusers scheduler class name, extra config, A1111 "Schedule type")
SAMPLERS: dict[str, tuple[str | None, dict, str | None]] = {
    "Default": (None, {}, None),
    "Euler": ("EulerDiscreteScheduler", {}, None),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, None),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}, None),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "Karras"),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        "Karras",
    ),
    # DDIM clips its x0 estimate to [-1, 1] unless told not to: right for pixels, ruinous for latents, and a
    # model whose saved scheduler never mentions clip_sample (any DPM++ config, like the demo model's) gets it
    "DDIM": ("DDIMScheduler", {"clip_sample": False}, None),
    "UniPC": ("UniPCMultistepScheduler", {}, None),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}, None),
    "Heun": ("HeunDiscreteScheduler", {}, None),
}


MEMORY_MODES = ("vae_slicing", "vae_tiling", "cpu_offload")


class GenerationCancelled(Exception):
    """Raised when the caller cancelled a generation; nothing was saved."""


@dataclass(frozen=True)
class LoraRequest:
    """An adapter to use for one generation: a library name or file, with text-encoder and UNet weights."""

    name: str
    te_weight: float = 1.0
    unet_weight: float | None = None

    @property
    def unet(self) -> float:
        """The UNet weight (defaults to the text-encoder weight)."""
        return self.te_weight if self.unet_weight is None else self.unet_weight


@dataclass
class GenerationRequest:
    """Everything one generation needs; invalid values raise a ValueError naming them."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg: float = 7.0
    width: int = 0
    height: int = 0
    sampler: str = "Default"
    batch: int = 1
    loras: list[LoraRequest] = field(default_factory=list)
    fuse: bool = True
    # memory-saving modes for 8-12 GB GPUs (diffusers' VAE slicing / tiling and model CPU offload)
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode large images in overlapping tiles
    cpu_offload: bool = False  # keep each model on the CPU until it runs (needs a GPU)
    clip_skip: int = 1  # SD 1.x/2.x: 1 = the text encoder's last layer, 2 = the penultimate (A1111's "Clip skip")

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt is empty")
        for name in MEMORY_MODES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or self.seed < -1 or self.seed >= 2**32:
            raise ValueError(f"seed must be -1 (random) or an integer in [0, 2^32), got {self.seed!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 150:
            raise ValueError(f"steps must be an integer from 1 to 150, got {self.steps!r}")
        if not isinstance(self.cfg, (int, float)) or not 1.0 <= self.cfg <= 30.0:
            raise ValueError(f"cfg must be a number from 1 to 30, got {self.cfg!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or (value != 0 and (value < 16 or value > 2048 or value % 8)):
                raise ValueError(f"{name} must be 0 (model default) or a multiple of 8 from 16 to 2048, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not isinstance(self.batch, int) or not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be an integer from 1 to 16, got {self.batch!r}")
        check_clip_skip_value(self.clip_skip)


@dataclass
class GenerationResult:
    """The images of one request, with their seeds, infotexts and saved files."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path]
    notes: list[str] = field(default_factory=list)  # things the user should know, e.g. a mode that did nothing


Resolver = Callable[[str], Path]


def _scheduler_for(pipeline, sampler: str, original):
    class_name, extra, _ = SAMPLERS[sampler]
    if class_name is None:
        return original
    import diffusers

    return getattr(diffusers, class_name).from_config(original.config, **extra)


@contextlib.contextmanager
def _using_scheduler(pipeline, sampler: str):
    original = pipeline.scheduler
    pipeline.scheduler = _scheduler_for(pipeline, sampler, original)
    try:
        yield
    finally:
        pipeline.scheduler = original


@contextlib.contextmanager
def memory_modes(pipeline, *, vae_slicing: bool, vae_tiling: bool, cpu_offload: bool):
    """Turn on the requested memory-saving modes for one run and restore the pipeline after; yields notes.

    CPU offload (diffusers' `enable_model_cpu_offload`) moves each model to the GPU only while it runs; on a
    machine without one it does nothing, and says so in the notes."""
    from diffusers.utils.torch_utils import get_device

    vae, notes = pipeline.vae, []
    saved = {name: getattr(vae, name) for name in ("use_slicing", "use_tiling") if hasattr(vae, name)}
    home = pipeline.device
    offload_to = home if home.type != "cpu" else torch.device(get_device())
    offloaded = False
    try:
        for wanted, mode in ((vae_slicing, "slicing"), (vae_tiling, "tiling")):
            if wanted and f"use_{mode}" in saved and hasattr(vae, f"enable_{mode}"):
                getattr(vae, f"enable_{mode}")()
            elif wanted:
                notes.append(f"VAE {mode} is not available for {type(vae).__name__}; decoded in one piece")
        if cpu_offload and offload_to.type == "cpu":
            notes.append("CPU offload did nothing: there is no GPU, so the models already run on the CPU")
        elif cpu_offload:
            offloaded = True
            pipeline.enable_model_cpu_offload(device=offload_to)
        yield notes
    finally:
        if offloaded:
            pipeline.remove_all_hooks()
            pipeline.to(home)
        for name, value in saved.items():
            setattr(vae, name, value)


def _resolve_stack(
    stack: AdapterStack,
    base: BaseModel,
    loras: list[LoraRequest],
    resolver: Resolver | None,
    files: int | None = None,
    install: bool = True,
):
    """Make the stack hold exactly `loras` at their weights (adding from files / the library as needed).

    Adapters are identified by their resolved file, so two files with the same name (checkpoints of one run)
    are two adapters; the second gets a numbered slot name. Only the first `files` requests (the explicit ones,
    not prompt tags) may name a file when there is a resolver, so typed text cannot read outside the library.
    New files are read and matched before the stack changes: a bad file leaves the pipeline as it was.
    `install=False` keeps new adapters as data (no PEFT layers), which is all a fused run needs."""
    wanted: dict[Path, LoraRequest] = {}
    for index, request in enumerate(loras):
        path = Path(request.name)
        may_be_file = resolver is None or files is None or index < files
        if not (may_be_file and path.suffix == ".safetensors" and path.is_file()):
            if resolver is None:
                raise ValueError(f"unknown adapter {request.name!r}: no adapter library to look it up in")
            path = resolver(request.name)
        wanted[path.resolve()] = request
    slots = {entry.adapter.parsed.path.resolve(): name for name, entry in stack.entries.items()}
    loaded = {path: load_adapter(path, base) for path in wanted if path not in slots}
    for path, name in slots.items():
        if path not in wanted:
            stack.remove(name)
    for path, request in wanted.items():
        name = slots.get(path)
        if name is None:
            slot = _free_slot(stack, path.stem)
            stack.add(loaded[path], request.te_weight, request.unet, name=slot, install=install)
        else:
            stack.set_weight(name, request.te_weight, request.unet)
            stack.set_enabled(name, True)
    if install:
        stack.ensure_installed()


def _free_slot(stack: AdapterStack, stem: str) -> str:
    """`stem`, or `stem_2`, `stem_3`... whichever is not yet a slot in the stack."""
    name = civitai_lora_name(stem)
    candidate, number = name, 1
    while candidate in stack.entries:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def generate(
    base: BaseModel,
    request: GenerationRequest,
    *,
    stack: AdapterStack | None = None,
    resolver: Resolver | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate `request.batch` images; the stack is set to the request's adapters plus `<lora:...>` prompt tags."""
    check_clip_skip(base.family, request.clip_skip)
    prompt_text, tags = parse_lora_tags(request.prompt)
    if not prompt_text:
        raise ValueError("prompt is empty once the <lora:...> tags are taken out")
    loras = list(request.loras) + [LoraRequest(t.name, t.te_weight, t.unet_weight) for t in tags]
    stack = stack if stack is not None else AdapterStack(base)
    # a fused run merges the adapters into the weights (cached while the stack is unchanged): no PEFT layers needed
    _resolve_stack(stack, base, loras, resolver, files=len(request.loras), install=not request.fuse)

    pipe = base.pipeline
    width = request.width or base.native_size
    height = request.height or base.native_size
    seed = request.seed if request.seed >= 0 else random.randrange(2**32 - request.batch)
    seeds = [(seed + i) % 2**32 for i in range(request.batch)]

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if should_stop is not None and should_stop():
            pipeline._interrupt = True
        if progress is not None:
            progress(step + 1, request.steps)
        return callback_kwargs

    fuse = stack.fused() if request.fuse and stack.active() else contextlib.nullcontext()
    memory = memory_modes(
        pipe, vae_slicing=request.vae_slicing, vae_tiling=request.vae_tiling, cpu_offload=request.cpu_offload
    )
    with _using_scheduler(pipe, request.sampler), fuse, memory as notes:
        output = pipe(
            **prompt_arguments(base, prompt_text, request.negative_prompt, request.clip_skip),
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            width=width,
            height=height,
            num_images_per_prompt=request.batch,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=on_step_end,
        )
    if getattr(pipe, "_interrupt", False):
        pipe._interrupt = False
        raise GenerationCancelled("generation cancelled; nothing was saved")

    infotexts = [_infotext(base, request, stack, prompt_text, s, width, height) for s in seeds]
    paths = _save(output.images, infotexts, seeds, out_dir) if out_dir is not None else []
    return GenerationResult(images=list(output.images), seeds=seeds, infotexts=infotexts, paths=paths, notes=notes)


def _infotext(
    base: BaseModel,
    request: GenerationRequest,
    stack: AdapterStack,
    prompt_text: str,
    seed: int,
    width: int,
    height: int,
) -> str:
    active = stack.active()
    tags = " ".join(lora_tag(name, e.te_weight, e.unet_weight) for name, e in active)
    prompt = f"{prompt_text} {tags}".strip()
    _, _, schedule = SAMPLERS[request.sampler]
    sampler = request.sampler.removesuffix(" Karras")
    if sampler == "Default":
        sampler = type(base.pipeline.scheduler).__name__.removesuffix("Scheduler")
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": f"{request.cfg:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": base.extra.get("model_hash"),
        "Model": base.name,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Lora hashes": ", ".join(f"{n}: {e.adapter.parsed.short_hash}" for n, e in active),
        "Version": VERSION,
    }
    return format_infotext(prompt, request.negative_prompt, params)


def _save(images, infotexts, seeds, out_dir) -> list[Path]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    start = len(list(folder.glob("*.png")))
    paths = []
    for offset, (image, text, seed) in enumerate(zip(images, infotexts, seeds, strict=True)):
        info = PngInfo()
        info.add_text("parameters", text)
        path = folder / f"{start + offset:05d}-{seed}.png"
        while path.exists():
            start += 1
            path = folder / f"{start + offset:05d}-{seed}.png"
        with atomic.atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        paths.append(path)
    return paths
