"""Reliability: every kind of bad image a real upload folder holds is used correctly or skipped with its reason."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.library import Workspace
from studio.ui import dataset_tab
from tests.helpers import write_style_images
from training.config import TrainConfig
from training.data import BACKGROUND, image_to_tensor, open_image, scan_dataset
from training.trainer import Trainer

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PROBE = (8, 32)  # a pixel inside the plain left half of every `_picture`


def _picture(color, seed: int, size=(64, 64), mode: str = "RGB") -> Image.Image:
    """Plain `color` on the left half, random rectangles on the right half (so no two pictures look alike)."""
    rng = random.Random(seed)
    image = Image.new(mode, size, color)
    draw = ImageDraw.Draw(image)
    half = size[0] // 2
    for _ in range(8):
        x0, y0 = rng.randrange(half, size[0] - 4), rng.randrange(0, size[1] - 4)
        x1, y1 = rng.randrange(x0 + 2, size[0] + 1), rng.randrange(y0 + 2, size[1] + 1)
        fill = tuple(rng.randrange(256) for _ in color) if isinstance(color, tuple) else rng.randrange(256)
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    return image


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk (PIL cannot write 16-bit RGB, and a bomb's header needs no pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, **kwargs)


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- bad files
# name -> (writer, expected reason) for files that must be skipped.
def _write_rejects(folder: Path) -> dict[str, str]:
    good_png = io.BytesIO()
    _picture(RED, 1).save(good_png, format="PNG")
    good_jpg = _jpeg_bytes(_picture(BLUE, 2))
    rejects = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "empty.jpg": (b"", "empty file (0 bytes)"),
        "truncated.png": (good_png.getvalue()[: len(good_png.getvalue()) // 2], "unreadable image"),
        "truncated.jpg": (good_jpg[: len(good_jpg) // 2], "unreadable image"),
        "header_only.png": (good_png.getvalue()[:40], "not an image PIL can read (corrupt"),
        "text.png": (b"just some notes, not a picture\n" * 20, "not an image PIL can read"),
        "page.jpg": (b"<!doctype html><html><body>404</body></html>", "not an image PIL can read"),
        "program.webp": (b"\x7fELF\x02\x01\x01" + bytes(200), "not an image PIL can read"),
        "bomb.png": (_png(30000, 30000, 8, 2, b""), "possible decompression bomb; not decoded"),
        "just_over.png": (_png(9000, 8000, 8, 2, b""), "over the 64,000,000-pixel limit"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported file type .svg (accepted: png"),
        "photo.heic": (bytes(64), "unsupported file type .heic"),
        "layers.psd": (b"8BPS" + bytes(60), "unsupported file type .psd"),
        "README": (b"read me", "unsupported file type (none)"),
    }
    for name, (data, _) in rejects.items():
        (folder / name).write_bytes(data)
    _save(Image.new("RGB", (1, 1), RED), folder / "one_pixel.png")
    _save(Image.new("RGB", (40, 30), RED), folder / "tiny.png")
    reasons = {name: reason for name, (_, reason) in rejects.items()}
    reasons["one_pixel.png"] = "too small (1x1; at least 64 px a side)"
    reasons["tiny.png"] = "too small (40x30"
    return reasons


# name -> expected RGB at PROBE (within 3 levels) for odd files that must be kept and decoded correctly.
def _write_keepers(folder: Path) -> dict[str, tuple[int, int, int]]:
    expected = {}

    frames = [_picture(RED, 10), _picture(GREEN, 11)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames = [_picture(RED, 12), _picture(GREEN, 13)]
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    expected["animated.gif"] = expected["animated.webp"] = RED  # the first frame

    _picture(RED, 14).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = RED
    _picture(BLUE, 15).convert("CMYK").save(folder / "cmyk.tif")
    expected["cmyk.tif"] = BLUE

    _picture(GREEN, 16).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "palette.png")
    expected["palette.png"] = GREEN
    clear = Image.new("P", (64, 64), 0)
    clear.putpalette([0, 0, 0] + [v for i in range(1, 256) for v in (i, 255 - i, (i * 7) % 256)])
    draw = ImageDraw.Draw(clear)
    for i in range(1, 9):
        draw.rectangle([32 + i * 3, i * 6, 36 + i * 3, i * 6 + 5], fill=i * 20)
    clear.save(folder / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = BACKGROUND

    _picture((90, 255), 17, mode="LA").save(folder / "gray_alpha.png")
    expected["gray_alpha.png"] = (90, 90, 90)
    _picture((90, 0), 18, mode="LA").save(folder / "gray_clear.png")
    expected["gray_clear.png"] = BACKGROUND

    gray = np.full((64, 64), 30000, dtype=np.uint16)
    gray[:, 32:] = np.random.default_rng(19).integers(0, 65535, (64, 32), dtype=np.uint16)
    Image.fromarray(gray).save(folder / "gray16.png")
    expected["gray16.png"] = (117, 117, 117)  # 30000 / 256
    noise = np.random.default_rng(20).integers(0, 65535, (64, 32, 3)).astype(">u2")
    left = np.tile(np.array([65535, 32768, 0], dtype=">u2"), (64, 32, 1))
    pixels = np.concatenate([left, noise], axis=1).astype(">u2")  # PNG stores 16-bit samples big-endian
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(64))
    (folder / "rgb16.png").write_bytes(_png(64, 64, 16, 2, rows))
    expected["rgb16.png"] = (255, 128, 0)

    half_red = _picture((255, 0, 0, 128), 21, mode="RGBA")
    half_red.save(folder / "transparent.png")
    expected["transparent.png"] = (255, 127, 127)  # 50% red over the white background
    _picture((0, 0, 255, 0), 22, mode="RGBA").save(folder / "transparent.webp", lossless=True)
    expected["transparent.webp"] = BACKGROUND

    original = _picture(BLUE, 23, size=(96, 96))
    original.save(folder / "original.png")
    expected["original.png"] = BLUE
    (folder / "original_small.jpg").write_bytes(_jpeg_bytes(original.resize((80, 80)), quality=85))
    expected["original_small.jpg"] = BLUE

    _picture(GREEN, 24).save(folder / "café ñ 猫 01.png")
    (folder / "café ñ 猫 01.txt").write_text("sks, a green café sign", encoding="utf-8")
    expected["café ñ 猫 01.png"] = GREEN
    _picture(RED, 25).save(folder / "with  spaces .png")
    expected["with  spaces .png"] = RED
    return expected


def _write_exif_rotated(path: Path) -> Image.Image:
    """An upright picture (red top, blue bottom, 64x96) stored rotated, with EXIF orientation 6 to undo it."""
    upright = Image.new("RGB", (64, 96), RED)
    ImageDraw.Draw(upright).rectangle([0, 48, 63, 95], fill=BLUE)
    ImageDraw.Draw(upright).ellipse([20, 10, 40, 30], fill=GREEN)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 96x64, sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(path, quality=95, exif=exif.tobytes())
    return upright


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A data folder holding every bad kind of file next to two good images; (folder, rejects, keepers)."""
    folder = write_style_images(tmp_path_factory.mktemp("mixed") / "data", count=2)
    rejects = _write_rejects(folder)
    keepers = _write_keepers(folder)
    _write_exif_rotated(folder / "rotated.jpg")
    (folder / "original_copy.png").write_bytes((folder / "original.png").read_bytes())
    rejects["original_copy.png"] = "exact duplicate of"
    return folder, rejects, keepers


@pytest.fixture(scope="module")
def report(mixed_folder):
    """The validation report of the mixed folder."""
    return scan_dataset(mixed_folder[0], "sks", "sks style")


def test_every_bad_file_is_skipped_with_its_reason(mixed_folder, report):
    _, rejects, _ = mixed_folder
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert set(reasons) == set(rejects)
    for name, expected in rejects.items():
        assert expected in reasons[name], (name, reasons[name])
    summary = report.summary()
    assert all(name in summary for name in rejects)


def test_odd_but_valid_images_are_kept_and_decoded_to_the_right_colours(mixed_folder, report):
    folder, _, keepers = mixed_folder
    kept = {item.path.name for item in report.items}
    assert set(keepers) | {"rotated.jpg", "img_00.png", "img_01.png"} == kept
    for name, color in keepers.items():
        image = open_image(folder / name)
        assert image.mode == "RGB"
        got = image.getpixel(PROBE)
        assert max(abs(a - b) for a, b in zip(got, color, strict=True)) <= 3, (name, got, color)


def test_exif_rotated_photo_is_read_and_trained_upright(mixed_folder, report):
    folder = mixed_folder[0]
    item = next(i for i in report.items if i.path.name == "rotated.jpg")
    assert (item.width, item.height) == (64, 96)  # upright size, not the stored 96x64
    image = open_image(folder / "rotated.jpg")
    assert image.size == (64, 96)
    top, bottom = np.asarray(image)[:40].reshape(-1, 3).mean(0), np.asarray(image)[56:].reshape(-1, 3).mean(0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]
    # what the trainer feeds the VAE: the same upright picture (a 64x96 crop of the 64x96 image), red above blue
    pixels = image_to_tensor(image, (64, 96), True, False, random.Random(0))
    assert pixels.shape == (3, 96, 64)
    assert pixels[0, :40].mean() > 0.5 > pixels[2, :40].mean()
    assert pixels[2, 56:].mean() > 0.5 > pixels[0, 56:].mean()


def test_exact_and_near_duplicates_are_reported(mixed_folder, report):
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert reasons["original_copy.png"] == "exact duplicate of original.png"
    notes = {n.path.name: n.reason for n in report.notes}
    assert set(notes) == {"original_small.jpg"}, notes  # nothing else in the folder looks alike
    assert notes["original_small.jpg"].startswith("near-duplicate of original.png")
    assert "note original_small.jpg: near-duplicate of original.png" in report.summary()


def test_unicode_and_spaces_in_names_keep_their_captions(mixed_folder, report):
    captions = {item.path.name: item.caption for item in report.items}
    assert captions["café ñ 猫 01.png"] == "sks, a green café sign"
    assert captions["with  spaces .png"] == "sks style"


def test_the_dataset_tab_shows_skips_duplicates_and_notes(mixed_folder, report):
    rows = {row[0]: row[1:] for row in dataset_tab.report_rows(report, 64)}
    assert rows["original_copy.png"] == ["skipped", "exact duplicate of original.png"]
    assert rows["original_small.jpg"][0] == "kept" and "near-duplicate of original.png" in rows["original_small.jpg"][1]
    assert rows["bomb.png"][0] == "skipped" and "decompression bomb" in rows["bomb.png"][1]
    stats = dataset_tab.statistics_text(report, 64)
    assert "1 exact duplicate(s) skipped, 1 near-duplicate(s) kept" in stats and "original_small.jpg" in stats


def test_a_short_training_run_on_the_mixed_folder_does_not_crash(mixed_folder, report, tiny_model_dir, tmp_path):
    folder = mixed_folder[0]
    config = TrainConfig(
        base=str(tiny_model_dir),
        data_dir=str(folder),
        output=str(tmp_path / "mixed.safetensors"),
        resolution=32,
        rank=2,
        alpha=2.0,
        max_train_steps=3,
        batch_size=2,
        unet_lr=1e-3,
        train_text_encoder=False,
        save_dtype="fp32",
    )
    result = Trainer(config).run()
    assert result.steps == 3 and np.isfinite(result.losses).all()
    assert {i.path.name for i in result.report.items} == {i.path.name for i in report.items}
    assert result.output.is_file()


def test_an_upload_with_unicode_and_clashing_names_pairs_every_caption_with_its_image(tmp_path):
    source = tmp_path / "upload"
    source.mkdir()
    names = ["猫", "犬", "a b", "a_b", "café", "cafe"]
    for index, stem in enumerate(names):
        _picture(RED, 100 + index).save(source / f"{stem}.png")
        (source / f"{stem}.txt").write_text(f"caption {index}", encoding="utf-8")
    workspace = Workspace(tmp_path / "ws")
    files = sorted(source.iterdir(), key=lambda p: (p.suffix != ".txt", p.name))  # captions arrive first
    report = workspace.import_files("set", files)
    assert len(report.added) == 12 and not report.skipped, report
    folder = workspace.dataset_dir("set")
    by_pixels = {open_image(source / f"{stem}.png").tobytes(): index for index, stem in enumerate(names)}
    for image_name, caption in workspace.captions("set"):
        index = by_pixels[open_image(folder / image_name).tobytes()]
        assert caption == f"caption {index}", (image_name, caption)
    assert all(p.name.isascii() for p in folder.iterdir())
