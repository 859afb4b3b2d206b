"""Reliability of the served app: localhost by default, auth on every route, files only from the workspace, no silent
overwrites, bounded uploads and queue, and several sessions generating during training without disturbing it."""

from __future__ import annotations

import inspect
import io
import os
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from gradio_client import Client, handle_file
from PIL import Image

from studio.adapters import read_adapter
from studio.cli import build_parser
from studio.generate import GenerationRequest, LoraRequest, generate
from studio.jobs import JobRunner
from studio.library import Workspace
from studio.models import load_base
from studio.ui import app as app_module
from studio.ui.common import ModelCache
from tests.helpers import make_adapter, snapshot_tree, write_style_images
from training.config import TrainConfig
from training.trainer import Trainer, train

USER, PASSWORD = "me", "s3cret-pass"
QUEUE = 2
TRAINING_HOOKS: list = []  # a test's observers of the background trainer's progress events


def _observed_trainer(config, progress, should_stop) -> Trainer:
    """The real Trainer for the server's job runner; its progress events also reach TRAINING_HOOKS."""

    def report(event) -> None:
        for hook in list(TRAINING_HOOKS):
            hook(event)
        progress(event)

    return Trainer(config, progress=report, should_stop=should_stop)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fn_index(app, elem_id: str, side: str = "outputs") -> int:
    """The event whose outputs (or inputs) include the component with `elem_id`."""
    found = [i for i, fn in app.fns.items() if any(getattr(c, "elem_id", None) == elem_id for c in getattr(fn, side))]
    assert found, elem_id
    return found[0]


def _serve(tiny_model_dir, root, queue_size: int):
    """The studio served with auth on a free port and a 1 MB upload limit, with two adapters and a dataset."""
    workspace = Workspace(root / "ws")
    write_style_images(workspace.dataset_dir("inky"), count=4)
    make_adapter(tiny_model_dir, workspace.adapter_path("a"), seed=1, rank=2, targets="attn")
    make_adapter(tiny_model_dir, workspace.adapter_path("b"), seed=2, rank=2, targets="attn")
    runner, models = JobRunner(workspace, trainer_factory=_observed_trainer), ModelCache()
    app = app_module.launch(
        port=_free_port(),
        workspace=str(workspace.root),
        base=str(tiny_model_dir),
        auth=f"{USER}:{PASSWORD}",
        max_upload_mb=1,
        queue_size=queue_size,
        block=False,
        runner=runner,
        models=models,
    )
    return SimpleNamespace(
        url=app.local_url, app=app, ws=workspace, runner=runner, models=models, root=root, base=str(tiny_model_dir)
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The studio with a queue of 2 (to show the bound); torn down after."""
    served = _serve(tiny_model_dir, tmp_path_factory.mktemp("server"), QUEUE)
    yield served
    served.app.close()


@pytest.fixture(scope="module")
def roomy_server(tiny_model_dir, tmp_path_factory):
    """The studio with the default queue (32): several sessions at once must all be served, never refused."""
    served = _serve(tiny_model_dir, tmp_path_factory.mktemp("roomy_server"), 32)
    yield served
    served.app.close()


def _client(server, tmp_path) -> Client:
    downloads = tmp_path / f"downloads_{os.urandom(4).hex()}"
    return Client(server.url, auth=(USER, PASSWORD), verbose=False, download_files=str(downloads))


def _login(server) -> requests.Session:
    session = requests.Session()
    response = session.post(server.url + "login", data={"username": USER, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return session


# ----------------------------------------------------------------------------------------------------- access


def test_the_server_binds_to_localhost_by_default(server):
    assert inspect.signature(app_module.launch).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    port = int(server.url.rstrip("/").rsplit(":", 1)[1])
    listening = []
    for line in (
        Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    ):
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            listening.append(address)
    assert listening == ["0100007F"], f"the server listens on {listening}, not only 127.0.0.1"


def test_with_auth_every_route_refuses_an_unauthenticated_request(server):
    image = next(server.ws.dataset_dir("inky").glob("*.png"))
    generate_fn = _fn_index(server.app, "gen-gallery")
    api = server.url + "gradio_api/"
    refused = {
        "GET config": requests.get(server.url + "config", timeout=30),
        "GET info": requests.get(api + "info", timeout=30),
        "GET openapi.json": requests.get(api + "openapi.json", timeout=30),
        "GET file= (workspace image)": requests.get(api + f"file={image}", timeout=30),
        "GET file= (/etc/passwd)": requests.get(api + "file=/etc/passwd", timeout=30),
        "GET file/ (old route)": requests.get(api + f"file/{image}", timeout=30),
        "POST upload": requests.post(api + "upload", files={"files": ("x.png", b"123")}, timeout=30),
        "GET upload_progress": requests.get(api + "upload_progress?upload_id=x", timeout=30),
        "POST queue/join": requests.post(
            api + "queue/join", json={"data": [], "fn_index": generate_fn, "session_hash": "intruder"}, timeout=30
        ),
        "GET queue/data": requests.get(api + "queue/data?session_hash=intruder", timeout=30),
        "POST run/predict": requests.post(api + "run/predict", json={"data": []}, timeout=30),
        "POST call": requests.post(api + "call/describe_base", json={"data": ["demo"]}, timeout=30),
        "GET monitoring": requests.get(server.url + "monitoring", timeout=30),
        "GET login_check": requests.get(api + "login_check", timeout=30),
    }
    for route, response in refused.items():
        assert response.status_code in (401, 403), (route, response.status_code, response.text[:200])
        assert image.read_bytes() not in response.content and "root:" not in response.text, route
    page = requests.get(server.url, timeout=30)
    assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
    assert "dataset-name" not in page.text and str(server.ws.root) not in page.text, "the login page leaks the app"
    bad = requests.post(server.url + "login", data={"username": USER, "password": "wrong"}, timeout=30)
    assert bad.status_code in (400, 401) and "Incorrect credentials" in bad.text
    assert requests.get(api + "runs", timeout=30).status_code == 404, "run history (kept outside the workspace) is off"
    session = _login(server)
    assert session.get(server.url + "config", timeout=30).status_code == 200  # the refusals above were the auth


def test_files_are_served_only_from_the_workspace(server):
    session = _login(server)
    api = server.url + "gradio_api/"
    image = next(server.ws.dataset_dir("inky").glob("*.png"))
    served = session.get(api + f"file={image}", timeout=30)
    assert served.status_code == 200 and served.content == image.read_bytes()
    secret = server.root / "secret.txt"  # beside the workspace, not in it
    secret.write_text("not for the web")
    link = server.ws.outputs_dir / "innocent.png"
    link.symlink_to(secret)
    for path in (
        "/etc/passwd",
        str(secret),
        f"{server.ws.root}/../secret.txt",
        f"{server.ws.root}/%2e%2e/secret.txt",
        str(link),
        str(Path(__file__).resolve()),
    ):
        response = session.get(api + f"file={path}", timeout=30)
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "not for the web" not in response.text and "root:" not in response.text, path


def test_an_oversize_upload_is_refused_and_uploads_stay_in_the_workspace(server):
    session = _login(server)
    before = snapshot_tree(server.root, exclude=server.ws.root)
    too_big = session.post(
        server.url + "gradio_api/upload", files={"files": ("big.png", os.urandom(1536 * 1024))}, timeout=60
    )
    assert too_big.status_code == 413 and "exceeded maximum allowed size" in too_big.text
    ok = session.post(server.url + "gradio_api/upload", files={"files": ("ok.png", os.urandom(512 * 1024))}, timeout=60)
    assert ok.status_code == 200
    (stored,) = ok.json()
    assert Path(stored).resolve().is_relative_to(server.ws.root), stored
    assert snapshot_tree(server.root, exclude=server.ws.root) == before, "an upload was written outside the workspace"


def test_an_upload_never_silently_overwrites_an_adapter_or_an_image(server, tmp_path):
    client = _client(server, tmp_path)
    import_fn = next(  # the Import button: (files: the adapter and its A1111 sidecars, name, base model) -> status
        i
        for i, fn in server.app.fns.items()
        if [getattr(c, "elem_id", None) for c in (*fn.inputs, *fn.outputs)] == [None, None, "base-model", "lib-status"]
    )
    original = server.ws.adapter_path("a").read_bytes()
    impostor = tmp_path / "a.safetensors"  # another adapter under an existing name
    shutil.copyfile(server.ws.adapter_path("b"), impostor)
    for name in ("a", ""):
        status = client.predict([handle_file(str(impostor))], name, server.base, fn_index=import_fn)
        assert "an adapter named 'a' already exists; give another name" in status
    assert server.ws.adapter_path("a").read_bytes() == original
    status = client.predict([handle_file(str(impostor))], "a_copy", server.base, fn_index=import_fn)
    assert "Imported **a_copy**" in status and server.ws.adapter_path("a").read_bytes() == original
    server.ws.delete_adapter("a_copy")

    upload_fn = _fn_index(server.app, "dataset-status")
    folder = server.ws.dataset_dir("inky")
    kept = (folder / "img_00.png").read_bytes()
    clash = tmp_path / "img_00.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(clash)
    status, _ = client.predict("inky", [handle_file(str(clash))], "", fn_index=upload_fn)
    assert "1 file(s) added" in status
    assert (folder / "img_00.png").read_bytes() == kept and (folder / "img_00_1.png").read_bytes() == clash.read_bytes()
    (folder / "img_00_1.png").unlink()


def _gen_args(server, prompt: str, seed: int, stack: list[tuple[str, float]] = ()) -> list:
    rows = []
    for index in range(4):
        name, weight = stack[index] if index < len(stack) else (None, 1.0)
        rows += [name, weight, True, False, 1.0, 1.0]
    return [server.base, prompt, "", "fixed", seed, 2, 7.0, 0, 0, "Default", 1, *rows]


def test_the_request_queue_is_bounded_with_a_clear_error(server, tmp_path):
    generate_fn = _fn_index(server.app, "gen-gallery")
    server.models.get(server.base)
    clients = [_client(server, tmp_path) for _ in range(QUEUE + 4)]
    jobs = []
    with server.models.lock:  # the pipeline is busy: two requests run (and wait for it), the rest queue
        for index, client in enumerate(clients):
            jobs.append(client.submit(*_gen_args(server, f"queued {index}", index), fn_index=generate_fn))
            deadline = 0
            while jobs[-1].status().code.name in ("STARTING", "JOINING_QUEUE") and deadline < 200:
                threading.Event().wait(0.05)
                deadline += 1
    results, refusals = [], []
    for job in jobs:
        try:
            results.append(job.result(timeout=120))
        except Exception as exc:  # gradio_client raises QueueError for a full queue
            refusals.append(str(exc))
    assert len(results) == 2 + QUEUE, "two running and a full queue complete"
    assert refusals == ["Queue is full! Please try again."] * 2
    for index, (_, info, status) in enumerate(results):
        assert info.startswith(f"queued {index}\n") and status.startswith("Saved 1 image(s)")


# -------------------------------------------------------------------------------------------------------- load
SESSIONS = [
    ("session zero, a red circle", 10, [("a", 0.8)]),
    ("session one, a blue square", 11, [("b", 1.0)]),
    ("session two, a green circle", 12, []),
    ("session three, a black square", 13, [("a", 0.5), ("b", 0.7)]),
]


def test_sessions_generate_while_training_runs_without_disturbing_it_or_each_other(roomy_server, tmp_path):
    server = roomy_server
    config = TrainConfig(
        base=server.base,
        data_dir=str(server.ws.dataset_dir("inky")),
        output=str(tmp_path / "reference.safetensors"),
        resolution=32,
        rank=4,
        alpha=4.0,
        max_train_steps=8,
        batch_size=2,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        train_text_encoder=True,
        unet_targets="attn",
        seed=3,
        checkpoint_every_steps=4,
    )
    reference = train(config).output
    solo = load_base(server.base)
    expected = []
    for prompt, seed, stack in SESSIONS:
        request = GenerationRequest(prompt, seed=seed, steps=2, loras=[LoraRequest(n, w) for n, w in stack])
        expected.append(np.asarray(generate(solo, request, resolver=server.ws.existing_adapter).images[0]))

    generate_fn = _fn_index(server.app, "gen-gallery")
    outcomes: dict[int, list] = {index: [] for index in range(len(SESSIONS))}
    loading, generated = threading.Event(), threading.Event()
    first_round = threading.Barrier(len(SESSIONS), action=generated.set)

    def user(index: int) -> None:  # a session generating twice (re-installing its adapters) while training runs
        client = _client(server, tmp_path)
        prompt, seed, stack = SESSIONS[index]
        args = _gen_args(server, prompt, seed, stack)
        assert loading.wait(timeout=120)
        outcomes[index].append(client.predict(*args, fn_index=generate_fn))
        first_round.wait(timeout=120)
        outcomes[index].append(client.predict(*args, fn_index=generate_fn))

    def hold_while_loading(event) -> None:  # the trainer has seeded itself and not yet built its LoRA layers:
        if event.phase == "loading":  # let every session generate right there, the most fragile moment
            loading.set()
            assert generated.wait(timeout=120)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(SESSIONS))]
    for thread in threads:
        thread.start()
    TRAINING_HOOKS.append(hold_while_loading)
    try:
        job = server.runner.submit(
            config.replace(
                output=str(server.ws.adapter_path("trained")),
                work_dir=str(server.ws.run_dir("trained")),
                output_name="trained",
            )
        )
        job.join(timeout=300)
    finally:
        TRAINING_HOOKS.remove(hold_while_loading)
        loading.set()
    for thread in threads:
        thread.join(timeout=300)
    assert job.join(timeout=300) and job.status == "done", job.error
    assert job.step == 8 and len(job.losses) == 8

    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(
            read_adapter(reference).tensors.values(),
            read_adapter(server.ws.adapter_path("trained")).tensors.values(),
            strict=True,
        )
    )
    assert difference < 1e-4, f"training was disturbed by the generations (max difference {difference})"
    assert all(len(runs) == 2 for runs in outcomes.values()), outcomes
    names = {"a", "b"}
    for index, runs in outcomes.items():
        prompt, seed, stack = SESSIONS[index]
        others = [p for j, (p, _, _) in enumerate(SESSIONS) if j != index]
        for gallery, info, status in runs:
            assert status.startswith("Saved 1 image(s)"), status
            first_line = info.splitlines()[0]
            assert first_line.startswith(prompt) and not any(other in info for other in others)
            used = {n for n in names if f"<lora:{n}:" in first_line}
            assert used == {n for n, _ in stack}, (index, first_line)
            assert f"Seed: {seed}," in info
            image = np.asarray(Image.open(io.BytesIO(Path(gallery[0]["image"]).read_bytes())).convert("RGB"))
            assert np.array_equal(image, expected[index]), f"session {index} got another session's image"


def test_one_sessions_results_are_not_visible_to_another(server, tmp_path):
    generate_fn = _fn_index(server.app, "gen-gallery")
    preview_fn = _fn_index(server.app, "gen-preview-for", "inputs")
    first, second = _client(server, tmp_path), _client(server, tmp_path)
    _, info, status = first.predict(*_gen_args(server, "only mine", 5, [("a", 1.0)]), fn_index=generate_fn)
    assert status.startswith("Saved") and "only mine" in info
    # the second session asks to use "its" last image as a preview: it has none, whatever the first one did
    message = second.predict("a", fn_index=preview_fn)
    assert "generate an image first" in message
    assert not server.ws.preview_path("a").exists()
    assert "is now the preview of **a**" in first.predict("a", fn_index=preview_fn)
    server.ws.preview_path("a").unlink()
