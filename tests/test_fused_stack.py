"""A fixed adapter stack costs nothing extra: fused weights are cached while the stack is unchanged, fused runs
need no PEFT layers, and the base weights come back bit for bit."""

import numpy as np
import pytest
import torch

from studio.compose import AdapterStack
from studio.generate import GenerationRequest, LoraRequest, generate
from studio.models import load_base
from tests.helpers import make_adapter


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    return [make_adapter(tiny_model_dir, folder / f"style_{i}.safetensors", seed=10 + i, rank=4) for i in range(3)]


@pytest.fixture
def merges(monkeypatch):
    """Count the merges of a stack into full weights (the work a cached fusion saves); the real method still runs."""
    calls = []
    original = AdapterStack._merge

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(AdapterStack, "_merge", counting)
    return calls


def _weights(base):
    return {k: v.detach().clone() for m in (base.unet, *base.text_encoders) for k, v in m.state_dict().items()}


def _request(paths, weight=0.7, fuse=True):
    loras = [LoraRequest(str(p), weight) for p in paths]
    return GenerationRequest("sks, a red circle", seed=3, steps=2, width=32, height=32, loras=loras, fuse=fuse)


def test_a_repeated_generation_reuses_the_fused_weights_and_restores_the_base(tiny_model_dir, adapters, merges):
    base = load_base(str(tiny_model_dir))
    original = _weights(base)
    plain = generate(base, _request([])).images[0]
    stack = AdapterStack(base)
    first = generate(base, _request(adapters), stack=stack).images[0]
    computed = len(merges)
    assert computed == 1
    assert all(torch.equal(original[k], v) for k, v in _weights(base).items())
    second = generate(base, _request(adapters), stack=stack).images[0]
    assert len(merges) == computed, "an unchanged stack must not recompute its fused weights"
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(plain))
    after = _weights(base)
    assert after.keys() == original.keys() and all(torch.equal(original[k], v) for k, v in after.items())
    assert not any("lora" in name for name, _ in base.unet.named_modules()), "a fused run needs no PEFT layers"
    assert np.array_equal(np.asarray(generate(base, _request([])).images[0]), np.asarray(plain))


def test_a_changed_weight_or_an_edited_base_refuses_the_cache(tiny_model_dir, adapters, merges):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    at_07 = generate(base, _request(adapters[:1], 0.7), stack=stack).images[0]
    merges.clear()
    at_03 = generate(base, _request(adapters[:1], 0.3), stack=stack).images[0]
    assert merges and not np.array_equal(np.asarray(at_07), np.asarray(at_03))

    merges.clear()
    layer = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    with torch.no_grad():
        layer.weight.mul_(0.5)  # someone edits the base in place: the cached merge is stale
    edited = generate(base, _request(adapters[:1], 0.3), stack=stack).images[0]
    assert merges, "an in-place edit of a base weight must rebuild the fused weights"
    assert not np.array_equal(np.asarray(edited), np.asarray(at_03))


def test_unfused_generation_installs_peft_layers_and_matches_the_fused_one(tiny_model_dir, adapters):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    fused = np.asarray(generate(base, _request(adapters), stack=stack).images[0], dtype=np.float32)
    assert all(not entry.installed for entry in stack.entries.values())
    unfused = np.asarray(generate(base, _request(adapters, fuse=False), stack=stack).images[0], dtype=np.float32)
    assert all(entry.installed for entry in stack.entries.values())
    assert any("lora" in name for name, _ in base.unet.named_modules())
    assert np.abs(fused - unfused).max() <= 2  # 8-bit pixels of the same image, up to float rounding
    stack.clear()
    assert not any("lora" in name for name, _ in base.unet.named_modules())
