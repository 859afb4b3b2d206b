"""Base-model families (SD 1.x now; SD 2.x and SDXL register here later) and base-model loading."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "sample_data" / "demo_model"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# Formats that can run arbitrary code when loaded; we never unpickle them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelFamily:
    """What the trainer, exporter and loaders need to know about one Stable Diffusion family."""

    name: str
    label: str
    ss_base_model_version: str
    ss_v2: bool
    modelspec_architecture: str
    resolution: int
    text_encoder_attrs: tuple[str, ...]
    kohya_te_prefixes: tuple[str, ...]
    # kohya names UNet modules either by their diffusers path ("diffusers") or their SGM/LDM path ("sgm").
    kohya_unet_naming: str = "diffusers"
    # Path prefix kohya expects inside each text encoder (transformers 5 dropped `text_model` on CLIPTextModel).
    kohya_te_roots: tuple[str, ...] = ("text_model.",)
    bucket_step: int = 64
    modelspec_implementation: str = "diffusers"

    def kohya_te_prefix(self, index: int) -> str:
        """The kohya key prefix of text encoder number `index` (0-based)."""
        return self.kohya_te_prefixes[index]


SD1 = ModelFamily(
    name="sd1",
    label="SD 1.x",
    ss_base_model_version="sd_v1",
    ss_v2=False,
    modelspec_architecture="stable-diffusion-v1",
    resolution=512,
    text_encoder_attrs=("text_encoder",),
    kohya_te_prefixes=("lora_te_",),
)

FAMILIES: dict[str, ModelFamily] = {SD1.name: SD1}


def get_family(name: str) -> ModelFamily:
    """Look up a registered family by name, with an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(pipeline) -> ModelFamily:
    """Tell the family of a loaded diffusers pipeline from its components."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError("SDXL base models are not supported yet (planned); this studio handles SD 1.x")
    cross_dim = pipeline.unet.config.cross_attention_dim
    if cross_dim == 1024:
        raise ValueError("SD 2.x base models are not supported yet (planned); this studio handles SD 1.x")
    return SD1


@dataclass
class BaseModel:
    """A loaded base model: the diffusers pipeline, its family, and where it came from."""

    pipeline: object
    family: ModelFamily
    spec: str
    name: str
    extra: dict = field(default_factory=dict)

    @property
    def unet(self):
        """The pipeline's UNet."""
        return self.pipeline.unet

    @property
    def native_size(self) -> int:
        """The image size the model was trained at: UNet sample size times the VAE's downscale factor."""
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    @property
    def text_encoders(self) -> list:
        """The pipeline's text encoders, in the family's order."""
        return [getattr(self.pipeline, attr) for attr in self.family.text_encoder_attrs]

    @property
    def tokenizers(self) -> list:
        """The pipeline's tokenizers, matching `text_encoders`."""
        attrs = [attr.replace("text_encoder", "tokenizer") for attr in self.family.text_encoder_attrs]
        return [getattr(self.pipeline, attr) for attr in attrs]


def resolve_spec(spec: str) -> tuple[str, str]:
    """Classify a base-model spec as ("folder" | "single_file" | "hub", location); raise if unusable."""
    if not spec or not spec.strip():
        raise ValueError("base model is empty: give 'demo', a diffusers folder, a .safetensors file or a hub id")
    spec = spec.strip()
    if spec == "demo":
        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise ValueError(
                f"the bundled demo model is not present at {DEMO_MODEL_DIR}; "
                "pass a diffusers folder, a .safetensors checkpoint or a hub id with --base"
            )
        return "folder", str(DEMO_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base model folder {path} has no model_index.json (not a diffusers folder)")
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"base model {path.name} is a pickle-based file ({path.suffix}); loading it could run "
                "arbitrary code, so only .safetensors checkpoints are accepted"
            )
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"base model file {path.name} is not a .safetensors checkpoint")
        return "single_file", str(path)
    if HUB_ID.fullmatch(spec) and not spec.endswith(".safetensors"):
        return "hub", spec
    raise ValueError(f"base model not found: {spec!r} is neither an existing folder or file nor a hub id")


def load_base(
    spec: str,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config_dir: str | None = None,
) -> BaseModel:
    """Load a base model from 'demo', a diffusers folder, a single-file .safetensors, or a hub id."""
    from diffusers import StableDiffusionPipeline

    kind, location = resolve_spec(spec)
    common = {"torch_dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        if kind == "single_file":
            kwargs = dict(common)
            if config_dir is not None:
                kwargs.update(config=config_dir, local_files_only=True)
            pipe = StableDiffusionPipeline.from_single_file(location, **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(location, **common)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not load base model {spec!r}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    family = detect_family(pipe)
    name = Path(location).name if kind != "hub" else location
    if spec == "demo":
        name = "demo"
    extra = {"model_hash": file_sha256(location)[:10]} if kind == "single_file" else {}
    return BaseModel(pipeline=pipe, family=family, spec=spec, name=name, extra=extra)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file, read in 1 MiB chunks (A1111's checkpoint "Model hash" is its first 10 hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
