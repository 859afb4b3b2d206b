"""Round trip: diffusers folder -> one LDM-layout .safetensors (studio.convert) -> from_single_file via load_base."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.convert import (
    detect_family_from_checkpoint,
    ldm_state_dict,
    read_checkpoint_shapes,
    save_single_file,
)
from studio.models import SD1, SD2V, SDXL, load_base
from studio.tiny import build_text_encoder, build_unet, load_sd15_config

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory):
    """The tiny model written as one LDM-layout checkpoint."""
    return save_single_file(tiny_model_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir, single_file):
    """(folder-loaded, single-file-loaded) pipelines of the same tiny model."""
    from_folder = load_base(str(tiny_model_dir)).pipeline
    from_file = load_base(str(single_file), config_dir=str(tiny_model_dir)).pipeline
    return from_folder, from_file


def _generate(pipeline) -> np.ndarray:
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    return pipeline(
        "a red circle",
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_file_has_ldm_layout(single_file):
    shapes = read_checkpoint_shapes(single_file)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in shapes)
    for prefix in prefixes:
        assert any(key.startswith(prefix) for key in shapes), prefix
    # tiny UNet: 2 blocks x 1 layer -> conv_in, resnet+attn, downsampler, resnet; 2 x 2 output blocks
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in shapes
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in shapes  # upsampler of a block without attention
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in shapes
    assert not any(".output_blocks.4." in key for key in shapes)
    # VAE attention is stored as 1x1 convs, decoder levels are numbered from the bottom
    assert len(shapes["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4
    assert len(shapes["first_stage_model.decoder.mid.attn_1.proj_out.weight"]) == 4
    assert shapes["first_stage_model.decoder.up.1.upsample.conv.weight"][0] == 32
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in shapes


def test_every_weight_survives_round_trip(pipelines):
    from_folder, from_file = pipelines
    for name in COMPONENTS:
        expected = getattr(from_folder, name).state_dict()
        actual = getattr(from_file, name).state_dict()
        assert set(actual) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"


def test_single_file_generates_the_same_image(pipelines):
    from_folder, from_file = pipelines
    expected, actual = _generate(from_folder), _generate(from_file)
    assert actual.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(actual - expected).max() < 1e-5


def test_save_accepts_loaded_model_and_writes_atomically(tiny_model_dir, single_file, tmp_path):
    target = tmp_path / "out" / "model.safetensors"
    assert save_single_file(load_base(str(tiny_model_dir)), target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]
    assert read_checkpoint_shapes(target) == read_checkpoint_shapes(single_file)
    half = save_single_file(tiny_model_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    assert read_checkpoint_shapes(half) == read_checkpoint_shapes(single_file)
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(tiny_model_dir, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="model_index.json"):
        save_single_file(tmp_path, tmp_path / "x.safetensors")


def _sd15_shaped_pipeline():
    """SD 1.5's block structure (4 levels, 2 layers each, same block types) at tiny widths, random weights."""
    from diffusers import AutoencoderKL

    unet_config = load_sd15_config("unet")
    unet_config.update(
        block_out_channels=[16, 16, 32, 32], cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8
    )
    vae_config = load_sd15_config("vae")
    vae_config.update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4)
    torch.manual_seed(0)
    return SimpleNamespace(
        unet=build_unet(unet_config),
        vae=AutoencoderKL(**vae_config),
        text_encoder=build_text_encoder(
            {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
        ),
    )


def test_sd15_block_layout_inverts_diffusers_conversion():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    pipe = _sd15_shaped_pipeline()
    ldm = ldm_state_dict(pipe)
    # well-known SD 1.5 checkpoint names
    for key in (
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.decoder.up.0.block.2.conv1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
    ):
        assert key in ldm, key
    assert not any(key.startswith("first_stage_model.decoder.up.0.upsample") for key in ldm)
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}
    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)),
        "text_encoder": text,
    }
    for name in COMPONENTS:
        expected = getattr(pipe, name).state_dict()
        assert set(back[name]) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(back[name][key], tensor), f"{name}.{key}"


def test_sd15_sized_config_maps_every_key():
    """The real SD 1.5 configs, built on the meta device (no memory, no weights): names and shapes only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(**load_sd15_config("unet")),
            vae=AutoencoderKL(**load_sd15_config("vae")),
            text_encoder=build_text_encoder(load_sd15_config("text_encoder")),
        )
    ldm = ldm_state_dict(pipe)
    # 686 UNet + 248 VAE + 196 CLIP tensors, as in the released SD 1.5 checkpoint (minus the position_ids buffer)
    assert len(ldm) == 686 + 248 + 196
    assert ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert ldm["first_stage_model.encoder.mid.attn_1.k.weight"].shape == (512, 512, 1, 1)
    assert detect_family_from_checkpoint({key: tensor.shape for key, tensor in ldm.items()}) is SD1


def test_detect_family(single_file):
    assert detect_family_from_checkpoint(single_file) is SD1
    assert detect_family_from_checkpoint(read_checkpoint_shapes(single_file)) is SD1
    assert detect_family_from_checkpoint(list(read_checkpoint_shapes(single_file))) is SD1
    unet_only = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert detect_family_from_checkpoint(unet_only) is SD1


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (
            [
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                "conditioner.embedders.1.model.positional_embedding",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            ],
            SDXL,
        ),
        (["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.out.2.weight"], SD2V),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, SD2V),
        ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}, SDXL),
    ],
)
def test_detect_other_families(keys, family):
    assert detect_family_from_checkpoint(keys) is family


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            ["conditioner.embedders.0.model.text_projection", "model.diffusion_model.out.2.weight"],
            r"conditioner\.embedders.*refiner",
        ),
        ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280)}, "refiner"),
        (["model.diffusion_model.out.2.weight"], "cannot tell"),
        (["lora_unet_down_blocks_0.alpha"], "not a Stable Diffusion checkpoint"),
    ],
)
def test_detect_family_refuses(keys, message):
    with pytest.raises(ValueError, match=message):
        detect_family_from_checkpoint(keys)


def test_pickle_checkpoint_is_refused(single_file, tiny_model_dir, tmp_path):
    pickle_path = tmp_path / "model.ckpt"
    pickle_path.write_bytes(single_file.read_bytes())
    with pytest.raises(ValueError, match="pickle"):
        load_base(str(pickle_path), config_dir=str(tiny_model_dir))


@pytest.mark.parametrize("keep", [0, 5, 200, "half"])
def test_truncated_checkpoint_is_a_value_error(single_file, tiny_model_dir, tmp_path, keep):
    data = single_file.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(ValueError):
        load_base(str(broken), config_dir=str(tiny_model_dir))
    with pytest.raises(ValueError, match="not a readable"):
        detect_family_from_checkpoint(broken)
