"""Memory-saving modes: VAE slicing / tiling and CPU offload for generation, fp32 LoRA over a bf16 base in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.cli import build_generate_request, build_parser, main
from studio.generate import GenerationRequest, generate
from studio.models import load_base
from tests.helpers import write_style_images
from training.config import TrainConfig
from training.lora import lora_parameters
from training.trainer import Trainer


def _has_accelerator() -> bool:
    from diffusers.utils.torch_utils import get_device

    return get_device() != "cpu"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _decoded(base, **options) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The request's images as one float array, and the latent shapes the VAE decoder was called on."""
    shapes = []
    hook = base.pipeline.vae.decoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        result = generate(base, GenerationRequest(prompt="a red circle", steps=3, **options))
    finally:
        hook.remove()
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images]), shapes


def test_vae_slicing_decodes_one_image_at_a_time_and_gives_the_same_images(base):
    whole, whole_calls = _decoded(base, seed=3, batch=2)
    sliced, sliced_calls = _decoded(base, seed=3, batch=2, vae_slicing=True)
    assert [shape[0] for shape in whole_calls] == [2]
    assert [shape[0] for shape in sliced_calls] == [1, 1]
    # the same convolutions on one image instead of two: equal up to float rounding, i.e. at most 1 level of 255
    assert np.abs(whole - sliced).max() <= 1
    assert base.pipeline.vae.use_slicing is False, "the mode is for one request; the shared pipeline is restored"


def test_vae_tiling_decodes_in_tiles_and_gives_the_same_image_within_tolerance(base):
    # 64x64 images are 32x32 latents; the tiny VAE (sample_size 32) tiles latents above 16x16 with 25% overlap
    whole, whole_calls = _decoded(base, seed=3, width=64, height=64)
    tiled, tiled_calls = _decoded(base, seed=3, width=64, height=64, vae_tiling=True)
    other, _ = _decoded(base, seed=4, width=64, height=64)
    assert whole_calls == [(1, 4, 32, 32)]
    assert len(tiled_calls) > 1 and all(max(shape[2:]) <= 16 for shape in tiled_calls)
    # Each tile is normalised on its own and the seams are blended, so pixels move a little: diffusers' own
    # pipeline tests allow 0.2 of the range (51 levels) for tiling; measured here: max 30, mean 3.4. Another seed
    # differs by a mean of ~46 levels, so a mean of 8 still tells "the same image" from a different one.
    assert np.abs(whole - tiled).max() <= 0.2 * 255
    assert np.abs(whole - tiled).mean() <= 8
    assert np.abs(whole - other).mean() > 30
    assert base.pipeline.vae.use_tiling is False


def test_cpu_offload_runs_or_says_clearly_that_it_did_nothing(base):
    device = base.pipeline.device
    plain = generate(base, GenerationRequest(prompt="a red circle", seed=5, steps=2))
    offloaded = generate(base, GenerationRequest(prompt="a red circle", seed=5, steps=2, cpu_offload=True))
    assert base.pipeline.device == device, "the pipeline is back where it was"
    if _has_accelerator():
        assert offloaded.notes == []
    else:
        assert offloaded.notes == ["CPU offload did nothing: there is no GPU, so the models already run on the CPU"]
        assert np.array_equal(np.asarray(plain.images[0]), np.asarray(offloaded.images[0]))


def test_memory_options_must_be_booleans():
    with pytest.raises(ValueError, match="vae_tiling must be true or false"):
        GenerationRequest(prompt="a red circle", vae_tiling="yes")


def test_memory_flags_round_trip_from_the_cli(tiny_model_dir, tmp_path, capsys):
    parser = build_parser()
    plain = build_generate_request(parser.parse_args(["generate", "--prompt", "a", "--out", str(tmp_path)]))
    assert (plain.vae_slicing, plain.vae_tiling, plain.cpu_offload) == (False, False, False)
    flags = ["--vae-slicing", "--vae-tiling", "--cpu-offload"]
    request = build_generate_request(parser.parse_args(["generate", "--prompt", "a", "--out", str(tmp_path), *flags]))
    assert (request.vae_slicing, request.vae_tiling, request.cpu_offload) == (True, True, True)

    out = tmp_path / "images"
    argv = ["generate", "--base", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "2", "--seed", "1"]
    assert main([*argv, "--width", "64", "--height", "64", "--out", str(out), *flags]) == 0
    printed = capsys.readouterr()
    assert len(list(out.glob("*.png"))) == 1 and "wrote " in printed.out
    if not _has_accelerator():
        assert "note: CPU offload did nothing" in printed.err


def test_the_generate_tab_memory_checkboxes_reach_the_request(tiny_model_dir, tmp_path):
    import gradio as gr

    from studio.library import Workspace
    from studio.ui import generate_tab
    from studio.ui.common import ModelCache

    with gr.Blocks() as app:
        generate_tab.build(Workspace(tmp_path / "ws"), ModelCache(), gr.Textbox(str(tiny_model_dir)))
    boxes = {block.elem_id: block for block in app.blocks.values() if block.elem_id in generate_tab.MEMORY_IDS}
    assert set(boxes) == set(generate_tab.MEMORY_IDS) and all(box.value is False for box in boxes.values())
    click = next(fn for fn in app.fns.values() if boxes["gen-cpu-offload"] in fn.inputs)
    values = {"gen-vae-slicing": True, "gen-vae-tiling": True, "gen-cpu-offload": True}
    args = [values.get(block.elem_id, getattr(block, "value", None)) for block in click.inputs]
    args[0] = str(tiny_model_dir)  # the base-model box
    args[1 + generate_tab.SETTINGS.index("prompt")] = "a red circle"
    args[1 + generate_tab.SETTINGS.index("steps")] = 2
    items, paths, info, status = click.fn(*args)
    assert len(paths) == 1 and "Saved 1 image" in status
    if not _has_accelerator():
        assert "Note: CPU offload did nothing" in status


def test_training_keeps_lora_parameters_in_fp32_over_a_bf16_base(tiny_model_dir, tmp_path):
    base = load_base(str(tiny_model_dir), torch_dtype=torch.bfloat16)
    data = write_style_images(tmp_path / "data", count=2)
    config = TrainConfig(
        base=str(tiny_model_dir),
        data_dir=str(data),
        output=str(tmp_path / "out" / "bf16.safetensors"),
        resolution=32,
        rank=4,
        alpha=4.0,
        max_train_steps=2,
        batch_size=2,
        unet_lr=1e-2,
        text_encoder_lr=1e-2,
        train_text_encoder=True,
        mixed_precision="bf16",
    )
    result = Trainer(config, base=base).run()
    assert result.steps == 2 and all(np.isfinite(result.losses))
    for model in (base.unet, base.text_encoders[0]):
        lora = {id(p) for p in lora_parameters(model)}
        assert lora and all(p.dtype == torch.float32 for p in lora_parameters(model))
        assert all(p.dtype == torch.bfloat16 for p in model.parameters() if id(p) not in lora)
        ups = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert max(p.abs().max().item() for p in ups) > 0, "the fp32 LoRA weights were trained"
