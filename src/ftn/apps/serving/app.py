"""The HTTP server: a FastAPI application over one :class:`~ftn.apps.serving.registry.TaskService`.

Endpoints (every error is ``{"error": "..."}`` with a 4xx/5xx status):

- ``GET /healthz`` — liveness and a little state; ``GET /metrics`` — Prometheus text format.
- ``GET /tasks`` — every served task with its parameter cost; ``GET /tasks/{name}`` — one, with labels.
- ``POST /tasks/{name}/predict?k=5`` — body: one image (raw bytes, or multipart field ``file``);
  returns the top-k labels with probabilities. Requests for different tasks are batched together.
- ``PUT /tasks/{name}`` — admin: body is an adapter file (raw or multipart); verified against the
  backbone exactly as ``load_task`` does, then served and written to the folder; 409 if taken.
- ``DELETE /tasks/{name}`` — admin: stop serving the task and delete its file.
- ``POST /admin/rescan`` — admin: pick up files other replicas added or removed.

Admin endpoints need ``Authorization: Bearer <token>`` (compared in constant time); with no token
configured they are disabled. Bodies are bounded (``max_image_bytes``, ``max_adapter_bytes``)
and read incrementally, so an oversized upload is refused without being stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from ...core.errors import AdapterFileError, ConfigError, DataError, FTNError, ShapeError, TaskError
from .batcher import BatchStats, BatcherClosed, CrossTaskBatcher, Overloaded
from .predict import MAX_PIXELS, decode_image, preprocess, top_k
from .registry import TaskExists, TaskService, validate_name

__all__ = ["create_app", "ServeSettings"]

log = logging.getLogger("ftn.serve")

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class ServeSettings:
    def __init__(self, *, admin_token: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 4096, max_image_bytes: int = 10 * 2**20, max_adapter_bytes: int = 256 * 2**20,
                 max_pixels: int = MAX_PIXELS, rescan_s: float = 0.0, max_k: int = 100, prep_threads: int = 1) -> None:
        self.admin_token = admin_token or None
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self.max_image_bytes = max_image_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self.max_pixels = max_pixels
        self.rescan_s = rescan_s
        self.max_k = max_k
        self.prep_threads = prep_threads


class _Metrics:
    def __init__(self, service: TaskService, batcher: CrossTaskBatcher) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ftn_predict_requests", "Prediction requests by task and HTTP status",
                                ["task", "code"], registry=r)
        self.latency = Histogram("ftn_predict_latency_seconds", "Prediction latency (request read to reply)",
                                 ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ftn_batch_size", "Requests per batched pass (all tasks)",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram("ftn_batch_tasks", "Distinct tasks per batched pass",
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.task_batch = Histogram("ftn_task_batch_size", "A task's requests per batched pass", ["task"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("ftn_queue_wait_seconds", "Time from queueing to the batch starting",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_run = Histogram("ftn_batch_run_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.admin = Counter("ftn_admin_requests", "Admin requests by operation and HTTP status",
                             ["op", "code"], registry=r)
        Gauge("ftn_tasks", "Tasks served", registry=r).set_function(lambda: len(service.catalog))
        Gauge("ftn_resident_tasks", "Tasks loaded in the model (the resident set)",
              registry=r).set_function(lambda: len(service.resident))
        Gauge("ftn_resident_bytes", "Bytes of adapter tensors loaded in the model", registry=r).set_function(
            lambda: service.resident_bytes)
        self.loads = Counter("ftn_adapter_loads", "Adapters loaded into the model, by reason (start: room left "
                             "after a scan, request: a cold load, upload)", ["reason"], registry=r)
        self.evictions = Counter("ftn_adapter_evictions", "Resident tasks evicted (least recently used) to make "
                                 "room", registry=r)
        self.cold_load = Histogram("ftn_adapter_cold_load_seconds", "Loading a task a request asked for",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        service.on_load = self.on_load
        service.on_evict = lambda task: self.evictions.inc()
        Gauge("ftn_queue_depth", "Requests waiting for a batch", registry=r).set_function(lambda: batcher.queued)

    def on_load(self, task: str, reason: str, seconds: float) -> None:
        self.loads.labels(reason).inc()
        if reason == "request":
            self.cold_load.observe(seconds)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(len(stats.tasks))
        self.batch_tasks.observe(len(stats.per_task))
        self.batch_run.observe(stats.run_s)
        for task, n in stats.per_task.items():
            self.task_batch.labels(task).observe(n)
        for w in stats.queue_wait_s:
            self.queue_wait.observe(w)

    def forget(self, task: str) -> None:
        for metric in (self.latency, self.task_batch):
            with contextlib.suppress(KeyError):
                metric.remove(task)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(exc: FTNError) -> int:
    if isinstance(exc, (Overloaded, BatcherClosed)):
        return 503
    if isinstance(exc, TaskExists):
        return 409
    if isinstance(exc, TaskError):
        return 404
    if isinstance(exc, (DataError, AdapterFileError, ShapeError)):
        return 422
    return 400  # ConfigError (bad name, bad parameter) and anything else the caller provoked


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's payload (raw body, or the first file of a multipart form), at most ``limit``
    bytes; more is refused with 413 as soon as it is seen."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit + 64 * 1024  # multipart framing around the file
        except ValueError:
            raise HTTPException(400, "invalid Content-Length") from None
        if too_big:
            raise HTTPException(413, f"{what} too large: {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + 64 * 1024:
            raise HTTPException(413, f"{what} too large: over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def stream() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, f"multipart body has no file field named 'file' (the {what})")
        body = await upload.read()
        await upload.close()
    if len(body) > limit:
        raise HTTPException(413, f"{what} too large: {len(body)} bytes; the limit is {limit} bytes")
    if not body:
        raise HTTPException(400, f"empty body: send the {what}")
    return body


def create_app(service: TaskService, settings: ServeSettings | None = None) -> FastAPI:
    """The application. Its lifespan loads the adapter folder, starts the batcher (and the
    folder rescan, if ``rescan_s`` > 0) and, on shutdown, drains every queued request."""
    settings = settings or ServeSettings()
    batcher = CrossTaskBatcher(service.run_batch, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                               max_queue=settings.max_queue)
    metrics = _Metrics(service, batcher)
    # Decoding and preprocessing run on their own thread pool, small on purpose: torch ops called
    # from many threads at once each start their own OpenMP team and thrash a small machine.
    prep_executor = concurrent.futures.ThreadPoolExecutor(settings.prep_threads, thread_name_prefix="ftn-prep")
    batcher.on_batch = metrics.on_batch

    async def on_model_thread(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(batcher.executor, fn, *args)

    async def rescan_forever() -> None:
        while True:
            await asyncio.sleep(settings.rescan_s)
            try:
                changes = await on_model_thread(service.sync_folder)
                for name in changes["removed"]:
                    metrics.forget(name)
                if changes["added"] or changes["removed"]:
                    log.info("adapter folder changed: %s", changes)
            except Exception:  # noqa: BLE001 - keep serving; the next rescan retries
                log.exception("rescan of %s failed", service.folder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        loaded = await on_model_thread(service.load_folder)
        log.info("serving %d task(s) from %s%s", len(service.catalog), service.folder,
                 f"; not loaded: {loaded['failed']}" if loaded["failed"] else "")
        rescan = asyncio.create_task(rescan_forever()) if settings.rescan_s > 0 else None
        try:
            yield
        finally:
            if rescan is not None:
                rescan.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescan
            await batcher.close()  # drains: queued requests still get their answers
            prep_executor.shutdown(wait=False)

    app = FastAPI(title="ftn serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(FTNError)
    async def ftn_error(request: Request, exc: FTNError) -> JSONResponse:
        return _error(_status_of(exc), str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    def require_admin(request: Request) -> None:
        if settings.admin_token is None:
            raise HTTPException(403, "admin endpoints are disabled: start the server with FTN_ADMIN_TOKEN set")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            raise HTTPException(403, "wrong admin token")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(service.catalog), "queued": batcher.queued}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tasks")
    async def list_tasks() -> dict[str, Any]:
        catalog = service.catalog
        resident = set(service.resident)
        return {"backbone": service.backbone_summary(), "residency": service.residency(),
                "tasks": [{**catalog[n].summary(), "resident": n in resident} for n in sorted(catalog)],
                "not_loaded": dict(service.skipped)}

    @app.get("/tasks/{name}")
    async def get_task(name: str) -> dict[str, Any]:
        validate_name(name)
        entry = service.catalog.get(name)
        if entry is None:
            raise TaskError(f"unknown task {name!r}")
        return entry.summary(with_labels=True)

    @app.post("/tasks/{name}/predict")
    async def predict(name: str, request: Request, k: int = 5) -> JSONResponse:
        started = time.perf_counter()
        known = name in service.catalog
        label = name if known else "<unknown>"  # unknown names must not grow the metrics
        code = 500
        try:
            validate_name(name)
            entry = service.catalog.get(name)
            if entry is None:
                raise TaskError(f"unknown task {name!r}; GET /tasks lists the served ones")
            if entry.kind != "classification":
                raise ConfigError(f"task {name!r} is a {entry.kind} task; the server returns labels only "
                                  f"(use `ftn predict` for prediction images)")
            if not 1 <= k <= settings.max_k:
                raise ConfigError(f"k must be in 1..{settings.max_k}, got {k}")
            body = await _read_body(request, settings.max_image_bytes, "image")

            def prepare() -> Any:
                return preprocess(decode_image(body, settings.max_pixels), entry.input)

            x = await asyncio.get_running_loop().run_in_executor(prep_executor, prepare)
            logits = await batcher.submit(name, x)
            predictions = top_k(logits.unsqueeze(0), entry.labels, k)[0]
            code = 200
            return JSONResponse({"task": name, "predictions": predictions})
        except HTTPException as exc:
            code = exc.status_code
            raise
        except FTNError as exc:
            code = _status_of(exc)
            raise
        finally:
            metrics.requests.labels(label, str(code)).inc()
            if code == 200:
                metrics.latency.labels(label).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def admin_op(op: str, success: int):
        """Count an admin request under the status it ends with (``success``, the HTTP error's,
        the status an FTNError maps to, or 500 for anything else)."""
        code = 500
        try:
            yield
            code = success
        except HTTPException as exc:
            code = exc.status_code
            raise
        except FTNError as exc:
            code = _status_of(exc)
            raise
        finally:
            metrics.admin.labels(op, str(code)).inc()

    @app.put("/tasks/{name}", status_code=201)
    async def add_task(name: str, request: Request) -> JSONResponse:
        with admin_op("add", 201):
            require_admin(request)
            validate_name(name)
            data = await _read_body(request, settings.max_adapter_bytes, "adapter file")
            entry = await on_model_thread(service.add, name, data)
            log.info("added task %s (%d bytes)", name, len(data))
            return JSONResponse({"added": entry.summary()}, status_code=201)

    @app.delete("/tasks/{name}")
    async def remove_task(name: str, request: Request) -> dict[str, Any]:
        with admin_op("remove", 200):
            require_admin(request)
            validate_name(name)
            await on_model_thread(service.remove, name)
            metrics.forget(name)
            log.info("removed task %s", name)
            return {"removed": name}

    @app.post("/admin/rescan")
    async def rescan(request: Request) -> dict[str, Any]:
        require_admin(request)
        changes = await on_model_thread(service.sync_folder)
        for name in changes["removed"]:
            metrics.forget(name)
        return changes

    return app
