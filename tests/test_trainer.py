"""The DreamBooth-style trainer on a tiny model: learning, resume, prior preservation, checkpoints, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from studio.adapters import read_adapter
from studio.models import DEMO_MODEL_DIR, load_base
from tests.helpers import write_style_images
from training.config import TrainConfig
from training.data import image_to_tensor, open_image, scan_dataset
from training.metrics import adapter_of, best_record, overtraining_warning, read_metrics, rises
from training.trainer import Trainer, TrainingCancelled, train
from training.validation import hold_out


def _config(model_dir, data_dir, out: Path, **overrides) -> TrainConfig:
    values = dict(
        base=str(model_dir),
        data_dir=str(data_dir),
        output=str(out),
        resolution=64,
        rank=4,
        alpha=4.0,
        max_train_steps=6,
        batch_size=2,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        unet_targets="kohya",
        train_text_encoder=True,
        save_dtype="fp32",
        sample_steps=2,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _folder_latents(pipeline, data_dir) -> tuple[list[Path], torch.Tensor]:
    """The data folder's PNG paths and their 64x64 latents (the posterior means, scaled)."""
    paths = sorted(Path(data_dir).glob("*.png"))
    with torch.no_grad():
        pixels = torch.stack([image_to_tensor(open_image(p), (64, 64), True, False, None) for p in paths])
        return paths, pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor


def _fixed_batch_loss(pipeline, data_dir) -> float:
    """Denoising loss on the data folder's images with fixed noise and timesteps (the same for every call)."""
    paths, latents = _folder_latents(pipeline, data_dir)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        ids = pipeline.tokenizer(
            [p.with_suffix(".txt").read_text() for p in paths], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        hidden = pipeline.text_encoder(ids)[0]
        losses = []
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (len(paths),), generator=generator)
            noisy = pipeline.scheduler.add_noise(latents, noise, timesteps)
            losses.append(F.mse_loss(pipeline.unet(noisy, timesteps, hidden).sample, noise).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("targets", ["kohya", "locon"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_model_dir, tmp_path, targets):
    data = write_style_images(tmp_path / "data", count=2)
    for txt in data.glob("*.txt"):  # the trainer prepends the trigger; keep evaluation captions identical
        txt.write_text("sks, " + txt.read_text())
    out = tmp_path / "out" / "learned.safetensors"
    config = _config(tiny_model_dir, data, out, max_train_steps=40, unet_lr=3e-3, text_encoder_lr=1e-3)
    result = train(config.replace(unet_targets=targets))
    assert result.steps == 40 and len(result.losses) == 40
    adapter = read_adapter(out)
    convs = [n for n in adapter.module_names if n.endswith(("_conv1", "_conv2"))]
    network_args = json.loads(adapter.metadata["ss_network_args"])
    if targets == "locon":  # kohya's LoCon: 3x3 conv LoRAs, and the conv rank and alpha named as kohya names them
        assert adapter.tensors[f"{convs[0]}.lora_down.weight"].dim() == 4
        assert (network_args["conv_dim"], network_args["conv_alpha"]) == ("4", "4")
    else:
        assert not convs and "conv_dim" not in network_args
    before = _fixed_batch_loss(load_base(str(tiny_model_dir)).pipeline, data)
    adapted = load_base(str(tiny_model_dir)).pipeline
    adapted.load_lora_weights(str(out))
    after = _fixed_batch_loss(adapted, data)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_resume_continues_where_it_stopped_and_ends_like_an_uninterrupted_run(tiny_model_dir, tmp_path, ema_decay):
    data = write_style_images(tmp_path / "data", count=4)
    common = dict(checkpoint_every_steps=3, ema_decay=ema_decay)
    straight = train(_config(tiny_model_dir, data, tmp_path / "a" / "lora.safetensors", **common))

    config = _config(tiny_model_dir, data, tmp_path / "b" / "lora.safetensors", **common)
    steps_seen = []

    def progress(event):
        if event.phase == "training":
            steps_seen.append(event.step)

    with pytest.raises(TrainingCancelled):
        Trainer(config, progress=progress, should_stop=lambda: len(steps_seen) >= 4).run()
    assert not Path(config.output).exists(), "a stopped run must not leave a final adapter"
    assert steps_seen == [1, 2, 3, 4]
    resumed_steps = []
    resumed = Trainer(config, progress=lambda e: e.phase == "training" and resumed_steps.append(e.step)).run(
        resume_from=config.resolved_work_dir
    )
    assert resumed_steps == [5, 6]
    # metrics.jsonl goes on from the checkpoint: the stop's checkpoint at step 4, then the end
    assert [r["step"] for r in read_metrics(config.resolved_work_dir)] == [3, 4, 6]
    assert resumed.losses[:4] == pytest.approx(straight.losses[:4], abs=1e-6)
    a, b = read_adapter(straight.output).tensors, read_adapter(resumed.output).tensors
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_with_an_ema_the_adapter_is_the_moving_average_of_the_trained_weights(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=4)
    # the same run without the average, with a checkpoint after every step: its adapters are the trained weights
    raw = train(
        _config(tiny_model_dir, data, tmp_path / "raw" / "x.safetensors", checkpoint_every_steps=1, keep_checkpoints=9)
    )
    trajectory = [read_adapter(c / "adapter.safetensors").tensors for c in raw.checkpoints]
    trajectory.append(read_adapter(raw.output).tensors)
    averaged = read_adapter(
        train(_config(tiny_model_dir, data, tmp_path / "ema" / "x.safetensors", ema_decay=0.5)).output
    )
    # the warm-up of diffusers' EMAModel: step k (from 1) mixes in with weight 1 - min(decay, k / (k + 9))
    expected = {k: v.clone() for k, v in trajectory[0].items()}
    for step, weights in enumerate(trajectory[1:], start=1):
        keep = min(0.5, (1 + step) / (10 + step))
        expected = {k: keep * expected[k] + (1 - keep) * weights[k] for k in expected}
    final = trajectory[-1]
    ups = [k for k in final if "lora_up" in k]
    assert max((averaged.tensors[k] - expected[k]).abs().max().item() for k in ups) < 1e-5
    assert max((averaged.tensors[k] - final[k]).abs().max().item() for k in ups) > 1e-4, "the average must lag"
    assert averaged.metadata["ss_ema_decay"] == "0.5"
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_resume_refuses_a_changed_rank(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=2)
    config = _config(
        tiny_model_dir, data, tmp_path / "o" / "x.safetensors", checkpoint_every_steps=2, max_train_steps=3
    )
    train(config)
    with pytest.raises(ValueError, match="rank"):
        train(config.replace(rank=8), resume_from=config.resolved_work_dir)


def test_checkpoints_are_loadable_adapters_with_samples(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=2)
    events = []
    result = train(
        _config(
            tiny_model_dir,
            data,
            tmp_path / "o" / "x.safetensors",
            checkpoint_every_steps=2,
            sample_prompts=["sks, a red circle"],
        ),
        progress=events.append,
    )
    assert [c.name for c in result.checkpoints] == ["step-000002", "step-000004"]
    for checkpoint in result.checkpoints:
        adapter = read_adapter(checkpoint / "adapter.safetensors")
        assert adapter.metadata["ss_steps"] == str(int(checkpoint.name.split("-")[1]))
        assert (checkpoint / "samples" / "sample_00.png").is_file()
        assert (checkpoint / "config.toml").is_file()
    sample_events = [e for e in events if e.phase == "checkpoint"]
    assert sample_events and sample_events[0].samples[0].name == "sample_00.png"
    training = [e for e in events if e.phase == "training"]
    assert training[-1].eta_seconds == 0 and training[0].lr > 0 and training[0].loss > 0


def test_prior_preservation_generates_class_images_once_and_reuses_them(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=2)
    class_dir = tmp_path / "class"
    config = _config(
        tiny_model_dir,
        data,
        tmp_path / "o1" / "x.safetensors",
        max_train_steps=2,
        prior_preservation=True,
        class_prompt="a drawing",
        num_class_images=3,
        class_dir=str(class_dir),
        prior_loss_weight=0.5,
    )
    events = []
    result = train(config, progress=events.append)
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 3
    assert sum(e.phase == "class_images" for e in events) == 3
    assert result.plan.num_class_images == 3
    assert read_adapter(result.output).metadata["ss_num_reg_images"] == "3"
    stamps = [p.stat().st_mtime_ns for p in images]

    events.clear()
    train(config.replace(output=str(tmp_path / "o2" / "x.safetensors")), progress=events.append)
    assert not [e for e in events if e.phase == "class_images"]
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps


def test_empty_or_unusable_folder_is_a_clear_error_and_writes_nothing(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "o" / "x.safetensors"
    with pytest.raises(ValueError, match="no usable training images"):
        train(_config(tiny_model_dir, empty, out))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="a.png: not an image"):
        train(_config(tiny_model_dir, junk, out))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_missing_base_model_is_a_clear_error(tmp_path):
    data = write_style_images(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match="base model not found"):
        train(_config(tmp_path / "no_such_model", data, tmp_path / "o" / "x.safetensors"))


def test_latent_and_text_caches_do_not_change_what_is_learned(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=4)
    common = dict(max_train_steps=4, train_text_encoder=False, random_flip=True)
    cached = train(
        _config(
            tiny_model_dir,
            data,
            tmp_path / "c" / "x.safetensors",
            cache_latents=True,
            cache_text_embeddings=True,
            **common,
        )
    )
    uncached = train(
        _config(
            tiny_model_dir,
            data,
            tmp_path / "u" / "x.safetensors",
            cache_latents=False,
            cache_text_embeddings=False,
            **common,
        )
    )
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-5, abs=1e-6)


def test_memory_and_schedule_options_train_to_the_planned_step(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=4, size=(96, 64))
    events = []
    result = train(
        _config(
            tiny_model_dir,
            data,
            tmp_path / "o" / "x.safetensors",
            max_train_steps=3,
            gradient_accumulation_steps=2,
            batch_size=1,
            gradient_checkpointing=True,
            min_snr_gamma=5.0,
            noise_offset=0.05,
            lr_scheduler="cosine",
            lr_warmup_steps=2,
            resolution=128,
            bucket_step=32,
            min_bucket_resolution=64,
            max_bucket_resolution=256,
        ),
        progress=events.append,
    )
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.plan.batches_per_epoch == 4 and result.plan.steps_per_epoch == 2
    lrs = [e.lr for e in events if e.phase == "training"]
    assert lrs[0] < lrs[1], "warmup should raise the learning rate"
    metadata = read_adapter(result.output).metadata
    assert json.loads(metadata["ss_bucket_info"]) == {"buckets": {"160x96": 4}}


def test_min_snr_weights_follow_the_paper():
    from training.trainer import min_snr_weights

    alphas = torch.tensor([0.5, 0.9, 0.99])  # SNR 1, 9, 99
    steps = torch.tensor([0, 1, 2])
    assert min_snr_weights(alphas, steps, 5.0, v_pred=False).tolist() == pytest.approx([1.0, 5 / 9, 5 / 99], rel=1e-5)
    assert min_snr_weights(alphas, steps, 5.0, v_pred=True).tolist() == pytest.approx([0.5, 0.5, 5 / 100], rel=1e-5)


def test_optional_optimizers_say_how_to_install_them(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import prodigyopt  # noqa: F401

        pytest.skip("prodigyopt is installed here")
    except ImportError:
        pass
    data = write_style_images(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match=r"pip install 'lora-style-studio\[prodigy\]'"):
        train(_config(tiny_model_dir, data, tmp_path / "o" / "x.safetensors", optimizer="prodigy"))


def _drift(model_dir, adapter: Path, data_dir, prompts: list[str]) -> float:
    """Mean squared change the adapter makes to the UNet's prediction on the data's noisy latents under `prompts`."""
    from studio.compose import AdapterStack, load_adapter

    base = load_base(str(model_dir))
    pipe = base.pipeline
    paths, latents = _folder_latents(pipe, data_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        timesteps = torch.randint(100, 900, (len(paths),), generator=generator)
        noisy = pipe.scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
        before = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample
        AdapterStack(base).add(load_adapter(adapter, base), 1.0)
        after = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample
    return F.mse_loss(after, before).item()


def test_output_preservation_keeps_the_captions_without_the_trigger_as_the_base_draws_them(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=4)
    captions = [p.read_text() for p in sorted(data.glob("*.txt"))]
    common = dict(max_train_steps=12, unet_lr=3e-3, text_encoder_lr=3e-3, cache_text_embeddings=False)
    plain = train(_config(tiny_model_dir, data, tmp_path / "a" / "plain.safetensors", **common))
    kept = train(_config(tiny_model_dir, data, tmp_path / "b" / "kept.safetensors", preservation_weight=5.0, **common))
    without_trigger = [_drift(tiny_model_dir, r.output, data, captions) for r in (plain, kept)]
    with_trigger = [_drift(tiny_model_dir, r.output, data, [f"sks, {c}" for c in captions]) for r in (plain, kept)]
    # without the trigger word the preserved adapter changes the picture far less; with it, it still changes it
    assert without_trigger[1] < 0.5 * without_trigger[0]
    assert with_trigger[1] > 2 * without_trigger[1]


def test_output_preservation_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="preservation_prompt"):
        TrainConfig(preservation_weight=1.0, preservation_prompt="class")
    with pytest.raises(ValueError, match="preservation_weight"):
        TrainConfig(preservation_weight=-1.0)
    with pytest.raises(ValueError, match="trigger"):
        TrainConfig(preservation_weight=1.0, trigger="")


def test_caption_dropout_rate_is_validated():
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        TrainConfig(caption_dropout_rate=1.0)


def test_validation_loss_is_the_same_every_run_written_at_every_checkpoint_and_names_the_best(tiny_model_dir, tmp_path):
    data = write_style_images(tmp_path / "data", count=4)
    held = write_style_images(tmp_path / "held", count=2, seed=9)
    common = dict(checkpoint_every_steps=2, keep_checkpoints=1, validation_dir=str(held))
    runs = [train(_config(tiny_model_dir, data, tmp_path / name / "lora.safetensors", **common)) for name in "ab"]
    assert runs[0].validation_losses == runs[1].validation_losses  # fixed noise and timesteps: the same numbers
    records = read_metrics(tmp_path / "a" / "lora_run")
    assert [(r["step"], r["checkpoint"]) for r in records] == [(2, "step-000002"), (4, "step-000004"), (6, "final")]
    assert [(r["step"], r["val_loss"]) for r in records] == runs[0].validation_losses
    assert all(isinstance(r["train_loss"], float) for r in records)
    best = min(records, key=lambda r: r["val_loss"])
    assert runs[0].best_checkpoint == adapter_of(best, tmp_path / "a" / "lora_run", runs[0].output)
    assert runs[0].best_checkpoint.is_file(), "the best checkpoint outlives keep_checkpoints"
    # scoring held-out pictures draws nothing from the training's random numbers: the same run without it
    plain = train(_config(tiny_model_dir, data, tmp_path / "c" / "lora.safetensors", checkpoint_every_steps=2))
    assert plain.losses == runs[0].losses and plain.validation_losses == []
    assert [r["step"] for r in read_metrics(tmp_path / "c" / "lora_run")] == [2, 4, 6]


def test_validation_images_are_held_out_the_same_way_every_time(tmp_path):
    data = write_style_images(tmp_path / "data", count=7)
    report = scan_dataset(data, "sks", "sks style")
    kept, held = hold_out(report, 3)
    assert [i.path.name for i in held] == ["img_01.png", "img_03.png", "img_05.png"]  # spread over the folder
    assert hold_out(report, 3)[1] == held and len(kept.items) == 4 and not set(kept.items) & set(held)
    assert "img_03.png: held out" in kept.summary()
    with pytest.raises(ValueError, match="at least one picture to train on"):
        hold_out(report, 7)
    with pytest.raises(ValueError, match="validation_images and validation_dir"):
        TrainConfig(validation_images=2, validation_dir=str(data))


def test_overtraining_is_a_validation_loss_that_keeps_rising():
    def records(*losses):
        return [{"step": 10 * i, "val_loss": v, "checkpoint": f"step-{10 * i:06d}"} for i, v in enumerate(losses, 1)]

    assert rises(records(0.5, 0.4, 0.3)) == 0 and not overtraining_warning(records(0.5, 0.4, 0.3))
    assert rises(records(0.5, 0.3, 0.4, 0.45)) == 2 and not overtraining_warning(records(0.5, 0.3, 0.4, 0.45))
    warning = overtraining_warning(records(0.5, 0.3, 0.4, 0.45, 0.5))
    assert "risen 3 times in a row" in warning and "step-000020 (step 20)" in warning
    assert best_record(records(0.5, 0.3, 0.3))["step"] == 20  # the earliest of equals
    assert best_record([{"step": 5, "train_loss": 1.0}]) is None


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model_index.json").is_file(), reason="needs the bundled demo model")
def test_a_deliberately_overtrained_run_warns_and_keeps_its_best_checkpoint(tmp_path):
    # the demo model draws the held-out shapes well; trained hard on two checkerboards, at ten times the style
    # preset's learning rate, it draws them worse at every checkpoint
    data = write_style_images(tmp_path / "data", count=2)
    board = ((np.indices((64, 64)).sum(0) // 2) % 2 * 255).astype(np.uint8)
    for path in data.glob("*.png"):
        Image.fromarray(np.stack([board, 255 - board, board], -1)).save(path)
    held = write_style_images(tmp_path / "held", count=2, seed=7)
    config = _config(
        "demo",
        data,
        tmp_path / "out" / "board.safetensors",
        validation_dir=str(held),
        unet_targets="attn",
        train_text_encoder=False,
        batch_size=1,
        max_train_steps=30,
        checkpoint_every_steps=6,
        keep_checkpoints=1,
    )
    events = []
    result = train(config, progress=events.append)
    losses = [loss for _, loss in result.validation_losses]
    assert [step for step, _ in result.validation_losses] == [6, 12, 18, 24, 30]
    assert all(later > earlier for earlier, later in zip(losses[:-1], losses[1:], strict=True)), losses
    warned = [e.step for e in events if e.phase == "checkpoint" and "over-training" in e.message]
    assert warned == [24], "the fourth checkpoint is the third rise in a row"
    run_dir = config.resolved_work_dir
    assert "risen 4 times in a row" in overtraining_warning(read_metrics(run_dir))
    assert result.best_checkpoint == run_dir / "checkpoints" / "step-000006" / "adapter.safetensors"
    assert result.best_checkpoint.is_file() and (run_dir / "checkpoints" / "step-000024").is_dir()


def test_tensorboard_gets_the_training_and_validation_losses(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_style_images(tmp_path / "data", count=3)
    config = _config(
        tiny_model_dir,
        data,
        tmp_path / "lora.safetensors",
        validation_images=1,
        checkpoint_every_steps=2,
        max_train_steps=4,
        log_with="tensorboard",
        sample_prompts=["sks, a circle", "sks, a square"],  # a list option, which trackers do not take as is
    )
    result = train(config)
    events = sorted((config.resolved_work_dir / "tensorboard").glob("events.*"))
    assert len(events) == 1
    logged = EventAccumulator(str(events[0]))
    logged.Reload()
    scalars = logged.Scalars("val_loss")
    assert [s.step for s in scalars] == [step for step, _ in result.validation_losses] == [2, 4]
    assert [s.value for s in scalars] == pytest.approx([loss for _, loss in result.validation_losses])
    assert [s.step for s in logged.Scalars("train_loss")] == [2, 4]
