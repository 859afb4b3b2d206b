"""The `studio` command line: train -> export -> load in diffusers, and readable errors."""

import pytest

from studio.adapters import read_adapter
from studio.cli import build_parser, build_train_config, main
from tests.helpers import write_style_images
from tests.test_lora_export import assert_loads_in_diffusers_like_a_hand_merge


def test_train_then_private_export_loads_in_diffusers_like_a_hand_merge(tiny_model_dir, tmp_path, capsys):
    data = write_style_images(tmp_path / "data", count=4)
    out = tmp_path / "adapters" / "inky.safetensors"
    code = main(
        [
            "train",
            "--base",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--trigger",
            "inky",
            "--out",
            str(out),
            "--preset",
            "quick",
            "--steps",
            "4",
            "--rank",
            "4",
            "--alpha",
            "2",
            "--lr",
            "3e-2",
            "--te-lr",
            "3e-2",
            "--text-encoder",
            "--targets",
            "kohya",
            "--resolution",
            "64",
            "--batch-size",
            "2",
            "--seed",
            "7",
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "4 image(s) kept" in printed and "wrote" in printed
    trained = read_adapter(out)
    assert trained.metadata["modelspec.trigger_phrase"] == "inky"
    assert trained.metadata["ss_steps"] == "4" and trained.metadata["ss_seed"] == "7"
    assert "ss_tag_frequency" in trained.metadata

    public = tmp_path / "public.safetensors"
    assert main(["export", str(out), "--out", str(public), "--no-dataset-metadata"]) == 0
    exported = read_adapter(public)
    assert "ss_tag_frequency" not in exported.metadata and "ss_dataset_dirs" not in exported.metadata
    assert_loads_in_diffusers_like_a_hand_merge(tiny_model_dir, public)


def test_bad_values_exit_with_a_message_naming_them(tiny_model_dir, tmp_path, capsys):
    data = write_style_images(tmp_path / "data", count=2)
    out = tmp_path / "x.safetensors"
    assert main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--rank", "0"]) == 2
    assert "rank must be at least 1" in capsys.readouterr().err
    assert main(["train", "--base", str(tmp_path / "missing"), "--data", str(data), "--out", str(out)]) == 2
    assert "base model not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(out)]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not out.exists()


def test_flags_override_config_file_which_overrides_preset(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "character"\nrank = 12\nalpha = 6.0\n')
    args = build_parser().parse_args(["train", "--config", str(config), "--alpha", "3", "--steps", "50"])
    built = build_train_config(args)
    assert (built.rank, built.alpha, built.max_train_steps, built.unet_targets) == (12, 3.0, 50, "kohya")


def test_save_config_writes_a_reusable_toml(tmp_path):
    path = tmp_path / "saved.toml"
    assert main(["train", "--preset", "quick", "--rank", "2", "--save-config", str(path)]) == 0
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert build_train_config(args).rank == 2


def test_prediction_type_for_sd2_single_files_reaches_the_config_and_is_checked(tmp_path):
    args = build_parser().parse_args(["train", "--prediction-type", "epsilon", "--clip-skip", "2"])
    built = build_train_config(args)
    assert (built.prediction_type, built.clip_skip) == ("epsilon", 2)
    assert build_train_config(build_parser().parse_args(["train"])).prediction_type == ""
    with pytest.raises(ValueError, match="prediction_type"):
        built.replace(prediction_type="sample")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--prediction-type", "v"])


@pytest.mark.parametrize("argv", [["train", "--steps", "x"], ["export"]])
def test_argument_errors_exit_with_usage(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_every_unet_target_preset_is_a_targets_choice():
    from training.lora import UNET_TARGET_PRESETS

    for targets in UNET_TARGET_PRESETS:
        args = build_parser().parse_args(["train", "--targets", targets])
        assert build_train_config(args).unet_targets == targets


def test_train_holds_out_validation_images_and_prints_the_best_checkpoint(tiny_model_dir, tmp_path, capsys):
    data = write_style_images(tmp_path / "data", count=4)
    out = tmp_path / "adapters" / "held.safetensors"
    argv = ["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--preset", "quick"]
    argv += ["--steps", "4", "--checkpoint-every", "2", "--validation-images", "1", "--resolution", "64", "--rank", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "3 image(s) kept, 1 file(s) skipped" in printed and "img_02.png: held out" in printed
    assert "validation loss" in printed and "best checkpoint by validation loss: " in printed
    assert str(tmp_path / "adapters" / "held_run" / "metrics.jsonl") in printed
    assert read_adapter(out).metadata["ss_num_train_images"] == "3"


def test_tensorboard_logging_names_the_extra_when_it_is_not_installed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    data = write_style_images(tmp_path / "data", count=2)
    out = tmp_path / "x.safetensors"
    argv = ["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--log-with", "tensorboard"]
    assert main(argv) == 2
    assert "pip install 'lora-style-studio[tensorboard]'" in capsys.readouterr().err
    assert not out.exists()
    args = build_parser().parse_args(["train", "--log-with", "tensorboard", "--validation-dir", "held"])
    assert (build_train_config(args).log_with, build_train_config(args).validation_dir) == ("tensorboard", "held")
