"""The training config: validated on construction, named errors, TOML round-trip, presets."""

import pytest

from training.config import PRESETS, TrainConfig


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    config = TrainConfig.from_preset(
        "style", data_dir="data", output="out/a.safetensors", sample_prompts=['sks, a "quoted" prompt']
    )
    path = tmp_path / "run.toml"
    config.save(path)
    assert TrainConfig.from_toml(path) == config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", -4),
        ("alpha", 0.0),
        ("unet_lr", -1.0),
        ("batch_size", 0),
        ("resolution", 100),
        ("optimizer", "sgd"),
        ("unet_targets", "everything"),
        ("lr_scheduler", "warp"),
        ("dropout", 1.5),
        ("save_dtype", "int8"),
        ("mixed_precision", "fp8"),
        ("rank", "8"),
        ("train_text_encoder", "yes"),
        ("validation_images", -1),
        ("log_with", "wandb"),
    ],
)
def test_bad_value_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_prior_preservation_needs_a_class_prompt_and_images():
    with pytest.raises(ValueError, match="class_prompt"):
        TrainConfig(prior_preservation=True, num_class_images=4)
    with pytest.raises(ValueError, match="num_class_images"):
        TrainConfig(prior_preservation=True, class_prompt="a painting")


def test_unknown_option_and_preset_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rnak"):
        TrainConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("anime")
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = [")
    with pytest.raises(ValueError, match="cannot read config"):
        TrainConfig.from_toml(bad)


def test_presets_differ_and_toml_may_name_a_preset(tmp_path):
    assert set(PRESETS) == {"style", "character", "quick"}
    assert TrainConfig.from_preset("quick").max_train_steps < TrainConfig.from_preset("style").max_train_steps
    assert TrainConfig.from_preset("character").train_text_encoder
    path = tmp_path / "c.toml"
    path.write_text('preset = "quick"\nrank = 2\n')
    config = TrainConfig.from_toml(path)
    assert (config.rank, config.max_train_steps) == (2, PRESETS["quick"]["max_train_steps"])


def test_integers_are_accepted_for_float_options():
    assert TrainConfig(alpha=8).alpha == 8.0
