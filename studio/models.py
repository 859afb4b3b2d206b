"""Base-model families (SD 1.x, SD 2.x 512 and 768-v, SDXL base) and base-model loading."""

from __future__ import annotations

import hashlib
import json
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
    # Families whose adapters fit each other's weights (SD 2.x 512 and 768-v share one architecture).
    lineage: str = ""
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if not self.lineage:
            object.__setattr__(self, "lineage", self.name)

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL (two text encoders, pooled embeddings, size/crop conditioning)."""
        return self.lineage == "sdxl"

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

SD2 = ModelFamily(
    name="sd2",
    label="SD 2.x (512, epsilon)",
    ss_base_model_version="sd_v2",
    ss_v2=True,
    modelspec_architecture="stable-diffusion-v2-512",
    resolution=512,
    text_encoder_attrs=("text_encoder",),
    kohya_te_prefixes=("lora_te_",),
)
SD2V = ModelFamily(
    name="sd2v",
    label="SD 2.x (768, v-prediction)",
    ss_base_model_version="sd_v2_v",
    ss_v2=True,
    modelspec_architecture="stable-diffusion-v2-768-v",
    resolution=768,
    text_encoder_attrs=("text_encoder",),
    kohya_te_prefixes=("lora_te_",),
    lineage="sd2",
    prediction_type="v_prediction",
)
SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    ss_base_model_version="sdxl_base_v1-0",
    ss_v2=False,
    modelspec_architecture="stable-diffusion-xl-v1-base",
    resolution=1024,
    text_encoder_attrs=("text_encoder", "text_encoder_2"),
    kohya_te_prefixes=("lora_te1_", "lora_te2_"),
    kohya_unet_naming="sgm",
    kohya_te_roots=("text_model.", "text_model."),
    bucket_step=32,
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD2, SD2V, SDXL)}


def get_family(name: str) -> ModelFamily:
    """Look up a registered family by name, with an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(pipeline) -> ModelFamily:
    """Tell the family of a loaded diffusers pipeline (or any object with its components) from its components."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return SDXL
    # SD 2.x's OpenCLIP text encoder uses GELU where SD 1.x's OpenAI CLIP uses quick-GELU (true of tiny test
    # models too, whose widths say nothing); without a text encoder, SD 2.x's 1024-wide cross-attention tells.
    text_config = getattr(getattr(pipeline, "text_encoder", None), "config", None)
    if text_config is not None:
        is_sd2 = getattr(text_config, "hidden_act", "quick_gelu") == "gelu"
    else:
        is_sd2 = pipeline.unet.config.cross_attention_dim == 1024
    if is_sd2:
        scheduler = getattr(pipeline, "scheduler", None)
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        return SD2V if prediction == "v_prediction" else SD2
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


def pipeline_class(family: ModelFamily):
    """The diffusers pipeline class that runs `family`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family.is_sdxl else StableDiffusionPipeline


def _folder_pipeline_class(location: str):
    """The pipeline class a diffusers folder names in its model_index.json (SDXL or SD)."""
    import json

    from diffusers import DiffusionPipeline

    try:
        class_name = json.loads((Path(location) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{location}/model_index.json is unreadable: {exc}") from exc
    if not class_name:
        return DiffusionPipeline
    return pipeline_class(SDXL if "XL" in class_name else SD1)


# The shipped diffusers config folder (no weights) of each family: what a single-file checkpoint is loaded into.
SHIPPED_CONFIG_NAMES = {"sd1": "sd15", "sd2": "sd21_base", "sd2v": "sd21_768v", "sdxl": "sdxl_base"}


def shipped_config_dir(family: ModelFamily) -> Path:
    """The shipped diffusers config folder (configs and tokenizer settings, no weights) of `family`."""
    return CONFIGS_DIR / SHIPPED_CONFIG_NAMES[family.name]


def _missing_tokenizers(config_dir: Path) -> dict:
    """Tokenizers a config folder names but ships without a vocabulary, built from the shipped CLIP BPE file."""
    from studio.clip_tokenizer import clip_tokenizer

    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        folder = config_dir / name
        if not folder.is_dir() or any((folder / vocab).is_file() for vocab in ("vocab.json", "tokenizer.json")):
            continue
        settings_file = folder / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        tokenizers[name] = clip_tokenizer(
            settings.get("pad_token", "<|endoftext|>"), settings.get("model_max_length", 77)
        )
    return tokenizers


def folder_prediction_type(config_dir: str | Path) -> str | None:
    """The scheduler's prediction_type in a diffusers (config) folder, or None if it does not say."""
    path = Path(config_dir) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text()).get("prediction_type")
    except (OSError, ValueError):
        return None


def _with_prediction_type(pipe, prediction_type: str):
    """`pipe` with its scheduler switched to `prediction_type` (same scheduler class and settings otherwise)."""
    if pipe.scheduler.config.get("prediction_type", "epsilon") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def _load_single_file(
    location: str, torch_dtype: torch.dtype, config_dir: str | None, prediction_type: str | None
) -> object:
    """A pipeline from an LDM/SGM-layout .safetensors file, with configs from `config_dir` or the shipped folder."""
    from studio.convert import detect_family_from_checkpoint, sdxl_text_encoder_2_if_ambiguous

    fallback = (folder_prediction_type(config_dir) if config_dir is not None else None) or "v_prediction"
    family = detect_family_from_checkpoint(location, prediction_type=prediction_type, fallback_prediction_type=fallback)
    folder = Path(config_dir) if config_dir is not None else shipped_config_dir(family)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"config folder {folder} has no model_index.json (not a diffusers config folder)")
    cls = pipeline_class(family)
    components = _missing_tokenizers(folder)
    if family.is_sdxl:
        components.update(sdxl_text_encoder_2_if_ambiguous(location, folder, torch_dtype))
    pipe = cls.from_single_file(
        location, config=str(folder), local_files_only=True, **components, **_load_kwargs(cls, torch_dtype)
    )
    # SD 2.x's choice is the family's; other families keep their config's unless the caller asked (v-pred finetunes)
    chosen = family.prediction_type if family.lineage == "sd2" else prediction_type
    return _with_prediction_type(pipe, chosen) if chosen else pipe


def load_base(
    spec: str,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config_dir: str | None = None,
    prediction_type: str | None = None,
) -> BaseModel:
    """Load a base model from 'demo', a diffusers folder, a single-file .safetensors, or a hub id.

    A single file is loaded offline into `config_dir` (a diffusers folder without weights) or, by default, the
    shipped config folder of its family. SD 2.x files do not say whether they are 512/epsilon or 768/v-prediction:
    `prediction_type` ("epsilon" | "v_prediction") decides, else the file's modelspec metadata, else a same-named
    LDM .yaml beside it (A1111's convention), else `config_dir`'s scheduler, else 768/v-prediction (SD 2.1's flagship).
    """
    from diffusers import DiffusionPipeline

    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    kind, location = resolve_spec(spec)
    try:
        if kind == "single_file":
            pipe = _load_single_file(location, torch_dtype, config_dir, prediction_type)
        else:
            cls = _folder_pipeline_class(location) if kind == "folder" else DiffusionPipeline
            pipe = cls.from_pretrained(location, **_load_kwargs(cls, torch_dtype))
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


def _load_kwargs(cls, torch_dtype: torch.dtype) -> dict:
    """from_pretrained / from_single_file arguments for `cls` (only SD 1/2 pipelines have a safety checker)."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype}
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file, read in 1 MiB chunks (A1111's checkpoint "Model hash" is its first 10 hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
