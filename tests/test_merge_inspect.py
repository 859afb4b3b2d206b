"""Merging adapters (exact and SVD) and inspecting files."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import parse_adapter, read_adapter
from studio.cli import main
from studio.compose import AdapterStack, load_adapter
from studio.merge import merge_adapters
from studio.models import load_base
from tests.helpers import hand_merge, make_adapter
from tests.helpers import render as run


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return (
        make_adapter(tiny_model_dir, folder / "a.safetensors", seed=5, rank=4),
        make_adapter(tiny_model_dir, folder / "b.safetensors", seed=6, rank=2, alpha=1.0, te_targets="attn_mlp"),
    )


def test_exact_merge_equals_both_adapters_at_their_weights(tiny_model_dir, pair, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = merge_adapters([(pair[0], 0.7), (pair[1], 0.5)], out, dtype="fp32")
    assert report.relative_error_max == 0.0
    base = load_base(str(tiny_model_dir))
    AdapterStack(base).add(load_adapter(out, base), 1.0)
    reference = load_base(str(tiny_model_dir)).pipeline
    hand_merge(reference, [(pair[0], 0.7, 0.7), (pair[1], 0.5, 0.5)])
    assert np.abs(run(base.pipeline) - run(reference)).max() < 1e-4
    merged = parse_adapter(out)
    assert set(merged.modules) == set(parse_adapter(pair[0]).modules) | set(parse_adapter(pair[1]).modules)
    assert max(merged.ranks()) == 6 and read_adapter(out).metadata["ss_network_module"] == "networks.lora"


def test_svd_merge_reports_its_error_and_is_exact_at_full_rank(pair, tmp_path):
    full = merge_adapters([(pair[0], 0.7), (pair[1], 0.5)], tmp_path / "full.safetensors", rank=6, dtype="fp32")
    assert full.relative_error_max < 1e-4
    low = merge_adapters([(pair[0], 0.7), (pair[1], 0.5)], tmp_path / "low.safetensors", rank=1, dtype="fp32")
    assert 0.05 < low.relative_error_mean <= low.relative_error_max < 1.0
    assert parse_adapter(tmp_path / "low.safetensors").ranks() == [1]
    exact = parse_adapter(tmp_path / "full.safetensors").modules
    reference = merge_adapters([(pair[0], 0.7), (pair[1], 0.5)], tmp_path / "ref.safetensors", dtype="fp32")
    ref_modules = parse_adapter(reference.output).modules
    for name, module in exact.items():
        assert torch.allclose(module.delta(), ref_modules[name].delta(), atol=1e-4)


def test_merging_different_families_is_refused(tmp_path):
    sd1 = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 2),
    }
    sd2 = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 1024),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1024, 2),
    }
    save_file(sd1, str(tmp_path / "sd1.safetensors"))
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ValueError, match="different model families"):
        merge_adapters(
            [(tmp_path / "sd1.safetensors", 1), (tmp_path / "sd2.safetensors", 1)], tmp_path / "x.safetensors"
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_merge_and_inspect(tiny_model_dir, pair, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{pair[0]}:0.7", f"{pair[1]}:0.5", "--out", str(out), "--rank", "2"]) == 0
    assert "relative error: max" in capsys.readouterr().out
    assert main(["inspect", str(out), "--base", str(tiny_model_dir)]) == 0
    printed = capsys.readouterr().out
    assert "format:   kohya" in printed and "rank:     2" in printed and "AutoV3" in printed
    assert f"matched:  {len(parse_adapter(out).modules)} module(s)" in printed and "unmatched: 0" in printed
    assert "ss_network_args" in printed
