"""The served model and its adapter folder.

:class:`TaskService` owns one :class:`~ftn.FTNModel` (one frozen backbone in memory) and the folder
of adapter files it serves. Every method that touches the model — loading, adding, removing,
rescanning and running batches — must run on one thread (the batcher's executor), so a forward
pass never sees a half-added task; :attr:`catalog` is an immutable snapshot that other threads
read freely.

Files: an adapter is ``<folder>/<task>.safetensors`` with ``<task>`` matching :data:`TASK_NAME`.
Uploads are verified by loading them into the model (``load_task``'s checks: format, checksum,
layers, shapes, norms, head, backbone fingerprint, labels) *before* the file is written, then
written atomically (temporary file, fsync, rename), so a crash at any point leaves either no file
or the whole file, and a file in the folder is always one that loaded.

Memory: the backbone is stored once; each task adds its factors, norms and head. Layers cache a
task's dense W + ΔW while it is in use; only the ``hot_tasks`` most recently used tasks keep that
cache (an LRU), so memory stays backbone + adapters + ``hot_tasks`` weight sets however many tasks
are loaded. Optionally the ``merged`` hottest tasks are also kept as plain merged modules.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...core.io import atomic_write_bytes
from ...core.errors import ConfigError, FTNError, TaskError
from ...core.model import FTNModel
from .predict import DEFAULT_IMAGE_SIZE, InputSpec, load_adapter

__all__ = ["TaskService", "TaskEntry", "TASK_NAME", "validate_name", "TaskExists"]

log = logging.getLogger("ftn.serve")

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SUFFIX = ".safetensors"


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

    def summary(self, with_labels: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "num_labels": len(self.labels) if self.labels else None,
               "parameters": self.parameters, "file_bytes": self.file_bytes, "sha256": self.sha256,
               "input": self.input.as_dict()}
        if with_labels:
            out["labels"] = list(self.labels) if self.labels else None
        return out


class TaskService:
    def __init__(self, model: FTNModel, folder: str | Path, *, default_image_size: int = DEFAULT_IMAGE_SIZE,
                 batching: str = "mixed", hot_tasks: int = 8, merged: int = 0) -> None:
        if batching not in ("subbatch", "mixed"):
            raise ConfigError(f"batching must be 'subbatch' or 'mixed', got {batching!r}")
        self.model = model.eval()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.default_image_size = default_image_size
        self.batching = batching
        self.hot_tasks = max(0, hot_tasks)
        self.merged_capacity = max(0, merged)
        if self.merged_capacity and batching != "subbatch":
            raise ConfigError("merged tasks run as their own sub-batches: use batching='subbatch' with merged > 0")
        self.catalog: dict[str, TaskEntry] = {}
        self._files: dict[str, tuple[int, int]] = {}  # task -> (mtime_ns, size) of its file
        self._hot: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._merged: collections.OrderedDict[str, nn.Module] = collections.OrderedDict()
        self._uses: collections.Counter[str] = collections.Counter()
        self._batches = 0
        self.skipped: dict[str, str] = {}  # file name -> why it is not served
        self.fingerprint = model.backbone_fingerprint()

    # ------------------------------------------------------------------ folder
    def path_of(self, name: str) -> Path:
        path = (self.folder / f"{validate_name(name)}{SUFFIX}").resolve()
        if path.parent != self.folder.resolve():  # cannot happen with the name pattern; belt and braces
            raise ConfigError(f"task name {name!r} escapes the adapter folder")
        return path

    def _scan(self) -> dict[str, Path]:
        found = {}
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            name = path.name[:-len(SUFFIX)]
            if TASK_NAME.fullmatch(name) and path.is_file():
                found[name] = path
            elif not name.startswith("."):
                self.skipped[path.name] = "file name is not a valid task name"
        return found

    def load_folder(self) -> dict[str, Any]:
        """Load every adapter in the folder (at start). Files that do not load are skipped and
        reported, not fatal: one bad file must not take every task down. Leftover temporary
        files of interrupted uploads are removed."""
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            tmp.unlink(missing_ok=True)
        return self.sync_folder()

    def sync_folder(self) -> dict[str, Any]:
        """Make the served tasks match the folder: load new files, drop tasks whose file is gone,
        reload changed files. Replicas sharing a folder call this periodically."""
        found = self._scan()
        added, removed, failed = [], [], {}
        for name in [n for n in self.catalog if n not in found]:
            self._drop(name)
            removed.append(name)
        for name, path in found.items():
            stat = path.stat()
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
                self._load(name, path)
                added.append(name)
                self.skipped.pop(path.name, None)
            except FTNError as exc:
                failed[path.name] = str(exc)
                self.skipped[path.name] = str(exc)
                self._files[name] = signature  # do not retry until the file changes
                log.error("not serving %s: %s", path, exc)
        return {"added": added, "removed": removed, "failed": failed}

    @staticmethod
    def _file_sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _load(self, name: str, path: Path) -> TaskEntry:
        data = path.read_bytes()
        load_adapter(self.model, path, name, self.fingerprint)
        stat = path.stat()
        self._files[name] = (stat.st_mtime_ns, stat.st_size)
        return self._register(name, data)

    def _register(self, name: str, data: bytes) -> TaskEntry:
        info = self.model.task_info(name)
        report = self.model.parameter_report().tasks[name]
        labels = info.get("labels")
        entry = TaskEntry(
            name=name, labels=tuple(labels) if labels else None,
            input=InputSpec.from_info(info, self.default_image_size),
            kind=(info.get("outputs") or {}).get("kind", "classification"),
            parameters={"delta": report.delta, "norms": report.norms, "norm_buffers": report.norm_buffers,
                        "head": report.head, "total": report.delta + report.norms + report.head},
            file_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), info=info)
        self.catalog = {**self.catalog, name: entry}
        return entry

    # ------------------------------------------------------------------ admin
    def add(self, name: str, data: bytes) -> TaskEntry:
        """Verify ``data`` as an adapter for this backbone, serve it as ``name`` and write it to the
        folder. Refused (model and folder unchanged) if it does not load or the name is taken."""
        path = self.path_of(name)
        if name in self.catalog:
            raise TaskExists(f"task {name!r} is already served; DELETE it first to replace it")
        # Verify from a private temporary file in the folder (same file system: the final rename
        # is atomic), then publish.
        staging = self.folder / f".{name}{SUFFIX}.upload-{os.getpid()}.tmp"
        atomic_write_bytes(staging, data)
        try:
            try:
                load_adapter(self.model, staging, name, self.fingerprint)
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
        return self._register(name, data)

    def remove(self, name: str) -> None:
        path = self.path_of(name)
        if name not in self.catalog:
            raise TaskError(f"unknown task {name!r}")
        path.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        self._drop(name)

    def _drop(self, name: str) -> None:
        if name in self.model.heads:
            self.model.remove_task(name)
        self.catalog = {k: v for k, v in self.catalog.items() if k != name}
        self._files.pop(name, None)
        self._hot.pop(name, None)
        self._merged.pop(name, None)
        self._uses.pop(name, None)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def run_batch(self, tasks: Sequence[str], inputs: Sequence[Tensor]) -> list[Any]:
        """One result per request: the task's output for that input (or the exception for it).

        Requests are grouped by task (and input shape); ``batching="subbatch"`` runs each task's
        group as one batch, ``"mixed"`` runs every task of a shape group in one ``forward_mixed``.
        """
        results: list[Any] = [None] * len(tasks)
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, (task, x) in enumerate(zip(tasks, inputs)):
            if task not in self.model.heads:
                results[i] = TaskError(f"unknown task {task!r} (removed?)")
                continue
            groups.setdefault((task, tuple(x.shape)), []).append(i)
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
        for task, _ in groups:
            self._touch(task)
        self._batches += 1
        if self.merged_capacity and self._batches % 20 == 0:
            self._refresh_merged()
        return results

    def _touch(self, task: str) -> None:
        """LRU of tasks whose dense W + ΔW stays cached in the layers."""
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
        report = self.model.parameter_report()
        return {"parameters": report.backbone, "adapted_layers": report.adapted_layers,
                "norm_layers": report.norm_layers, "fingerprint": self.fingerprint,
                "batching": self.batching, "hot_tasks": self.hot_tasks, "merged": self.merged_capacity}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
