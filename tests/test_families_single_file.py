"""SD 2.x (512, 768-v) and SDXL as single-file checkpoints: write, detect, load offline, shipped configs, tokenizer."""

from __future__ import annotations

import fnmatch
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.clip_tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
from studio.convert import (
    detect_family_from_checkpoint,
    ldm_state_dict,
    read_checkpoint_metadata,
    read_checkpoint_shapes,
    save_single_file,
)
from studio.models import (
    CONFIGS_DIR,
    SD1,
    SD2,
    SD2V,
    SDXL,
    SHIPPED_CONFIG_NAMES,
    get_family,
    load_base,
    shipped_config_dir,
)
from studio.tiny import build_tiny_pipeline, load_config

FAMILIES = ("sd2", "sd2v", "sdxl")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """A tiny model of one family: its diffusers folder, its single file, and both loaded through load_base."""
    family = request.param
    workdir = tmp_path_factory.mktemp(family)
    folder = build_tiny_pipeline(workdir / "model", seed=1, family=family)
    single = save_single_file(folder, workdir / f"{family}.safetensors")
    return SimpleNamespace(
        family=get_family(family),
        folder=folder,
        file=single,
        from_folder=load_base(str(folder)),
        from_file=load_base(str(single), config_dir=str(folder)),
    )


def _components(family) -> tuple[str, ...]:
    return ("unet", "vae", *family.text_encoder_attrs)


def _generate(pipeline) -> np.ndarray:
    return pipeline(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_round_trip_keeps_every_weight(tiny):
    assert tiny.from_file.family is tiny.family
    for name in _components(tiny.family):
        expected = getattr(tiny.from_folder.pipeline, name).state_dict()
        actual = getattr(tiny.from_file.pipeline, name).state_dict()
        assert set(actual) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"


def test_round_trip_uses_the_config_folders_tokenizers(tiny):
    for expected, actual in zip(tiny.from_folder.tokenizers, tiny.from_file.tokenizers, strict=True):
        assert actual.get_vocab() == expected.get_vocab() and actual.pad_token == expected.pad_token


def test_round_trip_generates_the_same_image(tiny):
    expected, actual = _generate(tiny.from_folder.pipeline), _generate(tiny.from_file.pipeline)
    assert actual.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(actual - expected).max() < 1e-5
    assert tiny.from_file.pipeline.scheduler.config.prediction_type == tiny.family.prediction_type


def test_file_has_the_family_layout(tiny):
    shapes = read_checkpoint_shapes(tiny.file)
    if tiny.family.is_sdxl:
        prefixes = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
        # the pooled-text + size/crop embedding: 6 numbers x 8 + 32 pooled = 80 inputs, time-embedding wide
        assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (128, 80)
        assert shapes["model.diffusion_model.label_emb.0.2.weight"] == (128, 128)
        assert shapes["conditioner.embedders.1.model.text_projection"] == (32, 32)
        # SDXL's second level has 2 transformer layers per attention in the tiny model
        assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in shapes
        open_clip = "conditioner.embedders.1.model."
    else:
        prefixes = ("cond_stage_model.model.",)
        assert not any(key.startswith("cond_stage_model.transformer.") for key in shapes)
        open_clip = "cond_stage_model.model."
    for prefix in ("model.diffusion_model.", "first_stage_model.", *prefixes):
        assert any(key.startswith(prefix) for key in shapes), prefix
    assert shapes[open_clip + "transformer.resblocks.1.attn.in_proj_weight"] == (96, 32)  # q, k, v stacked
    assert shapes[open_clip + "transformer.resblocks.1.attn.in_proj_bias"] == (96,)
    assert shapes[open_clip + "positional_embedding"] == (77, 32)
    assert open_clip + "transformer.resblocks.0.mlp.c_fc.weight" in shapes
    assert open_clip + "ln_final.weight" in shapes
    assert not any("q_proj" in key or "self_attn" in key for key in shapes if key.startswith(open_clip))
    assert read_checkpoint_metadata(tiny.file)["modelspec.architecture"] == tiny.family.modelspec_architecture


def test_detection_tells_the_family(tiny):
    assert detect_family_from_checkpoint(tiny.file) is tiny.family
    shapes = read_checkpoint_shapes(tiny.file)
    if tiny.family.lineage == "sd2":
        # key names alone cannot tell SD 2.x 512 from 768-v: the caller's word, else the fallback
        assert detect_family_from_checkpoint(shapes) is SD2V
        assert detect_family_from_checkpoint(list(shapes), prediction_type="epsilon") is SD2
        assert detect_family_from_checkpoint(shapes, fallback_prediction_type="epsilon") is SD2
    else:
        assert detect_family_from_checkpoint(list(shapes)) is SDXL


def test_written_file_inverts_diffusers_conversion(tiny):
    """diffusers' own LDM -> diffusers converters, applied to the written file, give back every weight exactly."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = tiny.from_folder.pipeline
    checkpoint = load_file(str(tiny.file))
    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config)),
    }
    if tiny.family.is_sdxl:
        clip = convert_ldm_clip_checkpoint(checkpoint)
        back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in clip.items()}
        back["text_encoder_2"] = convert_open_clip_checkpoint(
            pipe.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model."
        )
    else:
        text = convert_open_clip_checkpoint(pipe.text_encoder, checkpoint, prefix="cond_stage_model.model.")
        back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in text.items()}
    for name in _components(tiny.family):
        expected = getattr(pipe, name).state_dict()
        assert set(back[name]) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(back[name][key], tensor), f"{name}.{key}"


LDM_CONFIG_V = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
"""


def _without_metadata(path: Path, target: Path) -> Path:
    save_file(load_file(str(path)), str(target))
    return target


def test_sd2_prediction_type_comes_from_argument_metadata_or_config_folder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd2_prediction")
    eps_folder = build_tiny_pipeline(workdir / "eps", seed=2, family="sd2")
    v_folder = build_tiny_pipeline(workdir / "v", seed=2, family="sd2v")
    written = save_single_file(eps_folder, workdir / "eps.safetensors")
    bare = _without_metadata(written, workdir / "bare.safetensors")

    def loaded(path, folder, prediction_type=None):
        base = load_base(str(path), config_dir=str(folder), prediction_type=prediction_type)
        return base.family, base.pipeline.scheduler.config.prediction_type

    # the file's model-spec header says epsilon, even when loaded into a v-prediction folder
    assert loaded(written, v_folder) == (SD2, "epsilon")
    # without a header, the config folder's scheduler decides
    assert loaded(bare, eps_folder) == (SD2, "epsilon")
    assert loaded(bare, v_folder) == (SD2V, "v_prediction")
    # A1111's convention: an LDM config of the same name beside the checkpoint
    bare.with_suffix(".yaml").write_text(LDM_CONFIG_V)
    assert loaded(bare, eps_folder) == (SD2V, "v_prediction")
    bare.with_suffix(".yaml").write_text(LDM_CONFIG_V.replace('    parameterization: "v"\n', ""))
    assert loaded(bare, v_folder) == (SD2, "epsilon")  # LDM's default parameterization is eps
    # an explicit prediction type wins over all of them
    assert loaded(written, eps_folder, "v_prediction") == (SD2V, "v_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        load_base(str(written), config_dir=str(eps_folder), prediction_type="v")


def _meta_pipeline(name: str) -> SimpleNamespace:
    """The shipped real-size configs of `name` as modules on the meta device (names and shapes, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family_name = {folder: family for family, folder in SHIPPED_CONFIG_NAMES.items()}[name]
    folder = shipped_config_dir(get_family(family_name))
    with torch.device("meta"):
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(**load_config(name, "unet")),
            vae=AutoencoderKL(**load_config(name, "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**load_config(name, "text_encoder"))),
            scheduler=SimpleNamespace(config=SimpleNamespace(**load_config(name, "scheduler"))),
        )
        if (folder / "text_encoder_2").is_dir():
            config = CLIPTextConfig(**load_config(name, "text_encoder_2"))
            pipe.text_encoder_2 = CLIPTextModelWithProjection(config)
    return pipe


def _millions(module) -> float:
    return sum(parameter.numel() for parameter in module.parameters()) / 1e6


@pytest.mark.parametrize(
    ("name", "unet", "text_encoders"),
    [
        ("sd15", 859.52, (123.06,)),
        ("sd21_base", 865.91, (340.39,)),
        ("sd21_768v", 865.91, (340.39,)),
        ("sdxl_base", 2567.46, (123.06, 694.66)),
    ],
)
def test_shipped_configs_have_the_published_parameter_counts(name, unet, text_encoders):
    pipe = _meta_pipeline(name)
    assert round(_millions(pipe.unet), 2) == unet
    assert round(_millions(pipe.vae), 2) == 83.65
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    assert tuple(round(_millions(encoder), 2) for encoder in encoders) == text_encoders


@pytest.mark.parametrize(
    ("family", "scheduler", "prediction_type", "size", "pad_tokens"),
    [
        (SD1, "PNDMScheduler", "epsilon", 512, {"tokenizer": "<|endoftext|>"}),
        (SD2, "PNDMScheduler", "epsilon", 512, {"tokenizer": "!"}),
        (SD2V, "DDIMScheduler", "v_prediction", 768, {"tokenizer": "!"}),
        (SDXL, "EulerDiscreteScheduler", "epsilon", 1024, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}),
    ],
)
def test_shipped_config_folders_describe_their_family(family, scheduler, prediction_type, size, pad_tokens):
    from studio.models import pipeline_class

    folder = shipped_config_dir(family)
    index = pipeline_class(family).load_config(str(folder))
    assert index["_class_name"] == pipeline_class(family).__name__
    assert index["scheduler"] == ["diffusers", scheduler]
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config.get("prediction_type", "epsilon") == prediction_type
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["sample_size"] * 8 == size == family.resolution
    for name, pad in pad_tokens.items():
        settings = json.loads((folder / name / "tokenizer_config.json").read_text())
        assert (settings["pad_token"], settings["model_max_length"]) == (pad, 77)
        # no vocabulary: it is built from the one shipped BPE file instead
        assert not {"vocab.json", "tokenizer.json"} & {path.name for path in (folder / name).iterdir()}
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))


def _text_shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {key.removeprefix("text_model."): tuple(tensor.shape) for key, tensor in state_dict.items()}


@pytest.mark.parametrize(("name", "family", "model_type"), [("sd21_768v", SD2V, "v2"), ("sdxl_base", SDXL, "xl_base")])
def test_real_configs_map_every_key_to_a_distinct_checkpoint_key(name, family, model_type):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    pipe = _meta_pipeline(name)
    ldm = ldm_state_dict(pipe)  # raises if two weights land on one key or a weight has no place
    attrs = ["unet", "vae", *family.text_encoder_attrs]
    open_clip = pipe.text_encoder_2 if family.is_sdxl else pipe.text_encoder
    fused = 4 * open_clip.config.num_hidden_layers  # q/k/v weights and biases become one in_proj each
    assert len(ldm) == sum(len(getattr(pipe, attr).state_dict()) for attr in attrs) - fused
    assert infer_diffusers_model_type(ldm) == model_type  # diffusers' own sniffing agrees on the family
    assert detect_family_from_checkpoint({key: tensor.shape for key, tensor in ldm.items()}) is family
    unet_back = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    assert {k: v.shape for k, v in unet_back.items()} == {k: v.shape for k, v in pipe.unet.state_dict().items()}
    prefix = "conditioner.embedders.1.model." if family.is_sdxl else "cond_stage_model.model."
    text_back = convert_open_clip_checkpoint(open_clip, ldm, prefix=prefix)
    assert _text_shapes(text_back) == _text_shapes(open_clip.state_dict())
    if family.is_sdxl:
        assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
        assert ldm["model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"].shape == (
            1280,
            2048,
        )
        assert ldm["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
        assert ldm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
        assert ldm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in ldm
    else:
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear projection
        assert ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, 1024)


@pytest.fixture(scope="module")
def tokenizer():
    """The CLIP tokenizer built from the shipped BPE file."""
    return clip_tokenizer()


def test_clip_vocabulary_is_complete(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!"]) == [49406, 49407, 0]


@pytest.mark.parametrize(
    ("prompt", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("the black dog", [49406, 518, 1449, 1929, 49407]),
        (
            "a photo of an astronaut riding a horse on mars",
            [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
        ),
        # "CoreML" -> "core" + "ml</w>": a word split into several BPE pieces; case is folded
        (
            "Apple CoreML developer tools on a Macbook Air are fast",
            [49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407],
        ),
    ],
)
def test_clip_tokenizer_matches_the_reference_ids(tokenizer, prompt, ids):
    assert tokenizer(prompt).input_ids == ids


def test_open_clip_tokenizer_pads_with_exclamation_mark(tokenizer):
    open_clip = clip_tokenizer(pad_token="!")
    padded = open_clip("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {0} and len(padded) == 77
    assert tokenizer("a cat", padding="max_length", max_length=77).input_ids[4:] == [49407] * 73


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host name or open a connection is recorded and refused."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:] or args))
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _shipped_folder_with_tiny_shapes(family, tiny_folder: Path, target: Path) -> Path:
    """A copy of the shipped config folder of `family` whose weight configs are the tiny model's (everything else,
    model_index, scheduler and tokenizer settings, stays as shipped)."""
    shutil.copytree(shipped_config_dir(family), target)
    for component in ("unet", "vae", *family.text_encoder_attrs):
        shutil.copy(tiny_folder / component / "config.json", target / component / "config.json")
    return target


@pytest.mark.parametrize("family", [SD1, SD2, SD2V, SDXL], ids=lambda family: family.name)
def test_single_file_loads_offline_with_shipped_configs(family, no_network, tmp_path):
    folder = build_tiny_pipeline(tmp_path / "tiny", seed=3, family=family.name)
    single = save_single_file(folder, tmp_path / "tiny.safetensors")
    config_dir = _shipped_folder_with_tiny_shapes(family, folder, tmp_path / "config")
    base = load_base(str(single), config_dir=str(config_dir))
    assert no_network == []
    assert base.family is family
    shipped_scheduler = json.loads((shipped_config_dir(family) / "scheduler" / "scheduler_config.json").read_text())
    assert type(base.pipeline.scheduler).__name__ == shipped_scheduler["_class_name"]
    tokenizers = base.tokenizers
    assert [len(t) for t in tokenizers] == [CLIP_VOCAB_SIZE] * len(family.text_encoder_attrs)
    assert tokenizers[0].pad_token == ("!" if family.lineage == "sd2" else "<|endoftext|>")
    assert tokenizers[-1].pad_token == ("<|endoftext|>" if family is SD1 else "!")  # OpenCLIP pads with "!"
    assert tokenizers[-1]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = load_base(str(folder)).pipeline
    for attr in ("unet", *family.text_encoder_attrs):
        expected = getattr(reference, attr).state_dict()
        assert all(torch.equal(getattr(base.pipeline, attr).state_dict()[k], v) for k, v in expected.items()), attr


def test_default_config_folder_is_the_shipped_one_and_stays_offline(no_network, tmp_path):
    """Without config_dir the detected family's shipped (real-size) configs are used: a tiny file does not fit them,
    and finding that out touches no network."""
    folder = build_tiny_pipeline(tmp_path / "tiny", seed=4, family="sd2")
    single = save_single_file(folder, tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"(?i)size|shape"):
        load_base(str(single))
    assert no_network == []
    assert shipped_config_dir(detect_family_from_checkpoint(single)).name == "sd21_base"
    assert shipped_config_dir(SD2V).name == "sd21_768v" and shipped_config_dir(SD1).name == "sd15"


def test_every_shipped_config_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["studio"]
    shipped = [path.relative_to(CONFIGS_DIR.parent).as_posix() for path in CONFIGS_DIR.rglob("*") if path.is_file()]
    assert "configs/clip/bpe_simple_vocab_16e6.txt.gz" in shipped and "configs/clip/NOTICE" in shipped
    assert [name for name in shipped if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)] == []
