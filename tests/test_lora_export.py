"""LoRA injection and the kohya/CivitAI export: keys, shapes, alphas, metadata, hashes, and interop."""

import hashlib
import json
import struct

import pytest
import torch
from accelerate import init_empty_weights
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from studio.adapters import (
    export_adapter,
    kohya_state_dict,
    read_adapter,
    save_adapter,
    training_metadata,
)
from studio.models import SD1, load_base
from studio.tiny import load_sd15_config
from tests.helpers import hand_merge, randomize_lora_up, render
from training.lora import LoraSpec, inject_lora, unet_targets


def _adapted(tiny_model_dir, spec):
    base = load_base(str(tiny_model_dir))
    inject_lora(base.unet, base.text_encoders, spec)
    randomize_lora_up([base.unet, *base.text_encoders])
    return base


def _metadata(**extra):
    return training_metadata(
        SD1,
        rank=4,
        alpha=2.0,
        network_args={"unet_targets": "kohya"},
        title="inky",
        trigger_phrase="sks",
        training={"steps": 10},
        dataset={
            "tag_frequency": {"data": {"a red circle": 3}},
            "dataset_dirs": {"data": {"n_repeats": 1, "img_count": 3}},
        },
        **extra,
    )


def test_target_presets_select_the_documented_modules(tiny_model_dir):
    base = load_base(str(tiny_model_dir))
    counts = inject_lora(base.unet, base.text_encoders, LoraSpec(rank=4, unet_targets="cross_attn"))
    names = [n for n, m in base.unet.named_modules() if isinstance(m, LoraLayer)]
    assert counts["unet"] == len(names) > 0
    assert all(".attn2." in n for n in names)
    assert counts["text_encoder"] == 4 * base.text_encoders[0].config.num_hidden_layers
    trainable = [n for m in (base.unet, *base.text_encoders) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_sd15_kohya_preset_has_192_unet_and_72_te_modules_and_rank8_is_9_mib_locon_278(tmp_path):
    with init_empty_weights():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = UNet2DConditionModel(**load_sd15_config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**load_sd15_config("text_encoder")))
    unet.to_empty(device="cpu")
    text_encoder.to_empty(device="cpu")
    assert len(unet_targets(unet, LoraSpec(unet_targets="locon"))) == 278  # kohya's count with conv_dim set
    counts = inject_lora(
        unet, [text_encoder], LoraSpec(rank=8, alpha=8, unet_targets="kohya", text_encoder_targets="attn_mlp")
    )
    assert counts == {"unet": 192, "text_encoder": 72}
    path = tmp_path / "sd15_r8.safetensors"
    save_adapter(path, kohya_state_dict(SD1, unet, [text_encoder]), _metadata(), dtype="fp16")
    data = path.read_bytes()
    payload = len(data) - 8 - struct.unpack("<Q", data[:8])[0]
    assert round(payload / 2**20, 1) == 9.0
    names = read_adapter(path).module_names
    assert sum(n.startswith("lora_unet_") for n in names) == 192
    assert sum(n.startswith("lora_te_text_model_encoder_layers_") for n in names) == 72


def test_exported_keys_shapes_alphas_dtype_and_metadata_follow_formats_md(tiny_model_dir, tmp_path):
    base = _adapted(tiny_model_dir, LoraSpec(rank=4, alpha=2.0, unet_targets="kohya", text_encoder_targets="attn"))
    path = tmp_path / "inky.safetensors"
    save_adapter(path, kohya_state_dict(SD1, base.unet, base.text_encoders), _metadata())
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
        assert keys == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        for module in modules:
            down, up, alpha = (f.get_tensor(f"{module}.{s}") for s in ("lora_down.weight", "lora_up.weight", "alpha"))
            assert down.dtype == up.dtype == alpha.dtype == torch.float16
            assert alpha.dim() == 0 and alpha.item() == 2.0
            assert down.shape[0] == 4 and up.shape[1] == 4
            if "proj_in" in module:  # a 1x1 conv in SD1.x
                assert down.dim() == 4 and down.shape[2:] == (1, 1)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert json.loads(meta["ss_network_args"]) == {"unet_targets": "kohya"}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"a red circle": 3}}


def test_hashes_match_an_independent_computation(tiny_model_dir, tmp_path):
    # rank 160 in fp32 makes the file larger than the 1 MiB offset of the legacy hash
    base = _adapted(tiny_model_dir, LoraSpec(rank=160, unet_targets="kohya", text_encoder_targets="attn_mlp"))
    path = tmp_path / "h.safetensors"
    meta = save_adapter(path, kohya_state_dict(SD1, base.unet, base.text_encoders), _metadata(), dtype="fp32")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()
    # the legacy hash is defined on the file as kohya writes it before user metadata: only ss_* keys
    from safetensors.torch import save

    adapter = read_adapter(path)
    ss_only = save(adapter.tensors, {k: v for k, v in adapter.metadata.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_private_export_drops_captions_and_folders_and_rehashes(tiny_model_dir, tmp_path):
    base = _adapted(tiny_model_dir, LoraSpec(rank=4))
    source = tmp_path / "full.safetensors"
    save_adapter(source, kohya_state_dict(SD1, base.unet, base.text_encoders), _metadata())
    out = tmp_path / "public.safetensors"
    meta = export_adapter(source, out, include_dataset_metadata=False, title="Inky Lines")
    exported = read_adapter(out)
    assert "ss_tag_frequency" not in exported.metadata and "ss_dataset_dirs" not in exported.metadata
    assert exported.metadata["modelspec.title"] == "Inky Lines" == meta["ss_output_name"]
    original = read_adapter(source)
    assert exported.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(exported.tensors[k], original.tensors[k]) for k in original.tensors)
    assert exported.metadata["sshs_model_hash"] == original.metadata["sshs_model_hash"]


def test_pickle_adapters_are_refused_without_loading(tmp_path):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"\x80\x04cos\nsystem\n")
    with pytest.raises(ValueError, match="pickle"):
        read_adapter(evil)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable"):
        read_adapter(broken)


def assert_loads_in_diffusers_like_a_hand_merge(model_dir, path):
    """diffusers' own loader adapts every module in the file, and its output equals our hand merge."""
    adapter = read_adapter(path)
    fresh = load_base(str(model_dir)).pipeline
    fresh.load_lora_weights(str(path), adapter_name="under_test")
    loaded = sum(
        isinstance(m, LoraLayer) and "under_test" in m.lora_A
        for model in (fresh.unet, fresh.text_encoder)
        for m in model.modules()
    )
    assert loaded == len(adapter.module_names), "diffusers left some modules of the file unmatched"
    merged = load_base(str(model_dir)).pipeline
    assert hand_merge(merged, [(path, 1.0, 1.0)]) == len(adapter.module_names)
    plain = render(load_base(str(model_dir)).pipeline)
    ours, theirs = render(merged), render(fresh)
    assert abs(ours - theirs).max() < 1e-4
    assert abs(ours - plain).max() > 1e-2, "the adapter should change the image"


def test_export_loads_in_diffusers_and_equals_hand_merged_weights(tiny_model_dir, tmp_path):
    base = _adapted(tiny_model_dir, LoraSpec(rank=4, alpha=2.0, unet_targets="kohya", text_encoder_targets="attn_mlp"))
    path = tmp_path / "interop.safetensors"
    save_adapter(path, kohya_state_dict(SD1, base.unet, base.text_encoders), _metadata(), dtype="fp16")
    assert_loads_in_diffusers_like_a_hand_merge(tiny_model_dir, path)


def test_locon_adapts_resnet_convs_and_loads_in_diffusers_like_a_hand_merge(tiny_model_dir, tmp_path):
    base = _adapted(tiny_model_dir, LoraSpec(rank=4, alpha=2.0, unet_targets="locon", text_encoder_targets=None))
    path = tmp_path / "locon.safetensors"
    save_adapter(path, kohya_state_dict(SD1, base.unet, base.text_encoders), _metadata(), dtype="fp32")
    tensors = read_adapter(path).tensors
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    down = tensors[f"{conv1}.lora_down.weight"]
    assert down.shape[0] == 4 and down.shape[2:] == (3, 3)  # [r, in, 3, 3], the FORMATS.md LoCon column
    assert tensors[f"{conv1}.lora_up.weight"].shape[1:] == (4, 1, 1)
    for name in ("down_blocks_0_downsamplers_0_conv", "up_blocks_0_upsamplers_0_conv", "mid_block_resnets_0_conv2"):
        assert f"lora_unet_{name}.lora_down.weight" in tensors, name
    assert_loads_in_diffusers_like_a_hand_merge(tiny_model_dir, path)
