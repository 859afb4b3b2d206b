"""Before a run: step arithmetic, exact trainable parameters and adapter size, and a time and memory estimate
for a chosen device, with memory-saving modes suggested when the run would not fit.

The estimate counts what one training step of this very model does on weightless (meta-device) copies: the
floating-point operations and dispatched operators of the forward and backward passes (torch.utils.flop_counter)
and the bytes autograd keeps for the backward pass (saved-tensor hooks), then turns them into seconds and bytes
with a few constants calibrated against measured CPU runs (bench/estimate_check.py). CPU speed is scaled by a
short matrix-multiply probe of this machine (its CPU time, so a busy machine estimates its quiet speed); a GPU
is assumed to be a current consumer card.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from studio.models import BaseModel
from training.config import TrainConfig
from training.lora import LoraSpec, text_encoder_targets, unet_targets, used_text_encoder_layers
from training.trainer import Trainer, TrainPlan

HEADER_BYTES = 16_384  # the JSON header with metadata, roughly
GIB = 1024**3

# Fitted (least squares on relative error) to measured CPU runs of bench/estimate_check.py on a 2-core machine:
# six configurations of the demo model and the SD1.5-shaped model, two runs each (12 points; time within 20%,
# memory within 3% of every one of them).
CPU_REFERENCE_GFLOPS = 99.0  # the probe's single-thread fp32 matmul speed on the calibration machine
CPU_EFFICIENCY = 0.82  # share of the probe's speed a training step's matmuls and convolutions reach
CPU_ATTENTION_EFFICIENCY = 0.37  # the same for PyTorch's CPU flash attention (small heads, softmax work)
CPU_SECONDS_PER_OP = 26e-6  # Python, dispatch and memory-bound cost per operator at the reference speed
CPU_THREAD_EFFICIENCY = 0.7  # what each torch thread beyond the first adds to the matmul speed (an assumption)
CPU_RUNTIME_BYTES = 429 * 1024**2  # Python, torch, diffusers, transformers, peft, accelerate once imported
CHECKPOINT_RECOMPUTE = 0.55  # share of a forward pass gradient checkpointing runs again (measured, SD1.5 shape)
# peak over the activations autograd saves: gradients in flight and backward temporaries, plus, on a CPU, the
# freed blocks glibc keeps in the heap (on a GPU, the caching allocator's slack: an assumption)
ACTIVATION_FACTOR = {"cpu": 2.04, "gpu": 1.2}
# the VAE encoding before the loop, in multiples of its largest activation (the GPU value is an assumption)
ENCODE_FACTOR = {"cpu": 5.3, "gpu": 3.0}
# A GPU with no probe: a current consumer card in half precision, launch-bound on small operators (assumptions).
GPU_EFFECTIVE_TFLOPS = 25.0
GPU_SECONDS_PER_OP = 15e-6
GPU_RUNTIME_BYTES = 700 * 1024**2  # CUDA context, cuBLAS/cuDNN workspaces
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # per trainable parameter


# ----------------------------------------------------------------------------- the device
@dataclass(frozen=True)
class Device:
    """What the estimate is for: "cpu" or "gpu", with `memory_gib` of memory (None: this machine's)."""

    kind: str = "cpu"
    memory_gib: float | None = None

    def __post_init__(self):
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"device kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if self.memory_gib is not None and not self.memory_gib > 0:
            raise ValueError(f"device memory must be a positive number of GiB, got {self.memory_gib!r}")

    @classmethod
    def parse(cls, text: str | None) -> Device:
        """Read "auto" (or empty: this machine), "cpu", "cpu:32" (32 GiB of RAM), "gpu:24" or "cuda:24" (24 GiB)."""
        text = (text or "auto").strip().lower().replace("gib", "").replace("gb", "").replace(" ", "")
        if text in ("auto", "this", "thismachine"):
            return cls.this_machine()
        kind, _, size = text.partition(":")
        kind = {"cuda": "gpu"}.get(kind, kind)
        if kind not in ("cpu", "gpu"):
            raise ValueError(f"unknown device {text!r}: use auto, cpu, cpu:GiB or gpu:GiB (e.g. gpu:24)")
        if not size:
            return cls.this_machine() if kind == ("gpu" if torch.cuda.is_available() else "cpu") else cls(kind)
        try:
            return cls(kind, float(size))
        except ValueError:
            raise ValueError(f"device memory {size!r} is not a number of GiB (e.g. gpu:24)") from None

    @classmethod
    def this_machine(cls) -> Device:
        """The visible GPU with its memory, or this machine's CPU and RAM."""
        if torch.cuda.is_available():
            return cls("gpu", torch.cuda.get_device_properties(0).total_memory / GIB)
        return cls("cpu", _total_ram_bytes() / GIB if _total_ram_bytes() else None)

    @property
    def budget_bytes(self) -> int | None:
        """The memory the run may use, in bytes (None: unknown)."""
        return None if self.memory_gib is None else int(self.memory_gib * GIB)

    def label(self) -> str:
        """A short name: "CPU (31.2 GiB)", "GPU (24 GiB)"."""
        size = f" ({self.memory_gib:.3g} GiB)" if self.memory_gib else ""
        return f"{self.kind.upper()}{size}"


def _total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def cpu_gflops() -> float:
    """One core's fp32 matrix-multiply speed, in CPU time so that other work on the machine does not lower it
    (best of 15 short runs on one thread, about 0.2 s, once per process)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(15):
            started = time.thread_time()
            for _ in range(4):
                a @ b
            best = min(best, time.thread_time() - started)
    finally:
        torch.set_num_threads(previous)
    return 4 * 2 * 512**3 / max(best, 1e-9) / 1e9


# ----------------------------------------------------------------------------- LoRA size (exact)
@dataclass
class LoraSize:
    """Trainable LoRA parameters (exact) against the adapted models' size, and the adapted module counts."""

    lora_parameters: int
    model_parameters: int
    unet_parameters: int
    modules: dict[str, int]


def _meta_models(base: BaseModel):
    """Weightless copies (meta device) of the base's UNet and text encoders: exact shapes, no memory."""
    cached = base.extra.get("meta_models")
    if cached is not None:
        return cached
    models = _fresh_meta_models(base)[:2]
    base.extra["meta_models"] = models
    return models


def _fresh_meta_models(base: BaseModel):
    """New weightless UNet, text encoders and VAE (a dry run changes their flags, so each gets its own)."""
    with torch.device("meta"):
        unet = type(base.unet).from_config(base.unet.config)
        text_encoders = [type(te)(te.config) for te in base.text_encoders]
        vae = type(base.pipeline.vae).from_config(base.pipeline.vae.config)
    return unet, text_encoders, vae


def _fan(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of one output position of a Linear or Conv2d: a 3x3 conv reads 9 inputs per channel."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw, module.out_channels
    return module.in_features, module.out_features


def lora_parameter_count(module: nn.Module, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on one Linear or Conv2d: down reads its fan-in, up writes its fan-out."""
    return rank * sum(_fan(module))


def lora_size(base: BaseModel, config: TrainConfig) -> LoraSize:
    """Exact LoRA parameter count for `config` on `base`: rank * (fan-in + fan-out) per targeted module."""
    unet, text_encoders = _meta_models(base)
    spec = config.lora_spec
    modules = {"unet": 0}
    count = 0
    for path in unet_targets(unet, spec):
        count += lora_parameter_count(unet.get_submodule(path), spec.rank)
        modules["unet"] += 1
    if config.train_text_encoder:
        used = used_text_encoder_layers(base.family, text_encoders, config.clip_skip)
        for index, te in enumerate(text_encoders):
            key = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
            paths = text_encoder_targets(te, spec, used[index])
            modules[key] = len(paths)
            count += sum(lora_parameter_count(te.get_submodule(p), spec.rank) for p in paths)
    unet_total = sum(p.numel() for p in unet.parameters())
    total = unet_total + sum(p.numel() for te in text_encoders for p in te.parameters())
    return LoraSize(count, total, unet_total, modules)


def adapter_file_bytes(size: LoraSize, save_dtype: str) -> int:
    """Size of the exported file: the LoRA tensors in `save_dtype`, one alpha per module, and the header."""
    width = 4 if save_dtype == "fp32" else 2
    modules = sum(size.modules.values())
    return size.lora_parameters * width + modules * width + HEADER_BYTES


# ----------------------------------------------------------------------------- dry runs on the meta device
@dataclass(frozen=True)
class PassProfile:
    """One pass of a model counted on the meta device: flops, dispatched operators, bytes kept for backward."""

    flops: float = 0.0  # matmuls and convolutions
    ops: int = 0
    forward_flops: float = 0.0
    forward_ops: int = 0
    attention_flops: float = 0.0  # fused attention kernels, which run at their own (lower) speed
    forward_attention_flops: float = 0.0
    saved_bytes: int = 0
    checkpointed_saved_bytes: int = 0  # the same with gradient checkpointing of resnet and transformer blocks
    largest_output_bytes: int = 0  # the biggest single module output (transient peak of a no-grad pass)


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dispatched operators and their matmul / convolution / attention flops (torch.utils.flop_counter's
    formulas, plus PyTorch's CPU flash attention, which that registry lacks)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.flops = 0
        self.attention_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            self.attention_flops += 4 * _attention_size(args[0], args[1])  # Q K^T and P V
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            self.attention_flops += 10 * _attention_size(args[1], args[2])  # recomputed scores, four gradients
        return out


def _attention_size(query: torch.Tensor, key: torch.Tensor) -> int:
    *batch, length, depth = query.shape
    return math.prod(batch) * length * key.shape[-2] * depth


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """Routes unmasked scaled-dot-product attention to the flash kernel during a dry run, so the meta device keeps
    what a real CPU or GPU run keeps (no attention matrix) instead of the math fallback's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and kwargs.get("attn_mask") is None:
            query, key, value = args[:3]
            if query.device.type == "meta" and len(args) == 3:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query,
                    key,
                    value,
                    kwargs.get("dropout_p", 0.0),
                    kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"),
                )[0]
        return func(*args, **kwargs)


# modules diffusers wraps in torch.utils.checkpoint when gradient checkpointing is on
_CHECKPOINTED = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


def _dry_run(model: nn.Module, call, trainable: list[str], rank: int, train: bool) -> PassProfile:
    """Run `call()` (forward, then backward when `train`) on a meta `model` whose `trainable` modules stand in
    for LoRA-adapted ones; count flops and operators, and the activations autograd saves."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # kept alive so that ids stay unique
    total = [0]
    starts: dict[str, int] = {}
    internal: dict[str, int] = {}
    inputs: dict[str, int] = {}
    largest = [0]
    lora_extra = [0]
    lora_flop_correction = [0.0]
    handles = []

    def pack(tensor):
        root = tensor if tensor._base is None else tensor._base
        if id(root) not in params and id(root) not in saved:
            saved[id(root)] = root
            total[0] += root.untyped_storage().nbytes()
        return tensor

    def saved_total() -> int:
        return total[0]

    def on_output(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles += [module.register_forward_hook(on_output) for module in model.modules()]
    for path in trainable:
        module = model.get_submodule(path)
        module.weight.requires_grad_(train)

        def lora_hook(module, args, output, rank=rank):
            n_in, n_out = _fan(module)
            tokens = output.numel() // output.shape[-1 if isinstance(module, nn.Linear) else 1]
            lora_extra[0] += tokens * rank * 4  # the rank-r activation LoRA keeps for its up-matrix gradient
            # LoRA computes no full weight gradient, only rank-r ones (forward and backward ~ 3x the forward)
            lora_flop_correction[0] += 6 * tokens * rank * (n_in + n_out) - 2 * tokens * n_in * n_out

        handles.append(module.register_forward_hook(lora_hook))
    if train:
        for name, module in model.named_modules():
            if type(module).__name__ in _CHECKPOINTED:
                handles.append(module.register_forward_pre_hook(_start_block(name, saved_total, starts, inputs)))
                handles.append(module.register_forward_hook(_end_block(name, saved_total, starts, internal)))
    counter = _Counter()
    try:
        with _FlashAttention(), counter, torch.set_grad_enabled(train):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = call()
            forward_flops, forward_ops, forward_attention = counter.flops, counter.ops, counter.attention_flops
            if train:
                out.float().pow(2).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
        for path in trainable:
            model.get_submodule(path).weight.requires_grad_(False)
    total_saved = saved_total() + (lora_extra[0] if train else 0)
    blocks = [internal[name] for name in internal]
    checkpointed = total_saved - sum(blocks) + sum(inputs.values()) + max(blocks, default=0)
    flops = counter.flops + (lora_flop_correction[0] if train else 0)
    return PassProfile(
        flops=float(flops),
        ops=counter.ops,
        forward_flops=float(forward_flops),
        forward_ops=forward_ops,
        attention_flops=float(counter.attention_flops),
        forward_attention_flops=float(forward_attention),
        saved_bytes=total_saved if train else 0,
        checkpointed_saved_bytes=max(checkpointed, 0) if train else 0,
        largest_output_bytes=largest[0],
    )


def _start_block(name, saved_total, starts, inputs):
    def hook(module, args):
        if name in starts or any(name.startswith(outer + ".") for outer in starts):
            return  # the outermost checkpointed block counts
        inputs[name] = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        starts[name] = saved_total()

    return hook


def _end_block(name, saved_total, starts, internal):
    def hook(module, args, output):
        if name in starts and name not in internal:
            internal[name] = saved_total() - starts[name]

    return hook


@dataclass(frozen=True)
class ModelProfile:
    """The dry runs an estimate needs for one config: a training step, and the no-grad passes around it."""

    unet_train: PassProfile
    unet_sample: PassProfile  # one denoising step at batch 2 (classifier-free guidance), batch 1 image
    vae_encode: PassProfile  # one image
    vae_decode: PassProfile  # one image
    text_forward: PassProfile  # one caption
    text_train: PassProfile | None  # the text encoder's training step, when it is trained


def model_profile(base: BaseModel, config: TrainConfig, resolution: int) -> ModelProfile:
    """Dry runs of `base` for `config` at `resolution` (cached on the base model per distinct setting)."""
    spec = config.lora_spec
    key = ("profile", resolution, config.batch_size, spec, config.train_text_encoder)
    cache = base.extra.setdefault("estimate_profiles", {})
    if key not in cache:
        cache[key] = _profile(base, spec, resolution, config.batch_size, config.train_text_encoder)
    return cache[key]


def _profile(base: BaseModel, spec: LoraSpec, resolution: int, batch: int, train_te: bool) -> ModelProfile:
    unet, text_encoders, vae = _fresh_meta_models(base)
    factor = base.pipeline.vae_scale_factor
    tokens = _tokens(base)
    context = unet.config.cross_attention_dim

    def unet_call(count: int):
        def call():
            with torch.device("meta"):
                latents = torch.randn(count, unet.config.in_channels, resolution // factor, resolution // factor)
                hidden = torch.randn(count, tokens, context)
                timesteps = torch.randint(0, 1000, (count,))
                extra = {}
                if unet.config.addition_embed_type == "text_time":
                    width = text_encoders[-1].config.projection_dim
                    extra["added_cond_kwargs"] = {
                        "text_embeds": torch.randn(count, width),
                        "time_ids": torch.randn(count, 6),
                    }
            return unet(latents, timesteps, hidden, **extra).sample

        return call

    def vae_encode():
        with torch.device("meta"):
            pixels = torch.randn(1, vae.config.in_channels, resolution, resolution)
        return vae.encode(pixels).latent_dist.mean

    def vae_decode():
        with torch.device("meta"):
            latents = torch.randn(1, vae.config.latent_channels, resolution // factor, resolution // factor)
        return vae.decode(latents).sample

    def text_call(encoder, count: int):
        def call():
            with torch.device("meta"):
                ids = torch.zeros(count, tokens, dtype=torch.long)
            return encoder(ids)[0]

        return call

    unet.requires_grad_(False)
    vae.requires_grad_(False)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
    targets = unet_targets(unet, spec)
    text_train = None
    if train_te:
        te_profiles = [
            _dry_run(te, text_call(te, batch), text_encoder_targets(te, spec), spec.rank, True) for te in text_encoders
        ]
        text_train = _sum_profiles(te_profiles)
    text_forward = _sum_profiles([_dry_run(te, text_call(te, 1), [], 0, False) for te in text_encoders])
    unet_train = _dry_run(unet, unet_call(batch), targets, spec.rank, True)
    # a denoising step of one image with classifier-free guidance: the training forward pass at batch 2
    sample = PassProfile(
        flops=unet_train.forward_flops * 2 / batch,
        ops=unet_train.forward_ops,
        attention_flops=unet_train.forward_attention_flops * 2 / batch,
    )
    return ModelProfile(
        unet_train=unet_train,
        unet_sample=sample,
        vae_encode=_dry_run(vae, vae_encode, [], 0, False),
        vae_decode=_dry_run(vae, vae_decode, [], 0, False),
        text_forward=text_forward,
        text_train=text_train,
    )


def _tokens(base: BaseModel) -> int:
    """Tokens per caption: the text encoder's context length (77 for Stable Diffusion)."""
    return base.text_encoders[0].config.max_position_embeddings


def weightless_base(spec: str) -> BaseModel:
    """The base model `spec` as weightless (meta-device) modules built from its config files: enough for an
    estimate, without loading weights. Works for "demo", diffusers folders and single-file checkpoints (whose
    family's shipped configs are used); a hub id raises a ValueError (its configs are not on disk)."""
    import json
    import types

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.convert import detect_family_from_checkpoint
    from studio.models import detect_family, resolve_spec, shipped_config_dir

    kind, location = resolve_spec(spec)
    if kind == "hub":
        raise ValueError(f"{spec!r} is a hub id: the estimate needs the model's config files on disk")
    folder = Path(location) if kind == "folder" else shipped_config_dir(detect_family_from_checkpoint(location))

    def component(name: str, file: str = "config.json") -> dict:
        return json.loads((folder / name / file).read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component("unet"))
        vae = AutoencoderKL.from_config(component("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(component("text_encoder")))
        text_encoder_2 = None
        if (folder / "text_encoder_2" / "config.json").is_file():
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(component("text_encoder_2")))
    scheduler = types.SimpleNamespace(config=types.SimpleNamespace(**component("scheduler", "scheduler_config.json")))
    pipeline = types.SimpleNamespace(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, scheduler=scheduler
    )
    pipeline.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return BaseModel(pipeline=pipeline, family=detect_family(pipeline), spec=spec, name=Path(location).name)


def _sum_profiles(profiles: list[PassProfile]) -> PassProfile:
    return PassProfile(
        flops=sum(p.flops for p in profiles),
        ops=sum(p.ops for p in profiles),
        forward_flops=sum(p.forward_flops for p in profiles),
        forward_ops=sum(p.forward_ops for p in profiles),
        attention_flops=sum(p.attention_flops for p in profiles),
        forward_attention_flops=sum(p.forward_attention_flops for p in profiles),
        saved_bytes=sum(p.saved_bytes for p in profiles),
        checkpointed_saved_bytes=sum(p.checkpointed_saved_bytes for p in profiles),
        largest_output_bytes=max((p.largest_output_bytes for p in profiles), default=0),
    )


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Time and peak memory of one run on one device, with what to change when it does not fit."""

    device: Device
    seconds: float
    seconds_per_step: float
    setup_seconds: float
    peak_bytes: int
    memory: dict[str, int]
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the device's memory (None when the memory is unknown)."""
        budget = self.device.budget_bytes
        return None if budget is None else self.peak_bytes <= budget


def _speed(device: Device) -> tuple[float, float, float]:
    """(matmul flop/s, attention flop/s, seconds per operator) of `device`; a CPU's from the probe and threads."""
    if device.kind == "gpu":
        rate = GPU_EFFECTIVE_TFLOPS * 1e12
        return rate, rate, GPU_SECONDS_PER_OP
    probe = cpu_gflops()
    relative = min(max(probe / CPU_REFERENCE_GFLOPS, 0.25), 4.0)
    threads = 1 + CPU_THREAD_EFFICIENCY * (torch.get_num_threads() - 1)  # not measured here: an assumption
    rate = probe * 1e9 * threads
    return rate * CPU_EFFICIENCY, rate * CPU_ATTENTION_EFFICIENCY, CPU_SECONDS_PER_OP / relative


def _pass_seconds(profile: PassProfile, speed: tuple[float, float, float]) -> float:
    matmul, attention, per_op = speed
    return profile.flops / matmul + profile.attention_flops / attention + profile.ops * per_op


def estimate(
    config: TrainConfig,
    base: BaseModel,
    device: Device | None = None,
    plan: TrainPlan | None = None,
    *,
    suggest: bool = True,
) -> Estimate:
    """Estimated wall time and peak memory of `config` on `base` for `device` (default: this machine), with
    memory-saving suggestions when it does not fit (unless `suggest` is False)."""
    device = device or Device.this_machine()
    if plan is None:
        trainer = Trainer(config, base=base)
        plan = trainer.plan(trainer.scan())
    resolution = config.resolution or base.native_size
    profile = model_profile(base, config, resolution)
    size = lora_size(base, config)
    seconds, per_step, setup = _seconds(config, plan, profile, size, device)
    memory = _memory(config, plan, profile, size, base, resolution, device)
    result = Estimate(device, seconds, per_step, setup, sum(memory.values()), memory)
    if suggest and result.fits is False:
        result.suggestions = suggestions(config, base, device, plan, result)
    return result


def _seconds(config, plan, profile: ModelProfile, size: LoraSize, device: Device) -> tuple[float, float, float]:
    speed = _speed(device)
    batch = config.batch_size
    unet = profile.unet_train
    step = _pass_seconds(unet, speed)
    forward = PassProfile(flops=unet.forward_flops, ops=unet.forward_ops, attention_flops=unet.forward_attention_flops)
    if config.preservation_weight:
        # output preservation: the preservation prompts join the training pass (twice the batch, the same kernels),
        # after a no-grad forward pass of the base model on the batch
        step += _pass_seconds(replace(unet, ops=0), speed) + _pass_seconds(forward, speed)
    if config.gradient_checkpointing:  # the checkpointed blocks run their forward pass again
        recompute = _pass_seconds(forward, speed)
        if config.preservation_weight:  # on the doubled batch
            recompute += _pass_seconds(replace(forward, ops=0), speed)
        step += CHECKPOINT_RECOMPUTE * recompute
    if config.train_text_encoder and profile.text_train is not None:
        step += (2 if config.preservation_weight else 1) * _pass_seconds(profile.text_train, speed)
    elif not config.cache_text_embeddings:  # the captions, and the preservation prompts too
        step += (2 if config.preservation_weight else 1) * batch * _pass_seconds(profile.text_forward, speed)
    cache_latents = config.cache_latents and config.center_crop
    if not cache_latents:
        step += batch * _pass_seconds(profile.vae_encode, speed)
    step += 30 * speed[2] + size.lora_parameters * 16 / 4e9  # optimizer: a few foreach kernels over the LoRA state
    step *= config.gradient_accumulation_steps
    flips = 2 if config.random_flip else 1
    images = plan.num_images + plan.num_class_images
    setup = 0.0
    if cache_latents:
        setup += images * flips * _pass_seconds(profile.vae_encode, speed)
    if not config.train_text_encoder and config.cache_text_embeddings:
        setup += images * _pass_seconds(profile.text_forward, speed)
    image = config.sample_steps * _pass_seconds(profile.unet_sample, speed) + _pass_seconds(profile.vae_decode, speed)
    if config.prior_preservation:
        setup += plan.num_class_images * image
    checkpoints = config.checkpoint_every_steps and max(0, (plan.total_steps - 1) // config.checkpoint_every_steps)
    sampling = (1 + (checkpoints or 0)) * len(config.sample_prompts) * image
    return setup + plan.total_steps * step + sampling, step, setup


def _memory(config, plan, profile: ModelProfile, size: LoraSize, base, resolution, device: Device) -> dict[str, int]:
    precision = config.mixed_precision
    half = precision in ("fp16", "bf16") or (precision == "auto" and device.kind == "gpu")
    width = 2 if half else 4
    weights = sum(p.numel() for m in (base.unet, base.pipeline.vae, *base.text_encoders) for p in m.parameters())
    optimizer = OPTIMIZER_STATE_BYTES.get(config.optimizer, 8)
    if config.optimizer == "adamw8bit" and device.kind != "gpu":
        optimizer = OPTIMIZER_STATE_BYTES["adamw"]  # bitsandbytes needs a GPU
    unet = profile.unet_train
    saved = unet.checkpointed_saved_bytes if config.gradient_checkpointing else unet.saved_bytes
    if config.train_text_encoder and profile.text_train is not None:
        text = profile.text_train
        saved += text.checkpointed_saved_bytes if config.gradient_checkpointing else text.saved_bytes
    if config.preservation_weight:  # the preservation prompts go through the same pass, doubling its batch
        saved *= 2
    activations = int(saved * ACTIVATION_FACTOR[device.kind] * width / 4)
    # before the loop the latents are encoded one image at a time: a no-grad pass, a few outputs alive at once
    encode = int(ENCODE_FACTOR[device.kind] * profile.vae_encode.largest_output_bytes * width / 4)
    flips = 2 if config.random_flip else 1
    latent_bytes = 2 * base.pipeline.vae.config.latent_channels * (resolution // base.pipeline.vae_scale_factor) ** 2
    caches = (plan.num_images + plan.num_class_images) * flips * latent_bytes * 4
    if not config.train_text_encoder and config.cache_text_embeddings:
        tokens = _tokens(base)
        caches += plan.num_images * tokens * sum(te.config.hidden_size for te in base.text_encoders) * 4
    return {
        "runtime": GPU_RUNTIME_BYTES if device.kind == "gpu" else CPU_RUNTIME_BYTES,
        "weights": weights * width,
        # fp32 weights and gradients, the optimizer's state, and the moving average's fp32 copy when on
        "lora_and_optimizer": size.lora_parameters * (8 + optimizer + (4 if config.ema_decay else 0)),
        "activations": activations,
        "vae_encoding": encode,
        "caches": caches,
    }


def suggestions(config: TrainConfig, base: BaseModel, device: Device, plan: TrainPlan, current: Estimate) -> list[str]:
    """Memory-saving changes that apply, each with the peak it would give, most effective first; then all together."""
    options: list[tuple[str, dict]] = []
    if not config.gradient_checkpointing:
        options.append(("turn on gradient checkpointing (about 20-30% slower steps)", {"gradient_checkpointing": True}))
    if config.train_text_encoder:
        options.append(
            (
                "freeze the text encoder and cache its outputs",
                {"train_text_encoder": False, "cache_text_embeddings": True},
            )
        )
    if device.kind == "gpu" and config.optimizer == "adamw":
        options.append(("use 8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}))
    if config.batch_size > 1:
        smaller = max(1, config.batch_size // 2)
        options.append((f"lower the batch size to {smaller}", {"batch_size": smaller}))
    resolution = config.resolution or base.native_size
    if resolution > 256:
        lower = max(256, (resolution * 3 // 4) // 64 * 64)
        options.append((f"train at {lower} px", {"resolution": lower, "max_bucket_resolution": max(lower, 1024)}))
    lines, combined, scored = [], {}, []
    for text, changes in options:
        peak = estimate(config.replace(**changes), base, device, plan, suggest=False).peak_bytes
        if peak < current.peak_bytes:
            scored.append((peak, text, changes))
    for peak, text, changes in sorted(scored, key=lambda item: item[0]):
        lines.append(f"{text}: about {human_bytes(peak)} (saves {human_bytes(current.peak_bytes - peak)})")
        combined.update(changes)
    if len(scored) > 1:
        peak = estimate(config.replace(**combined), base, device, plan, suggest=False).peak_bytes
        verdict = "fits" if device.budget_bytes is None or peak <= device.budget_bytes else "still does not fit"
        lines.append(f"all of these together: about {human_bytes(peak)} ({verdict})")
    if not lines:
        lines.append("no training setting brings it down enough: the model's weights alone need most of it")
    return lines


# ----------------------------------------------------------------------------- text
def human_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def human_seconds(seconds: float) -> str:
    """90 -> "2 min"."""
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_estimate(result: Estimate, resolution: int) -> list[str]:
    """The estimate as Markdown list lines (time, memory against the device, suggestions when over)."""
    device = result.device
    where = f"this machine, {device.label()}" if device == Device.this_machine() else f"a {device.label()}"
    speed = "" if device.kind == "cpu" else " (assuming a current consumer GPU's speed)"
    lines = [
        f"- estimated time on {where}: **about {human_seconds(result.seconds)}** "
        f"(about {result.seconds_per_step:.2f} s per step{speed}); estimated peak memory: "
        f"**about {human_bytes(result.peak_bytes)}** at {resolution}px (rough estimates, calibrated on CPU runs)"
    ]
    if result.fits is False:
        lines.append(f"- **does not fit** the {device.label()}'s {human_bytes(device.budget_bytes)}; to save memory:")
        lines += [f"  - {text}" for text in result.suggestions]
    return lines


def describe_plan(config: TrainConfig, base: BaseModel, device: Device | None = None) -> str:
    """The plan as Markdown: images, steps, epochs, images seen, trainable parameters, file size, estimates."""
    trainer = Trainer(config, base=base)
    report = trainer.scan()
    plan = trainer.plan(report)
    resolution = config.resolution or base.native_size
    size = lora_size(base, config)
    result = estimate(config, base, device, plan)
    percent = 100 * size.lora_parameters / size.model_parameters
    modules = ", ".join(f"{k}: {v}" for k, v in size.modules.items())
    class_line = f" + {plan.num_class_images} class images" if plan.num_class_images else ""
    return "\n".join(
        [
            f"**Plan:** {plan.num_images} images{class_line} x {plan.repeats} repeat(s), batch {config.batch_size} "
            f"-> {plan.steps_per_epoch} steps per epoch",
            f"- **{plan.total_steps} total steps** over **{plan.epochs} epoch(s)**; {plan.images_seen} images seen",
            f"- trainable parameters: **{size.lora_parameters:,}** ({percent:.3f}% of the model's "
            f"{size.model_parameters:,}); adapted modules: {modules}",
            f"- adapter file: about **{human_bytes(adapter_file_bytes(size, config.save_dtype))}** "
            f"({config.save_dtype})",
            *describe_estimate(result, resolution),
        ]
    )
