"""Stable Diffusion pipelines built from configs with random weights, for tests and benchmarks (no download)."""

from __future__ import annotations

import json
import string
from contextlib import contextmanager
from pathlib import Path

import torch

from studio.models import CONFIGS_DIR, SHIPPED_CONFIG_NAMES

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}
TINY_TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
TINY_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def write_char_tokenizer(directory: str | Path) -> Path:
    """Write a character-level CLIP BPE vocabulary (no merges) that a real CLIPTokenizer can load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def load_config(name: str, component: str) -> dict:
    """The real config of `component` (unet, text_encoder, text_encoder_2, vae, scheduler) of shipped model `name`."""
    if name not in SHIPPED_CONFIG_NAMES.values():
        raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(SHIPPED_CONFIG_NAMES.values())}")
    file_name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = CONFIGS_DIR / name / component / file_name
    if not path.is_file():
        raise ValueError(f"shipped config {name!r} has no {component!r} component")
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def load_sd15_config(component: str) -> dict:
    """The real Stable Diffusion 1.5 config of `component` (unet, text_encoder, vae, scheduler), shipped."""
    return load_config("sd15", component)


@contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def build_unet(config: dict, seed: int = 0):
    """A UNet2DConditionModel with random weights from a config dict."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(**config)


def build_text_encoder(config: dict, vocab_size: int | None = None, seed: int = 0):
    """A CLIPTextModel with random weights from a config dict."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(config)
    if vocab_size is not None:
        config.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with _seeded(seed):
        return CLIPTextModel(CLIPTextConfig(**config)).eval()


TINY_FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")
# What makes each family's tiny model structurally that family (the same switches its real configs set).
_TINY_SD2_UNET = {"use_linear_projection": True, "attention_head_dim": [2, 4]}
_TINY_SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 64,  # both text encoders' hidden states side by side (32 + 32)
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 size/crop numbers x 8 + the pooled embedding (32)
}


def build_tiny_pipeline(workdir: str | Path, seed: int = 0, family: str = "sd1"):
    """A complete tiny pipeline of `family` (random weights, char tokenizer) saved to `workdir` as a diffusers folder.

    sd1: StableDiffusionPipeline; sd2 / sd2v: OpenCLIP-style (GELU) text encoder and linear projections, with
    epsilon / v-prediction; sdxl: StableDiffusionXLPipeline with two text encoders and size conditioning.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    workdir = Path(workdir)
    tokenizer_dir = write_char_tokenizer(workdir / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    openclip_tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77, pad_token="!")
    unet_config = dict(TINY_UNET)
    text_config = dict(TINY_TEXT_ENCODER)
    scheduler_config = dict(TINY_SCHEDULER)
    if family in ("sd2", "sd2v"):
        unet_config.update(_TINY_SD2_UNET)
        text_config["hidden_act"] = "gelu"
        tokenizer = openclip_tokenizer
    if family == "sd2v":
        scheduler_config.update(prediction_type="v_prediction", timestep_spacing="trailing")
    if family == "sdxl":
        unet_config.update(_TINY_SDXL_UNET)
    unet = build_unet(unet_config, seed)
    with _seeded(seed + 1):
        vae = AutoencoderKL(**TINY_VAE)
    text_encoder = build_text_encoder(text_config, vocab_size=len(tokenizer), seed=seed + 2)
    if family == "sdxl":
        config = CLIPTextConfig(
            **{**TINY_TEXT_ENCODER, "hidden_act": "gelu"},
            vocab_size=len(tokenizer),
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        with _seeded(seed + 3):
            text_encoder_2 = CLIPTextModelWithProjection(config).eval()
        pipe = StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=openclip_tokenizer,
            scheduler=DDIMScheduler(**scheduler_config),
        )
    else:
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(workdir)
    return workdir
