"""Composition at zero cost? Generation time with 0, 1 and 3 adapters (fused and unfused), stack switch time,
adapter load time.

    python bench/generate_speed.py [--models demo,sd15] [--repeats 6] [--sd15-repeats 3] [--switches 12]

Adapters: kohya's LierLa targets (every attention, feed-forward and projection layer of the UNet, attention and
MLP of the text encoder), rank 16, random non-zero up-matrices, written as kohya files. Generations go through
`studio.generate.generate` as the CLI and the UI call it; contenders alternate so background load hits them
alike, and every ratio is the median of the per-round ratios against the base model's time in the same round:

- base: no adapter;
- fused 1 / fused 3: a fixed stack of 1 or 3 adapters (the default: merged into the weights, cached while the
  stack is unchanged, the exact base weights back after every batch);
- unfused 1 / unfused 3: the same stacks as PEFT layers (`fuse=False`), on a second copy of the model.

Fixed-stack overhead: what a generation with an unchanged stack of 3 adapters adds besides sampling (resolving the
stack, swapping the cached merged weights in and out), timed alone: the noise-free part of `fixed_stack_ratio`.
Switch: from a stack of 3 adapters to 3 others (read from disk, matched, merged), until the pipeline is ready
to run. Load: reading and matching one adapter file. Demo model: 4 images, 20 steps at 64 px; SD1.5-shaped
model (real configs, random weights): 1 image, 3 steps at 128 px, fewer rounds. The last line is one JSON object with
`fixed_stack_ratio` (fused 3-adapter stack / base, the worse model) and `switch_ms` (demo model, median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, load_model, machine  # noqa: E402
from studio.adapters import kohya_te_name, kohya_unet_name, save_adapter, training_metadata  # noqa: E402
from studio.compose import AdapterStack, load_adapter  # noqa: E402
from studio.generate import GenerationRequest, LoraRequest, _resolve_stack, generate  # noqa: E402
from studio.models import BaseModel  # noqa: E402
from training.lora import LoraSpec, text_encoder_targets, unet_targets  # noqa: E402

SETTINGS = {  # model -> (size, steps, batch)
    "demo": (64, 20, 4),
    "sd15": (128, 3, 1),
}
RANK = 16


def write_adapter(base: BaseModel, path: Path, seed: int) -> Path:
    """A kohya LierLa adapter for `base` with random down and non-zero up matrices."""
    spec = LoraSpec(rank=RANK, alpha=RANK / 2, unet_targets="kohya", text_encoder_targets="attn_mlp")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = [(kohya_unet_name(base.family, p), base.unet.get_submodule(p)) for p in unet_targets(base.unet, spec)]
    for index, te in enumerate(base.text_encoders):
        modules += [(kohya_te_name(base.family, index, p), te.get_submodule(p)) for p in text_encoder_targets(te, spec)]
    for name, module in modules:
        out_dim, in_dim = module.weight.shape[:2]
        kernel = (1, 1) if module.weight.dim() == 4 else ()
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, in_dim, *kernel, generator=generator) / in_dim**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, RANK, *kernel, generator=generator) * 0.02
        tensors[f"{name}.alpha"] = torch.tensor(float(spec.alpha))
    metadata = training_metadata(base.family, rank=RANK, alpha=spec.alpha, network_args={}, title=path.stem)
    save_adapter(path, tensors, metadata, dtype="fp16")
    return path


def timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleave(contenders: dict, repeats: int, label: str, log) -> dict[str, list[tuple[float, float]]]:
    """Warm each contender up once, then time them in alternating order for `repeats` rounds."""
    for run in contenders.values():  # caches, PEFT layers, first-call allocations
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for round_index in range(repeats):
        names = list(contenders) if round_index % 2 == 0 else list(contenders)[::-1]
        for name in names:
            times[name].append(timed(contenders[name]))
        log(f"{label} round {round_index + 1}: " + ", ".join(f"{n} {times[n][-1][0]:.2f}s" for n in contenders))
    return times


def bench_model(model: str, repeats: int, switches: int, log) -> dict:
    """Generation times, switch and load times on one model."""
    size, steps, batch = SETTINGS[model]
    base, second = load_model(model), load_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(base, Path(tmp) / f"style_{i}.safetensors", seed=i) for i in range(6)]

        def request(count: int, fuse: bool = True) -> GenerationRequest:
            loras = [LoraRequest(str(p), 0.6) for p in paths[:count]]
            return GenerationRequest(
                "a red circle on a blue background",
                seed=7,
                steps=steps,
                width=size,
                height=size,
                batch=batch,
                loras=loras,
                fuse=fuse,
            )

        fused_1, fused_3, unfused = AdapterStack(base), AdapterStack(base), AdapterStack(second)
        phase_one = {
            "base": lambda: generate(base, request(0)),
            "fused_1": lambda: generate(base, request(1), stack=fused_1),
            "fused_3": lambda: generate(base, request(3), stack=fused_3),
            "unfused_3": lambda: generate(second, request(3, fuse=False), stack=unfused),
        }
        times = interleave(phase_one, repeats, f"{model} fused", log)
        # the second copy's stack cut to one adapter (outside the timing: that is a switch, not a generation)
        _resolve_stack(unfused, second, request(1, fuse=False).loras, None)
        phase_two = {
            "base": lambda: generate(base, request(0)),
            "unfused_1": lambda: generate(second, request(1, fuse=False), stack=unfused),
        }
        later = interleave(phase_two, max(2, repeats // 2), f"{model} unfused", log)

        def unchanged_stack():  # what a generation with the same 3 adapters does besides sampling
            _resolve_stack(fused_3, base, request(3).loras, None, install=False)
            with fused_3.fused():
                pass

        overhead_ms = [1000 * timed(unchanged_stack)[0] for _ in range(20)]

        switch = AdapterStack(base)
        groups = [request(3).loras, [LoraRequest(str(p), 0.6) for p in paths[3:]]]
        switch_ms = []
        for index in range(switches + 1):

            def change(loras=groups[index % 2]):
                _resolve_stack(switch, base, loras, None, install=False)
                with switch.fused():
                    pass

            wall, _ = timed(change)
            if index:  # the first fills the module lookup table once per model
                switch_ms.append(1000 * wall)
        load_ms = [1000 * timed(lambda p=p: load_adapter(p, base))[0] for p in paths for _ in range(2)]
        modules = len(load_adapter(paths[0], base).patches)

    def ratio(runs: dict, name: str, which: int) -> float:
        pairs = zip(runs[name], runs["base"], strict=True)
        return round(statistics.median(t[which] / r[which] for t, r in pairs), 4)

    seconds = {name: round(statistics.median(t[0] for t in ts), 3) for name, ts in times.items()}
    seconds["unfused_1"] = round(statistics.median(t[0] for t in later["unfused_1"]), 3)
    names = ("fused_1", "fused_3", "unfused_3")
    result = {
        "size": size,
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "seconds_per_generation": seconds,
        "ratio_to_base": {**{n: ratio(times, n, 0) for n in names}, "unfused_1": ratio(later, "unfused_1", 0)},
        "cpu_time_ratio_to_base": {
            **{n: ratio(times, n, 1) for n in names},
            "unfused_1": ratio(later, "unfused_1", 1),
        },
        "fixed_stack_overhead_ms": round(statistics.median(overhead_ms), 2),
        "fixed_stack_overhead_fraction": round(statistics.median(overhead_ms) / 1000 / seconds["base"], 5),
        "switch_ms": {"median": round(statistics.median(switch_ms), 1), "max": round(max(switch_ms), 1)},
        "load_ms": {"median": round(statistics.median(load_ms), 1), "max": round(max(load_ms), 1)},
        "adapter_modules": modules,
    }
    return result


def main() -> None:
    """Benchmark each model, print the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,sd15")
    parser.add_argument("--repeats", type=int, default=6, help="rounds on the demo model")
    parser.add_argument("--sd15-repeats", type=int, default=3, help="rounds on the SD1.5-shaped model")
    parser.add_argument("--switches", type=int, default=12, help="stack switches timed (a third on SD1.5)")
    args = parser.parse_args()
    started = time.time()
    result: dict = {"machine": machine()}

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    models = [m for m in args.models.split(",") if m]
    for model in models:
        repeats = args.sd15_repeats if model == "sd15" else args.repeats
        switches = max(2, args.switches // 3) if model == "sd15" else args.switches
        result[model] = bench_model(model, repeats, switches, log)
    result["fixed_stack_ratio"] = max(result[m]["ratio_to_base"]["fused_3"] for m in models)
    result["fixed_stack_cpu_time_ratio"] = max(result[m]["cpu_time_ratio_to_base"]["fused_3"] for m in models)
    result["fixed_stack_overhead_fraction"] = max(result[m]["fixed_stack_overhead_fraction"] for m in models)
    result["switch_ms"] = result[models[0]]["switch_ms"]["median"]
    result["targets"] = {"fixed_stack_ratio": "<= 1.03", "switch_ms": "< 250 on the demo model"}
    result["wall_seconds"] = round(time.time() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
