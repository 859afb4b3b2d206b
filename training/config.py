"""The typed training config: validated on construction, round-trips through TOML, with named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from studio import atomic
from studio.conditioning import MAX_CLIP_SKIP
from training.lora import TEXT_ENCODER_TARGET_PRESETS, UNET_TARGET_PRESETS, LoraSpec

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
PRESERVATION_PROMPTS = ("caption", "blank")
TRACKERS = ("", "tensorboard")  # accelerate's trackers the run may also log to ("": metrics.jsonl only)


@dataclass
class TrainConfig:
    """Everything one DreamBooth-style LoRA training run needs. Invalid values raise a ValueError naming them."""

    # what to train on
    base: str = "demo"
    # SD 2.x single files do not say 512/epsilon or 768/v-prediction: "" = decide from metadata / .yaml / default
    prediction_type: str = ""
    data_dir: str = ""
    output: str = ""
    trigger: str = "sks"
    class_noun: str = "style"
    output_name: str = ""
    # LoRA shape
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    unet_targets: str = "cross_attn"
    train_text_encoder: bool = True
    text_encoder_targets: str = "attn"
    # text conditioning: 1 = the text encoder's last layer, 2 = the penultimate (A1111/kohya "clip skip"; SD 1.x/2.x)
    clip_skip: int = 1
    # optimisation
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 1000
    epochs: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    # an exponential moving average of the adapter weights (0 = off): samples, checkpoints and the exported adapter
    # use the average, which smooths out the last steps' noise (the EMA of Stable Diffusion's own training)
    ema_decay: float = 0.0
    seed: int = 0
    # data
    resolution: int = 0  # 0: the base model's native size (512 for SD 1.x)
    enable_bucket: bool = True
    min_bucket_resolution: int = 256
    max_bucket_resolution: int = 1024
    bucket_step: int = 0  # 0: the model family's default (64 for SD 1.x)
    center_crop: bool = True
    random_flip: bool = False
    # kohya's caption_dropout_rate: this share of samples trains on the empty prompt (classifier-free guidance's)
    caption_dropout_rate: float = 0.0
    repeats: int = 1
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    # prior preservation (DreamBooth, Ruiz et al. 2022, arXiv:2208.12242)
    prior_preservation: bool = False
    class_prompt: str = ""
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    class_dir: str = ""
    # output preservation (ai-toolkit's "differential output preservation"): a second loss keeps the model's
    # prediction with the adapter equal to the base model's for the same noisy image under the caption without the
    # trigger word ("caption") or the empty prompt ("blank"), so the look belongs to the trigger word
    preservation_weight: float = 0.0
    preservation_prompt: str = "caption"
    # checkpoints and samples
    work_dir: str = ""
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 0
    keep_checkpoints: int = 3
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_seed: int = 0
    save_dtype: str = "fp16"
    # when to stop: a validation loss on held-out pictures at fixed noise and timesteps, at every checkpoint and at
    # the end, written with the training loss to RUN_DIR/metrics.jsonl (kohya's validation split, ai-toolkit's)
    validation_images: int = 0  # hold out this many pictures of the data folder, the same ones every run (0: none)
    validation_dir: str = ""  # or score the pictures of this folder (not trained on)
    log_with: str = ""  # "tensorboard": also log the losses through accelerate's trackers to RUN_DIR/tensorboard

    def __post_init__(self):
        self._coerce_types()
        self._validate()

    def _coerce_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif kind == "float" and not isinstance(value, float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif kind == "str" and not isinstance(value, str):
                raise ValueError(f"{f.name} must be a string, got {value!r}")
        if isinstance(self.sample_prompts, str) or not all(isinstance(p, str) for p in self.sample_prompts):
            raise ValueError(f"sample_prompts must be a list of strings, got {self.sample_prompts!r}")
        self.sample_prompts = list(self.sample_prompts)

    def _validate(self) -> None:
        def need(condition: bool, name: str, rule: str) -> None:
            if not condition:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        need(self.rank >= 1, "rank", "must be at least 1")
        need(self.alpha > 0, "alpha", "must be positive")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.unet_targets in UNET_TARGET_PRESETS, "unet_targets", f"must be one of {list(UNET_TARGET_PRESETS)}")
        need(
            self.text_encoder_targets in TEXT_ENCODER_TARGET_PRESETS,
            "text_encoder_targets",
            f"must be one of {list(TEXT_ENCODER_TARGET_PRESETS)}",
        )
        need(
            self.prediction_type in ("", "epsilon", "v_prediction"),
            "prediction_type",
            "must be empty (decide from the checkpoint), 'epsilon' or 'v_prediction'",
        )
        need(1 <= self.clip_skip <= MAX_CLIP_SKIP, "clip_skip", f"must be from 1 (last layer) to {MAX_CLIP_SKIP}")
        need(self.unet_lr > 0, "unet_lr", "must be positive")
        need(self.text_encoder_lr >= 0, "text_encoder_lr", "must be zero or positive")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}")
        need(self.weight_decay >= 0, "weight_decay", "must be zero or positive")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be positive")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be zero (off) or positive")
        need(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {list(LR_SCHEDULERS)}")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be zero or positive")
        need(self.max_train_steps >= 0, "max_train_steps", "must be zero (use epochs) or positive")
        need(self.epochs >= 0, "epochs", "must be zero (use max_train_steps) or positive")
        if self.max_train_steps == 0 and self.epochs == 0:
            raise ValueError("max_train_steps and epochs are both 0: set one of them")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {list(MIXED_PRECISION)}")
        need(self.min_snr_gamma >= 0, "min_snr_gamma", "must be zero (off) or positive")
        need(0 <= self.noise_offset < 1, "noise_offset", "must be in [0, 1)")
        need(self.seed >= 0, "seed", "must be zero or positive")
        need(
            self.resolution == 0 or (self.resolution >= 32 and self.resolution % 8 == 0),
            "resolution",
            "must be 0 (the model's native size) or a multiple of 8, at least 32",
        )
        need(self.min_bucket_resolution >= 64, "min_bucket_resolution", "must be at least 64")
        need(
            self.max_bucket_resolution >= max(self.resolution, 64),
            "max_bucket_resolution",
            f"must be at least resolution ({self.resolution})",
        )
        need(self.bucket_step >= 0 and self.bucket_step % 8 == 0, "bucket_step", "must be 0 or a multiple of 8")
        need(self.repeats >= 1, "repeats", "must be at least 1")
        need(0 <= self.caption_dropout_rate < 1, "caption_dropout_rate", "must be in [0, 1)")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 turns the average off)")
        need(self.prior_loss_weight >= 0, "prior_loss_weight", "must be zero or positive")
        need(self.num_class_images >= 0, "num_class_images", "must be zero or positive")
        if self.prior_preservation:
            need(bool(self.class_prompt.strip()), "class_prompt", "is required with prior preservation")
            need(self.num_class_images >= 1, "num_class_images", "must be at least 1 with prior preservation")
        need(self.preservation_weight >= 0, "preservation_weight", "must be zero (off) or positive")
        need(
            self.preservation_prompt in PRESERVATION_PROMPTS,
            "preservation_prompt",
            f"must be one of {list(PRESERVATION_PROMPTS)}",
        )
        if self.preservation_weight and self.preservation_prompt == "caption":
            need(bool(self.trigger.strip()), "trigger", "is required to preserve the captions without it")
        need(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be zero (off) or positive")
        need(self.checkpoint_every_epochs >= 0, "checkpoint_every_epochs", "must be zero (off) or positive")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        need(self.sample_steps >= 1, "sample_steps", "must be at least 1")
        need(self.sample_cfg >= 1, "sample_cfg", "must be at least 1")
        need(self.save_dtype in SAVE_DTYPES, "save_dtype", f"must be one of {list(SAVE_DTYPES)}")
        need(self.validation_images >= 0, "validation_images", "must be zero (none) or positive")
        if self.validation_images and self.validation_dir.strip():
            raise ValueError("validation_images and validation_dir are both set: hold pictures out or give a folder")
        need(self.log_with in TRACKERS, "log_with", f"must be one of {list(TRACKERS)}")
        need(" " not in self.trigger.strip(), "trigger", "must be a single word")
        if self.output and not self.output.endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")

    @property
    def lora_spec(self) -> LoraSpec:
        """The LoRA shape this config asks for."""
        return LoraSpec(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            unet_targets=self.unet_targets,
            text_encoder_targets=self.text_encoder_targets if self.train_text_encoder else None,
        )

    @property
    def instance_prompt(self) -> str:
        """The caption used for an image without a sidecar: the trigger word and the class noun."""
        return f"{self.trigger} {self.class_noun}".strip()

    @property
    def resolved_work_dir(self) -> Path:
        """Where checkpoints, samples and caches go (default: beside the output file)."""
        if self.work_dir:
            return Path(self.work_dir)
        if not self.output:
            raise ValueError("output is empty: set output (or work_dir)")
        out = Path(self.output)
        return out.with_name(out.stem + "_run")

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with `changes` applied; unknown names raise a ValueError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text (every option, so a saved run is fully described)."""
        lines = ["# LoRA style studio training config"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the config as TOML, atomically."""
        atomic.write_text(path, self.to_toml())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML config file written by `save` (or by hand)."""
        values = read_toml(path)
        preset = values.pop("preset", None)
        if preset is not None:
            return cls.from_preset(preset, **values)
        return cls.from_dict(values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A preset (style, character, quick) for the config's base model, with `overrides` applied on top."""
        base = overrides.get("base", cls.base)
        return cls.from_dict({**preset_values(name, base if isinstance(base, str) else ""), **overrides})


def preset_values(name: str, base: str = "demo") -> dict[str, Any]:
    """The values preset `name` sets for `base`: the bundled demo model's own, else the community's (SD 1.x/2.x/XL)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **MODEL_PRESETS.get(base.strip(), {}).get(name, {})}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a TOML config file, with a readable error if it cannot be read."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# Presets: starting points that follow common community practice for each kind of subject.
PRESETS: dict[str, dict[str, Any]] = {
    # a look rather than a subject: UNet attention, a frozen text encoder is enough, moderate rank
    "style": {
        "class_noun": "style",
        "rank": 16,
        "alpha": 8.0,
        "unet_targets": "attn",
        "train_text_encoder": False,
        "unet_lr": 1e-4,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        "max_train_steps": 1500,
        "batch_size": 4,
        "min_snr_gamma": 5.0,
        "random_flip": True,
        "cache_latents": True,
    },
    # a specific person/object: text encoder too, prior preservation against drift of the class
    "character": {
        "class_noun": "person",
        "rank": 32,
        "alpha": 16.0,
        "unet_targets": "kohya",
        "train_text_encoder": True,
        "text_encoder_targets": "attn",
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "max_train_steps": 2000,
        "batch_size": 2,
        "min_snr_gamma": 5.0,
        "random_flip": False,
    },
    # a smoke test of the whole pipeline in a few minutes
    "quick": {
        "rank": 4,
        "alpha": 4.0,
        "unet_targets": "cross_attn",
        "train_text_encoder": False,
        "unet_lr": 5e-4,
        "max_train_steps": 100,
        "batch_size": 2,
    },
}

# Per-model presets, over the ones above (kohya and OneTrainer ship presets per base model): `--base NAME` takes
# MODEL_PRESETS[NAME][preset] over PRESETS[preset]. The demo model has no values of its own yet: no setting measured
# on it so far (higher learning rates, a text-encoder LoRA; bench/style_diagnosis.py) draws its styles at CFG 7
# better than the community's values do, and each broke the pictures' content more (README, the demo model).
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "style": {},
    },
}
