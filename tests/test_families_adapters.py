"""Adapters across families: SDXL's SGM kohya names, diffusers' loader agreeing with ours, other naming styles, and
refusing an adapter made for another family before anything is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapters import parse_adapter
from studio.compose import AdapterStack, load_adapter
from studio.models import load_base
from studio.tiny import build_tiny_pipeline
from tests.helpers import make_adapter
from tests.helpers import render as run


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Tiny diffusers folders of each family."""
    return {f: build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{f}"), seed=3, family=f) for f in ("sd2v", "sdxl")}


@pytest.fixture(scope="module")
def sdxl_adapter(family_dirs, tmp_path_factory):
    """A kohya adapter on the tiny SDXL model: UNet transformer modules and both text encoders, non-zero ups."""
    path = tmp_path_factory.mktemp("sdxl_lora") / "xl_style.safetensors"
    return make_adapter(family_dirs["sdxl"], path, seed=5, targets="kohya", te_targets="attn_mlp", std=0.5)


def _max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


def test_sdxl_export_uses_sgm_unet_names_and_te1_te2(sdxl_adapter):
    names = {key.split(".")[0] for key in load_file(sdxl_adapter)}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet and all(
        n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in unet
    )
    assert not any("down_blocks" in n or "up_blocks" in n for n in unet)
    # The tiny SDXL UNet: down block 1 (cross-attention, 2 transformer layers) is input_blocks.3 after conv_in,
    # down block 0 (one resnet) and its downsampler.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert {n.split("_text_model")[0] for n in names if n.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert parse_adapter(sdxl_adapter).family == "sdxl"  # te1/te2 say SDXL whatever the widths


def test_diffusers_loader_reads_our_sdxl_file_like_our_stack(family_dirs, sdxl_adapter):
    from diffusers import StableDiffusionXLPipeline

    ours = load_base(str(family_dirs["sdxl"]))
    plain = run(ours.pipeline)
    AdapterStack(ours).add(load_adapter(sdxl_adapter, ours), 1.0)
    with_ours = run(ours.pipeline)
    assert _max_diff(with_ours, plain) > 1e-2

    theirs = StableDiffusionXLPipeline.from_pretrained(family_dirs["sdxl"])
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(sdxl_adapter))
    assert _max_diff(run(theirs), with_ours) < 1e-4


def test_a_diffusers_format_sdxl_file_matches_the_same_modules(family_dirs, sdxl_adapter, tmp_path):
    """The same adapter saved the diffusers/PEFT way (unet.down_blocks..., text_encoder...) composes identically."""
    from peft.utils import get_peft_model_state_dict

    from studio.models import load_base as load
    from tests.helpers import randomize_lora_up
    from training.lora import LoraSpec, inject_lora

    base = load(str(family_dirs["sdxl"]))
    torch.manual_seed(7)
    inject_lora(
        base.unet, base.text_encoders, LoraSpec(rank=4, alpha=4.0, unet_targets="attn", text_encoder_targets="attn")
    )
    randomize_lora_up([base.unet, *base.text_encoders], seed=7, std=0.5)
    tensors = {}
    for prefix, model in (
        ("unet", base.unet),
        ("text_encoder", base.text_encoders[0]),
        ("text_encoder_2", base.text_encoders[1]),
    ):
        for key, value in get_peft_model_state_dict(model).items():
            tensors[f"{prefix}.{key}"] = value.contiguous()
    diffusers_file = tmp_path / "diffusers_style.safetensors"
    save_file(tensors, diffusers_file)

    parsed = parse_adapter(diffusers_file)
    fresh = load(str(family_dirs["sdxl"]))
    matched = load_adapter(diffusers_file, fresh)
    assert not matched.unmatched
    assert len(matched.patches) == len(parsed.modules) == len(tensors) // 2
    assert {component for component, _ in matched.patches} == {"unet", "text_encoder", "text_encoder_2"}
    plain = run(fresh.pipeline)
    AdapterStack(fresh).add(matched, 1.0)
    assert _max_diff(run(fresh.pipeline), plain) > 1e-2


def test_ldm_named_sd1_files_match_like_diffusers_named_ones(tiny_model_dir, tmp_path):
    """Some SD 1.x LoRAs in the wild name UNet modules by their LDM path (input_blocks_1_1_...)."""
    from studio.adapters import sgm_module_path

    source = make_adapter(tiny_model_dir, tmp_path / "diffusers_named.safetensors", seed=11)
    base = load_base(str(tiny_model_dir))
    renamed, changed = {}, 0
    paths = {n.replace(".", "_"): n for n, _ in base.unet.named_modules()}
    for key, value in load_file(source).items():
        name, _, rest = key.partition(".")
        if name.startswith("lora_unet_"):
            ldm = sgm_module_path(base.unet.config, paths[name.removeprefix("lora_unet_")])
            if ldm is not None and ldm.replace(".", "_") != name.removeprefix("lora_unet_"):
                name, changed = "lora_unet_" + ldm.replace(".", "_"), changed + 1
        renamed[f"{name}.{rest}"] = value
    assert changed > 0
    ldm_file = tmp_path / "ldm_named.safetensors"
    save_file(renamed, ldm_file)

    expected = load_base(str(tiny_model_dir))
    AdapterStack(expected).add(load_adapter(source, expected), 1.0)
    AdapterStack(base).add(load_adapter(ldm_file, base), 1.0)
    assert not load_adapter(ldm_file, base).unmatched
    assert _max_diff(run(base.pipeline), run(expected.pipeline)) < 1e-6


def _weights(base) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v.clone() for i, m in enumerate([base.unet, *base.text_encoders]) for k, v in m.state_dict().items()
    }


@pytest.mark.parametrize(
    ("target", "source", "message"),
    [
        ("tiny", "sdxl", "LoRA for SDXL models"),
        ("sd2v", "sdxl", "LoRA for SDXL models"),
        ("sdxl", "sd1_768", "LoRA for SD1 models"),
        ("tiny", "sd2_1024", "LoRA for SD2 models"),
    ],
)
def test_an_adapter_for_another_family_is_refused_before_anything_is_touched(
    target, source, message, tiny_model_dir, family_dirs, sdxl_adapter, tmp_path
):
    if source == "sdxl":
        path = sdxl_adapter
    else:
        width = 768 if source == "sd1_768" else 1024
        down = torch.randn(4, width) * 0.1
        tensors = {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(width, 4) * 0.1,
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0),
        }
        path = tmp_path / f"{source}.safetensors"
        save_file(tensors, path)
    base = load_base(str(tiny_model_dir if target == "tiny" else family_dirs[target]))
    before = _weights(base)
    stack = AdapterStack(base)
    with pytest.raises(ValueError, match=message):
        stack.add(load_adapter(path, base), 1.0)
    after = _weights(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sd2_512_and_768_v_adapters_are_one_lineage(family_dirs, tmp_path):
    """An SD 2.x adapter says sd_v2_v or sd_v2 in its metadata, but both fit either SD 2.x base."""
    adapter = make_adapter(family_dirs["sd2v"], tmp_path / "v.safetensors", seed=2)
    meta = parse_adapter(adapter).metadata
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    base = load_base(str(family_dirs["sd2v"]))
    assert base.family.name == "sd2v" and base.family.lineage == "sd2"
    plain = run(base.pipeline)
    AdapterStack(base).add(load_adapter(adapter, base), 1.0)
    assert _max_diff(run(base.pipeline), plain) > 1e-2


def test_real_sdxl_config_gives_kohyas_722_unet_and_264_text_encoder_modules():
    """Built from the shipped SDXL base configs on the meta device (no weights): kohya's LierLa set, SGM-named."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.adapters import kohya_te_name, kohya_unet_name
    from studio.models import SDXL
    from studio.tiny import load_config
    from training.lora import LoraSpec, text_encoder_targets, unet_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config("sdxl_base", "unet"))
        te1 = CLIPTextModel(CLIPTextConfig(**load_config("sdxl_base", "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**load_config("sdxl_base", "text_encoder_2")))
    spec = LoraSpec(rank=8, alpha=8, unet_targets="kohya", text_encoder_targets="attn_mlp")
    unet_names = {kohya_unet_name(SDXL, path, unet.config) for path in unet_targets(unet, spec)}
    te_names = {
        kohya_te_name(SDXL, i, path) for i, te in enumerate((te1, te2)) for path in text_encoder_targets(te, spec)
    }
    assert (len(unet_names), len(te_names)) == (722, 264)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0",
        "lora_unet_output_blocks_0_1_proj_in",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
    ):
        assert name in unet_names, name
    assert "lora_te1_text_model_encoder_layers_11_self_attn_q_proj" in te_names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in te_names


def test_sdxl_locon_names_are_kohyas_sgm_names():
    from diffusers import UNet2DConditionModel

    from studio.adapters import kohya_unet_name
    from studio.models import SDXL
    from studio.tiny import load_config
    from training.lora import LoraSpec, unet_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config("sdxl_base", "unet"))
    paths = unet_targets(unet, LoraSpec(unet_targets="locon"))
    names = {kohya_unet_name(SDXL, path, unet.config) for path in paths}
    assert len(names) == len(paths)
    for name in (
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_2_2_conv",
    ):
        assert name in names, name
