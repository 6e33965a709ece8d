"""Drive a running ``ftn serve`` as users would: a server process on loopback and concurrent HTTP
clients (httpx). Used by the tests and by ``benchmarks/bench_serving.py``.

- :class:`ServerProcess` starts ``python -m ftn.apps.cli serve ...`` on a free port of 127.0.0.1, waits
  for ``/healthz``, and stops it (SIGTERM: graceful) or kills it (SIGKILL).
- :func:`run_load` runs ``clients`` concurrent clients, each with its own connection, sending
  predictions round-robin over a list of ``(task, image bytes)`` for ``duration_s`` seconds or
  ``max_requests`` requests; it returns counts, errors, throughput and latency percentiles.
- :func:`clone_adapters` writes many distinct adapters from one (a folder of 1,000 tasks in
  seconds, for the resident-set tests and ``benchmarks/bench_serving_resident.py``);
  :func:`generate_adapters` makes such a folder for a seeded random backbone (what
  ``ftn serve --no-pretrained --seed 0`` builds).
- :func:`read_metrics`, :func:`histogram_quantile`, :func:`per_replica` and :func:`rss_mib` read
  what a server reports (Prometheus text, one response per replica) and what it costs (RSS), for
  ``benchmarks/loadtest_scale.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ServerProcess", "LoadResult", "run_load", "free_port", "percentile", "clone_adapters",
           "generate_adapters", "read_metrics", "histogram_quantile", "per_replica", "rss_mib"]


def clone_adapters(template: str | Path, folder: str | Path, names: Sequence[str], *, seed: int = 0,
                   scale: float = 0.3) -> list[Path]:
    """One adapter per name: the ``template`` adapter file with new random ΔW factors and head
    (N(0, scale²)), its task name and checksum rewritten; norms as in the template. A
    millisecond per file, where adding, filling and saving a task costs a QR per factor."""
    import json
    import struct

    import torch
    from safetensors.torch import save as st_save

    from ...core.adapters import read_adapter, tensor_digest

    tensors, _ = read_adapter(template)
    raw = Path(template).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8:8 + n])["__metadata__"]
    g = torch.Generator().manual_seed(seed)
    paths = []
    for name in names:
        own = {k: (torch.randn(v.shape, generator=g) * scale if k.startswith(("delta.", "head.")) else v)
               for k, v in tensors.items()}
        path = Path(folder) / f"{name}.safetensors"
        path.write_bytes(st_save(own, metadata={**metadata, "task": name, "content_sha256": tensor_digest(own)}))
        paths.append(path)
    return paths


def generate_adapters(folder: str | Path, names: Sequence[str], *, backbone: str = "mobilenet_v2", rank: int = 8,
                      classes: int = 10, size: int = 64, seed: int = 0, scale: float = 0.02) -> list[Path]:
    """``len(names)`` adapters (``classes`` labels, ``size`` px stretched, every Conv/Linear adapted
    at ``rank``) for the random backbone that ``ftn serve/predict --backbone BACKBONE
    --no-pretrained --seed 0`` builds: one saved by ``save_task``, cloned (:func:`clone_adapters`)."""
    import torch
    from torch import nn

    from .predict import build_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # as the commands' --seed 0
    model = build_model(backbone, pretrained=False)
    with torch.no_grad():
        features = model(torch.zeros(1, 3, size, size)).shape[1]
    model.add_task("base", head=nn.Linear(features, classes), rank=rank)
    info = {"labels": [f"c{j}" for j in range(classes)],
            "input": {"size": size, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                      "resize": "stretch"}}
    template = model.save_task("base", folder.parent / f".{folder.name}-template.safetensors", info=info)
    try:
        return clone_adapters(template, folder, names, seed=seed, scale=scale)
    finally:
        template.unlink()


def read_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text (``GET /metrics``) as ``{sample name: [(labels, value), ...]}``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The q-quantile (0..1) of a histogram given as cumulative ``(upper bound, count)`` pairs,
    interpolated linearly within the bucket it falls in (as Prometheus' ``histogram_quantile``);
    NaN without observations. Only as exact as the buckets."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return float("nan")
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):  # beyond the last finite bucket: its bound is all we know
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


def per_replica(url: str, path: str, *, replicas: int = 1, header: str | None = None, tries: int = 60,
                timeout: float = 60.0) -> dict[str, httpx.Response]:
    """``GET path`` until ``replicas`` different replicas answered (the response ``header`` names the
    replica; without a header there is one server). Behind a load balancer each request lands on
    some replica, so a few tries reach them all; fewer than asked for after ``tries`` are returned."""
    seen: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=url, timeout=timeout) as http:
        for _ in range(tries):
            r = http.get(path)
            r.raise_for_status()
            seen[r.headers.get(header, "server") if header else "server"] = r
            if len(seen) >= replicas:
                break
    return seen


def rss_mib(pid: int, *, children: bool = False) -> float:
    """Resident memory of a process (and, with ``children``, of every process below it), MiB."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *(proc.children(recursive=True) if children else [])]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # a child that exited meanwhile
            pass
    return total / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``ftn serve`` in a subprocess. ``args`` are extra command-line arguments."""

    def __init__(self, adapters: str | Path, args: Sequence[str] = (), *, token: str | None = None,
                 port: int | None = None, log_path: str | Path | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.adapters = Path(adapters)
        self.args = list(args)
        self.token = token
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        if self.token is not None:
            env["FTN_ADMIN_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "ftn.apps.cli", "serve", "--adapters", str(self.adapters), "--port", str(self.port),
               "--log-level", "warning", *self.args]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ftn serve exited with code {self.proc.returncode} during start"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"ftn serve did not answer /healthz within {self.startup_timeout} s")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (uvicorn drains in-flight requests), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: no chance to clean up (the crash case)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def close(self) -> None:
        self.stop()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    answers: dict[tuple[str, int], Any] = field(default_factory=dict)  # (task, image index) -> top label

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        ms = [x * 1e3 for x in self.latencies]
        return {"requests": self.requests, "errors": self.errors, "seconds": round(self.seconds, 2),
                "throughput_rps": round(self.throughput, 1), "p50_ms": round(percentile(ms, 50), 1),
                "p99_ms": round(percentile(ms, 99), 1)}


async def _run_load(url: str, work: Sequence[tuple[str, bytes]], clients: int, duration_s: float,
                    max_requests: int | None, timeout: float, stop: Callable[[], bool] | None,
                    ok_status: Sequence[int], task_header: str | None,
                    on_answer: Callable[[int, httpx.Response], None] | None) -> LoadResult:
    result = LoadResult()
    deadline = time.perf_counter() + duration_s
    counter = iter(range(10**12))

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            while time.perf_counter() < deadline and not (stop and stop()):
                n = next(counter)
                if max_requests is not None and n >= max_requests:
                    return
                task, image = work[n % len(work)]
                headers = {"content-type": "application/octet-stream"}
                if task_header:
                    headers[task_header] = task
                t0 = time.perf_counter()
                try:
                    r = await http.post(f"/tasks/{task}/predict", content=image, headers=headers)
                    ok = r.status_code in ok_status
                    detail = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail, r = False, f"{type(exc).__name__}: {exc}", None
                result.requests += 1
                if ok and r is not None and r.status_code == 200:
                    result.latencies.append(time.perf_counter() - t0)
                    result.answers[(task, n % len(work))] = r.json()["predictions"][0]["label"]
                    if on_answer is not None:
                        on_answer(n % len(work), r)
                elif not ok:
                    result.errors += 1
                    if len(result.error_samples) < 10:
                        result.error_samples.append(f"{task}: {detail}")

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def run_load(url: str, work: Sequence[tuple[str, bytes]], *, clients: int = 32, duration_s: float = 5.0,
             max_requests: int | None = None, timeout: float = 60.0, stop: Callable[[], bool] | None = None,
             ok_status: Sequence[int] = (200,), task_header: str | None = None,
             on_answer: Callable[[int, httpx.Response], None] | None = None) -> LoadResult:
    """Closed-loop load: ``clients`` concurrent clients, each sending its next request as soon as
    the previous one is answered. A response whose status is not in ``ok_status`` (or a
    connection error) counts as an error. ``task_header``: also name each request's task in this
    header (Ray Serve routes by ``serve_multiplexed_model_id``). ``on_answer(work index, response)``
    sees every 200 (to check answers)."""
    return asyncio.run(_run_load(url, work, clients, duration_s, max_requests, timeout, stop, ok_status,
                                 task_header, on_answer))
