"""The served model and its adapter folder.

:class:`TaskService` owns one :class:`~ftn.FTNModel` (one frozen backbone in memory) and the folder
of adapter files it serves. Every method that touches the model — loading, adding, removing,
rescanning, evicting and running batches — must run on one thread (the batcher's executor), so a
forward pass never sees a half-added task; :attr:`catalog` and :attr:`skipped` are immutable
snapshots that other threads read freely.

Files: an adapter is ``<folder>/<task>.safetensors`` with ``<task>`` matching :data:`TASK_NAME`.
Uploads are verified by loading them into the model (``load_task``'s checks: format, checksum,
layers, shapes, norms, head, backbone fingerprint, labels) *before* the file is written, then
written atomically (temporary file, fsync, rename), so a crash at any point leaves either no file
or the whole file. Files found in the folder are checked from their header alone when scanned
(every check but the tensors' checksum: :func:`~ftn.apps.serving.predict.inspect_adapter`), so a
folder of thousands of adapters is catalogued without loading them; a file whose tensors turn out
corrupt when it is loaded leaves the catalog for ``skipped`` with the reason.

Residency: the catalog lists every task; only a bounded set is loaded in the model (resident), at
most ``max_resident`` tasks and ``max_resident_bytes`` bytes of adapter tensors (0: no limit; the
default loads every task at start, as before). A request for a task that is not resident loads it
(a cold load), evicting the least recently used tasks first; a batch whose tasks do not fit at once
runs in parts that do, so the bound holds at every moment. Memory is then the backbone + the
resident set + the caches below, however many tasks the folder holds.

Caches: layers cache a task's dense W + ΔW while it is in use; only the ``hot_tasks`` most
recently used tasks keep that cache (an LRU). Optionally the ``merged`` hottest tasks are also
kept as plain merged modules (one backbone copy each).

Staging files of uploads are named per process (host, pid and a random token); at start only
staging files older than ``stale_staging_s`` (:data:`STALE_STAGING_S`, 10 min: an upload's
staging file lives for the seconds its verification takes) are deleted, so replicas sharing a
folder never delete each other's uploads in progress.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...core.adapters import AdapterHeader, ModelLayout
from ...core.io import atomic_write_bytes
from ...core.errors import AdapterFileError, ConfigError, FTNError, TaskError
from ...core.model import FTNModel
from .predict import DEFAULT_IMAGE_SIZE, InputSpec, inspect_adapter, load_adapter

__all__ = ["TaskService", "TaskEntry", "TASK_NAME", "validate_name", "TaskExists", "STALE_STAGING_S"]

log = logging.getLogger("ftn.serve")

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SUFFIX = ".safetensors"
STALE_STAGING_S = 600.0  # a staging file older than this belongs to an upload that died


class TaskExists(TaskError):
    """A task of that name is already served."""


def validate_name(name: str) -> str:
    """A task name that is safe as a file name: letters, digits, ``_`` and ``-``, at most 64,
    starting with a letter or digit (so no ``..``, ``/``, ``\\``, dot-files or empty names)."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigError(f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', "
                          f"starting with a letter or digit")
    return name


@dataclass(frozen=True)
class TaskEntry:
    name: str
    labels: tuple[str, ...] | None
    input: InputSpec
    kind: str
    parameters: dict[str, int]
    file_bytes: int
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)
    tensor_bytes: int = 0  # what the task costs while resident (its adapter tensors)

    def summary(self, with_labels: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "num_labels": len(self.labels) if self.labels else None,
               "parameters": self.parameters, "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes,
               "sha256": self.sha256, "input": self.input.as_dict()}
        if with_labels:
            out["labels"] = list(self.labels) if self.labels else None
        return out


class TaskService:
    def __init__(self, model: FTNModel, folder: str | Path, *, default_image_size: int = DEFAULT_IMAGE_SIZE,
                 batching: str = "mixed", hot_tasks: int = 8, merged: int = 0, max_resident: int = 0,
                 max_resident_bytes: int = 0, stale_staging_s: float = STALE_STAGING_S) -> None:
        if batching not in ("subbatch", "mixed"):
            raise ConfigError(f"batching must be 'subbatch' or 'mixed', got {batching!r}")
        if max_resident < 0 or max_resident_bytes < 0:
            raise ConfigError(f"max_resident and max_resident_bytes must be >= 0 (0: no limit), got "
                              f"{max_resident} and {max_resident_bytes}")
        self.model = model.eval()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.default_image_size = default_image_size
        self.batching = batching
        self.hot_tasks = max(0, hot_tasks)
        self.merged_capacity = max(0, merged)
        if self.merged_capacity and batching != "subbatch":
            raise ConfigError("merged tasks run as their own sub-batches: use batching='subbatch' with merged > 0")
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self.stale_staging_s = stale_staging_s
        self.catalog: dict[str, TaskEntry] = {}
        self._files: dict[str, tuple[int, int]] = {}  # task -> (mtime_ns, size) of its file
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU: task -> bytes
        self.resident_bytes = 0
        self._hot: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._merged: collections.OrderedDict[str, nn.Module] = collections.OrderedDict()
        self._uses: collections.Counter[str] = collections.Counter()
        self._batches = 0
        self.skipped: dict[str, str] = {}  # file name -> why it is not served
        self.fingerprint = model.backbone_fingerprint()
        self._backbone_report = model.parameter_report()
        self._layout = ModelLayout.of(model)  # what checking a file needs of the model, read once
        # Loads by reason ("start": filling free room after a scan, "request": a cold load, "upload")
        # and evictions; on_load(task, reason, seconds) / on_evict(task) feed the server's metrics.
        self.loads: collections.Counter[str] = collections.Counter()
        self.evictions = 0
        self.on_load: Callable[[str, str, float], None] | None = None
        self.on_evict: Callable[[str], None] | None = None
        # Staging files of this process: unique across replicas sharing the folder, even on NFS.
        self._staging_tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ folder
    def path_of(self, name: str) -> Path:
        path = (self.folder / f"{validate_name(name)}{SUFFIX}").resolve()
        if path.parent != self.folder.resolve():  # cannot happen with the name pattern; belt and braces
            raise ConfigError(f"task name {name!r} escapes the adapter folder")
        return path

    def _scan(self) -> tuple[dict[str, Path], dict[str, str]]:
        found, misnamed = {}, {}
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            name = path.name[:-len(SUFFIX)]
            if TASK_NAME.fullmatch(name) and path.is_file():
                found[name] = path
            elif not name.startswith("."):
                misnamed[path.name] = "file name is not a valid task name"
        return found, misnamed

    def load_folder(self) -> dict[str, Any]:
        """Catalog every adapter in the folder (at start) and load as many as the resident limits
        allow. Files that do not check out are skipped and reported, not fatal: one bad file must
        not take every task down. Staging files of uploads that died (older than
        ``stale_staging_s``) are removed; younger ones may be another replica's upload in progress."""
        now = time.time()
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > self.stale_staging_s:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:  # its replica finished (renamed or removed it) meanwhile
                pass
        return self.sync_folder()

    def sync_folder(self) -> dict[str, Any]:
        """Make the catalog match the folder: catalog new files (checked from their header), drop
        tasks whose file is gone, re-catalog changed files, forget failures of files that are gone;
        then load tasks while the resident limits leave room. Replicas sharing a folder call this
        periodically."""
        found, misnamed = self._scan()
        added, removed, failed = [], [], {}
        for name in [n for n in self.catalog if n not in found]:
            self._drop(name)
            removed.append(name)
        for name in [n for n in self._files if n not in found]:
            del self._files[name]  # a failed file that is gone: a new file of that name is retried
        skipped = {k: v for k, v in self.skipped.items() if (self.folder / k).is_file() and k not in misnamed}
        skipped.update(misnamed)
        for name, path in found.items():
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another replica since the scan: the next rescan sees it
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._files.get(name) == signature:
                continue
            if name in self.catalog:  # changed on disk: reload
                if self._file_sha(path) == self.catalog[name].sha256:
                    self._files[name] = signature
                    continue
                self._drop(name)
                removed.append(name)
            try:
                self._catalog_file(name, path, signature)
                added.append(name)
                skipped.pop(path.name, None)
            except FTNError as exc:
                failed[path.name] = skipped[path.name] = str(exc)
                self._files[name] = signature  # do not retry until the file changes
                log.error("not serving %s: %s", path, exc)
        self.skipped = skipped
        for name in list(added):  # fill free room only: nothing resident is evicted for a new file
            if self._room_for(self.catalog[name].tensor_bytes):
                try:
                    self._ensure_resident(name, "start")
                except FTNError as exc:
                    added.remove(name)
                    failed[f"{name}{SUFFIX}"] = str(exc)
        return {"added": added, "removed": removed, "failed": failed}

    @staticmethod
    def _file_sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _catalog_file(self, name: str, path: Path, signature: tuple[int, int]) -> TaskEntry:
        """Check a file from its header (nothing loaded) and list it in the catalog."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdapterFileError(f"cannot read adapter file {path}: {exc}") from None
        header, parameters = inspect_adapter(self.model, path, self.fingerprint, self._layout)
        self._check_fits(header)
        self._files[name] = signature
        return self._register(name, header, parameters, data)

    def _check_fits(self, header: AdapterHeader) -> None:
        if self.max_resident_bytes and header.tensor_bytes > self.max_resident_bytes:
            raise AdapterFileError(f"{header.path} holds {header.tensor_bytes:,} bytes of tensors, more than "
                                   f"the resident limit of {self.max_resident_bytes:,} bytes")

    def _register(self, name: str, header: AdapterHeader, parameters: dict[str, int], data: bytes) -> TaskEntry:
        info = header.meta["info"]
        labels = info.get("labels")
        entry = TaskEntry(
            name=name, labels=tuple(labels) if labels else None,
            input=InputSpec.from_info(info, self.default_image_size),
            kind=(info.get("outputs") or {}).get("kind", "classification"),
            parameters={**parameters, "total": parameters["delta"] + parameters["norms"] + parameters["head"]},
            file_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), info=info,
            tensor_bytes=header.tensor_bytes)
        self.catalog = {**self.catalog, name: entry}
        return entry

    # ------------------------------------------------------------------ residency
    @property
    def resident(self) -> list[str]:
        """Resident tasks, least recently used first."""
        return list(self._resident)

    def _room_for(self, nbytes: int, count: int = 1) -> bool:
        return ((not self.max_resident or len(self._resident) + count <= self.max_resident)
                and (not self.max_resident_bytes or self.resident_bytes + nbytes <= self.max_resident_bytes))

    def _ensure_resident(self, name: str, reason: str, pinned: Sequence[str] = ()) -> None:
        """Load ``name`` if it is not resident, evicting least recently used tasks (never one of
        ``pinned``, the tasks of the running part of a batch) until it fits. A file that fails
        to load leaves the catalog for ``skipped``."""
        if name in self._resident:
            return
        entry = self.catalog[name]
        self._make_room(entry.tensor_bytes, pinned)
        started = time.perf_counter()
        path = self.path_of(name)
        try:
            load_adapter(self.model, path, name, self.fingerprint, self._layout)
        except FTNError as exc:
            signature = self._files.get(name)
            self._drop(name)
            if signature is not None:
                self._files[name] = signature  # do not retry until the file changes
            self.skipped = {**self.skipped, path.name: str(exc)}
            log.error("not serving %s: %s", path, exc)
            raise
        seconds = time.perf_counter() - started
        self._resident[name] = entry.tensor_bytes
        self.resident_bytes += entry.tensor_bytes
        self.loads[reason] += 1
        if self.on_load is not None:
            self.on_load(name, reason, seconds)

    def _make_room(self, nbytes: int, pinned: Sequence[str] = ()) -> None:
        for victim in [t for t in self._resident if t not in pinned]:  # least recently used first
            if self._room_for(nbytes):
                return
            self._evict(victim)

    def _evict(self, name: str) -> None:
        self._unload(name)
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(name)

    def _unload(self, name: str) -> None:
        if name in self.model.heads:
            self.model.remove_task(name)
        self.resident_bytes -= self._resident.pop(name, 0)
        self._hot.pop(name, None)
        self._merged.pop(name, None)

    def _parts(self, names: Sequence[str]) -> list[list[str]]:
        """``names`` (distinct tasks, in order) split into runs that fit the resident limits
        together: one part unless a batch holds more tasks than may be resident at once."""
        parts: list[list[str]] = [[]]
        count = nbytes = 0
        for name in names:
            size = self.catalog[name].tensor_bytes
            if parts[-1] and ((self.max_resident and count + 1 > self.max_resident)
                              or (self.max_resident_bytes and nbytes + size > self.max_resident_bytes)):
                parts.append([])
                count = nbytes = 0
            parts[-1].append(name)
            count, nbytes = count + 1, nbytes + size
        return parts

    # ------------------------------------------------------------------ admin
    def add(self, name: str, data: bytes) -> TaskEntry:
        """Verify ``data`` as an adapter for this backbone, serve it as ``name`` and write it to the
        folder. Refused (model and folder unchanged) if it does not load or the name is taken."""
        path = self.path_of(name)
        if name in self.catalog:
            raise TaskExists(f"task {name!r} is already served; DELETE it first to replace it")
        # Verify from a private temporary file in the folder (same file system: the final rename
        # is atomic), then publish. Its name is this process's own (see the module docstring).
        staging = self.folder / f".{name}{SUFFIX}.upload-{self._staging_tag}.tmp"
        atomic_write_bytes(staging, data)
        try:
            try:
                header, parameters = inspect_adapter(self.model, staging, self.fingerprint, self._layout)
                self._check_fits(header)
                self._make_room(header.tensor_bytes)
                started = time.perf_counter()
                load_adapter(self.model, staging, name, self.fingerprint, self._layout)
            except FTNError as exc:  # say "the uploaded adapter", not the staging file's path
                raise type(exc)(str(exc).replace(str(staging), "the uploaded adapter")) from None
            try:
                os.replace(staging, path)
                _fsync_dir(self.folder)  # make the rename durable
            except BaseException:
                self.model.remove_task(name)
                raise
        finally:
            staging.unlink(missing_ok=True)
        stat = path.stat()
        self._files[name] = (stat.st_mtime_ns, stat.st_size)
        entry = self._register(name, header, parameters, data)
        self._resident[name] = header.tensor_bytes
        self.resident_bytes += header.tensor_bytes
        self.loads["upload"] += 1
        if self.on_load is not None:
            self.on_load(name, "upload", time.perf_counter() - started)
        return entry

    def remove(self, name: str) -> None:
        path = self.path_of(name)
        if name not in self.catalog:
            raise TaskError(f"unknown task {name!r}")
        path.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        self._drop(name)

    def _drop(self, name: str) -> None:
        self._unload(name)
        self.catalog = {k: v for k, v in self.catalog.items() if k != name}
        self._files.pop(name, None)
        self._uses.pop(name, None)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def run_batch(self, tasks: Sequence[str], inputs: Sequence[Tensor]) -> list[Any]:
        """One result per request: the task's output for that input (or the exception for it).

        Tasks that are not resident are loaded first (evicting the least recently used); a batch
        with more tasks than may be resident at once runs in parts. Requests are grouped by task
        (and input shape); ``batching="subbatch"`` runs each task's group as one batch, ``"mixed"``
        runs every task of a shape group in one ``forward_mixed``.
        """
        results: list[Any] = [None] * len(tasks)
        by_task: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            if task not in self.catalog:
                results[i] = TaskError(f"unknown task {task!r} (removed?)")
            else:
                by_task.setdefault(task, []).append(i)
        for part in self._parts(list(by_task)):
            ready = []
            for task in part:
                try:
                    self._ensure_resident(task, "request", pinned=part)
                    ready.append(task)
                except FTNError as exc:
                    for i in by_task[task]:
                        results[i] = exc
            self._run([i for task in ready for i in by_task[task]], tasks, inputs, results)
            for task in ready:
                self._touch(task)
        self._batches += 1
        if self.merged_capacity and self._batches % 20 == 0:
            self._refresh_merged()
        return results

    def _run(self, rows: list[int], tasks: Sequence[str], inputs: Sequence[Tensor], results: list[Any]) -> None:
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i in sorted(rows):
            groups.setdefault((tasks[i], tuple(inputs[i].shape)), []).append(i)
        if self.batching == "mixed":
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for (task, shape), idx in groups.items():
                by_shape.setdefault(shape, []).extend(idx)
            for idx in by_shape.values():
                batch_tasks = [tasks[i] for i in idx]
                outs = self.model.forward_mixed(torch.stack([inputs[i] for i in idx]), batch_tasks)
                seen: collections.Counter[str] = collections.Counter()
                for i, t in zip(idx, batch_tasks):
                    results[i] = outs[t][seen[t]]
                    seen[t] += 1
        else:
            for (task, _), idx in groups.items():
                x = torch.stack([inputs[i] for i in idx])
                merged = self._merged.get(task)
                out = merged(x) if merged is not None else self.model(x, task=task)
                for row, i in enumerate(idx):
                    results[i] = out[row]

    def _touch(self, task: str) -> None:
        """Mark ``task`` used: most recent in the resident LRU, and in the LRU of tasks whose
        dense W + ΔW stays cached in the layers."""
        self._resident.move_to_end(task)
        self._uses[task] += 1
        self._hot[task] = None
        self._hot.move_to_end(task)
        while len(self._hot) > self.hot_tasks:
            cold, _ = self._hot.popitem(last=False)
            for layer in self.model.adapted_layers().values():
                layer.clear_cache(cold)

    def _refresh_merged(self) -> None:
        """Keep the ``merged`` most used tasks (recent counts, halved each refresh) as plain
        merged modules: they then run at exactly the plain backbone's speed."""
        hottest = [t for t, _ in self._uses.most_common(self.merged_capacity)]
        for t in [t for t in self._merged if t not in hottest]:
            del self._merged[t]
        for t in hottest:
            if t not in self._merged and t in self.model.heads:
                self._merged[t] = self.model.merge(t).eval().requires_grad_(False)
                self._hot.pop(t, None)  # runs merged now: its cached W + ΔW would be a second copy
                for layer in self.model.adapted_layers().values():
                    layer.clear_cache(t)
        self._uses = collections.Counter({t: c // 2 for t, c in self._uses.items() if c // 2})

    def backbone_summary(self) -> dict[str, Any]:
        # Read from other threads: built from a report taken once (the backbone never changes),
        # not from the model, whose tasks the model thread adds and evicts meanwhile.
        report = self._backbone_report
        return {"parameters": report.backbone, "adapted_layers": report.adapted_layers,
                "norm_layers": report.norm_layers, "fingerprint": self.fingerprint,
                "batching": self.batching, "hot_tasks": self.hot_tasks, "merged": self.merged_capacity}

    def residency(self) -> dict[str, Any]:
        """The resident set against its limits, and loads and evictions so far."""
        return {"resident": len(self._resident), "resident_bytes": self.resident_bytes,
                "max_resident": self.max_resident, "max_resident_bytes": self.max_resident_bytes,
                "loads": dict(self.loads), "evictions": self.evictions}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
