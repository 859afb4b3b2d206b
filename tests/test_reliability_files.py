"""Reliability: archives, names and adapter files from the internet never write outside the workspace, never run
code, and a refused adapter leaves the running pipeline exactly as it was."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file

from studio import library
from studio.adapters import parse_adapter, read_metadata
from studio.cli import main
from studio.compose import AdapterStack, load_adapter
from studio.generate import GenerationRequest, LoraRequest, generate
from studio.library import Workspace
from studio.models import load_base
from studio.ui import dataset_tab, generate_tab, library_tab, train_tab
from studio.ui.common import ModelCache
from tests.helpers import make_adapter, render, snapshot_tree, write_style_images
from training.config import TrainConfig
from training.trainer import train


def _png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _link(name: str, target: str) -> tuple[zipfile.ZipInfo, str]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.fixture
def box(tmp_path):
    """(parent folder, workspace inside it, a folder of uploads beside it)."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    return tmp_path, Workspace(tmp_path / "ws"), uploads


# ------------------------------------------------------------------------------------------------------ archives


def test_hostile_zip_entries_are_refused_and_nothing_lands_outside_the_dataset(box):
    parent, workspace, uploads = box
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("../../inner_escape.png", _png())
    archive = uploads / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/one.png", _png())
        zf.writestr("good/one.txt", "a red square")
        zf.writestr("../escape.png", _png((1, 2, 3)))
        zf.writestr("../../../../../../tmp/escape_deep.png", _png((1, 2, 4)))
        zf.writestr("sub/../../sideways.png", _png((1, 2, 5)))
        zf.writestr("/abs/evil.png", _png((4, 5, 6)))
        zf.writestr("C:/windows/evil.png", _png((4, 5, 7)))
        zf.writestr(*_link("link.png", "/etc/passwd"))
        zf.writestr(*_link("dirlink/x.png", "../../.."))
        zf.writestr("nested.zip", inner.getvalue())
        zf.writestr("nested.tar.gz", b"\x1f\x8b" + bytes(30))
        zf.writestr("notes.pdf", b"%PDF")
        zf.writestr("__MACOSX/good/._one.png", b"resource fork")
        zf.writestr(".hidden.png", _png((9, 9, 9)))
    (uploads / "loose.tar").write_bytes(bytes(512))
    before = snapshot_tree(parent, exclude=workspace.root)
    ws_before = snapshot_tree(workspace.root)

    status, _ = dataset_tab.upload(workspace, "zipped", [str(archive), str(uploads / "loose.tar")], "")

    assert snapshot_tree(parent, exclude=workspace.root) == before, "something was written outside the workspace"
    added = {k: v for k, v in snapshot_tree(workspace.root).items() if k not in ws_before}
    assert set(added) == {"datasets/zipped/", "datasets/zipped/one.png", "datasets/zipped/one.txt"}
    for reason in ("path leaves the folder", "absolute path", "symbolic link", "archive inside the archive"):
        assert reason in status, reason
    assert status.count("path leaves the folder") == 3 and status.count("absolute path") == 2
    assert status.count("symbolic link") == 2 and status.count("archive inside the archive") == 2
    assert ".tar archives are not unpacked; upload a .zip" in status and "not an image (.pdf)" in status
    assert not Path("/tmp/escape_deep.png").exists()


def test_zip_bomb_by_compression_ratio_is_refused_before_unpacking(box):
    parent, workspace, uploads = box
    archive = uploads / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("flat.bmp", bytes(32 * 1024**2))  # 32 MiB of zeros: ~32 KiB compressed
        zf.writestr("fine.png", _png())
    assert archive.stat().st_size < 200 * 1024
    report = workspace.import_files("bombed", [archive])
    assert report.added == ["fine.png"]
    (name, reason), *_ = report.skipped
    assert name == "flat.bmp" and "zip bomb" in reason and f"over the {library.MAX_ZIP_RATIO}:1 limit" in reason
    assert sum(p.stat().st_size for p in workspace.dataset_dir("bombed").iterdir()) < 64 * 1024


def test_zip_bomb_by_total_size_entry_count_and_file_size_is_refused(box, monkeypatch):
    parent, workspace, uploads = box
    monkeypatch.setattr(library, "MAX_IMPORT_BYTES", 1024**2)
    monkeypatch.setattr(library, "MAX_FILE_BYTES", 512 * 1024)
    monkeypatch.setattr(library, "MAX_ZIP_ENTRIES", 5)
    noise = np.random.default_rng(0).bytes
    big = uploads / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        for index in range(3):
            zf.writestr(f"noise_{index}.png", noise(400 * 1024))
    status, _ = dataset_tab.upload(workspace, "sized", [str(big)], "")
    assert "big.zip unpacks to more than the 1 MiB limit" in status
    many = uploads / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for index in range(6):
            zf.writestr(f"p{index}.png", _png((index, 0, 0)))
    status, _ = dataset_tab.upload(workspace, "sized", [str(many)], "")
    assert "many.zip holds 6 files; the limit is 5" in status
    one_big = uploads / "one_big.png"
    one_big.write_bytes(noise(600 * 1024))
    report = workspace.import_files("sized", [one_big])
    assert report.skipped == [("one_big.png", "larger than the 0.5 MiB limit for one file")]
    assert list(workspace.dataset_dir("sized").iterdir()) == [], "no partial file may remain"


def test_a_zip_whose_header_understates_the_size_cannot_write_more_than_it_declared(box):
    parent, workspace, uploads = box
    data = np.random.default_rng(1).bytes(300 * 1024)
    archive = uploads / "liar.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("liar.png", data)
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size fields
        at = raw.find(signature)
        raw[at + offset : at + offset + 4] = struct.pack("<I", 1000)
    archive.write_bytes(bytes(raw))
    report = workspace.import_files("liar", [archive])
    assert not report.added and report.skipped[0][0] == "liar.png"
    assert "cannot be read from the zip" in report.skipped[0][1]
    assert list(workspace.dataset_dir("liar").iterdir()) == []


# -------------------------------------------------------------------------------------------- names that escape
EVIL_NAMES = ["../evil", "..", "../../../tmp/evil", "/etc/evil", "a/b", "..\\evil", "C:\\evil", ".hidden", "x" * 65]


def test_names_that_try_to_escape_the_workspace_are_refused_by_the_library_ui_and_cli(box, tiny_model_dir, capsys):
    parent, workspace, uploads = box
    write_style_images(workspace.dataset_dir("ok"), count=2)
    adapter = make_adapter(tiny_model_dir, workspace.adapter_path("good"), seed=1, rank=2)
    outside = make_adapter(tiny_model_dir, parent / "outside.safetensors", seed=2, rank=2)
    (uploads / "one.png").write_bytes(_png())
    before = snapshot_tree(parent, exclude=workspace.root)
    ws_before = snapshot_tree(workspace.root)
    models = ModelCache()
    base = str(tiny_model_dir)
    refused = 0
    for name in EVIL_NAMES:
        for call in (
            lambda n=name: workspace.dataset_dir(n),
            lambda n=name: workspace.adapter_path(n),
            lambda n=name: workspace.run_dir(n),
            lambda n=name: workspace.import_files(n, [uploads / "one.png"]),
            lambda n=name: workspace.save_dataset_settings(n, trigger="x"),
            lambda n=name: workspace.rename_adapter("good", n),
            lambda n=name: workspace.set_preview(n, uploads / "one.png"),
        ):
            with pytest.raises(ValueError, match="not allowed"):
                call()
            refused += 1
        messages = [
            dataset_tab.upload(workspace, name, [str(uploads / "one.png")], "")[0],
            library_tab.import_adapter(models, workspace, base, [str(adapter)], name),
            library_tab.merge(workspace, "good:0.5, good:0.5", name, 0),
            library_tab.rename(workspace, "good", name),
            train_tab.start(None, workspace, base, *_train_args(name)),
        ]
        for message in messages:
            assert "not allowed" in message, (name, message)
            refused += 1
    rows = [("../../evil.png", "caption"), ("/etc/passwd", "x")]
    assert "is not an image of dataset" in dataset_tab.save_captions(workspace, "ok", rows)
    for prompt in (f"a cat <lora:../../{outside.stem}:1>", f"a cat <lora:{outside}:1>", "a cat <lora:/etc/passwd:1>"):
        status = generate_tab.run(models, workspace, base, *_gen_args(prompt))[3]
        assert status.startswith("**Error:**") and ("not allowed" in status or "no adapter named" in status), status
        code = main(
            ["generate", "--base", base, "--prompt", prompt, "--workspace", str(workspace.root)]
            + ["--out", str(workspace.outputs_dir), "--steps", "1"]
        )
        assert code == 2 and "error:" in capsys.readouterr().err
        refused += 2
    assert refused == len(EVIL_NAMES) * 12 + 6
    assert snapshot_tree(parent, exclude=workspace.root) == before
    assert snapshot_tree(workspace.root) == ws_before, "a refused request changed the workspace"


def _train_args(name):
    values = train_tab.default_values(dataset="ok", name=name, preset="quick")
    values.update(steps=2, rank=2, alpha=2, resolution=64, batch_size=1)
    return train_tab.as_args(values)


def _gen_args(prompt):
    settings = dict(prompt=prompt, negative="", seed_mode="fixed", seed=1, steps=1, cfg=7.0, width=0, height=0)
    settings.update(sampler="Default", batch=1)
    rows = [None, 1.0, True, False, 1.0, 1.0] * generate_tab.SLOTS
    return [settings[k] for k in generate_tab.SETTINGS] + rows


# ------------------------------------------------------------------------------------------ pickles never run


class _Payload:
    """Unpickling this touches `marker`: proof that a loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_adapters_are_refused_without_being_unpickled(tmp_path, tiny_model_dir, capsys):
    proof = tmp_path / "proof_the_payload_works"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload is live: whoever unpickles it creates its marker

    marker = tmp_path / "code_ran"
    payload = pickle.dumps({"lora_unet_x.lora_down.weight": _Payload(marker)})
    files = []
    for suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".safetensors"):
        path = tmp_path / f"evil{suffix}"
        path.write_bytes(payload)
        files.append(path)
    torch_zip = tmp_path / "evil_zip.pt"
    torch.save({"w": _Payload(marker)}, torch_zip)  # torch's zip format, still a pickle inside
    files.append(torch_zip)

    base = load_base(str(tiny_model_dir))
    workspace = Workspace(tmp_path / "ws")
    models = ModelCache()
    refused = 0
    for path in files:
        for call in (
            lambda p=path: parse_adapter(p),
            lambda p=path: read_metadata(p),
            lambda p=path: load_adapter(p, base),
            lambda p=path: generate(base, GenerationRequest("a cat", steps=1, loras=[LoraRequest(str(p))])),
        ):
            with pytest.raises(ValueError, match="pickle|not a readable .safetensors"):
                call()
            refused += 1
        status = library_tab.import_adapter(models, workspace, str(tiny_model_dir), [str(path)], "")
        assert status.startswith("**Error:**") and ("pickle" in status or "not a readable" in status), status
        assert main(["inspect", str(path)]) == 2 and "error:" in capsys.readouterr().err
        refused += 2
        if path.suffix != ".safetensors":  # as a base model too
            with pytest.raises(ValueError, match="pickle-based file"):
                load_base(str(path))
            refused += 1
    assert refused == len(files) * 6 + len(files) - 1
    assert not marker.exists(), "a pickle was unpickled"
    assert workspace.list_adapters() == []


def test_a_checkpoint_with_a_malicious_state_file_is_refused_on_resume(tmp_path, tiny_model_dir):
    data = write_style_images(tmp_path / "data", count=2)
    config = TrainConfig(
        base=str(tiny_model_dir),
        data_dir=str(data),
        output=str(tmp_path / "out" / "x.safetensors"),
        resolution=64,
        rank=2,
        alpha=2.0,
        max_train_steps=2,
        train_text_encoder=False,
    )
    folder = config.resolved_work_dir / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"format": 1, "config": _Payload(marker)}, folder / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        train(config, resume_from=config.resolved_work_dir)
    assert not marker.exists()


# ------------------------------------------------------------------------------- damaged .safetensors adapters


def _raw(header, payload: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


def _damaged_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the error must contain), each built from a real adapter for the tiny model."""
    tensors = load_file(str(good))
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    module = down.removesuffix(".lora_down.weight")
    up, alpha = f"{module}.lora_up.weight", f"{module}.alpha"
    spec = {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}

    def variant(**changes):
        return save({**tensors, **changes})

    shapes = {}
    for key, value in tensors.items():  # every module 16 wider: made for a bigger model, nothing fits this one
        if key.endswith("lora_down.weight"):
            value = torch.cat([value, torch.randn(value.shape[0], 16)], dim=1)
        elif key.endswith("lora_up.weight"):
            value = torch.cat([value, torch.randn(16, value.shape[1])], dim=0)
        shapes[key] = value
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(2, 32),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(32, 2),
    }
    sgm_unet_only = {k: v for k, v in sdxl.items() if k.startswith("lora_unet_")}
    cases = {
        "huge_header": (_raw({}, length=2**62), "header too large"),
        "header_past_end": (_raw({}, length=10_000), "not a readable .safetensors"),
        "malformed_json": (_raw(b'{"a": [1, 2', b""), "invalid JSON"),
        "header_not_a_dict": (_raw([1, 2, 3]), "not a readable .safetensors"),
        "bad_offsets": (_raw({down: {**spec, "data_offsets": [0, 10**9]}}, bytes(64)), "offset"),
        "overlapping_offsets": (_raw({down: spec, up: {**spec, "shape": [8, 2]}}, bytes(64)), "offset"),
        "unknown_dtype": (_raw({down: {**spec, "dtype": "Q99"}}, bytes(64)), "not a readable .safetensors"),
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "not a readable .safetensors"),
        "empty": (b"", "not a readable .safetensors"),
        "int_tensors": (variant(**{down: tensors[down].to(torch.int32)}), "dtype int32; LoRA weights are floats"),
        "bool_tensors": (variant(**{up: tensors[up] > 0}), "dtype bool"),
        "nan": (variant(**{up: torch.full_like(tensors[up], float("nan"))}), "NaN or Inf values in its up matrix"),
        "inf": (variant(**{down: torch.full_like(tensors[down], float("inf"))}), "NaN or Inf values in its down"),
        "nan_alpha": (variant(**{alpha: torch.tensor(float("nan"))}), "NaN or Inf alpha"),
        "vector_alpha": (variant(**{alpha: torch.ones(3)}), "alpha that is not one number"),
        "rank_mismatch": (variant(**{down: torch.ones(3, tensors[down].shape[1])}), "inconsistent shapes"),
        "one_dimensional": (variant(**{down: torch.ones(8)}), "1-dimensional down matrix"),
        "shapes_of_another_model": (save(shapes), "matches nothing in this SD 1.x base model"),
        "sdxl_adapter": (save(sdxl), "is a LoRA for SDXL models; the base model is SD 1.x"),
        "sdxl_unet_names_only": (save(sgm_unet_only), "matches nothing in this SD 1.x base model"),
        "no_lora_at_all": (save({"model.diffusion_model.x.weight": torch.ones(2)}), "is not a LoRA adapter"),
    }
    out = {}
    for name, (data, words) in cases.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(data)
        out[name] = (path, words)
    return out


def _pipeline_state(base, stack: AdapterStack) -> dict:
    """Everything a failed load could change: every parameter and buffer, the module tree, PEFT state, the stack."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {"stack": [(n, e.te_weight, e.unet_weight, e.enabled) for n, e in stack.entries.items()]}
    for label, model in (("unet", base.unet), *((f"te{i}", m) for i, m in enumerate(base.text_encoders))):
        state[f"{label}.tensors"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state[f"{label}.modules"] = [(n, type(m).__name__) for n, m in model.named_modules()]
        state[f"{label}.peft"] = sorted(getattr(model, "peft_config", {}) or {})
        state[f"{label}.layers"] = [
            (n, list(m.active_adapters), dict(m.scaling), m.disable_adapters)
            for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer)
        ]
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith(".tensors"):
            assert before[key].keys() == after[key].keys(), key
            changed = [k for k in before[key] if not torch.equal(before[key][k], after[key][k])]
            assert not changed, f"{key}: {changed[:3]}"
        else:
            assert before[key] == after[key], key


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    good = make_adapter(tiny_model_dir, folder / "good.safetensors", seed=3, rank=2, targets="attn")
    other = make_adapter(tiny_model_dir, folder / "other.safetensors", seed=4, rank=2, targets="attn")
    return good, other, _damaged_files(folder, good)


@pytest.mark.parametrize("installed", [False, True], ids=["clean_pipeline", "with_an_adapter_installed"])
def test_damaged_adapters_give_a_clear_error_and_leave_the_pipeline_exactly_as_it_was(
    tiny_model_dir, adapter_files, installed
):
    good, other, damaged = adapter_files
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    if installed:
        stack.add(load_adapter(good, base), 0.7)
    image_before = render(base.pipeline)
    before = _pipeline_state(base, stack)
    for name, (path, words) in damaged.items():
        with pytest.raises(ValueError) as error:
            stack.add(load_adapter(path, base))
        assert path.name in str(error.value) and words in str(error.value), (name, str(error.value))
        _assert_same(before, _pipeline_state(base, stack))
        # the same file asked for by a generation (alone, and after a good one) fails the same way
        for loras in ([LoraRequest(str(path))], [LoraRequest(str(other)), LoraRequest(str(path))]):
            with pytest.raises(ValueError, match=re.escape(words)):
                generate(base, GenerationRequest("a cat", steps=1, loras=loras, fuse=False), stack=stack)
            _assert_same(before, _pipeline_state(base, stack))
    assert np.array_equal(render(base.pipeline), image_before)


def test_a_file_with_some_modules_that_do_not_fit_loads_the_rest_and_reports_them(tiny_model_dir, adapter_files):
    good, _, _ = adapter_files
    tensors = load_file(str(good))
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[down] = torch.randn(tensors[down].shape[0], tensors[down].shape[1] + 1)
    odd = good.with_name("partly_wrong.safetensors")
    save_file(tensors, str(odd))
    matched = load_adapter(odd, load_base(str(tiny_model_dir)))
    module = down.removesuffix(".lora_down.weight")
    assert [u for u in matched.unmatched if u.startswith(module)] == [
        f"{module} (shape {tensors[module + '.lora_up.weight'].shape[0]}x{tensors[down].shape[1]} does not match "
        f"the module's {tensors[module + '.lora_up.weight'].shape[0]}x{tensors[down].shape[1] - 1})"
    ]


def test_a_failure_inside_peft_installation_removes_every_trace(tiny_model_dir, adapter_files):
    good, _, _ = adapter_files
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    before = _pipeline_state(base, stack)
    matched = load_adapter(good, base)
    first = next(iter(matched.patches))
    matched.patches[first].alpha = float("nan")  # a NaN scale PEFT cannot be trusted with
    with pytest.raises(ValueError, match="PEFT scaled"):
        stack.add(matched)
    _assert_same(before, _pipeline_state(base, stack))
    assert not any("lora" in name for name, _ in base.unet.named_modules())


def test_library_import_of_a_damaged_file_adds_nothing(tmp_path, tiny_model_dir, adapter_files):
    _, _, damaged = adapter_files
    workspace = Workspace(tmp_path / "ws")
    models = ModelCache()
    for name, (path, words) in damaged.items():
        status = library_tab.import_adapter(models, workspace, str(tiny_model_dir), [str(path)], "")
        assert status.startswith("**Error:**") and words in status, (name, status)
    assert workspace.list_adapters() == [] and not any(workspace.adapters_dir.iterdir())
    assert os.listdir(workspace.adapters_dir) == []
