"""`studio train | export | ui`: the command line builds configs and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys

TRAIN_FLAGS = {
    # flag dest -> TrainConfig field
    "base": "base",
    "data": "data_dir",
    "trigger": "trigger",
    "class_noun": "class_noun",
    "out": "output",
    "name": "output_name",
    "steps": "max_train_steps",
    "epochs": "epochs",
    "rank": "rank",
    "alpha": "alpha",
    "lr": "unet_lr",
    "te_lr": "text_encoder_lr",
    "text_encoder": "train_text_encoder",
    "targets": "unet_targets",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "seed": "seed",
    "class_prompt": "class_prompt",
    "prior_images": "num_class_images",
    "prior_loss_weight": "prior_loss_weight",
    "checkpoint_every": "checkpoint_every_steps",
    "sample_prompt": "sample_prompts",
    "mixed_precision": "mixed_precision",
    "optimizer": "optimizer",
    "work_dir": "work_dir",
}


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA adapter on a folder of images")
    p.add_argument("--base", help="base model: demo, a diffusers folder, a .safetensors checkpoint or a hub id")
    p.add_argument("--data", help="folder of training images (.txt sidecars hold captions)")
    p.add_argument("--trigger", help="trigger word, e.g. sks")
    p.add_argument("--class-noun", help="class noun used in captions without a sidecar (e.g. style)")
    p.add_argument("--out", help="adapter file to write (.safetensors)")
    p.add_argument("--name", help="adapter title stored in the file (default: the file name)")
    p.add_argument("--config", help="a TOML config (flags override it)")
    p.add_argument("--preset", choices=["style", "character", "quick"], help="starting point (default: style)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--lr", type=float, help="UNet learning rate")
    p.add_argument("--te-lr", type=float, help="text-encoder learning rate")
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, help="also train the text encoder")
    p.add_argument("--targets", choices=["cross_attn", "attn", "kohya"], help="UNet modules to adapt")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--class-prompt", help="enables prior preservation with images of this prompt")
    p.add_argument("--prior-images", type=int, help="number of class images for prior preservation")
    p.add_argument("--prior-loss-weight", type=float)
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--sample-prompt", action="append", help="prompt rendered at each checkpoint (repeatable)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "prodigy"])
    p.add_argument("--work-dir", help="where checkpoints and samples go (default: beside --out)")
    p.add_argument("--resume", help="resume from a checkpoint folder or a run folder")
    p.add_argument("--save-config", help="write the effective config to this TOML file and exit")


def build_train_config(args: argparse.Namespace):
    """The TrainConfig described by parsed `studio train` arguments (preset < config file < flags)."""
    from training.config import TrainConfig, read_toml

    values = read_toml(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", None) or "style"
    values.pop("preset", None)
    for flag, name in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = value
    if args.class_prompt:
        values["prior_preservation"] = True
    if args.steps is not None and args.epochs is None:
        values["epochs"] = 0
    elif args.epochs is not None and args.steps is None:
        values["max_train_steps"] = 0
    return TrainConfig.from_preset(preset, **values)


def _run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from training.trainer import Trainer, TrainingCancelled

    config = build_train_config(args)
    if args.save_config:
        config.save(args.save_config)
        print(f"wrote {args.save_config}")
        return 0
    missing = [flag for flag, value in (("--data", config.data_dir), ("--out", config.output)) if not value]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    bar = None

    def on_progress(event) -> None:
        nonlocal bar
        if event.phase in ("training", "resumed"):
            if bar is None:
                bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True)
            bar.n = event.step
            if event.loss is not None:
                bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")
            bar.refresh()
        elif event.message:
            (bar.write if bar else print)(f"[{event.phase}] {event.message}")

    trainer = Trainer(config, progress=on_progress)
    report = trainer.scan()
    print(report.summary())
    try:
        result = trainer.run(resume_from=args.resume)
    except (KeyboardInterrupt, TrainingCancelled):
        print(f"\nstopped; resume with --resume {trainer.work_dir}", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {result.output} ({result.steps} steps, final loss {result.losses[-1]:.4f}, {result.seconds:.0f}s)")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from studio.adapters import export_adapter, file_hashes

    dtype = None if args.dtype == "keep" else args.dtype
    metadata = export_adapter(
        args.adapter, args.out, include_dataset_metadata=args.dataset_metadata, dtype=dtype, title=args.title
    )
    hashes = file_hashes(args.out)
    print(f"wrote {args.out}")
    print(f"  title: {metadata.get('modelspec.title', '')}  trigger: {metadata.get('modelspec.trigger_phrase', '')}")
    print(f"  AutoV2 {hashes['AutoV2']}  AutoV3 {hashes['AutoV3'][:12]}  SHA256 {hashes['SHA256']}")
    if not args.dataset_metadata:
        print("  caption and dataset-folder metadata left out")
    return 0


def _run_ui(args: argparse.Namespace) -> int:
    from studio.ui.app import launch

    launch(host=args.host, port=args.port, workspace=args.workspace, base=args.base, auth=args.auth, share=args.share)
    return 0


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the web UI server (shared by `studio ui` and launch.py)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", default="workspace", help="folder for datasets, adapters and outputs")
    parser.add_argument("--base", default="demo", help="base model to start with")
    parser.add_argument("--auth", help="USER:PASS required for every page and API call")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")


def build_parser() -> argparse.ArgumentParser:
    """The `studio` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="studio", description="LoRA style studio")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    e = sub.add_parser("export", help="write a CivitAI-ready copy of an adapter")
    e.add_argument("adapter", help="adapter .safetensors file")
    e.add_argument("--out", required=True, help="file to write")
    e.add_argument(
        "--dataset-metadata",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep caption tag counts and dataset folder names (--no-dataset-metadata leaves them out)",
    )
    e.add_argument("--dtype", choices=["keep", "fp16", "bf16", "fp32"], default="keep")
    e.add_argument("--title", help="new title stored in the file")
    ui = sub.add_parser("ui", help="start the web UI")
    add_ui_arguments(ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `studio` console script."""
    args = build_parser().parse_args(argv)
    handlers = {"train": _run_train, "export": _run_export, "ui": _run_ui}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
