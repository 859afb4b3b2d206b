"""Dataset scanning: a validation report with reasons, captions with the trigger word, buckets."""

import pytest
from PIL import Image

from tests.helpers import write_style_images
from training.data import assign_bucket, make_buckets, scan_dataset


def test_report_keeps_good_images_and_lists_each_skipped_file_with_a_reason(tmp_path):
    folder = write_style_images(tmp_path / "data", count=3)
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (20, 20)).save(folder / "tiny.png")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    report = scan_dataset(folder, "sks", "sks style")
    assert [item.path.name for item in report.items] == ["img_00.png", "img_01.png", "img_02.png"]
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert set(reasons) == {"broken.png", "empty.jpg", "tiny.png", "notes.pdf"}
    assert "0 bytes" in reasons["empty.jpg"]
    assert "too small" in reasons["tiny.png"]
    assert "unsupported file type .pdf" in reasons["notes.pdf"]
    assert "broken.png" in report.summary()


def test_trigger_is_prepended_only_when_missing(tmp_path):
    folder = write_style_images(tmp_path / "data", count=2)
    (folder / "img_01.txt").write_text("sks, a blue square")
    Image.new("RGB", (64, 64)).save(folder / "nocap.png")
    captions = {i.path.name: i.caption for i in scan_dataset(folder, "sks", "sks style").items}
    assert captions["img_00.png"] == "sks, a red circle on a white background"
    assert captions["img_01.png"] == "sks, a blue square"
    assert captions["nocap.png"] == "sks style"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data folder not found"):
        scan_dataset(tmp_path / "nope", "sks", "sks style")


def test_transparent_and_odd_mode_images_become_rgb(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(folder / "clear.png")
    Image.new("CMYK", (64, 64)).save(folder / "cmyk.jpg")
    Image.new("P", (64, 64)).save(folder / "palette.png")
    report = scan_dataset(folder, "sks", "sks style")
    assert len(report.items) == 3 and not report.skipped


def test_buckets_cover_aspect_ratios_within_the_pixel_budget():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert assign_bucket(1024, 512, buckets)[0] > assign_bucket(1024, 512, buckets)[1]
    assert assign_bucket(400, 800, buckets)[1] > assign_bucket(400, 800, buckets)[0]
    assert assign_bucket(777, 777, buckets) == (512, 512)


def test_without_trigger_takes_the_trigger_word_and_its_comma_out():
    from training.data import without_trigger

    assert without_trigger("sks, a red circle on a white background", "sks") == "a red circle on a white background"
    assert without_trigger("a SKS style drawing", "sks") == "a style drawing"
    assert without_trigger("a red, sks, circle", "sks") == "a red, circle"
    assert without_trigger("sksx is not sks", "sks") == "sksx is not"
    assert without_trigger("sks", "sks") == ""


def test_caption_dropout_drops_about_its_rate_and_the_same_samples_on_a_rerun():
    from training.data import drops_caption

    draws = [drops_caption(3, epoch, index, 0.2) for epoch in range(5) for index in range(200)]
    assert 0.16 < sum(draws) / len(draws) < 0.24
    assert draws == [drops_caption(3, epoch, index, 0.2) for epoch in range(5) for index in range(200)]
    assert not any(drops_caption(3, 0, index, 0.0) for index in range(200))
