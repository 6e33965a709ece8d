"""`ftn serve` tested as users meet it: a server process on 127.0.0.1 and a real HTTP client
(httpx). Small backbone (tiny_convnet), 8 adapters; a short load test; bad inputs; adding and
removing adapters under load; SIGKILL and restart; graceful shutdown."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from ftn import FTNModel
from ftn.core.adapters import read_adapter
from ftn.apps.serving.loadtest import ServerProcess, run_load
from ftn.apps.serving.predict import InputSpec, decode_image, preprocess, top_k

from helpers import SmallCNN
from helpers.serving import SERVER_ARGS, make_adapters, png_bytes, solid_png, tiny_model

# Every test here starts a server process: end-to-end, so `slow`.
pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
TASKS = [f"t{i}" for i in range(8)]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ["--max-image-bytes", "20000", "--max-adapter-bytes", "200000", "--max-pixels", "250000"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Adapters to serve (8) and spare ones to upload, made once."""
    root = tmp_path_factory.mktemp("library")
    paths = make_adapters(root / "served", TASKS)
    spare = make_adapters(root / "spare", ["extra", "late"], classes=3, seed=7)
    return root, paths, spare


@pytest.fixture(scope="module")
def server(library, tmp_path_factory):
    root, _, _ = library
    folder = tmp_path_factory.mktemp("serve") / "adapters"
    shutil.copytree(root / "served", folder)
    with ServerProcess(folder, [*SERVER_ARGS, *LIMITS], token=TOKEN, log_path=folder.parent / "server.log") as srv:
        yield srv, folder


def expected_predictions(paths, task, image, k=5):
    model = tiny_model()
    model.load_task(paths[task])
    x = preprocess(decode_image(image), InputSpec.from_info(model.task_info(task)))
    with torch.no_grad():
        return top_k(model(x[None], task=task), model.task_info(task)["labels"], k)[0]


def assert_same_predictions(got, expected):
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected):
        assert g["prob"] == pytest.approx(e["prob"], abs=2e-6)


def test_lists_tasks_with_their_cost_and_predicts_what_the_model_predicts(server, library):
    srv, _ = server
    _, paths, _ = library
    listing = httpx.get(f"{srv.url}/tasks").json()
    assert [t["name"] for t in listing["tasks"]] == TASKS
    model = tiny_model()
    model.load_task(paths["t0"])
    report = model.parameter_report().tasks["t0"]
    t0 = listing["tasks"][0]
    assert t0["parameters"]["total"] == report.delta + report.norms + report.head and t0["num_labels"] == 5
    assert listing["backbone"]["parameters"] == model.parameter_report().backbone
    detail = httpx.get(f"{srv.url}/tasks/t3").json()
    assert detail["labels"] == [f"t3-class{i}" for i in range(5)] and detail["input"]["size"] == 16
    image = png_bytes(11)
    for task in ("t0", "t5"):
        raw = httpx.post(f"{srv.url}/tasks/{task}/predict?k=3", content=image)
        form = httpx.post(f"{srv.url}/tasks/{task}/predict", params={"k": 3}, files={"file": ("x.png", image)})
        assert raw.status_code == form.status_code == 200
        assert raw.json() == form.json()
        assert_same_predictions(raw.json()["predictions"], expected_predictions(paths, task, image, k=3))
    assert httpx.get(f"{srv.url}/healthz").json()["tasks"] == 8


@pytest.mark.parametrize("method,path,kwargs,status,message", [
    ("post", "/tasks/t0/predict", {"content": b"not an image at all"}, 422, "not an image"),
    ("post", "/tasks/t0/predict", {"content": png_bytes(1)[:120]}, 422, "image"),  # truncated
    ("post", "/tasks/t0/predict", {"content": b"\0" * 30000}, 413, "too large"),
    ("post", "/tasks/t0/predict", {"content": solid_png(600)}, 422, "limit is 250,000 pixels"),
    ("post", "/tasks/t0/predict", {"content": b""}, 400, "empty body"),
    ("post", "/tasks/t0/predict?k=0", {"content": png_bytes(1)}, 400, "k must be"),
    ("post", "/tasks/t0/predict?k=abc", {"content": png_bytes(1)}, 422, "k"),
    ("post", "/tasks/nope/predict", {"content": png_bytes(1)}, 404, "unknown task 'nope'"),
    ("post", "/tasks/a.b/predict", {"content": png_bytes(1)}, 400, "invalid task name"),
    ("get", "/tasks/%2E%2E", {}, 400, "invalid task name"),
    ("put", "/tasks/x", {"content": b"adapter"}, 401, "Bearer"),
    ("put", "/tasks/x", {"content": b"adapter", "headers": {"Authorization": "Bearer wrong"}}, 403, "wrong admin token"),
    ("delete", "/tasks/t0", {"headers": {"Authorization": "Basic abc"}}, 401, "Bearer"),
    ("put", "/tasks/x", {"content": b"garbage adapter", "headers": AUTH}, 422, "the uploaded adapter is truncated or not a safetensors file"),
    ("put", "/tasks/x", {"content": b"\0" * 300000, "headers": AUTH}, 413, "too large"),
    ("put", "/tasks/t1", {"content": b"whatever", "headers": AUTH}, 409, "already served"),
    ("put", "/tasks/..", {"content": b"whatever", "headers": AUTH}, 404, "Not Found"),  # client resolves ..
    ("put", "/tasks/%2E%2E%2Fescape", {"content": b"whatever", "headers": AUTH}, 404, "Not Found"),
    ("put", "/tasks/.hidden", {"content": b"whatever", "headers": AUTH}, 400, "invalid task name"),
    ("delete", "/tasks/nope", {"headers": AUTH}, 404, "unknown task"),
])
def test_bad_requests_get_a_clear_json_error_and_the_server_keeps_serving(server, method, path, kwargs, status,
                                                                          message):
    srv, folder = server
    before = sorted(p.name for p in folder.parent.rglob("*"))
    r = httpx.request(method.upper(), f"{srv.url}{path}", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]
    assert sorted(p.name for p in folder.parent.rglob("*") if p.name != "server.log") == \
        [n for n in before if n != "server.log"]  # nothing written anywhere
    assert httpx.post(f"{srv.url}/tasks/t2/predict", content=png_bytes(2)).status_code == 200


def test_adapter_for_another_backbone_is_refused_with_the_reason(server, tmp_path):
    srv, folder = server
    torch.manual_seed(0)
    other = FTNModel(SmallCNN(), rank=2)
    other.add_task("foreign", head=nn.Linear(16, 3))
    data = other.save_task("foreign", tmp_path / "foreign.safetensors").read_bytes()
    r = httpx.put(f"{srv.url}/tasks/foreign", content=data, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 422 and ("backbone with other weights" in error or "another backbone" in error), error
    assert "upload" not in r.json()["error"] or "the uploaded adapter" in r.json()["error"]
    assert not (folder / "foreign.safetensors").exists() and "foreign" not in httpx.get(f"{srv.url}/tasks").text


@pytest.mark.parametrize("out_features", [4_000_000, 1e11, -5])
def test_an_uploaded_metadata_bomb_is_refused_at_once_and_changes_nothing(server, library, out_features):
    """A file whose head metadata declares a huge (or invalid) size, the checksum intact: 422 with
    the reason, nothing allocated or written, the served tasks unchanged."""
    import json
    import struct

    from safetensors.torch import save as st_save

    srv, folder = server
    _, paths, _ = library
    raw = paths["t0"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8:8 + n])["__metadata__"]
    head = {**json.loads(metadata["head"]), "out_features": out_features}
    bomb = st_save(read_adapter(paths["t0"])[0], metadata={**metadata, "head": json.dumps(head)})
    before = httpx.get(f"{srv.url}/tasks").json()
    r = httpx.put(f"{srv.url}/tasks/bomb", content=bomb, headers=AUTH, timeout=10)
    assert r.status_code == 422 and "the uploaded adapter: the head's" in r.json()["error"], r.text
    after = httpx.get(f"{srv.url}/tasks").json()
    assert [t["name"] for t in after["tasks"]] == [t["name"] for t in before["tasks"]]
    assert not (folder / "bomb.safetensors").exists()
    assert httpx.post(f"{srv.url}/tasks/t2/predict", content=png_bytes(2)).status_code == 200


def metric(text, name):
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def test_load_with_mixed_traffic_while_adapters_are_added_and_removed(server, library):
    """8 tasks, 32 concurrent clients, mixed traffic for ~5 s; meanwhile an admin adds and
    removes another adapter in a loop. No request may fail."""
    srv, folder = server
    _, paths, spare = library
    images = [png_bytes(100 + i) for i in range(4)]
    work = [(t, images[i % 4]) for i in range(4) for t in TASKS]
    churn = {"cycles": 0, "errors": []}
    done = threading.Event()

    def admin_churn():
        data = spare["extra"].read_bytes()
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
            while not done.is_set():
                for r in (http.put("/tasks/extra", content=data), http.get("/tasks/extra"),
                          http.post("/tasks/extra/predict", content=images[0]), http.delete("/tasks/extra")):
                    if r.status_code not in (200, 201):
                        churn["errors"].append(f"{r.request.method} {r.status_code} {r.text[:100]}")
                churn["cycles"] += 1

    thread = threading.Thread(target=admin_churn)
    thread.start()
    try:
        result = run_load(srv.url, work, clients=32, duration_s=5.0, max_requests=5000)
    finally:
        done.set()
        thread.join(60)
    print(f"\nload: {result.summary()}, admin add/remove cycles {churn['cycles']}")
    assert result.errors == 0, result.error_samples
    assert result.requests >= 64 and churn["cycles"] >= 1 and churn["errors"] == []
    for (task, i), label in list(result.answers.items())[:8]:  # answers under load are the right ones
        assert label == expected_predictions(paths, task, work[i][1], k=1)[0]["label"]
    text = httpx.get(f"{srv.url}/metrics").text
    batches = metric(text, "ftn_batch_tasks_count")
    single_task = float(re.search(r'^ftn_batch_tasks_bucket{le="1.0"} ([0-9.e+]+)$', text, re.M).group(1))
    assert batches > 0 and single_task < batches  # some batches mixed several tasks
    assert metric(text, "ftn_batch_size_sum") >= result.requests
    assert 'ftn_predict_latency_seconds_count{task="t7"}' in text
    assert not (folder / "extra.safetensors").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{t}.safetensors" for t in TASKS)


def test_max_resident_serves_every_task_with_two_loaded_and_shows_it_in_the_metrics(library, tmp_path):
    """`ftn serve --max-resident 2` over 8 adapters: every task answers as its own model does,
    at most 2 are loaded at a time, and /metrics and /tasks show the cold loads and evictions."""
    root, paths, _ = library
    folder = tmp_path / "adapters"
    shutil.copytree(root / "served", folder)
    image = png_bytes(4)
    with ServerProcess(folder, [*SERVER_ARGS, "--max-resident", "2", "--max-resident-bytes", "1M"],
                       log_path=tmp_path / "server.log") as srv:
        listing = httpx.get(f"{srv.url}/tasks").json()
        assert len(listing["tasks"]) == 8 and sum(t["resident"] for t in listing["tasks"]) == 2
        for task in [*TASKS, *TASKS[:2]]:
            r = httpx.post(f"{srv.url}/tasks/{task}/predict?k=3", content=image)
            assert r.status_code == 200, r.text
            assert_same_predictions(r.json()["predictions"], expected_predictions(paths, task, image, k=3))
        text = httpx.get(f"{srv.url}/metrics").text
        residency = httpx.get(f"{srv.url}/tasks").json()["residency"]
    assert metric(text, "ftn_resident_tasks") == 2 == residency["resident"]
    assert metric(text, "ftn_resident_bytes") == residency["resident_bytes"] > 0
    assert metric(text, "ftn_adapter_loads_total") == 10  # every reason: 2 at start + 8 cold loads
    assert residency["loads"] == {"start": 2, "request": 8} and residency["max_resident_bytes"] == 2**20
    assert metric(text, "ftn_adapter_evictions_total") == residency["evictions"] == 8
    assert metric(text, "ftn_adapter_cold_load_seconds_count") == 8


def test_sigkill_mid_load_loses_nothing_and_restart_gives_the_same_answers_then_drains(library, tmp_path):
    root, _, spare = library
    folder = tmp_path / "adapters"
    shutil.copytree(root / "served", folder)
    images = [png_bytes(200 + i) for i in range(2)]
    keys = [(t, i) for t in [*TASKS, "late"] for i in range(len(images))]
    log = tmp_path / "server.log"

    srv = ServerProcess(folder, [*SERVER_ARGS, "--max-wait-ms", "2"], token=TOKEN, log_path=log).start()
    try:
        added = httpx.put(f"{srv.url}/tasks/late", content=spare["late"].read_bytes(), headers=AUTH, timeout=60)
        assert added.status_code == 201
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            before = {(t, i): http.post(f"/tasks/{t}/predict", content=images[i]).json() for t, i in keys}
        holder = {}
        load = threading.Thread(target=lambda: holder.update(r=run_load(
            srv.url, [(t, images[0]) for t in TASKS], clients=16, duration_s=30, max_requests=20000,
            stop=lambda: srv.proc.poll() is not None)))
        load.start()
        time.sleep(1.5)
        srv.kill()  # SIGKILL mid-load: no shutdown code runs
        load.join(60)
        assert holder["r"].requests > 0 and holder["r"].errors > 0  # it really died under load
    finally:
        srv.kill()
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert files == sorted(f"{t}.safetensors" for t in [*TASKS, "late"])
    for t in [*TASKS, "late"]:
        read_adapter(folder / f"{t}.safetensors")  # every file complete, checksum intact

    # Restart on the same folder with a long batching window; send every question at once, and
    # SIGTERM the server while they all wait in the window: graceful shutdown answers them all,
    # with the same answers as before the crash.
    srv = ServerProcess(folder, [*SERVER_ARGS, "--max-wait-ms", "4000", "--max-batch", "64"], log_path=log).start()
    try:
        after = {}

        def ask(key):
            r = httpx.post(f"{srv.url}/tasks/{key[0]}/predict", content=images[key[1]], timeout=60)
            after[key] = r.json() if r.status_code == 200 else r.status_code

        threads = [threading.Thread(target=ask, args=(key,)) for key in keys]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/healthz").json()["queued"] < len(keys):
            assert time.monotonic() < deadline, "requests did not all arrive"
            time.sleep(0.02)
        code = srv.stop()  # SIGTERM while every request is in flight
        for t in threads:
            t.join(60)
        assert after.keys() == before.keys()
        for key in keys:  # the same answers (up to float rounding: batches now hold 2 images per task)
            assert after[key]["task"] == key[0]
            assert_same_predictions(after[key]["predictions"], before[key]["predictions"])
        assert code in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    finally:
        srv.kill()
