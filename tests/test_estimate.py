"""The estimate shown before training: it grows with what costs, and suggests memory-saving modes only when needed."""

import pytest

from studio.models import load_base
from tests.helpers import write_style_images
from training.config import TrainConfig
from training.estimate import Device, describe_plan, estimate


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    data = write_style_images(tmp_path_factory.mktemp("estimate") / "data", count=4)
    base = load_base(str(tiny_model_dir))
    config = TrainConfig(
        base=str(tiny_model_dir),
        data_dir=str(data),
        output=str(data.parent / "out.safetensors"),
        resolution=64,
        rank=4,
        batch_size=2,
        max_train_steps=10,
        unet_targets="attn",
        train_text_encoder=False,
    )
    return base, config


def test_the_estimate_grows_with_resolution_batch_and_rank(setup):
    base, config = setup
    device = Device("cpu", 64)
    reference = estimate(config, base, device)
    for change in ({"resolution": 128}, {"batch_size": 4}, {"rank": 32}):
        bigger = estimate(config.replace(**change), base, device)
        assert bigger.peak_bytes > reference.peak_bytes, change
        assert bigger.seconds_per_step > reference.seconds_per_step, change
        assert bigger.seconds > reference.seconds, change
    assert estimate(config.replace(max_train_steps=20), base, device).seconds > reference.seconds


def test_gradient_checkpointing_trades_time_for_memory(setup):
    base, config = setup
    device = Device("cpu", 64)
    big = config.replace(resolution=256, batch_size=4)
    plain, checkpointed = estimate(big, base, device), estimate(big.replace(gradient_checkpointing=True), base, device)
    assert checkpointed.memory["activations"] < plain.memory["activations"]
    assert checkpointed.seconds_per_step > plain.seconds_per_step


def test_output_preservation_costs_about_a_second_pass_in_time_and_memory(setup):
    base, config = setup
    device = Device("cpu", 64)
    plain = estimate(config, base, device)
    kept = estimate(config.replace(preservation_weight=1.0), base, device)
    # the demo model's style preset measured 0.091 s/step plain and 0.19 s/step with preservation (2.1x)
    assert 1.5 * plain.seconds_per_step < kept.seconds_per_step < 3 * plain.seconds_per_step
    assert kept.memory["activations"] == pytest.approx(2 * plain.memory["activations"], rel=1e-6)


def test_over_budget_suggests_memory_saving_modes_and_under_budget_does_not(setup):
    base, config = setup
    heavy = config.replace(resolution=512, batch_size=8, train_text_encoder=True)
    roomy = estimate(heavy, base, Device("gpu", 64))
    assert roomy.fits and roomy.suggestions == []
    text = describe_plan(heavy, base, Device("gpu", 64))
    assert "does not fit" not in text and "estimated peak memory" in text

    budget = roomy.peak_bytes * 0.9 / 1024**3
    tight = estimate(heavy, base, Device("gpu", budget))
    assert tight.fits is False
    joined = "\n".join(tight.suggestions)
    for mode in ("gradient checkpointing", "freeze the text encoder", "8-bit AdamW", "batch size to 4"):
        assert mode in joined, (mode, joined)
    assert "all of these together" in joined and "(fits)" in joined
    text = describe_plan(heavy, base, Device("gpu", budget))
    assert "does not fit" in text and "gradient checkpointing" in text


def test_devices_parse_and_bad_devices_are_named():
    assert Device.parse("gpu:24") == Device("gpu", 24.0)
    assert Device.parse("cuda:12GB") == Device("gpu", 12.0)
    assert Device.parse("cpu:32") == Device("cpu", 32.0)
    assert Device.parse("auto") == Device.this_machine()
    for bad in ("tpu:8", "gpu:lots", "gpu:-4"):
        with pytest.raises(ValueError, match="device"):
            Device.parse(bad)


def test_the_cli_prints_the_plan_for_a_chosen_device_without_loading_weights(tiny_model_dir, tmp_path, capsys):
    from studio.cli import main

    data = write_style_images(tmp_path / "data", count=4)
    common = ["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o.safetensors")]
    assert main([*common, "--plan", "--estimate-for", "gpu:0.1", "--resolution", "256", "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "estimated peak memory" in text and "does not fit the GPU (0.1 GiB)" in text
    assert "gradient checkpointing" in text and "lower the batch size to 4" in text
    assert not (tmp_path / "o.safetensors").exists(), "--plan must not train"
    assert main([*common, "--plan", "--estimate-for", "gpu:80"]) == 0
    assert "does not fit" not in capsys.readouterr().out
    assert main([*common, "--plan", "--estimate-for", "tpu"]) == 2


def test_sd2_and_sdxl_estimates_come_from_their_own_configs(setup, tmp_path):
    """A single SD 2.x 768-v file is estimated from the shipped SD 2.1-768 configs, an SDXL folder with both text
    encoders and its size conditioning, each with the family it is."""
    from studio.convert import save_single_file
    from studio.models import CONFIGS_DIR
    from studio.tiny import build_tiny_pipeline
    from training.estimate import weightless_base

    _, config = setup
    sd2 = weightless_base(str(CONFIGS_DIR / "sd21_768v"))
    assert sd2.family.name == "sd2v" and sd2.unet.config.cross_attention_dim == 1024
    at_768 = estimate(config.replace(resolution=768, batch_size=4), sd2, Device("gpu", 8))
    assert at_768.peak_bytes > 8 * 2**30 and any("gradient checkpointing" in s for s in at_768.suggestions)

    xl_dir = build_tiny_pipeline(tmp_path / "xl", family="sdxl")
    xl = weightless_base(str(xl_dir))
    assert xl.family.name == "sdxl" and len(xl.text_encoders) == 2
    both = estimate(config.replace(train_text_encoder=True, text_encoder_targets="attn"), xl, Device("cpu", 64))
    one = estimate(config, xl, Device("cpu", 64))
    assert both.memory["lora_and_optimizer"] > one.memory["lora_and_optimizer"]

    single = save_single_file(xl_dir, tmp_path / "xl.safetensors")
    assert weightless_base(str(single)).family.name == "sdxl"  # the shipped SDXL configs, by the file's keys
