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

Loading reads the header first (:func:`read_adapter_header`: a few kB) and checks every size the
metadata declares — layer ranks and shapes, a Linear head's features, each tensor's shape against
its bytes — against the tensors the file holds, and the task against the model
(:func:`check_adapter`), before anything is built: the checksum covers the tensors only, so
metadata alone must never decide an allocation (a head declaring 4,000,000 outputs is refused,
not allocated). Then the tensors are read and checked against their checksum, then the task is
added.

No pickle is involved anywhere. Files are written to a temporary file in the same folder,
flushed, fsync'ed and renamed over the target, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .config import validate_task_name
from .io import atomic_write_bytes
from .digest import tensor_digest
from .errors import AdapterFileError, ConfigError, TaskError
from .updates import KINDS
from ..version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_DECLARED", "save_task", "load_task", "read_adapter",
           "read_adapter_header", "check_adapter", "declared_parameters", "AdapterHeader", "ModelLayout",
           "read_state",
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


def _build_head(spec: dict[str, Any], device: str | None = None) -> nn.Module | None:
    """The head a spec describes; call only with a spec :func:`_check_declared` accepted."""
    if spec.get("type") == "Identity":
        return nn.Identity()
    if spec.get("type") == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], device=device)
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


# Bytes per element of each safetensors dtype (the format's spec), to check a header's declared
# shapes against its data offsets without loading anything.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "C64": 8,
                "U64": 8, "U32": 4, "U16": 2}
#: Largest dimension, rank or feature count a file may declare (torch's own index limit); every
#: declared size must also match a tensor the file really holds, so a file's bytes bound what
#: loading it allocates.
MAX_DECLARED = 2**31 - 1


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter file declares, from its header alone (no tensor is read): the decoded and
    type-checked metadata, each tensor's shape, and what loading the tensors costs in bytes.
    Every size the metadata declares (layer ranks, a Linear head's features) has been checked
    against these shapes, so building a task from it allocates no more than the file holds."""

    path: Path
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    tensor_bytes: int
    file_bytes: int


def _open_error(path: Path, exc: OSError) -> AdapterFileError:
    if isinstance(exc, FileNotFoundError):
        return AdapterFileError(f"adapter file not found: {path}")
    return AdapterFileError(f"cannot read adapter file {path}: {exc}")


def read_adapter_header(path: str | Path) -> AdapterHeader:
    """Read and check an adapter file's header only (a few kB however large the file is):
    format, version, metadata types and declared sizes against the declared tensors. The tensor
    bytes and their checksum are checked when the task is loaded (:func:`read_adapter`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                if n <= min(size - 8, _MAX_HEADER):
                    prefix += f.read(n)
    except OSError as exc:
        raise _open_error(path, exc) from None
    return _parse_header(prefix, size, path)


def _parse_header(data: bytes, file_size: int, path: Path) -> AdapterHeader:
    """``data``: at least the length field and the header of a file of ``file_size`` bytes."""
    if file_size < 8 or len(data) < 8:
        raise AdapterFileError(f"{path} is not an adapter file: only {file_size} bytes (truncated or empty)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(file_size - 8, _MAX_HEADER) or len(data) < 8 + header_len:
        raise AdapterFileError(f"{path} is truncated or not a safetensors file: header claims "
                               f"{header_len} bytes, file has {file_size - 8} after the length field")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
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
    except (ValueError, TypeError):
        raise AdapterFileError(f"{path} has an invalid format_version {raw_meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} uses adapter format v{version}, written by ftn "
                               f"{raw_meta.get('ftn_version', '?')}; this ftn reads up to v{FORMAT_VERSION}: upgrade ftn")
    shapes, tensor_bytes = _tensor_shapes(header, file_size - 8 - header_len, path)
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
    _check_declared(meta, shapes, path)
    return AdapterHeader(path, meta, shapes, tensor_bytes, file_size)


def _tensor_shapes(header: dict[str, Any], data_len: int, path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Each tensor's declared shape, checked against its dtype and byte range (so a shape cannot
    claim more than the file holds)."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(
                    type(d) is int and 0 <= d <= MAX_DECLARED for d in shape):
                raise ValueError(f"shape {shape!r} is not a list of integers in 0..{MAX_DECLARED}")
            if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len):
                raise ValueError(f"data offsets {[begin, end]} fall outside the {data_len} data bytes")
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path} is truncated or corrupt: tensor {key!r}: {exc}") from None
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        if nbytes != end - begin:
            raise AdapterFileError(f"{path} is truncated or corrupt: tensor {key!r} declares shape {tuple(shape)} "
                                   f"({nbytes} bytes) but holds {end - begin} bytes")
        shapes[key] = tuple(shape)
        total += nbytes
    return shapes, total


def _declared_int(value: Any, what: str, path: Path, low: int = 0) -> int:
    # JSON numbers like 1e11 or 4.0 decode as floats: refuse anything but a plain integer in range.
    if type(value) is not int or not low <= value <= MAX_DECLARED:
        raise AdapterFileError(f"{path}: {what} must be an integer in {low}..{MAX_DECLARED}, got {value!r}")
    return value


def _check_declared(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Type-check every per-layer entry and the head spec, and check the head's declared size
    against the head tensors the file really holds: nothing is built from metadata alone."""
    for ln, entry in meta["layers"].items():
        if not isinstance(entry, dict):
            raise AdapterFileError(f"{path}: layer {ln} has corrupt metadata: {entry!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise AdapterFileError(f"{path}: layer {ln} has no valid weight shape: {shape!r}")
        for d in shape:
            _declared_int(d, f"layer {ln}'s weight shape", path)
        _declared_int(entry.get("rank"), f"layer {ln}'s rank", path)
        _declared_int(entry.get("requested_rank", 0), f"layer {ln}'s requested_rank", path)
        if not isinstance(entry.get("kind", "cp"), str) or not isinstance(entry.get("options", {}), dict):
            raise AdapterFileError(f"{path}: layer {ln} has a corrupt update kind or options")
    for ln, entry in meta["norms"].items():
        if not isinstance(entry, dict):
            raise AdapterFileError(f"{path}: norm layer {ln} has corrupt metadata: {entry!r}")
    spec = meta["head"]
    head_shapes = {k[len("head."):]: s for k, s in shapes.items() if k.startswith("head.")}
    if spec.get("type") == "Linear":
        n_in = _declared_int(spec.get("in_features"), "the head's in_features", path, low=1)
        n_out = _declared_int(spec.get("out_features"), "the head's out_features", path, low=1)
        if not isinstance(spec.get("bias"), bool):
            raise AdapterFileError(f"{path}: the head's bias must be true or false, got {spec.get('bias')!r}")
        expected = {"weight": (n_out, n_in), **({"bias": (n_out,)} if spec["bias"] else {})}
    elif spec.get("type") == "Identity":
        expected = {}
    else:
        return  # a custom head: the caller's module is checked against the tensors in load_task
    if head_shapes != expected:
        raise AdapterFileError(
            f"{path}: the head's metadata declares {spec.get('type')} "
            f"{', '.join(f'{k} {v}' for k, v in sorted(expected.items(), reverse=True)) or 'with no tensors'} "
            f"but the file's head tensors are "
            f"{', '.join(f'{k} {v}' for k, v in sorted(head_shapes.items(), reverse=True)) or 'none'}")


def _read_file(path: str | Path) -> tuple[bytes, AdapterHeader]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _open_error(path, exc) from None
    return data, _parse_header(data, len(data), path)


def _load_tensors(data: bytes, header: AdapterHeader) -> dict[str, Tensor]:
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types on malformed data
        raise AdapterFileError(f"{header.path} is truncated or corrupt: {exc}") from None
    if tensor_digest(tensors) != header.meta["content_sha256"]:
        raise AdapterFileError(f"{header.path} is corrupt: its tensors do not match the checksum stored in it")
    return tensors


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify an adapter file: tensors and decoded metadata, or AdapterFileError."""
    data, header = _read_file(path)
    return _load_tensors(data, header), header.meta


def _stored_shapes(kind: str, layer: _LayerShape, rank: int) -> dict[str, tuple[int, ...]]:
    """The tensors a layer's update of ``kind`` stores, by key, with their shapes."""
    if kind == "cp":
        return {str(k): (d, rank) for k, d in enumerate(layer.modes)}
    shapes = {"weight": layer.shape}
    return {**shapes, "score": ()} if kind == "gated" else shapes


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class _LayerShape:
    shape: tuple[int, ...]  # the frozen weight's
    modes: tuple[int, ...]  # its CP modes


@dataclass(frozen=True)
class ModelLayout:
    """What checking an adapter file needs of a model, read once: each adapted layer's weight
    shape and CP modes, each task norm's state shapes and which of its keys are parameters.
    A model's layout never changes (tasks come and go, layers do not), so a server checking
    thousands of files passes one layout instead of walking the model's modules per file."""

    layers: dict[str, _LayerShape]
    norms: dict[str, dict[str, tuple[int, ...]]]
    norm_parameters: frozenset[str]  # "norm.<layer>.<key>" of the norms' parameters (not buffers)
    # The modules themselves, to fill a loaded task's tensors without walking the model again
    # (a walk visits every module of every loaded task: tens of ms with 64 MobileNetV2 tasks).
    layer_modules: dict[str, nn.Module] = field(default_factory=dict, compare=False, repr=False)
    norm_modules: dict[str, nn.Module] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        layer_modules, norm_layers = model.adapted_layers(), model.task_norm_layers()
        layers = {ln: _LayerShape(tuple(layer.base.weight.shape), tuple(layer.modes))
                  for ln, layer in layer_modules.items()}
        norms = {ln: {k: tuple(t.shape) for k, t in norm.base.state_dict().items()} for ln, norm in norm_layers.items()}
        params = frozenset(f"norm.{ln}.{k}" for ln, norm in norm_layers.items() for k, _ in norm.base.named_parameters())
        return cls(layers, norms, params, layer_modules, norm_layers)


@dataclass
class _Plan:
    """What :func:`check_adapter` decided: enough to add the task without looking again."""

    ranks: dict[str, tuple[int, int]]
    updates: dict[str, dict[str, Any]]
    norm_keys: dict[str, list[str]]
    head: nn.Module | None  # None: build it from the file's (checked) spec


def check_adapter(model: nn.Module, adapter: str | Path | AdapterHeader, head: nn.Module | None = None,
                  check_fingerprint: bool = True, layout: ModelLayout | None = None) -> AdapterHeader:
    """Every check :func:`load_task` makes that does not need the tensor bytes — layers, shapes,
    ranks, norms, head, labels and (with ``check_fingerprint``) the backbone fingerprint —
    from the file's header alone, without changing or allocating anything. ``head`` may live on
    the ``meta`` device (only its state's shapes are compared); ``layout``: the model's
    :class:`ModelLayout`, read once by a caller checking many files. Returns the header."""
    header = adapter if isinstance(adapter, AdapterHeader) else read_adapter_header(adapter)
    _plan(model, header, head, check_fingerprint, layout)
    return header


def _plan(model: nn.Module, header: AdapterHeader, head: nn.Module | None, check_fingerprint: bool,
          layout: ModelLayout | None = None) -> _Plan:
    path, meta, shapes = header.path, header.meta, header.shapes
    layout = layout or ModelLayout.of(model)
    layers = layout.layers
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
    shape_diff = [f"{ln}: file {tuple(file_layers[ln]['shape'])} vs model {layer.shape}"
                  for ln, layer in layers.items() if tuple(file_layers[ln]["shape"]) != layer.shape]
    if shape_diff:
        raise AdapterFileError(f"{path} was made for a backbone with other layer shapes: {_summarise(shape_diff)}")

    norms = layout.norms
    file_norms: dict[str, Any] = meta["norms"]
    if set(norms) != set(file_norms):
        diff = sorted(set(norms) ^ set(file_norms))
        raise AdapterFileError(f"{path} has other task-specific norm layers than this model: {_summarise(diff)}")

    expected_keys: set[str] = set()
    ranks: dict[str, tuple[int, int]] = {}
    updates: dict[str, dict[str, Any]] = {}
    for ln, layer in layers.items():
        rank = file_layers[ln]["rank"]
        ranks[ln] = (file_layers[ln].get("requested_rank", rank), rank)
        kind = file_layers[ln].get("kind", "cp")
        if kind not in KINDS:
            raise AdapterFileError(f"{path}: layer {ln} has an update of unknown kind {kind!r}; "
                                   f"this ftn knows {sorted(KINDS)}: upgrade ftn")
        if kind != "cp":
            updates[ln] = {"kind": kind, **file_layers[ln].get("options", {})}
        for key, shape in (_stored_shapes(kind, layer, rank) if rank else {}).items():
            key = f"delta.{ln}.{key}"
            expected_keys.add(key)
            if shapes.get(key) != shape:
                got = shapes[key] if key in shapes else "missing"
                raise AdapterFileError(f"{path}: {kind} update tensor {key} should have shape {shape}, got {got}")
    norm_keys: dict[str, list[str]] = {}
    for ln, reference in norms.items():
        bad = [key for key, shape in reference.items() if shapes.get(f"norm.{ln}.{key}") != shape]
        if bad:
            raise AdapterFileError(f"{path}: norm layer {ln} has missing or mis-shaped entries {bad}")
        expected_keys.update(f"norm.{ln}.{key}" for key in reference)
        norm_keys[ln] = list(reference)

    # The head to compare with: the caller's, or the file's spec built on the meta device (no
    # memory; its declared size was already checked against the head tensors in the header).
    probe = head if head is not None else _build_head(meta["head"], device="meta")
    if probe is None:
        raise AdapterFileError(f"{path} has a custom head ({meta['head'].get('class')}); "
                               f"pass a module of that structure as load_task(..., head=...)")
    head_shapes = {k[len("head."):]: s for k, s in shapes.items() if k.startswith("head.")}
    expected_keys.update(f"head.{k}" for k in head_shapes)
    head_reference = probe.state_dict()
    if set(head_shapes) != set(head_reference) or any(
            head_shapes[k] != tuple(head_reference[k].shape) for k in head_reference):
        raise AdapterFileError(f"{path}: the head in the file does not fit the given head "
                               f"(file keys/shapes {list(head_shapes.items())})")
    try:
        validate_task_info(meta["info"], probe)
    except ConfigError as exc:
        raise AdapterFileError(f"{path}: task info does not fit the head: {exc}") from None
    unexpected = sorted(set(shapes) - expected_keys)
    if unexpected:
        raise AdapterFileError(f"{path} holds unexpected tensors: {_summarise(unexpected)}")

    if check_fingerprint:
        fingerprint = model.backbone_fingerprint()
        if fingerprint != meta["backbone_fingerprint"]:
            raise AdapterFileError(
                f"{path} was trained on a backbone with other weights (fingerprint "
                f"{meta['backbone_fingerprint'][:12]}…, this backbone {fingerprint[:12]}…); "
                f"pass check_fingerprint=False only if you know the difference is harmless")
    return _Plan(ranks, updates, norm_keys, head)


def declared_parameters(model: nn.Module, header: AdapterHeader, head: nn.Module | None = None,
                        layout: ModelLayout | None = None) -> dict[str, int]:
    """The task's parameter counts as the model's parameter report gives them once it is loaded
    (``delta``, ``norms``, ``norm_buffers``, ``head``), from the header of a file
    :func:`check_adapter` accepted; ``head`` and ``layout`` as there."""
    probe = head if head is not None else _build_head(header.meta["head"], device="meta")
    head_params = {f"head.{k}" for k, _ in probe.named_parameters()} if probe is not None else set()
    norm_params = (layout or ModelLayout.of(model)).norm_parameters
    counts = {"delta": 0, "norms": 0, "norm_buffers": 0, "head": 0}
    for key, shape in header.shapes.items():
        n = math.prod(shape)
        if key.startswith("delta."):
            counts["delta"] += n
        elif key.startswith("norm."):
            counts["norms" if key in norm_params else "norm_buffers"] += n
        elif key in head_params:  # the head's buffers (a decoder's BatchNorm statistics) are not parameters
            counts["head"] += n
    return counts


def load_task(model: nn.Module, path: str | Path, name: str | None = None, head: nn.Module | None = None,
              check_fingerprint: bool = True, layout: ModelLayout | None = None) -> str:
    """Add the task stored at ``path`` to ``model`` under ``name`` (default: the stored name).

    Everything is checked before the model is touched, and before anything the metadata declares
    is built: layers, shapes, ranks, norms, head (its declared size against the tensors the file
    holds) and the backbone fingerprint, then the tensor bytes against their checksum. On any
    mismatch the model is left as it was and AdapterFileError says what differs. ``layout``:
    the model's :class:`ModelLayout`, read once by a caller loading many files. Returns the task
    name.
    """
    data, header = _read_file(path)
    meta = header.meta
    name = validate_task_name(name if name is not None else meta["task"])
    if name in model.heads:
        raise TaskError(f"task {name!r} already exists; pass name=... or remove_task({name!r}) first")
    layout = layout or ModelLayout.of(model)
    plan = _plan(model, header, head, check_fingerprint, layout)
    tensors = _load_tensors(data, header)
    del data
    head = plan.head if plan.head is not None else _build_head(meta["head"])
    assert head is not None  # _plan refused custom heads without a module

    # All checks passed: now change the model, and undo everything if anything still fails.
    layers, norms = layout.layer_modules, layout.norm_modules
    model.add_task_with_ranks(name, plan.ranks, head, spec=meta["task_spec"], info=meta["info"],
                              updates=plan.updates)
    try:
        with torch.no_grad():
            for ln, layer in layers.items():
                if name in layer.tasks:
                    for key, t in layer.tasks[name].parameters_by_key().items():
                        t.copy_(tensors[f"delta.{ln}.{key}"])
            for ln, norm in norms.items():
                norm.tasks[name].load_state_dict({key: tensors[f"norm.{ln}.{key}"] for key in plan.norm_keys[ln]})
            model.heads[name].load_state_dict(
                {k[len("head."):]: t for k, t in tensors.items() if k.startswith("head.")})
    except Exception:
        model.remove_task(name)
        raise
    return name


def read_state(path: str | Path, reference: Mapping[str, Tensor], device: str | torch.device = "cpu"
               ) -> dict[str, Tensor]:
    """A plain safetensors state file (what a baseline method saves for a task), checked key by
    key against ``reference``'s shapes from its header before any tensor is read."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            wrong = sorted(k for k in keys & set(reference)
                           if tuple(f.get_slice(k).get_shape()) != tuple(reference[k].shape))
            if keys != set(reference) or wrong:
                parts = [f"{label} {_summarise(sorted(names))}" for label, names in (
                    ("missing", set(reference) - keys), ("unexpected", keys - set(reference)),
                    ("mis-shaped", wrong)) if names]
                raise AdapterFileError(f"{path} does not fit this task: {'; '.join(parts)}")
            return {k: f.get_tensor(k) for k in keys}
    except FileNotFoundError:
        raise AdapterFileError(f"task file not found: {path}") from None
    except (OSError, SafetensorError) as exc:
        raise AdapterFileError(f"{path} is truncated or corrupt: {exc}") from None
