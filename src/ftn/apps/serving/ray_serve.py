"""``ftn serve --ray``: the same HTTP API scaled out on Ray Serve, each task a multiplexed model.

Every replica runs the unchanged ``ftn serve`` application (:func:`~ftn.apps.serving.app.create_app`:
routes, limits, errors, batcher, metrics) over a :class:`~ftn.apps.serving.registry.TaskService`
that catalogues every task of the shared adapter folder and keeps at most ``--tasks-per-replica``
of them resident (loaded, LRU; ``--max-resident``). Ray Serve's model multiplexing routes: a request
passes through an ``@serve.multiplexed`` loader keyed by its task, so Ray Serve knows which tasks
each replica holds (an LRU of the same size, ``max_num_models_per_replica``) and its router sends a
request whose ``serve_multiplexed_model_id`` header names the task to a replica that has it loaded.
Without the header a request still works: any replica loads the task.

The folder is the source of truth, so hot add/remove reaches every replica without broadcasting:
an upload through any replica writes the file (verified first, as in ``ftn serve``); before a
request that names a task, a replica compares that task's file (one ``stat``) with what it saw
last and rescans the folder if it differs, so a task added, replaced or deleted through another
replica is served, reloaded or refused (404) on the next request.

Entry points: ``ftn serve --ray --replicas N ...`` (:func:`run_ray`), ``serve run
ftn.apps.serving.ray_serve:build_app adapters=DIR backbone=NAME ...`` (:func:`build_app`, the same
options as ``ftn serve`` without dashes), or :func:`application` from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve
from starlette.responses import JSONResponse

from ...core.errors import ConfigError
from .app import create_app
from .registry import SUFFIX, TASK_NAME
from .server import add_serve_arguments, build_service, serve_settings

__all__ = ["FTNReplica", "application", "build_app", "replica_config", "parse_serve_run_args", "run_ray",
           "MODEL_ID_HEADER", "REPLICA_HEADER"]

log = logging.getLogger("ftn.serve")

#: The request header Ray Serve's proxy routes by (the task's name).
MODEL_ID_HEADER = "serve_multiplexed_model_id"
#: Response header naming the replica that answered (for operators and the tests).
REPLICA_HEADER = "x-ftn-replica"
_TASK_PATH = re.compile(r"^/tasks/([^/]+)(/predict)?/?$")
#: Ray Serve gives its HTTP proxy 5 s to report ready and kills it after three misses, which a
#: loaded 2-core machine misses while replicas import torch (seen: ``serve.start`` failing with
#: ActorDiedError at load average 4). Read by the processes ``ray.init`` starts; a user's own
#: setting wins.
PATIENT_STARTUP_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
                       "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def patient_startup_env() -> None:
    """Set :data:`PATIENT_STARTUP_ENV`'s defaults; call before ``ray.init`` starts a local Ray."""
    for key, value in PATIENT_STARTUP_ENV.items():
        os.environ.setdefault(key, value)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


@serve.deployment
@serve.ingress()
class FTNReplica:
    """One Ray Serve replica: ``ftn serve``'s app, with each request's task passed through
    ``@serve.multiplexed`` (for routing) and checked against the shared folder first."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        import torch

        args = argparse.Namespace(**options)
        logging.basicConfig(level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        if args.threads:
            torch.set_num_threads(args.threads)
        self.service = build_service(args)
        self.ftn_app = create_app(self.service, serve_settings(args))
        self._executor = self.ftn_app.state.batcher.executor  # the model thread
        # task -> its file's (mtime_ns, size) when this replica last scanned; taken before the app's
        # start-up scan, so a file changed in between is rescanned at its first request, not missed.
        self._seen: dict[str, tuple[int, int] | None] = {
            path.name[:-len(SUFFIX)]: _signature(path) for path in self.service.folder.glob(f"*{SUFFIX}")}

        async def load_task(name: str) -> str:
            # The task loads on the model thread when its first request's batch runs (a cold load,
            # evicting the least recently used beyond --max-resident); Ray Serve only needs to know
            # it is (being) loaded here, to route the task's next requests to this replica.
            return name

        # Set per instance (Ray Serve detects it at run time) so that the capacity is an option.
        self._resident = serve.multiplexed(max_num_models_per_replica=args.tasks_per_replica)(load_task)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:  # a function: ASGI 3 to uvicorn
            await self._asgi(scope, receive, send)

        return asgi

    async def _sync(self) -> None:
        changes = await asyncio.get_running_loop().run_in_executor(self._executor, self.service.sync_folder)
        for name in changes["removed"]:
            self.ftn_app.state.metrics.forget(name)

    async def _fresh(self, name: str) -> None:
        """Rescan the folder if ``name``'s file is not what this replica saw last: another replica
        added, replaced or deleted it."""
        signature = _signature(self.service.path_of(name))
        if signature != self._seen.get(name):
            await self._sync()
            self._seen[name] = signature

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan: the app's own start-up and drain
            await self.ftn_app(scope, receive, send)
            return
        status: list[int] = []

        async def tagged_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.replica_id.encode())]}
            await send(message)

        method, path = scope["method"], scope["path"]
        match = _TASK_PATH.match(path)
        name = match.group(1) if match and TASK_NAME.fullmatch(match.group(1)) else None
        if name is None:  # other endpoints and invalid names: the app answers as ftn serve does
            if method == "GET" and path.rstrip("/") == "/tasks":
                await self._sync()  # list what the folder holds now
            await self.ftn_app(scope, receive, tagged_send)
            return
        predict = method == "POST" and match.group(2) is not None
        routed = serve.get_multiplexed_model_id()
        if predict and routed and routed != name:
            await JSONResponse({"error": f"header {MODEL_ID_HEADER} names task {routed!r} but the path names "
                                         f"{name!r}"}, status_code=400)(scope, receive, tagged_send)
            return
        await self._fresh(name)
        if predict and name in self.service.catalog:
            await self._resident(name)  # Ray Serve's LRU of this replica's tasks (routing)
        await self.ftn_app(scope, receive, tagged_send)
        if method == "PUT" and status == [201]:  # an upload is loaded on the replica that took it
            self._seen[name] = _signature(self.service.path_of(name))
            await self._resident(name)


# ---------------------------------------------------------------------- entry points
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftn serve --ray", add_help=False)
    add_serve_arguments(parser)
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    known = {a.dest for a in _parser()._actions}
    return {k: v for k, v in vars(args).items() if k in known}


def replica_config(args: argparse.Namespace | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ftn serve``'s options (a namespace, or a mapping of some of them over the defaults) as
    (the options each replica is built from, the deployment's Ray Serve options)."""
    if isinstance(args, Mapping):
        args = argparse.Namespace(**{**vars(_parser().parse_args(["--adapters", "."])), **args})
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    if args.tasks_per_replica < 1:
        raise ConfigError(f"--tasks-per-replica must be >= 1, got {args.tasks_per_replica}")
    options = _options(args)
    options["adapters"] = str(Path(args.adapters).resolve())  # replicas may start in another directory
    # The replica's resident set is the multiplexer's LRU: same size, unless --max-resident says less.
    options["max_resident"] = min(args.max_resident or args.tasks_per_replica, args.tasks_per_replica)
    deployment = {"name": "ftn", "num_replicas": args.replicas,
                  # The batcher needs concurrent requests to batch; Ray Serve's default is 5 per replica.
                  "max_ongoing_requests": max(2 * args.max_batch, 8),
                  "ray_actor_options": {"num_cpus": max(1, args.threads)}}
    return options, deployment


def application(args: argparse.Namespace | Mapping[str, Any]) -> serve.Application:
    """The Ray Serve application for ``ftn serve``'s options (see :func:`replica_config`)."""
    options, deployment = replica_config(args)
    return FTNReplica.options(**deployment).bind(options)


def build_app(args: Mapping[str, str]) -> serve.Application:
    """``serve run ftn.apps.serving.ray_serve:build_app adapters=DIR backbone=NAME replicas=2 ...``:
    ``ftn serve``'s options without the leading dashes (``no_pretrained=true`` for flags)."""
    return application(parse_serve_run_args(args))


def parse_serve_run_args(args: Mapping[str, str]) -> argparse.Namespace:
    """``serve run``'s ``key=value`` arguments parsed as ``ftn serve`` parses its options."""
    argv: list[str] = []
    flags = {a.dest for a in _parser()._actions if a.nargs == 0}
    for key, value in args.items():
        option = "--" + key.replace("_", "-")
        if key.replace("-", "_") in flags:
            if str(value).lower() in ("1", "true", "yes", "on"):
                argv.append(option)
        else:
            argv += [option, str(value)]
    try:
        return _parser().parse_args(argv)
    except SystemExit:  # argparse has printed what is wrong
        raise ConfigError(f"invalid ftn serve options for Ray Serve: {dict(args)}") from None


def run_ray(args: argparse.Namespace) -> int:
    """``ftn serve --ray``: start Ray (or join ``$RAY_ADDRESS``), deploy, serve until SIGINT/SIGTERM."""
    import ray

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = application(args)
    patient_startup_env()
    ray.init(logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="ftn", route_prefix="/")
        log.info("serving %s with %d Ray Serve replica(s) on http://%s:%d", args.adapters, args.replicas,
                 args.host, args.port)
        while not stop.wait(1.0):  # a timed wait: signal handlers run between waits
            pass
        log.info("shutting down (replicas drain their queued requests)")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
