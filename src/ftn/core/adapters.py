"""Adapter files: one task's factors, norms and head in one safetensors file.

Layout (format version 1, or 2 when the task has dense updates). Tensor keys:

- ``delta.<layer>.<k>``: factor k of ΔW at ``<layer>`` (k = 0 is the output mode),
- ``delta.<layer>.weight`` (and ``delta.<layer>.score``): a dense ΔW (partial unfreezing) or a
  TAPS gated ΔW and its score (:mod:`ftn.core.updates`; a TAPS layer switched off stores nothing),
- ``norm.<layer>.<key>``: the task's norm state (affine and, for BatchNorm, running statistics),
- ``head.<key>``: the head's state dict.

String metadata (safetensors ``__metadata__``): ``format`` = ``ftn-adapter``, ``format_version``,
``ftn_version``, ``task``, ``config`` (factor init etc., JSON), ``layers`` (every adapted layer
of the model with its weight shape, CP modes and this task's rank, 0 where the task skips it;
in version 2 also ``kind`` (``cp`` when absent) and the kind's ``options``, e.g. TAPS's τ),
``norms`` (norm layer names and types), ``head`` (a spec to rebuild simple heads),
``backbone_fingerprint`` (SHA-256 of the frozen backbone), ``content_sha256`` (of the tensor
bytes, so a flipped bit is caught, not just a truncation) and, optionally, ``info`` (JSON: what a
prediction means and how inputs are prepared, see :func:`validate_task_info`; files without it
still load, with an empty info).

The functions work on an :class:`~ftn.core.model.FTNModel` through its public methods only
(``adapted_layers``, ``task_norm_layers``, ``heads``, ``config``, ``task_spec``, ``task_info``,
``add_task_with_ranks`` ...); this module does not import the model. :class:`TaskRecords` is
where the model keeps what a file holds besides tensors: each task's spec and info.

Version 2 differs from version 1 only by the per-layer ``kind``: a task of CP factors only is
still written as version 1 (readable by older ftn), and every version-1 file still loads.

No pickle is involved anywhere. Files are written to a temporary file in the same folder,
flushed, fsync'ed and renamed over the target, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .config import validate_task_name
from .io import atomic_write_bytes
from .digest import tensor_digest
from .errors import AdapterFileError, ConfigError, TaskError
from .updates import KINDS
from ..version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "save_task", "load_task", "read_adapter",
           "validate_task_info", "tensor_digest", "TaskRecords"]

FORMAT = "ftn-adapter"
FORMAT_VERSION = 2  # the newest this ftn reads and writes; files without dense updates are written as 1
_MAX_HEADER = 100 * 1024 * 1024


def _head_spec(head: nn.Module) -> dict[str, Any]:
    """How to rebuild the head on load without pickling code: plain Identity/Linear heads are
    described; anything else must be passed to ``load_task(head=...)``."""
    if type(head) is nn.Identity:
        return {"type": "Identity"}
    if type(head) is nn.Linear:
        return {"type": "Linear", "in_features": head.in_features, "out_features": head.out_features,
                "bias": head.bias is not None}
    return {"type": "custom", "class": f"{type(head).__module__}.{type(head).__qualname__}"}


def _build_head(spec: dict[str, Any]) -> nn.Module | None:
    if spec.get("type") == "Identity":
        return nn.Identity()
    if spec.get("type") == "Linear":
        return nn.Linear(int(spec["in_features"]), int(spec["out_features"]), bias=bool(spec["bias"]))
    return None


_INFO_KEYS = ("labels", "input", "outputs")
_RESIZE_MODES = ("stretch", "center_crop", "none")


def _head_outputs(head: nn.Module) -> int | None:
    return head.out_features if type(head) is nn.Linear else None


def validate_task_info(info: Mapping[str, Any] | None, head: nn.Module | None = None) -> dict[str, Any]:
    """Check a task's ``info`` (stored in its adapter file) and return a plain-JSON copy.

    - ``labels``: list of strings, one per output of the head (class names; for dense tasks the
      meaning of each output channel); with an ``nn.Linear`` head its length must equal
      ``out_features``.
    - ``input``: how images are prepared for the task: ``size`` (int), ``channels`` (1: the task was
      trained on grayscale images repeated to 3 channels, 3: RGB), ``mean`` / ``std`` (per-channel
      normalisation), ``resize`` (``"stretch"`` to size×size, ``"center_crop"``: shorter side to
      ``size * crop_ratio`` then a centre crop, or ``"none"``: any size, for dense tasks).
    - ``outputs``: free-form JSON describing the outputs, e.g. ``{"kind": "dense", "task": "depth",
      "unit": "m"}``; ``kind`` defaults to ``"classification"``.

    Raises ConfigError naming the first thing that is wrong.
    """
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise ConfigError(f"task info must be a mapping, got {type(info).__name__}")
    unknown = sorted(set(info) - set(_INFO_KEYS))
    if unknown:
        raise ConfigError(f"unknown task info key(s) {unknown}; known: {list(_INFO_KEYS)}")
    out: dict[str, Any] = {}
    labels = info.get("labels")
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not all(isinstance(x, str) for x in labels):
            raise ConfigError("labels must be a list of strings")
        labels = list(labels)
        expected = _head_outputs(head) if head is not None else None
        if expected is not None and len(labels) != expected:
            raise ConfigError(f"{len(labels)} labels given but the head has {expected} outputs")
        out["labels"] = labels
    spec = info.get("input")
    if spec is not None:
        if not isinstance(spec, Mapping):
            raise ConfigError("input must be a mapping")
        spec = dict(spec)
        size, channels = spec.get("size"), spec.get("channels", 3)
        resize = spec.setdefault("resize", "stretch")
        if resize not in _RESIZE_MODES:
            raise ConfigError(f"input.resize must be one of {list(_RESIZE_MODES)}, got {resize!r}")
        if (size is not None or resize != "none") and (
                isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192):
            raise ConfigError(f"input.size must be an int in 1..8192, got {size!r}")
        if channels not in (1, 3):
            raise ConfigError(f"input.channels must be 1 or 3, got {channels!r}")
        for key in ("mean", "std"):
            value = spec.get(key, [0.0, 0.0, 0.0] if key == "mean" else [1.0, 1.0, 1.0])
            if (isinstance(value, (str, bytes)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"input.{key} must be 3 numbers, got {value!r}")
            if key == "std" and any(v <= 0 for v in value):
                raise ConfigError(f"input.std must be positive, got {value!r}")
            spec[key] = [float(v) for v in value]
        ratio = spec.setdefault("crop_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio <= 4.0:
            raise ConfigError(f"input.crop_ratio must be a number in [1, 4], got {ratio!r}")
        unknown = sorted(set(spec) - {"size", "channels", "mean", "std", "resize", "crop_ratio"})
        if unknown:
            raise ConfigError(f"unknown input key(s) {unknown}")
        spec["channels"] = channels
        out["input"] = spec
    outputs = info.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, Mapping):
            raise ConfigError("outputs must be a mapping")
        out["outputs"] = json.loads(json.dumps(dict(outputs)))  # plain JSON, or TypeError
    return out


class TaskRecords:
    """Per task, what its adapter file holds besides tensors: its ``spec`` (how its ranks were
    asked for, see ``FTNModel.task_spec``) and its ``info`` (labels, input preparation, see
    :func:`validate_task_info`). What goes out is a copy, so callers cannot change a record."""

    def __init__(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {}
        self.infos: dict[str, dict[str, Any]] = {}

    def add(self, name: str, spec: Mapping[str, Any] | None) -> None:
        self.specs[name] = dict(spec) if spec is not None else {}

    def remove(self, name: str) -> None:
        self.specs.pop(name, None)
        self.infos.pop(name, None)

    def spec(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.specs.get(name, {}))

    def info(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.infos.get(name, {}))

    def set_info(self, name: str, info: Mapping[str, Any] | None, head: nn.Module) -> dict[str, Any]:
        """Record ``info`` after :func:`validate_task_info` against the task's ``head``."""
        try:
            checked = validate_task_info(info, head)
        except TypeError as exc:
            raise ConfigError(f"task info must be plain JSON: {exc}") from None
        self.infos[name] = checked
        return copy.deepcopy(checked)


def save_task(model: nn.Module, name: str, path: str | Path, info: Mapping[str, Any] | None = None) -> Path:
    """Save task ``name`` of ``model`` to ``path`` (safetensors, atomic).

    ``info`` (labels, input preparation, output meaning; see :func:`validate_task_info`) is stored
    in the file and recorded on the model; without it, what the model already records for the
    task (e.g. from the file it was loaded from) is written."""
    info = model.set_task_info(name, info) if info is not None else model.task_info(name)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    version = 1
    for layer_name, layer in model.adapted_layers().items():
        update = layer.tasks[name] if name in layer.tasks else None
        stored = update.stored() if update is not None else {}
        entry = layers[layer_name] = {
            "shape": list(layer.base.weight.shape), "modes": list(layer.modes), "rank": layer.rank(name) if stored else 0,
            "requested_rank": layer.requested_ranks.get(name, 0) if stored or update is None else 0}
        if update is not None and update.kind != "cp":
            entry.update(kind=update.kind, options=update.options())
            version = 2
        for key, t in stored.items():
            tensors[f"delta.{layer_name}.{key}"] = t.detach()
    norms: dict[str, Any] = {}
    for layer_name, norm in model.task_norm_layers().items():
        norms[layer_name] = {"type": type(norm.base).__name__}
        for key, t in norm.tasks[name].state_dict().items():
            tensors[f"norm.{layer_name}.{key}"] = t.detach()
    head = model.heads[name]
    for key, t in head.state_dict().items():
        tensors[f"head.{key}"] = t.detach()
    # safetensors refuses tensors that share memory; adapters are small, so copies are cheap.
    tensors = {k: v.cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(version),
        "ftn_version": __version__,
        "task": name,
        "config": json.dumps({k: v for k, v in asdict(model.config).items()
                              if k in ("init", "init_scale", "zero_mode", "rank_cap", "task_norms")}),
        "task_spec": json.dumps(model.task_spec(name)),
        "layers": json.dumps(layers),
        "norms": json.dumps(norms),
        "head": json.dumps(_head_spec(head)),
        "backbone_fingerprint": model.backbone_fingerprint(),
        "content_sha256": tensor_digest(tensors),
    }
    if info:
        metadata["info"] = json.dumps(info)
    return atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify an adapter file: tensors and decoded metadata, or AdapterFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFileError(f"adapter file not found: {path}") from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read adapter file {path}: {exc}") from None
    if len(data) < 8:
        raise AdapterFileError(f"{path} is not an adapter file: only {len(data)} bytes (truncated or empty)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER):
        raise AdapterFileError(f"{path} is truncated or not a safetensors file: header claims "
                               f"{header_len} bytes, file has {len(data) - 8} after the length field")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
        raw_meta = header.get("__metadata__") or {}
        if not isinstance(raw_meta, dict):
            raise ValueError("metadata is not a mapping")
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise AdapterFileError(f"{path} has a corrupt safetensors header: {exc}") from None
    if raw_meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is a safetensors file but not an ftn adapter "
                               f"(format {raw_meta.get('format')!r})")
    try:
        version = int(raw_meta.get("format_version", ""))
    except ValueError:
        raise AdapterFileError(f"{path} has an invalid format_version {raw_meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} uses adapter format v{version}, written by ftn "
                               f"{raw_meta.get('ftn_version', '?')}; this ftn reads up to v{FORMAT_VERSION}: upgrade ftn")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types on malformed data
        raise AdapterFileError(f"{path} is truncated or corrupt: {exc}") from None
    try:
        meta = {key: json.loads(raw_meta[key]) for key in ("config", "layers", "norms", "head", "task_spec")}
        meta.update({key: str(raw_meta[key]) for key in ("task", "backbone_fingerprint", "content_sha256")})
        for key in ("config", "layers", "norms", "head", "task_spec"):
            if not isinstance(meta[key], dict):
                raise ValueError(f"{key} is not a mapping")
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFileError(f"{path} has incomplete or corrupt metadata: {exc}") from None
    try:  # optional (files written before labels travelled with adapters have none)
        meta["info"] = validate_task_info(json.loads(raw_meta["info"])) if "info" in raw_meta else {}
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"{path} has corrupt task info (labels / input / outputs): {exc}") from None
    if tensor_digest(tensors) != meta["content_sha256"]:
        raise AdapterFileError(f"{path} is corrupt: its tensors do not match the checksum stored in it")
    return tensors, meta


def _stored_shapes(kind: str, layer: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The tensors a layer's update of ``kind`` stores, by key, with their shapes."""
    if kind == "cp":
        return {str(k): (d, rank) for k, d in enumerate(layer.modes)}
    shapes = {"weight": tuple(layer.base.weight.shape)}
    return {**shapes, "score": ()} if kind == "gated" else shapes


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_task(model: nn.Module, path: str | Path, name: str | None = None, head: nn.Module | None = None,
              check_fingerprint: bool = True) -> str:
    """Add the task stored at ``path`` to ``model`` under ``name`` (default: the stored name).

    Everything is checked before the model is touched: layers, shapes, ranks, norms, head and the
    backbone fingerprint. On any mismatch the model is left as it was and AdapterFileError says
    what differs. Returns the task name.
    """
    tensors, meta = read_adapter(path)
    name = validate_task_name(name if name is not None else meta["task"])
    if name in model.heads:
        raise TaskError(f"task {name!r} already exists; pass name=... or remove_task({name!r}) first")

    layers = model.adapted_layers()
    file_layers: dict[str, Any] = meta["layers"]
    missing = sorted(set(layers) - set(file_layers))
    extra = sorted(set(file_layers) - set(layers))
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"{len(extra)} layer(s) in the file are not adapted in this model ({_summarise(extra)})")
        if missing:
            parts.append(f"{len(missing)} adapted layer(s) of this model are not in the file ({_summarise(missing)})")
        raise AdapterFileError(f"{path} was made for another backbone or other include/exclude patterns: "
                               + "; ".join(parts))
    shape_diff = [f"{ln}: file {tuple(file_layers[ln]['shape'])} vs model {tuple(layer.base.weight.shape)}"
                  for ln, layer in layers.items() if tuple(file_layers[ln]["shape"]) != tuple(layer.base.weight.shape)]
    if shape_diff:
        raise AdapterFileError(f"{path} was made for a backbone with other layer shapes: {_summarise(shape_diff)}")

    norms = model.task_norm_layers()
    file_norms: dict[str, Any] = meta["norms"]
    if set(norms) != set(file_norms):
        diff = sorted(set(norms) ^ set(file_norms))
        raise AdapterFileError(f"{path} has other task-specific norm layers than this model: {_summarise(diff)}")

    expected_keys: set[str] = set()
    ranks: dict[str, tuple[int, int]] = {}
    updates: dict[str, dict[str, Any]] = {}
    for ln, layer in layers.items():
        rank = int(file_layers[ln]["rank"])
        ranks[ln] = (int(file_layers[ln].get("requested_rank", rank)), rank)
        kind = file_layers[ln].get("kind", "cp")
        if kind not in KINDS:
            raise AdapterFileError(f"{path}: layer {ln} has an update of unknown kind {kind!r}; "
                                   f"this ftn knows {sorted(KINDS)}: upgrade ftn")
        if kind != "cp":
            updates[ln] = {"kind": kind, **file_layers[ln].get("options", {})}
        for key, shape in (_stored_shapes(kind, layer, rank) if rank else {}).items():
            key = f"delta.{ln}.{key}"
            expected_keys.add(key)
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise AdapterFileError(f"{path}: {kind} update tensor {key} should have shape {shape}, got {got}")
    norm_states: dict[str, dict[str, Tensor]] = {}
    for ln, norm in norms.items():
        reference = norm.base.state_dict()
        state = {key: tensors.get(f"norm.{ln}.{key}") for key in reference}
        bad = [key for key, t in state.items() if t is None or t.shape != reference[key].shape]
        if bad:
            raise AdapterFileError(f"{path}: norm layer {ln} has missing or mis-shaped entries {bad}")
        expected_keys.update(f"norm.{ln}.{key}" for key in reference)
        norm_states[ln] = state

    if head is None:
        head = _build_head(meta["head"])
        if head is None:
            raise AdapterFileError(f"{path} has a custom head ({meta['head'].get('class')}); "
                                   f"pass a module of that structure as load_task(..., head=...)")
    head_state = {k[len("head."):]: t for k, t in tensors.items() if k.startswith("head.")}
    expected_keys.update(f"head.{k}" for k in head_state)
    head_reference = head.state_dict()
    if set(head_state) != set(head_reference) or any(
            head_state[k].shape != head_reference[k].shape for k in head_reference):
        raise AdapterFileError(f"{path}: the head in the file does not fit the given head "
                               f"(file keys/shapes {[(k, tuple(v.shape)) for k, v in head_state.items()]})")
    try:
        validate_task_info(meta["info"], head)
    except ConfigError as exc:
        raise AdapterFileError(f"{path}: task info does not fit the head: {exc}") from None
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise AdapterFileError(f"{path} holds unexpected tensors: {_summarise(unexpected)}")

    if check_fingerprint:
        fingerprint = model.backbone_fingerprint()
        if fingerprint != meta["backbone_fingerprint"]:
            raise AdapterFileError(
                f"{path} was trained on a backbone with other weights (fingerprint "
                f"{meta['backbone_fingerprint'][:12]}…, this backbone {fingerprint[:12]}…); "
                f"pass check_fingerprint=False only if you know the difference is harmless")

    # All checks passed: now change the model, and undo everything if anything still fails.
    model.add_task_with_ranks(name, ranks, head, spec=meta["task_spec"], info=meta["info"], updates=updates)
    try:
        with torch.no_grad():
            for ln, layer in layers.items():
                if name in layer.tasks:
                    for key, t in layer.tasks[name].parameters_by_key().items():
                        t.copy_(tensors[f"delta.{ln}.{key}"])
            for ln, norm in norms.items():
                norm.tasks[name].load_state_dict(norm_states[ln])
            model.heads[name].load_state_dict(head_state)
    except Exception:
        model.remove_task(name)
        raise
    return name
