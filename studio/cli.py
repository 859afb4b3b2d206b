"""`studio train | export | import | generate | inspect | merge | ui`: builds configs and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    "clip_skip": "clip_skip",
    "prediction_type": "prediction_type",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "seed": "seed",
    "class_prompt": "class_prompt",
    "prior_images": "num_class_images",
    "prior_loss_weight": "prior_loss_weight",
    "preservation_weight": "preservation_weight",
    "preservation_prompt": "preservation_prompt",
    "caption_dropout": "caption_dropout_rate",
    "ema_decay": "ema_decay",
    "checkpoint_every": "checkpoint_every_steps",
    "validation_images": "validation_images",
    "validation_dir": "validation_dir",
    "log_with": "log_with",
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
    p.add_argument("--targets", choices=["cross_attn", "attn", "kohya", "locon"], help="UNet modules to adapt")
    p.add_argument(
        "--clip-skip", type=int, help="SD 1.x/2.x text-encoder layer from the end: 1 = last (default), 2 = penultimate"
    )
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="for SD 2.x single files, which do not say: epsilon (512 base) or v_prediction (768-v)",
    )
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--class-prompt", help="enables prior preservation with images of this prompt")
    p.add_argument("--prior-images", type=int, help="number of class images for prior preservation")
    p.add_argument("--prior-loss-weight", type=float)
    p.add_argument(
        "--preservation-weight",
        type=float,
        help="output preservation: also keep the base model's prediction for the caption without the trigger (0: off)",
    )
    p.add_argument(
        "--preservation-prompt", choices=["caption", "blank"], help="what output preservation keeps (default: caption)"
    )
    p.add_argument("--caption-dropout", type=float, help="share of samples trained on the empty prompt (0: off)")
    p.add_argument("--ema-decay", type=float, help="export a moving average of the weights, e.g. 0.99 (0: off)")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument(
        "--validation-images",
        type=int,
        help="hold out N pictures (the same ones every run) and score them at each checkpoint and the end (0: off)",
    )
    p.add_argument("--validation-dir", help="score the pictures of this folder instead (not trained on)")
    p.add_argument(
        "--log-with",
        choices=["tensorboard"],
        help="also log the losses to RUN_DIR/tensorboard (needs: pip install 'lora-style-studio[tensorboard]')",
    )
    p.add_argument("--sample-prompt", action="append", help="prompt rendered at each checkpoint (repeatable)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "prodigy"])
    p.add_argument("--work-dir", help="where checkpoints and samples go (default: beside --out)")
    p.add_argument("--resume", help="resume from a checkpoint folder or a run folder")
    p.add_argument("--save-config", help="write the effective config to this TOML file and exit")
    p.add_argument(
        "--estimate-for",
        default="auto",
        help="device of the time and memory estimate printed before training: auto, cpu, cpu:GiB, gpu:GiB",
    )
    p.add_argument("--plan", action="store_true", help="print the plan and the estimate, then exit")


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

    from training import metrics
    from training.trainer import Trainer, TrainingCancelled, end_distributed, launched_rank

    config = build_train_config(args)
    main_process = launched_rank() == 0  # under torchrun / accelerate launch only rank 0 prints and writes
    if args.save_config:
        if main_process:
            config.save(args.save_config)
            print(f"wrote {args.save_config}")
        return 0
    missing = [flag for flag, value in (("--data", config.data_dir), ("--out", config.output)) if not value]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    if main_process:
        _print_estimate(config, args.estimate_for)
    if args.plan:
        return 0
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
    if main_process:
        print(report.summary())
    try:
        result = trainer.run(resume_from=args.resume)
    except (KeyboardInterrupt, TrainingCancelled):
        if main_process:
            print(f"\nstopped; resume with --resume {trainer.work_dir}", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
        end_distributed()
    if main_process:
        loss = result.losses[-1]
        print(f"wrote {result.output} ({result.steps} steps, final loss {loss:.4f}, {result.seconds:.0f}s)")
        records = metrics.read_metrics(trainer.work_dir)
        print(f"losses by step: {trainer.work_dir / metrics.METRICS_FILE}")
        best = metrics.best_summary(records, trainer.work_dir, result.output)
        if best:
            print(best)
        warning = metrics.overtraining_warning(records)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _print_estimate(config, device: str) -> None:
    """Print the plan with its time and memory estimate (and memory-saving modes if it will not fit)."""
    from training.estimate import Device, describe_plan, weightless_base

    chosen = Device.parse(device)
    try:
        base = weightless_base(config.base)
    except ValueError as exc:
        print(f"(no estimate: {exc})")
        return
    print(describe_plan(config, base, chosen).replace("**", ""))


def _run_export(args: argparse.Namespace) -> int:
    from studio import sidecars
    from studio.adapters import file_hashes

    dtype = None if args.dtype == "keep" else args.dtype
    metadata, warnings = sidecars.export_with_sidecars(
        args.adapter, args.out, include_dataset_metadata=args.dataset_metadata, dtype=dtype, title=args.title
    )
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    hashes = file_hashes(args.out)
    print(f"wrote {args.out}")
    print(f"  title: {metadata.get('modelspec.title', '')}  trigger: {metadata.get('modelspec.trigger_phrase', '')}")
    print(f"  AutoV2 {hashes['AutoV2']}  AutoV3 {hashes['AutoV3'][:12]}  SHA256 {hashes['SHA256']}")
    beside = [p for p in (sidecars.json_path(args.out), sidecars.preview_path(args.out)) if p.is_file()]
    print(f"  A1111 sidecars: {', '.join(str(p) for p in beside)}")
    if "ssmd_cover_images" in metadata:
        print("  cover image embedded (ssmd_cover_images, modelspec.thumbnail)")
    if not args.dataset_metadata:
        print("  caption and dataset-folder metadata left out")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from studio import sidecars
    from studio.adapters import parse_adapter
    from studio.library import Workspace

    parsed = parse_adapter(args.file)  # refuses pickles, unreadable files and files with no LoRA in them
    workspace = Workspace(args.workspace)
    target, warnings = workspace.import_adapter(args.file, args.name or "")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    fields, _ = sidecars.stored_fields(target)
    print(f"imported {target.stem} into {target.parent} ({parsed.format} format, {len(parsed.modules)} modules)")
    print(f"  trigger: {fields.get('activation text') or '-'}  preferred weight: {fields.get('preferred weight', 1):g}")
    print(f"  preview: {workspace.preview_path(target.stem) if workspace.preview_path(target.stem).is_file() else '-'}")
    return 0


def parse_weighted(spec: str, default: float | None = 1.0) -> tuple[str, float | None, float | None]:
    """FILE[:W[:UNET_W]] -> (file, weight or `default`, unet weight or None); the file part may itself contain ':'."""
    parts = spec.rsplit(":", 2)
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts)
    if not name:
        raise ValueError(f"bad adapter spec {spec!r}: expected FILE[:WEIGHT[:UNET_WEIGHT]]")
    weight = numbers[0] if numbers else default
    return name, weight, numbers[1] if len(numbers) > 1 else None


def generate_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of a `studio generate` call: each --prompt, then each line of --prompts-file (# lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read prompts file {args.prompts_file}: {exc}") from exc
        lines = (line.strip() for line in text.splitlines())
        prompts += [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError("no prompt: give --prompt (repeatable) or --prompts-file with one prompt per line")
    return prompts


def build_generate_requests(args: argparse.Namespace) -> list:
    """One GenerationRequest per prompt of parsed `studio generate` arguments, all with the same other settings."""
    from studio import sidecars
    from studio.generate import GenerationRequest, LoraRequest

    loras = []
    for spec in args.lora or []:
        path, weight, unet_weight = parse_weighted(spec, default=None)
        weight = sidecars.preferred_weight(path) if weight is None else weight  # A1111's NAME.json beside the file
        loras.append(LoraRequest(path, weight, unet_weight))
    return [
        GenerationRequest(
            prompt=prompt,
            negative_prompt=args.negative,
            seed=args.seed,
            steps=args.steps,
            cfg=args.cfg,
            width=args.width,
            height=args.height,
            sampler=args.sampler,
            batch=args.batch,
            loras=list(loras),
            fuse=args.fuse,
            vae_slicing=args.vae_slicing,
            vae_tiling=args.vae_tiling,
            cpu_offload=args.cpu_offload,
            clip_skip=args.clip_skip,
        )
        for prompt in generate_prompts(args)
    ]


def build_generate_request(args: argparse.Namespace):
    """The GenerationRequest of the first prompt of parsed `studio generate` arguments."""
    return build_generate_requests(args)[0]


def _run_generate(args: argparse.Namespace) -> int:
    from studio.compose import AdapterStack
    from studio.generate import generate
    from studio.infotext import parse_lora_tags
    from studio.library import Workspace
    from studio.models import load_base

    requests = build_generate_requests(args)  # every prompt is checked before the model loads
    library = Workspace(args.workspace) if args.workspace else None
    extra = {Path(lora.name).stem: Path(lora.name) for lora in requests[0].loras}

    def resolve(name: str) -> Path:
        if name in extra:
            return extra[name]
        if library is not None and library.adapter_path(name).is_file():
            return library.adapter_path(name)
        raise ValueError(f"unknown adapter {name!r} in the prompt: pass it with --lora or put it in the library")

    for request in requests:  # a bad <lora:...> tag in the last prompt fails now, not after the others ran
        for tag in parse_lora_tags(request.prompt)[1]:
            resolve(tag.name)
    base = load_base(args.base, prediction_type=args.prediction_type)
    stack = AdapterStack(base)  # one model and one adapter stack for every prompt: loaded and fused once
    for number, request in enumerate(requests, start=1):
        if len(requests) > 1:
            print(f"[{number}/{len(requests)}] {request.prompt}")
        result = generate(base, request, stack=stack, resolver=resolve, out_dir=args.out)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        for path in result.paths:
            print(f"wrote {path}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from studio.adapters import file_hashes, parse_adapter

    parsed = parse_adapter(args.file)
    hashes = file_hashes(args.file)
    print(f"file:     {parsed.path}")
    print(f"format:   {parsed.format}")
    print(f"family:   {parsed.family or 'unknown (decided by the base model)'}")
    print(f"modules:  {len(parsed.modules)} ({', '.join(f'{k}: {v}' for k, v in sorted(parsed.counts().items()))})")
    print(f"rank:     {', '.join(map(str, parsed.ranks()))}")
    print(f"alpha:    {', '.join(f'{a:g}' for a in parsed.alphas())}")
    print(f"hashes:   AutoV2 {hashes['AutoV2']}  AutoV3 {hashes['AutoV3'][:12]}  SHA256 {hashes['SHA256']}")
    if parsed.unknown_keys:
        print(f"not understood: {len(parsed.unknown_keys)}")
        for key in parsed.unknown_keys:
            print(f"  {key}")
    print("metadata:")
    for key, value in sorted(parsed.metadata.items()):
        shown = value if len(value) <= 100 else value[:97] + "..."
        print(f"  {key}: {shown}")
    if args.base:
        from studio.compose import match_adapter
        from studio.models import load_base

        matched = match_adapter(parsed, load_base(args.base))
        print(f"matched:  {len(matched.patches)} module(s) of {len(parsed.modules)}")
        print(f"unmatched: {len(matched.unmatched)}")
        for key in matched.unmatched:
            print(f"  {key}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from studio.merge import merge_adapters

    inputs = [parse_weighted(spec)[:2] for spec in args.adapters]
    report = merge_adapters(inputs, args.out, rank=args.rank, title=args.title, dtype=args.dtype)
    how = "exact (ranks concatenated)" if args.rank is None else f"SVD to rank {args.rank}"
    print(f"wrote {report.output}: {report.modules} modules, {how}, max rank {report.max_rank}")
    print(f"relative error: max {report.relative_error_max:.4f}, mean {report.relative_error_mean:.4f}")
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """Serve the web UI with the parsed server flags (`studio ui` and launch.py); a bad --auth is a ValueError."""
    from studio.ui.app import launch, parse_auth

    parse_auth(args.auth)
    launch(
        host=args.host,
        port=args.port,
        workspace=args.workspace,
        base=args.base,
        auth=args.auth,
        share=args.share,
        max_upload_mb=args.max_upload_mb,
        queue_size=args.queue_size,
    )
    return 0


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the web UI server (shared by `studio ui` and launch.py)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", default="workspace", help="folder for datasets, adapters and outputs")
    parser.add_argument("--base", default="demo", help="base model to start with")
    parser.add_argument("--auth", help="USER:PASS required for every page and API call")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--max-upload-mb", type=int, default=2048, help="largest file one upload may send")
    parser.add_argument("--queue-size", type=int, default=32, help="requests that may wait; more are refused")


def build_parser() -> argparse.ArgumentParser:
    """The `studio` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="studio", description="LoRA style studio")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    e = sub.add_parser("export", help="write a CivitAI-ready copy of an adapter, with A1111 sidecars beside it")
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
    imp = sub.add_parser(
        "import", help="add an adapter file to a workspace library, with its A1111 NAME.json and NAME.preview.png"
    )
    imp.add_argument("file", help="adapter .safetensors file (its NAME.json / NAME.preview.png are read if beside it)")
    imp.add_argument("--workspace", default="workspace", help="workspace folder (the library is its adapters/)")
    imp.add_argument("--name", help="name in the library (default: the file name)")
    g = sub.add_parser("generate", help="generate images, optionally with adapters")
    g.add_argument("--base", default="demo", help="base model")
    g.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="for SD 2.x single files, which do not say: epsilon (512 base) or v_prediction (768-v)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        help="prompt; may contain <lora:name:w> tags (repeatable: the model loads once for all prompts)",
    )
    g.add_argument(
        "--prompts-file",
        help="text file with one prompt per line (blank lines and lines starting with # are skipped), after --prompt",
    )
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument(
        "--lora", action="append", help="FILE[:W[:UNET_W]] adapter (repeatable; W defaults to its NAME.json's weight)"
    )
    g.add_argument("--seed", type=int, default=-1, help="seed (-1: random); image i uses seed + i")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--width", type=int, default=0, help="0: the model's native size")
    g.add_argument("--height", type=int, default=0)
    g.add_argument(
        "--sampler", default="Default", help="Default, Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC..."
    )
    g.add_argument("--batch", type=int, default=1)
    g.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        help="SD 1.x/2.x text-encoder layer from the end: 1 = last, 2 = penultimate (A1111's Clip skip)",
    )
    g.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge the adapters into the weights for the run (restored exactly after)",
    )
    g.add_argument("--workspace", default=None, help="adapter library for <lora:name> tags (its adapters/ folder)")
    memory = g.add_argument_group("memory-saving modes (for 8-12 GB GPUs)")
    memory.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    memory.add_argument("--vae-tiling", action="store_true", help="decode large images in overlapping tiles")
    memory.add_argument(
        "--cpu-offload", action="store_true", help="keep each model on the CPU until it runs (needs a GPU)"
    )
    g.add_argument("--out", required=True, help="folder for the PNGs (numbered on from the files already there)")
    i = sub.add_parser("inspect", help="show an adapter file's format, family, ranks, metadata and hashes")
    i.add_argument("file")
    i.add_argument("--base", help="also match it against this base model and list unmatched keys")
    m = sub.add_parser("merge", help="merge adapters at weights into one file")
    m.add_argument("adapters", nargs="+", help="FILE[:W] (repeat)")
    m.add_argument("--out", required=True)
    m.add_argument("--rank", type=int, help="SVD to this rank (default: exact, ranks concatenated)")
    m.add_argument("--title")
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ui = sub.add_parser("ui", help="start the web UI")
    add_ui_arguments(ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `studio` console script."""
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _run_train,
        "export": _run_export,
        "import": _run_import,
        "generate": _run_generate,
        "inspect": _run_inspect,
        "merge": _run_merge,
        "ui": run_ui,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as exc:  # bad input, a missing file, a full disk: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
