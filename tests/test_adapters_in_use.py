"""Adapters in use: import any LoRA, weighted composition, exact fusing and unloading, refusal of bad files."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import parse_adapter
from studio.compose import AdapterStack, load_adapter
from studio.models import load_base
from tests.helpers import hand_merge, make_adapter
from tests.helpers import render as run


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model_dir, folder / "style_a.safetensors", seed=1),
        "b": make_adapter(
            tiny_model_dir,
            folder / "style_b.safetensors",
            seed=2,
            rank=8,
            alpha=4.0,
            targets="attn",
            te_targets="attn_mlp",
        ),
    }


def weights_of(base):
    return {name: p.detach().clone() for m in (base.unet, *base.text_encoders) for name, p in m.state_dict().items()}


def test_adapter_changes_output_weight_zero_is_base_and_seed_is_reproducible(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    plain = run(base.pipeline)
    stack = AdapterStack(base)
    name = stack.add(load_adapter(adapters["a"], base), 1.0)
    with_adapter = run(base.pipeline)
    assert np.abs(with_adapter - plain).max() > 1e-2
    assert np.array_equal(run(base.pipeline), with_adapter)
    stack.set_weight(name, 0.0)
    assert np.array_equal(run(base.pipeline), plain)
    stack.set_weight(name, 1.0)
    stack.set_enabled(name, False)
    assert np.array_equal(run(base.pipeline), plain)


def test_two_adapters_at_07_and_03_equal_hand_merged_weights(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    stack.add(load_adapter(adapters["a"], base), 0.7)
    stack.add(load_adapter(adapters["b"], base), 0.3)
    composed = run(base.pipeline)
    merged = load_base(str(tiny_model_dir)).pipeline
    hand_merge(merged, [(adapters["a"], 0.7, 0.7), (adapters["b"], 0.3, 0.3)])
    assert np.abs(composed - run(merged)).max() < 1e-4


def test_separate_text_encoder_and_unet_weights(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    stack.add(load_adapter(adapters["a"], base), 0.0, unet_weight=1.0)
    merged = load_base(str(tiny_model_dir)).pipeline
    hand_merge(merged, [(adapters["a"], 0.0, 1.0)])
    assert np.abs(run(base.pipeline) - run(merged)).max() < 1e-4


def test_fused_equals_unfused_and_restores_exactly(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    stack.add(load_adapter(adapters["a"], base), 0.8)
    stack.add(load_adapter(adapters["b"], base), 0.5, unet_weight=0.2)
    before = weights_of(base)
    unfused = run(base.pipeline)
    with stack.fused():
        fused = run(base.pipeline)
    assert np.abs(fused - unfused).max() < 1e-4
    after = weights_of(base)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(run(base.pipeline), unfused)


def test_unload_restores_the_base_bit_for_bit(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    original = weights_of(base)
    plain = run(base.pipeline)
    stack = AdapterStack(base)
    stack.add(load_adapter(adapters["a"], base), 1.0)
    stack.add(load_adapter(adapters["b"], base), 0.5)
    with stack.fused():
        run(base.pipeline)
    stack.clear()
    restored = weights_of(base)
    assert restored.keys() == original.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert not any("lora" in name for name, _ in base.unet.named_modules())
    assert np.array_equal(run(base.pipeline), plain)


def _bad_files(folder, tiny_model_dir):
    folder.mkdir(exist_ok=True)
    (folder / "pickled.ckpt").write_bytes(b"\x80\x04\x95")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    save_file(
        {
            "lora_unet_nothing_here.lora_down.weight": torch.ones(2, 3),
            "lora_unet_nothing_here.lora_up.weight": torch.ones(3, 2),
        },
        str(folder / "nomatch.safetensors"),
    )
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4),
        },
        str(folder / "sdxl.safetensors"),
    )
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{name}.lora_down.weight": torch.ones(4, 999), f"{name}.lora_up.weight": torch.ones(32, 4)},
        str(folder / "wrongshape.safetensors"),
    )
    save_file(
        {f"{name}.lora_down.weight": torch.full((4, 32), float("nan")), f"{name}.lora_up.weight": torch.ones(32, 4)},
        str(folder / "nan.safetensors"),
    )
    return {
        "pickled.ckpt": "pickle",
        "garbage.safetensors": "not a readable",
        "nomatch.safetensors": "matches nothing",
        "sdxl.safetensors": "SDXL",
        "wrongshape.safetensors": "matches nothing",
        "nan.safetensors": "not a LoRA adapter we can read",
    }


def test_refused_or_broken_files_leave_the_pipeline_untouched(tiny_model_dir, adapters, tmp_path):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    stack.add(load_adapter(adapters["a"], base), 0.6)
    before_weights, before_image = weights_of(base), run(base.pipeline)
    for name, message in _bad_files(tmp_path / "bad", tiny_model_dir).items():
        with pytest.raises(ValueError, match=message):
            stack.add(load_adapter(tmp_path / "bad" / name, base), 1.0)
    assert list(stack.entries) == ["style_a"]
    after = weights_of(base)
    assert after.keys() == before_weights.keys() and all(torch.equal(before_weights[k], after[k]) for k in after)
    assert np.array_equal(run(base.pipeline), before_image)


def _module_paths(base):
    unet = [p for p, m in base.unet.named_modules() if p.endswith(("attn2.to_k", "attn1.to_q", "proj_in"))]
    te = [p for p, m in base.text_encoders[0].named_modules() if p.endswith(("q_proj", "fc1"))]
    return unet, te


def test_a_file_written_by_kohya_conventions_imports_with_zero_unmatched(tiny_model_dir, tmp_path):
    base = load_base(str(tiny_model_dir))
    unet_paths, te_paths = _module_paths(base)
    tensors, generator = {}, torch.Generator().manual_seed(0)
    modules = dict(base.unet.named_modules()) | {f"te:{p}": m for p, m in base.text_encoders[0].named_modules()}
    for kind, paths in (("unet", unet_paths), ("te", te_paths)):
        for path in paths:
            module = modules[path] if kind == "unet" else modules[f"te:{path}"]
            name = ("lora_unet_" + path if kind == "unet" else "lora_te_text_model_" + path).replace(".", "_")
            extra = (1, 1) if isinstance(module, torch.nn.Conv2d) else ()
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, module.weight.shape[1], *extra, generator=generator)
            tensors[f"{name}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4, *extra, generator=generator)
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya_made.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    matched = load_adapter(path, base)
    assert matched.unmatched == []
    assert len(matched.patches) == len(unet_paths) + len(te_paths)
    assert matched.parsed.format == "kohya"


def test_diffusers_peft_and_old_processor_files_import(tiny_model_dir, tmp_path):
    base = load_base(str(tiny_model_dir))
    unet_paths, te_paths = _module_paths(base)
    linear_unet = [p for p in unet_paths if not p.endswith("proj_in")]
    generator = torch.Generator().manual_seed(0)
    peft, old = {}, {}
    for path in linear_unet:
        module = base.unet.get_submodule(path)
        down = torch.randn(4, module.in_features, generator=generator)
        up = torch.randn(module.out_features, 4, generator=generator)
        peft[f"unet.{path}.lora_A.weight"], peft[f"unet.{path}.lora_B.weight"] = down, up
        head, _, proj = path.rpartition(".")
        old[f"{head}.processor.{proj}_lora.down.weight"], old[f"{head}.processor.{proj}_lora.up.weight"] = down, up
    for path in te_paths:
        module = base.text_encoders[0].get_submodule(path)
        peft[f"text_encoder.{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
        peft[f"text_encoder.{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    save_file(peft, str(tmp_path / "peft.safetensors"))
    save_file(old, str(tmp_path / "old.safetensors"))
    matched = load_adapter(tmp_path / "peft.safetensors", base)
    assert matched.unmatched == [] and len(matched.patches) == len(linear_unet) + len(te_paths)
    assert all(lora.alpha == lora.rank for lora in matched.patches.values())  # no alpha in the file: alpha = r
    old_matched = load_adapter(tmp_path / "old.safetensors", base)
    assert old_matched.unmatched == [] and len(old_matched.patches) == len(linear_unet)


def test_partly_matching_file_loads_and_reports_every_unmatched_key(tiny_model_dir, adapters, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(adapters["a"]))
    tensors["lora_unet_made_up_block.lora_down.weight"] = torch.ones(4, 8)
    tensors["lora_unet_made_up_block.lora_up.weight"] = torch.ones(8, 4)
    tensors["some_random_tensor"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    matched = load_adapter(tmp_path / "partial.safetensors", load_base(str(tiny_model_dir)))
    assert len(matched.unmatched) == 2
    assert any("made_up_block" in u for u in matched.unmatched)
    assert any("some_random_tensor" in u for u in matched.unmatched)
    assert len(matched.patches) == len(parse_adapter(adapters["a"]).modules)
