"""Build the bundled demo base model: a small but real latent diffusion model of the shapes world.

    python sample_data/build_demo_model.py            # about 100 minutes on 2 CPU cores
    python sample_data/build_demo_model.py --reuse-vae sample_data/demo_model/vae   # about 68 minutes

Stages (each cached in sample_data/.build, or --build-dir, so a stage can be re-run alone with --from STAGE):
  data       pools of images: a broad procedural corpus for the autoencoder, and 24,000 shapes-world scenes for the
             UNet, most drawn in 1-3 named looks (never an artist style's combination, nor all but one of its looks);
             captions name all of a picture's looks half the time, some a quarter, none a quarter
  vae        an AutoencoderKL (f=4, 16 latent channels) trained on 32x32 crops of the broad corpus; each latent
             channel is then normalised to mean 0 / std 1 inside the weights (scaling_factor 1.0)
  decoder    the autoencoder's decoder trained on alone at a lower learning rate (the encoder, and so the latent
             space the UNet learns, stays as it is: Stable Diffusion's ft-MSE autoencoder was made the same way)
  latents    the scenes encoded once (the UNet trains on cached latents)
  unet       a CLIPTextModel (with a real CLIPTokenizer over a small word vocabulary) and a UNet2DConditionModel
             trained together from scratch with classifier-free-guidance dropout, min-SNR weighting, offset
             noise and EMA, after a short pretraining of the text encoder to read each caption's color, shape,
             background and looks; a share of the prompts carry made-up words (like the trigger words users pick)
             that the models learn to pass over, so a trigger word on the base model does not derail the prompt.
             The first half of the steps, saved and resumed by unet_more (state saved every 1,000 steps too)
  unet_more  the second half
  save       the diffusers folder sample_data/demo_model (loads with StableDiffusionPipeline.from_pretrained)
--reuse-vae DIR takes an earlier build's autoencoder instead of the vae and decoder stages.
Step counts are fixed (not time budgets), so the build gives the same model on any machine.
The measurements live in sample_data/evaluate_demo.py, the judges in sample_data/evaluator.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_data.evaluator import content_indices  # noqa: E402
from sample_data.shapes import (  # noqa: E402
    ARTIST_STYLES,
    COLORS,
    LOOKS,
    SHAPES,
    looked_scenes,
    render,
    scenes,
    texture_image,
    to_array,
)

BUILD = ROOT / "sample_data" / ".build"
OUT = ROOT / "sample_data" / "demo_model"
STAGES = ("data", "vae", "decoder", "latents", "unet", "unet_more", "save")
SEED = 1234
MAX_TOKENS = 48
UNET_STEPS = 6000
# whole-word tokens: the content words and every word of the looks' phrases (tests/test_demo_model.py checks that
# this builds the shipped tokenizer)
WORDS = sorted(
    set(COLORS)
    | set(SHAPES)
    | {word for look in LOOKS.values() for word in look.phrase.replace("-", " ").split()}
    | {
        "a",
        "an",
        "on",
        "background",
        "the",
        "of",
        "in",
        "with",
        "style",
        "picture",
        "drawing",
        "painting",
        "photo",
        "shape",
        "and",
    }
)


def log(message: str) -> None:
    """Print a timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------- tokenizer


def write_tokenizer(directory: Path) -> None:
    """A real CLIP BPE vocabulary: every byte-level character, plus whole-word tokens for the shapes world."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "vocab.json", "merges.txt"):  # a saved tokenizer.json would win over new files
        (directory / stale).unlink(missing_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    # BPE applies the lowest-ranked merge first, so one word's merges can split another word ("t e" from "textured"
    # before "pas t" from "pastel"). Each word gets merges for the pieces it actually has until every word is one token.
    changed = True
    while changed:
        changed = False
        for word in WORDS:
            pieces = _bpe(word, {pair: rank for rank, pair in enumerate(merges)})
            if len(pieces) > 1:
                merges.append((pieces[0], pieces[1]))
                tokens.append(pieces[0] + pieces[1])
                changed = True
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    lines = dict.fromkeys(f"{a} {b}" for a, b in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(directory)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces BPE makes of `word` (end-of-word marked "</w>") with merges of the given ranks."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), k) for k, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, k = min(pairs)
        if rank == len(ranks):
            break
        pieces[k : k + 2] = [pieces[k] + pieces[k + 1]]
    return pieces


# --------------------------------------------------------------------------------------------- stage: data


def stage_data(vae_pool: int, scene_pool: int, plain_share: float = 0.2) -> None:
    """Render the autoencoder's broad corpus and the UNet's scenes (plain, or in 1-3 named looks, with prompts)."""
    from multiprocessing import Pool

    BUILD.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with Pool(2) as pool:
        corpus = pool.map(_texture, range(vae_pool), chunksize=64)
        corpus += pool.map(_render, scenes(SEED + 1, vae_pool // 3), chunksize=64)
        np.save(BUILD / "vae_corpus.npy", np.stack(corpus))
        log(f"vae corpus: {len(corpus)} images in {time.time() - started:.0f}s")
        started = time.time()
        unet_corpus = looked_scenes(SEED + 2, scene_pool, plain_share)
        np.save(BUILD / "scenes.npy", np.stack(pool.map(_render, unet_corpus, chunksize=64)))
    described = [{"prompt": s.prompt, "labels": scene_labels(s)} for s in unet_corpus]
    (BUILD / "scenes.json").write_text(json.dumps(described))
    looked = sum(1 for s in unet_corpus if s.looks)
    named = sum(1 for s in unet_corpus if s.named_looks)
    seconds = time.time() - started
    log(f"unet corpus: {len(unet_corpus)} scenes ({looked} with looks, {named} naming some) in {seconds:.0f}s")


def scene_labels(scene) -> list[int]:
    """What a caption says, as class indices: color, shape, background, then one 0/1 per named look."""
    return content_indices(scene) + [int(look in scene.named_looks) for look in LOOKS]


def _texture(index: int) -> np.ndarray:
    return to_array(texture_image(random.Random(f"texture:{SEED}:{index}")))


def _render(scene) -> np.ndarray:
    return to_array(render(scene))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns of an NCHW batch (pictures, not scenes: only for the autoencoder)."""
    if torch.rand((), generator=generator) < 0.5:
        batch = batch.flip(3)
    turns = int(torch.randint(0, 4, (), generator=generator))
    return torch.rot90(batch, turns, dims=(2, 3))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------- stage: vae

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=16,
    mid_block_add_attention=False,
    sample_size=64,
)
CROP = 32  # the autoencoder is fully convolutional: training on crops is 4x cheaper and sees the same textures


def warmup_cosine(step: int, steps: int, warmup: int, floor: float) -> float:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine from 1 down to `floor` at `steps`."""
    return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def stage_vae(steps: int, batch_size: int = 16, lr: float = 1e-3) -> None:
    """Train the autoencoder on the broad corpus for `steps`, then normalise its latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    corpus = np.load(BUILD / "vae_corpus.npy")
    held_out, train = corpus[:256], corpus[256:]
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        # start with a near-deterministic posterior: at log-variance 0 the sampling noise (std 1) drowns the
        # fresh encoder's small means, and the decoder spends thousands of steps learning to see through it
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup=100, floor=0.05)
        x = _crop_batch(train, batch_size, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 500 == 0:
            per_step = (time.time() - started) / (step + 1)
            log(f"vae step {step + 1}/{steps}: loss {loss.item():.4f} ({per_step:.2f} s/step)")
    vae.eval()
    with torch.no_grad():
        plain = to_tensor(np.stack([to_array(render(s)) for s in scenes(SEED + 2, 2048)]))
        normalise_latent_channels(vae, vae.encode(plain).latent_dist.mean)
    vae.save_pretrained(BUILD / "vae")
    log(f"vae: {steps} steps, {reconstruction_report(vae, held_out)}")


def stage_decoder(steps: int, batch_size: int = 16, lr: float = 2e-4) -> None:
    """Train the autoencoder's decoder alone for `steps` on the broad corpus; the encoder stays frozen."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    corpus = np.load(BUILD / "vae_corpus.npy")
    held_out, train = corpus[:256], corpus[256:]
    vae = AutoencoderKL.from_pretrained(BUILD / "vae")
    log(f"decoder: before, {reconstruction_report(vae.eval(), held_out)}")
    vae.requires_grad_(False)
    trained = [vae.post_quant_conv, vae.decoder]
    parameters = [p for module in trained for p in module.parameters()]
    for module in trained:
        module.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 1)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup=100, floor=0.05)
        x = _crop_batch(train, batch_size, generator)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()  # what the UNet's samples stand for: the posterior means
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if (step + 1) % 500 == 0:
            per_step = (time.time() - started) / (step + 1)
            log(f"decoder step {step + 1}/{steps}: loss {loss.item():.4f} ({per_step:.2f} s/step)")
    vae.eval()
    vae.save_pretrained(BUILD / "vae")
    log(f"decoder: {steps} steps, {reconstruction_report(vae, held_out)}")


def _crop_batch(images: np.ndarray, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch of CROPxCROP crops (one position per batch), flipped and turned."""
    index = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
    top, left = (int(v) for v in torch.randint(0, 64 - CROP + 1, (2,), generator=generator))
    return _augment(to_tensor(images[index])[:, :, top : top + CROP, left : left + CROP], generator)


def reconstruction_report(vae, held_out: np.ndarray) -> str:
    """The autoencoder's round-trip PSNR on held-out corpus pictures and on fresh renders of the two styles."""
    with torch.no_grad():
        x = to_tensor(held_out)
        quality = psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
        styled = {
            style: to_tensor(np.stack([to_array(render(s)) for s in scenes(5, 60, style)])) for style in ARTIST_STYLES
        }
        recon = {style: vae.decode(vae.encode(x).latent_dist.mode()).sample for style, x in styled.items()}
        both = psnr(torch.cat(list(recon.values())), torch.cat(list(styled.values())))
        each = ", ".join(f"{style} {psnr(recon[style], styled[style]):.2f}" for style in styled)
    return f"held-out PSNR {quality:.2f} dB, style sets {both:.2f} dB ({each})"


def normalise_latent_channels(vae, means: torch.Tensor) -> None:
    """Fold a per-channel shift and scale into the autoencoder so every latent channel has mean 0 and std 1.

    One global scaling factor leaves channels of very different spread, and the diffusion loss then under-weights
    the narrow ones (SD3/Flux keep per-channel statistics for this). StableDiffusionPipeline only knows a single
    scaling_factor, so the normalisation goes into the weights instead: quant_conv's mean (and log-variance) outputs
    are shifted and scaled, post_quant_conv undoes it on its input. Reconstructions are unchanged.
    """
    channels = means.shape[1]
    mu = means.mean(dim=(0, 2, 3))
    sigma = means.std(dim=(0, 2, 3)).clamp_min(1e-4)
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] /= sigma[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - mu) / sigma
    quant.bias[channels:] -= 2 * torch.log(sigma)
    post.bias += (post.weight[:, :, 0, 0] * mu[None, :]).sum(dim=1)
    post.weight *= sigma[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


# --------------------------------------------------------------------------------------------- stage: latents


def stage_latents() -> None:
    """Encode the plain scenes once (and their mirror images) with the trained autoencoder."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(BUILD / "vae").eval()
    images = np.load(BUILD / "scenes.npy")
    started, chunks = time.time(), []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = to_tensor(images[start : start + 256])
            chunks.append(vae.encode(x).latent_dist.parameters)
    torch.save(torch.cat(chunks), BUILD / "scene_latents.pt")
    log(f"latents: {len(images)} scenes in {time.time() - started:.0f}s")


# --------------------------------------------------------------------------------------------- stage: unet

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=128,
    hidden_act="quick_gelu",
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=VAE_CONFIG["latent_channels"],
    out_channels=VAE_CONFIG["latent_channels"],
    layers_per_block=1,
    block_out_channels=[96, 128, 160],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def made_up_word(rng: random.Random) -> str:
    """A random word outside the vocabulary, the kind of rare token users pick as a trigger ("sks", "ohwx")."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))


def with_made_up_words(prompt: str, rng: random.Random) -> str:
    """The prompt with one or two made-up words in front, the way trigger words are written ("sks, a ...")."""
    words = " ".join(made_up_word(rng) for _ in range(rng.choice([1, 1, 2])))
    return f"{words}{rng.choice([',', ',', ''])} {prompt}"


class CaptionProbe(torch.nn.Module):
    """Linear heads reading a caption's color, shape, background and looks from the text encoder's pooled output."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(width, n) for n in (len(COLORS), len(SHAPES), len(COLORS))])
        self.looks = torch.nn.Linear(width, len(LOOKS))

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the three content heads plus the looks' binary cross-entropy."""
        content = sum(F.cross_entropy(head(pooled), labels[:, k]) for k, head in enumerate(self.heads)) / 3
        return content + F.binary_cross_entropy_with_logits(self.looks(pooled), labels[:, 3:].float())


def pretrain_text_encoder(text_encoder, probe: CaptionProbe, ids: torch.Tensor, labels: torch.Tensor, steps: int):
    """Teach the fresh text encoder what a caption says before the UNet listens to it.

    Stable Diffusion starts from a pretrained CLIP text encoder; ours starts from nothing, and learning the
    caption's structure only through the denoising loss is slow (the same color word names the shape in one
    place and the background in another). A few hundred steps of reading the three attributes off the pooled
    output (the captions with and without made-up words) give the UNet informative tokens from its first step.
    """
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *probe.parameters()], lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(SEED + 5)
    flat_ids, flat_labels = ids.flatten(0, 1), labels.repeat(ids.shape[0], 1)
    for step in range(steps):
        index = torch.randint(0, len(flat_ids), (256,), generator=generator)
        loss = probe.loss(text_encoder(flat_ids[index]).pooler_output, flat_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(f"text encoder pretraining step {step + 1}/{steps}: loss {loss.item():.4f}")


def stage_unet(
    steps: int,
    stop_at: int | None = None,
    batch_size: int = 24,
    lr: float = 6e-4,
    cfg_dropout: float = 0.1,
    made_up_share: float = 0.3,
    probe_weight: float = 0.1,
    noise_offset: float = 0.3,
) -> None:
    """Train text encoder and UNet together on cached latents for `steps` in all; keep an EMA of both.

    With `stop_at`, stop after that many steps and leave the whole state (models, EMA, optimizer, random numbers) in
    BUILD/unet_state.pt; the next call resumes from it, so a long run is cut into stages that each fit an hour."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    write_tokenizer(BUILD / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(BUILD / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_CONFIG,
        )
    )
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    vae_config = json.loads((BUILD / "vae" / "config.json").read_text())
    scaling = vae_config["scaling_factor"]
    params = torch.load(BUILD / "scene_latents.pt")
    described = json.loads((BUILD / "scenes.json").read_text())
    prompts = [d["prompt"] for d in described]
    rng = random.Random(SEED)
    variants = [with_made_up_words(p, rng) if rng.random() < made_up_share else p for p in prompts * 2]
    ids = tokenizer(
        variants + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty = ids[-1]
    ids = ids[:-1].view(2, len(prompts), -1)
    labels = torch.tensor([d["labels"] for d in described])
    probe = CaptionProbe(TEXT_CONFIG["hidden_size"])
    models = torch.nn.ModuleList([unet, text_encoder])
    optimizer = torch.optim.AdamW([*models.parameters(), *probe.parameters()], lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(SEED)
    state_path = BUILD / "unet_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        models.load_state_dict(state["models"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        ema, start, losses, seconds = state["ema"], state["step"], state["losses"], state["seconds"]
        log(f"resuming the unet stage at step {start}")
    else:
        pretrain_text_encoder(text_encoder, probe, ids, labels, steps=300)
        ema = [p.detach().clone() for p in models.parameters()]
        start, losses, seconds = 0, [], 0.0
    unet_count = sum(p.numel() for p in unet.parameters()) / 1e6
    text_count = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    log(f"unet {unet_count:.2f}M parameters, text encoder {text_count:.2f}M")
    alphas = scheduler.alphas_cumprod
    end = min(steps, stop_at) if stop_at else steps
    started = time.time()

    def save_state(step: int, spent: float) -> None:
        state = {
            "models": models.state_dict(),
            "probe": probe.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "ema": ema,
            "step": step,
            "losses": losses,
            "seconds": spent,
        }
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    for step in range(start, end):
        factor = warmup_cosine(step, steps, warmup=200, floor=0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        index = torch.randint(0, len(params), (batch_size,), generator=generator)
        mean, logvar = params[index].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)) * scaling
        flip = torch.rand(batch_size, generator=generator) < 0.5
        latents = torch.where(flip[:, None, None, None], latents.flip(3), latents)
        variant = torch.randint(0, 2, (batch_size,), generator=generator)
        batch_ids = ids[variant, index].clone()
        drop = torch.rand(batch_size, generator=generator) < cfg_dropout
        batch_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            # The schedule never destroys an image completely: at t=999 the latents keep 6.8% of their signal, and
            # on a 16x16 latent that remnant's per-channel mean stands well clear of the noise's own (std 1/16).
            # Trained on that, the model took each picture's overall colours from the starting noise, not from the
            # prompt (background right 44% of the time, 100% when the true remnant was put into the starting noise).
            # A per-channel offset in the training noise (kohya's noise_offset) hides the remnant.
            noise = noise + noise_offset * torch.randn((batch_size, latents.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        encoded = text_encoder(batch_ids)
        pred = unet(noisy, timesteps, encoded.last_hidden_state).sample
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weights = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        if probe_weight and not drop.all():
            # keeps the text encoder's reading of the caption while it adapts to the UNet
            loss = loss + probe_weight * probe.loss(encoded.pooler_output[~drop], labels[index][~drop])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, param in zip(ema, models.parameters(), strict=True):
                shadow.lerp_(param.detach(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            per_step = (time.time() - started) / (step + 1 - start)
            recent = sum(losses[-100:]) / 100
            log(f"unet step {step + 1}/{steps}: loss {recent:.4f} lr {lr * factor:.2e} ({per_step:.2f} s/step)")
        if (step + 1) % 1000 == 0 and step + 1 < end:
            save_state(step + 1, seconds + time.time() - started)  # a killed machine loses at most 1000 steps
    seconds += time.time() - started
    if end < steps:
        save_state(end, seconds)
        save_ema_snapshot(unet, text_encoder, ema, BUILD / "partial")
        log(f"unet: stopped at step {end} of {steps} ({seconds / 60:.1f} min so far); the next stage resumes")
        return
    save_ema_snapshot(unet, text_encoder, ema, BUILD)
    state_path.unlink(missing_ok=True)
    minutes = seconds / 60
    (BUILD / "unet_log.json").write_text(json.dumps({"steps": steps, "minutes": minutes, "losses": losses[::10]}))
    log(f"unet: {steps} steps in {minutes:.1f} min")


def save_ema_snapshot(unet, text_encoder, ema: list[torch.Tensor], directory: Path) -> None:
    """Write the EMA weights of UNet and text encoder to directory/unet and directory/text_encoder."""
    import copy

    models = copy.deepcopy(torch.nn.ModuleList([unet, text_encoder]))
    with torch.no_grad():
        for shadow, param in zip(ema, models.parameters(), strict=True):
            param.copy_(shadow)
    models[0].save_pretrained(directory / "unet")
    models[1].save_pretrained(directory / "text_encoder")


# --------------------------------------------------------------------------------------------- stage: save


def stage_save() -> None:
    """Assemble the diffusers folder and check it loads with StableDiffusionPipeline."""
    import shutil

    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = DPMSolverMultistepScheduler(
        **{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(BUILD / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(BUILD / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(BUILD / "tokenizer", model_max_length=MAX_TOKENS),
        unet=UNet2DConditionModel.from_pretrained(BUILD / "unet"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    # the UNet's weights are stored in fp16 (half the bytes, within the 40 MB budget); loaders that compute in fp32
    # ask for it (`torch_dtype=torch.float32`, as the studio does)
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(OUT, safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(OUT, torch_dtype=torch.float32)
    image = loaded(
        "a red circle on a white background", num_inference_steps=20, generator=torch.Generator().manual_seed(0)
    ).images[0]
    image.save(BUILD / "check.png")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    log(f"saved {OUT} ({size / 2**20:.1f} MiB), generated a {image.size} check image")


def main() -> None:
    """Run the stages from --from on."""
    global BUILD, OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="start", choices=STAGES, default="data")
    parser.add_argument("--only", action="store_true", help="run just the --from stage")
    parser.add_argument("--vae-steps", type=int, default=14000)
    parser.add_argument("--decoder-steps", type=int, default=6000)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--vae-pool", type=int, default=3000)
    parser.add_argument("--scene-pool", type=int, default=24000)
    parser.add_argument(
        "--reuse-vae",
        metavar="DIR",
        help="take the autoencoder from this diffusers folder (an earlier build's, e.g. sample_data/demo_model/vae) "
        "instead of running the vae and decoder stages",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when the machine is shared)")
    parser.add_argument("--build-dir", type=Path, help=f"where stages cache their results (default {BUILD})")
    parser.add_argument("--out", type=Path, help=f"where the model is saved (default {OUT})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BUILD, OUT = args.build_dir or BUILD, args.out or OUT
    run = STAGES[STAGES.index(args.start) :][: 1 if args.only else None]
    if args.reuse_vae:
        import shutil

        BUILD.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(BUILD / "vae", ignore_errors=True)
        shutil.copytree(args.reuse_vae, BUILD / "vae")
        run = [stage for stage in run if stage not in ("vae", "decoder")]
        log(f"autoencoder taken from {args.reuse_vae}")
    for stage in run:
        log(f"stage {stage}")
        if stage == "data":
            stage_data(args.vae_pool, args.scene_pool)
        elif stage == "vae":
            stage_vae(args.vae_steps)
        elif stage == "decoder":
            stage_decoder(args.decoder_steps)
        elif stage == "latents":
            stage_latents()
        elif stage == "unet":
            stage_unet(args.unet_steps, stop_at=args.unet_steps // 2)
        elif stage == "unet_more":
            stage_unet(args.unet_steps)
        else:
            stage_save()


if __name__ == "__main__":
    main()
