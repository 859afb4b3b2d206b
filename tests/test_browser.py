"""The web UI in a real browser: headless Debian Chromium driven by Playwright against `python launch.py`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from studio.models import DEMO_MODEL_DIR
from tests.helpers import write_style_images
from training.metrics import read_metrics

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    """The bundled demo model when it is there, else a tiny model built from configs."""
    if (DEMO_MODEL_DIR / "model_index.json").is_file():
        return "demo"
    from studio.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("browser_model"), seed=0))


@pytest.fixture(scope="module")
def server(base_model, tmp_path_factory):
    """`python launch.py` on a free localhost port with a fresh workspace; yields its URL and workspace."""
    workspace = tmp_path_factory.mktemp("browser_ws")
    port = _free_port()
    log = open(workspace.parent / "server.log", "w")  # noqa: SIM115 - closed below
    # one torch thread: the server shares two cores with the browser (and two threads contend badly)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "launch.py", "--port", str(port), "--workspace", str(workspace), "--base", base_model]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {(workspace.parent / 'server.log').read_text()}") from None
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("server did not start within 90 s")
    yield url, workspace
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """A page in a fresh headless Chromium profile."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (the README's test command installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(server[0])
        yield page
        context.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> tuple[list[Path], Path]:
    """Twelve images with captions, and a zip with two more images, a broken image and unsafe entries."""
    root = tmp_path_factory.mktemp("uploads")
    images = write_style_images(root / "images", count=12)
    extra = write_style_images(root / "extra", count=2, seed=5, size=(96, 64))
    archive = root / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(extra.glob("*.png")):
            zf.write(path, f"more/extra_{path.name}")
        zf.writestr("more/broken.png", b"not really a png")
        zf.writestr("../outside.png", (extra / "img_00.png").read_bytes())
        zf.writestr("readme.md", "hello")
    return sorted(images.glob("*.png")) + sorted(images.glob("*.txt")), archive


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _fill(page, selector: str, value) -> None:
    box = page.locator(f"{selector} textarea, {selector} input:not([type=file]):not([type=range])").first
    box.fill(str(value))
    box.press("Tab")


def _choose(page, selector: str, option: str) -> None:
    page.locator(f"{selector} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _wait_text(page, selector: str, text: str, timeout: float = 60_000) -> None:
    page.locator(selector).filter(has_text=text).first.wait_for(timeout=timeout)


def test_the_whole_studio_in_a_browser(page, server, uploads, tmp_path):
    from playwright.sync_api import expect

    started = time.time()
    timings = {}
    url, workspace = server
    images, archive = uploads
    expect(page.locator("#base-status")).to_contain_text("Base model")

    # ---- Dataset: 12 images and a zip, the validation report, the trigger word
    _fill(page, "#dataset-name", "inky")
    _fill(page, "#dataset-resolution", 64)
    page.locator("#dataset-files input[type=file]").set_input_files([*images, archive])
    for uploaded in [*images, archive]:  # under load the upload can lag behind: wait for every file
        expect(page.locator("#dataset-files")).to_contain_text(Path(uploaded).stem, timeout=60_000)
    expect(page.locator("#dataset-files")).not_to_contain_text("Uploading", timeout=60_000)
    page.locator("#dataset-add").click()
    _wait_text(page, "#dataset-status", "file(s) added")
    status = page.locator("#dataset-status").inner_text()
    assert "27 file(s) added" in status, status  # 12 images + 12 captions + 3 images from the zip
    assert "path leaves the folder" in status and "readme.md" in status
    assert not (workspace / "datasets" / "outside.png").exists()
    expect(page.locator("#dataset-report")).to_contain_text("broken.png")
    expect(page.locator("#dataset-report")).to_contain_text("skipped")
    expect(page.locator("#dataset-stats")).to_contain_text("14 image(s) kept, 1 file(s) skipped")
    _fill(page, "#dataset-trigger", "inkstyle")
    page.locator("#dataset-save-trigger").click()
    _wait_text(page, "#dataset-status", "Saved trigger word")
    expect(page.locator("#dataset-report")).to_contain_text("96x64 -> bucket 64x64")
    page.locator("h1").first.click()  # close any open dropdown before the screenshot
    _shot(page, "dataset")
    # a bundled example style set becomes a workspace dataset in one click
    _choose(page, "#dataset-example", "halftone")
    page.locator("#dataset-use-example").click()
    _wait_text(page, "#dataset-status", "from the bundled example")
    expect(page.locator("#dataset-stats")).to_contain_text("60 image(s) kept", timeout=60_000)
    assert len(list((workspace / "datasets" / "halftone").glob("*.png"))) == 60
    timings["dataset"] = time.time() - started

    # ---- Train: a short run with a checkpoint and a sample; reload mid-training
    _tab(page, "Train")
    _choose(page, "#train-dataset", "inky")
    _fill(page, "#train-name", "inky")
    _choose(page, "#train-preset", "quick")
    expect(page.locator("#train-steps input")).to_have_value("100")  # the preset filled its values in
    _fill(page, "#train-steps", 12)
    _fill(page, "#train-rank", 4)
    _fill(page, "#train-batch", 1)
    _fill(page, "#train-resolution", 64)
    _fill(page, "#train-ckpt", 6)
    _fill(page, "#train-validation-images", 2)  # held out, scored at the checkpoint and the end
    _fill(page, "#train-samples", "inkstyle style, a circle")
    expect(page.locator("#train-plan")).to_contain_text("12 total steps", timeout=60_000)
    expect(page.locator("#train-plan")).to_contain_text("trainable parameters")
    page.locator("#train-start").click()
    _wait_text(page, "#train-message", "Training inky")
    page.reload()
    _tab(page, "Train")
    expect(page.locator("#train-progress")).to_contain_text("inky")
    expect(page.locator("#train-progress")).to_contain_text("(100%)", timeout=150_000)
    expect(page.locator("#train-progress")).to_contain_text("done")
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    for series in ("train", "validation", "best checkpoint"):  # both losses drawn, and a line at the best checkpoint
        line = f"#train-loss svg path[aria-roledescription='line mark'][aria-label*='series: {series}'][d]"
        expect(page.locator(line).first).to_be_attached()
    expect(page.locator("#train-progress")).to_contain_text("Best checkpoint by validation loss")
    assert len([r for r in read_metrics(workspace / "runs" / "inky") if "val_loss" in r]) == 2  # step 6 and the end
    expect(page.locator("#train-samples-gallery img").first).to_be_visible()
    _choose(page, "#train-dataset", "inky")  # the form is per page; show the plan again for the screenshot
    expect(page.locator("#train-plan")).to_contain_text("total steps")
    _shot(page, "train")
    timings["train"] = time.time() - started

    # ---- Generate: the new adapter at 0.8 from the stack, then from a <lora:...> tag
    _tab(page, "Generate")
    _fill(page, "#gen-prompt", "inkstyle style, a circle")
    _fill(page, "#gen-steps", 10)
    _choose(page, "#gen-adapter-0", "inky")
    _fill(page, "#gen-weight-0", 0.8)
    page.locator("#gen-run").click()
    _wait_text(page, "#gen-status", "Saved 1 image(s)")
    expect(page.locator("#gen-infotext textarea")).to_have_value(re.compile(r"<lora:inky:0\.8>[\s\S]*Lora hashes"))
    expect(page.locator("#gen-gallery img").first).to_be_visible()
    page.get_by_role("button", name="Clear stack").click()
    _fill(page, "#gen-prompt", "inkstyle style, a circle <lora:inky:0.8>")
    page.locator("#gen-run").click()
    expect(page.locator("#gen-status")).to_contain_text("00001-1.png")  # the second image, same seed
    outputs = sorted((workspace / "outputs").rglob("*.png"))
    assert len(outputs) == 2
    expect(page.locator("#gen-infotext textarea")).to_have_value(re.compile(r"<lora:inky:0\.8>"))
    page.locator("#gen-gallery img").first.click()
    _choose(page, "#gen-preview-for", "inky")
    page.locator("#gen-set-preview").click()
    expect(page.locator("#gen-status")).to_contain_text("is now the preview of inky")
    assert (workspace / "adapters" / "inky.preview.png").read_bytes() == outputs[-1].read_bytes()
    _shot(page, "generate")
    timings["generate"] = time.time() - started

    # ---- Compare: weight x checkpoint grid, saved as one PNG
    _tab(page, "Compare")
    _choose(page, "#cmp-adapter", "inky")
    expect(page.locator("#cmp-checkpoints")).to_contain_text("step-000006")
    _fill(page, "#cmp-weights", "0, 0.8")
    _fill(page, "#cmp-seeds", "1")
    _fill(page, "#cmp-steps", 5)
    _fill(page, "#cmp-prompt", "inkstyle style, a circle")
    page.locator("#cmp-run").click()
    _wait_text(page, "#cmp-status", "Saved a 2 x 2 grid", timeout=120_000)
    expect(page.locator("#cmp-grid img").first).to_be_visible()
    assert len(list((workspace / "outputs" / "grids").glob("*.png"))) == 1
    _shot(page, "compare")
    timings["compare"] = time.time() - started

    # ---- Library: the card, and the CivitAI export as a download without dataset metadata
    _tab(page, "Library")
    expect(page.locator("#lib-table")).to_contain_text("inkstyle")
    _choose(page, "#lib-adapter", "inky")
    expect(page.locator("#lib-details")).to_contain_text("AutoV3")
    page.locator("#lib-export").click()
    _wait_text(page, "#lib-status", "Exported")
    link = page.locator("#lib-download a").first
    with page.expect_download() as download_info:
        link.click()
    target = tmp_path / "download.safetensors"
    download_info.value.save_as(target)
    _shot(page, "library")
    timings["library"] = time.time() - started

    from studio.adapters import read_adapter

    exported = read_adapter(target)
    keys = list(exported.tensors)
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert {k.rsplit(".", 1)[-1] for k in keys} <= {"weight", "alpha"}
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    meta = exported.metadata
    assert meta["modelspec.trigger_phrase"] == "inkstyle" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "12" and meta["ss_output_name"] == "inky"
    assert "ss_tag_frequency" not in meta and "ss_dataset_dirs" not in meta
    assert len(meta["sshs_model_hash"]) == 64
    print("browser timings (s, cumulative):", {k: round(v, 1) for k, v in timings.items()})
