"""A1111 sidecars: NAME.json and NAME.preview.png beside saved and exported adapters, the cover in the header,
what an import keeps from them, and the `<lora:name:weight>` tags CivitAI's parser must be able to read."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio import sidecars
from studio.adapters import read_adapter, save_adapter, training_metadata
from studio.cli import build_generate_request, build_parser, main
from studio.generate import _free_slot
from studio.infotext import civitai_lora_name, lora_tag, parse_lora_tags
from studio.library import Workspace
from studio.models import SD1, SD2V, SDXL
from studio.ui import generate_tab, library_tab
from studio.ui.common import ModelCache
from tests.helpers import make_adapter, write_style_images

A1111_FIELDS = {"description", "sd version", "activation text", "preferred weight", "notes"}
# civitai/civitai src/utils/metadata/automatic.metadata.ts: the only <lora:...> tags it credits
CIVITAI_EXTRA_NETS = re.compile(r"<(lora|hypernet):([a-zA-Z0-9_\.\-]+):([0-9.]+)>")


def _png(path: Path, size=(320, 240), seed: int = 0) -> Path:
    """A noisy PNG (hard to compress, so the cover's size cap is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _nonzero_up(path: Path) -> float:
    """The largest |value| of any up-matrix in the file (0 would mean a no-op adapter)."""
    tensors = read_adapter(path).tensors
    return max(t.abs().max().item() for k, t in tensors.items() if k.endswith("lora_up.weight"))


def _without_trigger(source: Path, target: Path) -> Path:
    """A copy of `source` whose header holds no trigger phrase (like many files from CivitAI)."""
    adapter = read_adapter(source)
    metadata = {k: v for k, v in adapter.metadata.items() if k != "modelspec.trigger_phrase"}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(target, adapter.tensors, metadata, dtype="fp32")
    return target


@pytest.fixture
def studio(tiny_model_dir, tmp_path):
    """A workspace holding adapter "inky" (random non-zero up-matrices, trigger "sks") with a preview."""
    workspace = Workspace(tmp_path / "ws")
    make_adapter(tiny_model_dir, workspace.adapter_path("inky"), seed=1, rank=2, alpha=1.0, targets="attn")
    workspace.set_preview("inky", _png(tmp_path / "shot.png"))
    return workspace


def test_cli_export_writes_a1111_sidecars_and_embeds_a_small_cover(studio, tmp_path, capsys):
    source = studio.adapter_path("inky")
    assert _nonzero_up(source) > 0.1
    out = tmp_path / "out" / "inky_v1.safetensors"
    assert main(["export", str(source), "--out", str(out), "--no-dataset-metadata"]) == 0, capsys.readouterr().err
    assert "A1111 sidecars" in capsys.readouterr().out

    fields = json.loads((tmp_path / "out" / "inky_v1.json").read_text(encoding="utf-8"))
    assert set(fields) == A1111_FIELDS
    assert fields["sd version"] == "SD1" and fields["activation text"] == "sks"
    assert fields["preferred weight"] == 1.0 and isinstance(fields["preferred weight"], float)
    assert "SD 1.x" in fields["description"] and "sks" in fields["description"]
    assert "rank 2" in fields["notes"] and "alpha 1" in fields["notes"]
    preview = tmp_path / "out" / "inky_v1.preview.png"
    assert preview.read_bytes() == studio.preview_path("inky").read_bytes()

    exported = read_adapter(out)
    assert exported.tensors.keys() == read_adapter(source).tensors.keys()
    assert all(torch.equal(t, read_adapter(source).tensors[k]) for k, t in exported.tensors.items())
    covers = json.loads(exported.metadata["ssmd_cover_images"])  # A1111: json.loads, then b64decode each
    assert isinstance(covers, list) and len(covers) == 1
    cover = base64.b64decode(covers[0], validate=True)
    with Image.open(io.BytesIO(cover)) as image:
        assert (
            image.format == "PNG" and max(image.size) <= 256 and image.size[0] / image.size[1] == pytest.approx(4 / 3)
        )
    assert len(cover) <= sidecars.COVER_MAX_BYTES
    assert exported.metadata["modelspec.thumbnail"] == "data:image/png;base64," + covers[0]  # SwarmUI's key
    assert "modelspec.lora_default_weight" not in exported.metadata  # only a weight other than 1 is stated


def test_library_export_rename_merge_and_training_write_sidecars(studio, tiny_model_dir, tmp_path):
    path, summary = library_tab.export(studio, "inky", False)
    assert "cover image embedded" in summary and "inky_private.json" in summary, summary
    assert json.loads(Path(path).with_suffix(".json").read_text())["activation text"] == "sks"
    assert sidecars.preview_path(path).is_file()

    sidecars.write_sidecars(studio.adapter_path("inky"), {"preferred weight": 0.6, "negative text": "blurry"})
    studio.rename_adapter("inky", "ink2")
    assert not sidecars.json_path(studio.adapter_path("inky")).exists() and not studio.preview_path("inky").exists()
    kept = json.loads(sidecars.json_path(studio.adapter_path("ink2")).read_text())
    assert (
        kept["preferred weight"] == 0.6 and kept["negative text"] == "blurry" and studio.preview_path("ink2").is_file()
    )
    assert "ssmd_cover_images" not in read_adapter(studio.adapter_path("ink2")).metadata  # only exports embed it

    make_adapter(tiny_model_dir, studio.adapter_path("dots"), seed=2, rank=2, targets="attn")
    assert "Merged into **blend**" in library_tab.merge(studio, "ink2:0.5, dots:0.5", "blend", 0)
    assert json.loads(sidecars.json_path(studio.adapter_path("blend")).read_text())["activation text"] == "sks, sks"
    studio.delete_adapter("blend")
    assert not list(studio.adapters_dir.glob("blend*"))

    from training.config import TrainConfig
    from training.trainer import train

    data = write_style_images(tmp_path / "data", count=2)
    out = studio.adapter_path("trained")
    config = TrainConfig(
        base=str(tiny_model_dir), data_dir=str(data), output=str(out), trigger="inkstyle", resolution=64, rank=2,
        alpha=2.0, max_train_steps=2, batch_size=1, unet_targets="attn", save_dtype="fp32",
    )  # fmt: skip
    train(config)
    fields = json.loads(sidecars.json_path(out).read_text())
    assert fields["activation text"] == "inkstyle" and fields["sd version"] == "SD1"
    assert fields["notes"] == "Made with lora-style-studio: rank 2, alpha 2, 2 steps"


def test_importing_an_exported_folder_keeps_trigger_weight_and_preview(studio, tmp_path, capsys):
    sidecars.write_sidecars(studio.adapter_path("inky"), {"preferred weight": 0.6})
    out = tmp_path / "civitai" / "inky.safetensors"
    assert main(["export", str(studio.adapter_path("inky")), "--out", str(out)]) == 0
    assert read_adapter(out).metadata["modelspec.lora_default_weight"] == "0.6"

    fresh = tmp_path / "fresh"
    assert main(["import", str(out), "--workspace", str(fresh)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "trigger: sks" in printed and "preferred weight: 0.6" in printed
    library = Workspace(fresh)
    assert library.adapter_path("inky").read_bytes() == out.read_bytes()  # the file itself is not rewritten
    fields = json.loads(sidecars.json_path(library.adapter_path("inky")).read_text())
    assert fields["activation text"] == "sks" and fields["preferred weight"] == 0.6
    assert library.preview_path("inky").read_bytes() == sidecars.preview_path(out).read_bytes()

    # the preferred weight is the default where a weight is picked: the CLI's --lora FILE and the Generate tab's row
    argv = ["generate", "--prompt", "x", "--out", "o", "--lora", str(library.adapter_path("inky"))]
    request = build_generate_request(build_parser().parse_args(argv))
    assert request.loras[0].te_weight == 0.6
    assert generate_tab.slot_weight(library, "inky", 1.0)["value"] == 0.6
    assert "value" not in generate_tab.slot_weight(library, "inky", 0.6)  # a row already at it is left alone
    assert "preferred weight** (A1111's, in `inky.json`): 0.6" in library_tab.details(library, "inky")[1]

    # the .safetensors alone (as CivitAI serves it) still brings its weight and cover from the header
    alone = tmp_path / "alone" / "inky.safetensors"
    alone.parent.mkdir()
    shutil.copyfile(out, alone)
    assert main(["import", str(alone), "--workspace", str(tmp_path / "other")]) == 0
    other = Workspace(tmp_path / "other")
    assert json.loads(sidecars.json_path(other.adapter_path("inky")).read_text())["preferred weight"] == 0.6
    with Image.open(other.preview_path("inky")) as image:
        assert image.format == "PNG" and max(image.size) <= 256


def test_import_takes_the_trigger_from_the_sidecar_only_when_the_file_has_none(studio, tiny_model_dir, tmp_path):
    source = _without_trigger(studio.adapter_path("inky"), tmp_path / "from_a1111" / "inky style.safetensors")
    (tmp_path / "from_a1111" / "inky style.json").write_text(
        json.dumps(
            {"activation text": "inkstyle", "preferred weight": 0.0, "notes": "from A1111", "sd version": "SDXL"}
        )
    )
    _png(tmp_path / "from_a1111" / "inky style.preview.png", seed=3)
    # uploads arrive in folders of their own, as gradio stores them
    uploads = [tmp_path / f"up{i}" / p.name for i, p in enumerate(sorted(source.parent.iterdir()))]
    for upload, original in zip(uploads, sorted(source.parent.iterdir()), strict=True):
        upload.parent.mkdir()
        shutil.copyfile(original, upload)
    status = library_tab.import_adapter(ModelCache(), studio, str(tiny_model_dir), [str(p) for p in uploads], "")
    assert "Imported **inky_style**" in status and "trigger `inkstyle`" in status and ", preview" in status, status
    fields = json.loads(sidecars.json_path(studio.adapter_path("inky_style")).read_text())
    assert fields["activation text"] == "inkstyle" and fields["notes"] == "from A1111"
    assert fields["preferred weight"] == 1.0  # A1111's 0 means "no preference"
    assert fields["sd version"] == "SD1"  # the file says what it is for
    assert (
        studio.preview_path("inky_style").read_bytes()
        == (tmp_path / "from_a1111" / "inky style.preview.png").read_bytes()
    )
    assert library_tab.card(studio, "inky_style")["trigger"] == "inkstyle"

    # a file with its own trigger keeps it, whatever the sidecar says
    (tmp_path / "own").mkdir()
    shutil.copyfile(studio.adapter_path("inky"), tmp_path / "own" / "x.safetensors")
    (tmp_path / "own" / "x.json").write_text(json.dumps({"activation text": "other"}))
    studio.import_adapter(tmp_path / "own" / "x.safetensors")
    assert json.loads(sidecars.json_path(studio.adapter_path("x")).read_text())["activation text"] == "sks"


@pytest.mark.parametrize(
    ("sidecar", "words"),
    [
        (b'{"activation text": "ink", ', "not valid JSON"),
        (b"\xff\xfe garbage", "not UTF-8 text"),
        (b'["ink"]', "a JSON list, not an object of fields"),
        (b'{"preferred weight": "heavy"}', "\"preferred weight\" 'heavy' is not a number"),
        (b'{"preferred weight": 1e9}', '"preferred weight" 1000000000.0 is outside -10..10'),
        (b'{"activation text": 3}', '"activation text" is not text'),
    ],
)
def test_a_garbled_sidecar_is_named_in_a_warning_and_the_import_still_works(studio, tmp_path, capsys, sidecar, words):
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copyfile(studio.adapter_path("inky"), folder / "broken.safetensors")
    (folder / "broken.json").write_bytes(sidecar)
    (folder / "broken.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["import", str(folder / "broken.safetensors"), "--workspace", str(studio.root)]) == 0
    err = capsys.readouterr().err
    assert f"warning: broken.json is not a usable A1111 sidecar: {words}" in err, err
    assert "warning: broken.preview.png is not a readable image (unknown format); imported without it" in err, err
    fields = json.loads(sidecars.json_path(studio.adapter_path("broken")).read_text())
    assert fields["activation text"] == "sks" and fields["preferred weight"] == 1.0
    assert not studio.preview_path("broken").exists()

    # a garbled sidecar in the library itself: cards, weights and exports carry on, the export says so
    sidecars.json_path(studio.adapter_path("broken")).write_bytes(sidecar)
    assert library_tab.card(studio, "broken")["trigger"] == "sks"
    assert sidecars.preferred_weight(studio.adapter_path("broken")) == 1.0
    path, summary = library_tab.export(studio, "broken", True)
    assert Path(path).is_file() and "Warning: broken.json is not a usable A1111 sidecar" in summary, summary


def test_a_failed_import_leaves_nothing_behind(studio, tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copyfile(studio.adapter_path("inky"), folder / "solid.safetensors")
    (folder / "solid.json").write_text(json.dumps({"preferred weight": 0.5}))
    before = sorted(p.name for p in studio.adapters_dir.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sidecars.atomic, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        studio.import_adapter(folder / "solid.safetensors")
    assert sorted(p.name for p in studio.adapters_dir.iterdir()) == before
    monkeypatch.undo()
    assert studio.import_adapter(folder / "solid.safetensors")[0] == studio.adapter_path("solid")


def test_sd_version_follows_the_stated_family():
    def fields(family):
        return sidecars.default_fields(training_metadata(family, rank=4, alpha=4, network_args={}, title="t"))

    assert [fields(f)["sd version"] for f in (SD1, SD2V, SDXL)] == ["SD1", "SD2", "SDXL"]
    assert sidecars.default_fields({})["sd version"] == "Unknown"
    assert sidecars.default_fields({})["description"] == "LoRA for an unknown base model"


def test_lora_tags_we_write_are_ones_civitai_credits():
    names = ["inky", "my style v2", "café-noir", "猫", "a.b-c_d", "", "<lora:x:1>"]
    stack = type("Stack", (), {"entries": {"inky": None}})()
    for stem in names:
        for name in (civitai_lora_name(stem), _free_slot(stack, stem)):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), (stem, name)
    for weight in (0, 0.05, 0.3, 0.8, 1, 1.25, 2, 10, 1e-5, 0.1234567, -0.0):
        tag = lora_tag("inky_v2.1", weight, weight)
        match = CIVITAI_EXTRA_NETS.fullmatch(tag)
        assert match and match.group(2) == "inky_v2.1" and float(match.group(3)) == weight, tag
        assert parse_lora_tags(f"a cat {tag}")[1][0].te_weight == weight  # A1111 reads the same number
    # A1111 syntax CivitAI's pattern cannot hold (a negative weight, separate TE / UNet weights): written as A1111
    # reads it; CivitAI still credits the adapter through the infotext's "Lora hashes"
    for te, unet in ((-0.5, -0.5), (0.3, 1.0)):
        tag = lora_tag("inky", te, unet)
        assert parse_lora_tags(tag)[1][0].unet_weight == unet and not CIVITAI_EXTRA_NETS.fullmatch(tag)
