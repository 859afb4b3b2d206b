"""Training and generation across families: SD 2.x (512 epsilon, 768 v), SDXL (two text encoders, pooled
embedding, size/crop conditioning) and clip skip, checked against diffusers' own loader and prompt encoder."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from studio.adapters import read_adapter
from studio.conditioning import encode_prompts
from studio.generate import GenerationRequest, LoraRequest, generate
from studio.infotext import parse_infotext
from studio.models import load_base, pipeline_class
from studio.tiny import build_tiny_pipeline
from tests.helpers import write_style_images
from training.config import TrainConfig
from training.data import size_conditioning
from training.trainer import Trainer, train

PROMPT = "sks, a red circle"
EXPECTED_METADATA = {
    "sd2": {
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2",
        "modelspec.architecture": "stable-diffusion-v2-512/lora",
        "modelspec.prediction_type": "epsilon",
        "ss_clip_skip": "1",
    },
    "sd2v": {
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2_v",
        "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
        "modelspec.prediction_type": "v",
        "ss_clip_skip": "1",
    },
    "sdxl": {
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.prediction_type": "epsilon",
        "ss_clip_skip": "None",
    },
}
TE_PREFIXES = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sd2v": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Tiny diffusers folders of the SD 2.x and SDXL families."""
    return {f: build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{f}"), seed=1, family=f) for f in EXPECTED_METADATA}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two captioned 64x64 training images."""
    return write_style_images(tmp_path_factory.mktemp("data"), count=2)


def _config(model_dir, data_dir, out, **overrides) -> TrainConfig:
    values = dict(
        base=str(model_dir),
        data_dir=str(data_dir),
        output=str(out),
        resolution=32,
        rank=4,
        alpha=4.0,
        max_train_steps=4,
        batch_size=2,
        unet_lr=2e-2,
        text_encoder_lr=2e-2,
        unet_targets="kohya",
        train_text_encoder=True,
        text_encoder_targets="attn_mlp",
        save_dtype="fp32",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _request(**overrides) -> GenerationRequest:
    values = dict(prompt=PROMPT, seed=5, steps=3, cfg=5.0, width=32, height=32)
    values.update(overrides)
    return GenerationRequest(**values)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _largest_up(tensors, prefix: str) -> float:
    ups = [t.abs().max().item() for k, t in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
    assert ups, f"no {prefix} modules in the file"
    return max(ups)


@pytest.mark.parametrize("family", ["sd2", "sd2v", "sdxl"])
def test_trained_adapter_loads_in_diffusers_and_renders_like_our_generation(family, family_dirs, data_dir, tmp_path):
    model_dir = family_dirs[family]
    result = train(_config(model_dir, data_dir, tmp_path / f"{family}.safetensors"))
    adapter = read_adapter(result.output)
    for prefix in ("lora_unet_", *TE_PREFIXES[family]):
        assert _largest_up(adapter.tensors, prefix) > 1e-3, prefix
    assert {k: adapter.metadata[k] for k in EXPECTED_METADATA[family]} == EXPECTED_METADATA[family]
    if family == "sdxl":  # the first encoder's last layer feeds nothing (penultimate states); the second's is pooled
        layers = {k.split("_self_attn")[0].split("_mlp")[0] for k in adapter.tensors if k.startswith("lora_te")}
        assert layers == {f"lora_te{i}_text_model_encoder_layers_{n}" for i, n in ((1, 0), (2, 0), (2, 1))}

    base = load_base(str(model_dir))
    plain = generate(base, _request()).images[0]
    ours = generate(base, _request(loras=[LoraRequest(str(result.output))])).images[0]

    theirs = pipeline_class(base.family).from_pretrained(model_dir)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(result.output))
    components = set(theirs.get_list_adapters())
    assert components == {"unet", *base.family.text_encoder_attrs}, components
    image = theirs(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=5.0,
        width=32,
        height=32,
        generator=[torch.Generator("cpu").manual_seed(5)],
    ).images[0]
    assert np.abs(_pixels(image) - _pixels(ours)).max() <= 1
    assert np.abs(_pixels(ours) - _pixels(plain)).mean() > 2.0


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_training_conditioning_equals_the_pipeline_prompt_encoding(family, family_dirs):
    base = load_base(str(family_dirs[family]))
    for prompt in (PROMPT, ""):
        with torch.no_grad():
            ours = encode_prompts(base.family, base.tokenizers, base.text_encoders, [prompt])
            encoded = base.pipeline.encode_prompt(
                prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        assert torch.allclose(ours.hidden, encoded[0], atol=1e-6)
        if base.family.is_sdxl:
            assert ours.hidden.shape[-1] == sum(te.config.hidden_size for te in base.text_encoders)
            assert torch.allclose(ours.pooled, encoded[2], atol=1e-6)
        else:
            assert ours.pooled is None


def test_sdxl_time_ids_record_the_original_size_and_the_crop(family_dirs, tmp_path):
    wide = write_style_images(tmp_path / "wide", count=1, size=(96, 64))  # 3:2, cropped to the square 64 bucket
    base = load_base(str(family_dirs["sdxl"]))
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist())

    base.unet.register_forward_pre_hook(record, with_kwargs=True)
    config = _config(family_dirs["sdxl"], wide, tmp_path / "xl.safetensors", resolution=64, max_train_steps=1)
    train(config.replace(batch_size=1, min_bucket_resolution=64, train_text_encoder=False), base=base)
    # (original height, width, crop top, crop left, target height, width): 96x64 scaled to 96x64, centre crop
    assert seen[0] == [[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]]


def test_a_random_crop_of_a_mirrored_image_is_measured_from_its_new_left_edge():
    plain = size_conditioning((96, 64), (64, 64), center=False, flip=False, rng=random.Random(3))
    mirrored = size_conditioning((96, 64), (64, 64), center=False, flip=True, rng=random.Random(3))
    assert plain.original_size == (64, 96) and plain.target_size == (64, 64)
    assert plain.crop_top_left[1] != 16  # not the centre, where mirroring changes nothing
    assert mirrored.crop_top_left == (0, 96 - 64 - plain.crop_top_left[1])


def test_sdxl_text_embedding_cache_trains_like_encoding_every_step(family_dirs, data_dir, tmp_path):
    """With frozen text encoders, cached (hidden, pooled) conditioning gives the very same adapter."""
    config = _config(family_dirs["sdxl"], data_dir, tmp_path / "a.safetensors", train_text_encoder=False)
    cached = read_adapter(train(config).output).tensors
    fresh = read_adapter(
        train(config.replace(output=str(tmp_path / "b.safetensors"), cache_text_embeddings=False)).output
    ).tensors
    assert cached.keys() == fresh.keys()
    assert max((cached[k] - fresh[k]).abs().max().item() for k in cached) < 1e-6


def test_clip_skip_2_conditions_on_the_penultimate_layer(tiny_model_dir):
    """With clip skip 2 the last text-encoder layer no longer matters; with 1 it does. The infotext says which."""
    base = load_base(str(tiny_model_dir))
    last, second = generate(base, _request()), generate(base, _request(clip_skip=2))
    assert "Clip skip" not in parse_infotext(last.infotexts[0])[2]
    assert parse_infotext(second.infotexts[0])[2]["Clip skip"] == "2"
    assert np.abs(_pixels(last.images[0]) - _pixels(second.images[0])).mean() > 1.0

    with torch.no_grad():
        for param in base.pipeline.text_encoder.encoder.layers[-1].parameters():
            param.mul_(-3.0)
    assert np.array_equal(_pixels(generate(base, _request(clip_skip=2)).images[0]), _pixels(second.images[0]))
    assert not np.array_equal(_pixels(generate(base, _request()).images[0]), _pixels(last.images[0]))


def test_training_with_clip_skip_2_learns_something_else_and_says_so(tiny_model_dir, data_dir, tmp_path):
    one = train(_config(tiny_model_dir, data_dir, tmp_path / "one.safetensors"))
    two = train(_config(tiny_model_dir, data_dir, tmp_path / "two.safetensors", clip_skip=2))
    a, b = read_adapter(one.output), read_adapter(two.output)
    assert a.metadata["ss_clip_skip"] == "1" and b.metadata["ss_clip_skip"] == "2"
    # the tiny text encoder has two layers: with clip skip 2 only the first one's output is used, and trained
    assert any("encoder_layers_1_" in k for k in a.tensors)
    assert not any("encoder_layers_1_" in k for k in b.tensors)
    shared = [k for k in a.tensors if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in shared) > 1e-4


def test_clip_skip_is_refused_for_sdxl_by_name(family_dirs, data_dir, tmp_path):
    base = load_base(str(family_dirs["sdxl"]))
    with pytest.raises(ValueError, match="clip_skip 2 does not apply to SDXL"):
        generate(base, _request(clip_skip=2))
    config = _config(family_dirs["sdxl"], data_dir, tmp_path / "x.safetensors", clip_skip=2)
    with pytest.raises(ValueError, match="does not apply to SDXL"):
        Trainer(config, base=base).run()
    with pytest.raises(ValueError, match="clip_skip"):
        _request(clip_skip=0)


def test_clip_skip_flags_reach_the_train_config_and_the_generation_request(tmp_path):
    from studio.cli import build_generate_request, build_parser, build_train_config

    parser = build_parser()
    train_args = parser.parse_args(["train", "--data", str(tmp_path), "--out", "x.safetensors", "--clip-skip", "2"])
    assert build_train_config(train_args).clip_skip == 2
    assert build_train_config(parser.parse_args(["train"])).clip_skip == 1
    gen_args = parser.parse_args(["generate", "--prompt", "a cat", "--out", str(tmp_path), "--clip-skip", "2"])
    assert build_generate_request(gen_args).clip_skip == 2
    with pytest.raises(ValueError, match="clip_skip"):
        build_train_config(parser.parse_args(["train", "--clip-skip", "0"]))


def test_the_train_and_generate_tabs_pass_clip_skip_on(tiny_model_dir, data_dir, tmp_path):
    from studio.library import Workspace
    from studio.ui import generate_tab, train_tab
    from studio.ui.common import ModelCache

    workspace = Workspace(tmp_path / "ws")
    workspace.import_folder("shapes", data_dir)
    values = train_tab.default_values(dataset="shapes", clip_skip=2)
    assert train_tab.build_config(workspace, str(tiny_model_dir), *train_tab.as_args(values)).clip_skip == 2
    with pytest.raises(ValueError, match="clip skip"):
        train_tab.build_config(workspace, str(tiny_model_dir), *train_tab.as_args({**values, "clip_skip": 1.5}))

    settings = dict(prompt=PROMPT, negative="", seed_mode="fixed", seed=1, steps=2, cfg=5.0, width=32, height=32)
    settings.update(sampler="Default", batch=1)
    args = [settings[k] for k in generate_tab.SETTINGS] + [None, 1.0, True, False, 1.0, 1.0] * generate_tab.SLOTS
    models = ModelCache()
    info = generate_tab.run(models, workspace, str(tiny_model_dir), *args, clip_skip=2)[2]
    assert "Clip skip: 2" in info
    assert "Clip skip" not in generate_tab.run(models, workspace, str(tiny_model_dir), *args)[2]


def test_an_sdxl_batch_renders_each_image_from_its_own_seed_at_the_native_size(family_dirs, tmp_path):
    base = load_base(str(family_dirs["sdxl"]))
    batch = generate(base, _request(width=0, height=0, batch=2, negative_prompt="blurry"), out_dir=tmp_path)
    single = generate(base, _request(width=0, height=0, seed=6, negative_prompt="blurry"))
    assert batch.seeds == [5, 6] and batch.images[0].size == (base.native_size, base.native_size)
    assert np.array_equal(_pixels(batch.images[1]), _pixels(single.images[0]))
    assert not np.array_equal(_pixels(batch.images[0]), _pixels(batch.images[1]))
    params = parse_infotext(batch.infotexts[1])[2]
    assert params["Seed"] == "6" and params["Size"] == f"{base.native_size}x{base.native_size}"
    assert len(batch.paths) == 2 and all(p.is_file() for p in batch.paths)
