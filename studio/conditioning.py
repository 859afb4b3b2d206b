"""Text conditioning as each family's pipelines compute it: clip skip for SD 1.x/2.x, SDXL's two encoders and pooled
embedding. Shared by training (captions) and generation (prompts), so both condition the UNet the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.models import BaseModel, ModelFamily

MAX_CLIP_SKIP = 12  # SD 1.x's text encoder has 12 layers (SD 2.x's 23); more than that skips every layer


@dataclass
class PromptEmbeddings:
    """The text conditioning of a batch of prompts: per-token hidden states, and SDXL's pooled embedding."""

    hidden: torch.Tensor  # [batch, tokens, width]; SDXL: both encoders' widths side by side
    pooled: torch.Tensor | None = None  # [batch, projection width] from SDXL's second encoder, else None


def check_clip_skip_value(clip_skip: int) -> None:
    """Raise a ValueError if `clip_skip` is not an integer from 1 (the last layer) to MAX_CLIP_SKIP."""
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise ValueError(f"clip_skip must be an integer from 1 (last layer) to {MAX_CLIP_SKIP}, got {clip_skip!r}")


def check_clip_skip(family: ModelFamily, clip_skip: int) -> None:
    """Raise a ValueError if `clip_skip` is not a layer count from 1 or does not apply to `family` (SDXL)."""
    check_clip_skip_value(clip_skip)
    if family.is_sdxl and clip_skip != 1:
        raise ValueError(
            f"clip_skip {clip_skip} does not apply to {family.label}: SDXL is always conditioned on its text encoders' "
            "penultimate layers (set clip skip to 1)"
        )


def encode_prompts(
    family: ModelFamily,
    tokenizers: list,
    text_encoders: list,
    prompts: list[str],
    clip_skip: int = 1,
    device: torch.device | str = "cpu",
) -> PromptEmbeddings:
    """Text conditioning as the family's pipelines compute it (A1111's clip skip for SD 1.x/2.x).

    SD 1.x/2.x: hidden state `-clip_skip` of the text encoder through its final layer norm (1: its last layer).
    SDXL: each encoder's penultimate hidden state (no final norm) concatenated, and the second one's projection."""
    check_clip_skip(family, clip_skip)
    outputs = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        outputs.append(text_encoder(ids, output_hidden_states=family.is_sdxl or clip_skip > 1))
    if family.is_sdxl:
        hidden = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return PromptEmbeddings(hidden, outputs[-1].text_embeds)
    if clip_skip == 1:
        return PromptEmbeddings(outputs[0].last_hidden_state)
    model = getattr(text_encoders[0], "module", text_encoders[0])  # unwrapped from DDP
    layers = model.config.num_hidden_layers
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers")
    final_norm = getattr(model, "final_layer_norm", None) or model.text_model.final_layer_norm
    return PromptEmbeddings(final_norm(outputs[0].hidden_states[-clip_skip]))


def prompt_arguments(base: BaseModel, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> dict:
    """The prompt arguments of a pipeline call: the texts, or with clip skip the embeddings of both (as A1111).

    diffusers' own `clip_skip` reaches for `text_encoder.text_model`, which transformers 5 removed from
    CLIPTextModel, and leaves the negative prompt unskipped; so with clip skip the studio encodes both itself."""
    check_clip_skip(base.family, clip_skip)
    if clip_skip == 1:
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}
    pipe = base.pipeline
    args = (base.family, base.tokenizers, base.text_encoders)
    with torch.no_grad():
        positive = encode_prompts(*args, [prompt], clip_skip, pipe._execution_device).hidden
        negative = encode_prompts(*args, [negative_prompt], clip_skip, pipe._execution_device).hidden
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}
