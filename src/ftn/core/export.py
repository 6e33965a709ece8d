"""Exporting one task as a deployable file: the merged model (backbone with W + ΔW folded in,
the task's own norms, its head; :func:`ftn.core.merge.merge_task`) as an ONNX file or a
``torch.export`` program, with a dynamic batch size.

Only torch is needed here (``torch.onnx`` additionally needs the ``onnx`` and ``onnxscript``
packages, the ``export`` extra, imported when an ONNX file is asked for). A model that cannot be
exported (data-dependent control flow, an operator ONNX has no translation for, a batch size
fixed inside the model) is refused with an :class:`~ftn.core.errors.FTNError` saying why; no
file is written then.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, FTNError
from .io import atomic_write_bytes
from .merge import merge_task

__all__ = ["FORMATS", "MergedTask", "export_task", "default_dynamic_dims"]

#: Export formats and the suffix their files get by default.
FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
_MAX_BATCH = 65536
_ONNX_LIMIT = 2 * 1024 ** 3  # a protobuf message cannot be larger


class MergedTask(nn.Module):
    """``head(backbone(*inputs))`` of a merged task: the merged ``nn.Sequential`` takes one input,
    this takes as many as the backbone does (a text encoder's ids and attention mask)."""

    def __init__(self, merged: nn.Module) -> None:
        super().__init__()
        self.backbone = merged.backbone
        self.head = merged.head

    def forward(self, *inputs: Tensor) -> Any:
        return self.head(self.backbone(*inputs))


def default_dynamic_dims(inputs: Sequence[Tensor]) -> list[dict[int, str]]:
    """The batch dimension of every input; for token inputs (2-D integer tensors) the sequence
    length too."""
    dims = []
    for x in inputs:
        d = {0: "batch"}
        if x.dim() == 2 and not x.is_floating_point():
            d[1] = "sequence"
        dims.append(d)
    return dims


def _dynamic_shapes(inputs: Sequence[Tensor], dims: Sequence[Mapping[int, str]]) -> tuple[dict[int, Any], ...]:
    made: dict[str, Any] = {}
    for x in inputs:
        if x.shape[0] < 2:
            # torch.export specialises a size-1 dimension to 1 (it could be broadcast): an example
            # batch of 1 would silently give a file that takes only batches of 1.
            raise ConfigError(f"the example batch must hold at least 2 examples, got shape {tuple(x.shape)}")
    shapes = []
    for spec in dims:
        shape = {}
        for axis, name in spec.items():
            if axis != 0:
                # Other axes (a sequence length) take whatever range the model allows (BERT: up
                # to its 512 positions) instead of a range we would have to guess.
                shape[axis] = torch.export.Dim.AUTO
                continue
            if name not in made:  # the batch: strict, so a model that fixes it is refused
                made[name] = torch.export.Dim(name, min=1, max=_MAX_BATCH)
            shape[axis] = made[name]
        shapes.append(shape)
    return tuple(shapes)


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch.onnx colours its messages
    # torch.onnx wraps the real error in advice; its "Exception summary" names the cause.
    cause = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>: (.+)", text)
    if cause:
        return f"{cause.group(1)}: {cause.group(2).strip()}"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _refused(name: str, fmt: str, exc: BaseException) -> FTNError:
    """The export error as one line saying why (the cases a user can act on named)."""
    text = str(exc)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if op:
        why = f"the operator {op.group(1)} has no ONNX translation (--format torch-export can still hold it)"
    elif "batch" in text and ("specializ" in text or "Constraints violated" in text):
        why = "the model fixes the batch size (a reshape or view with a constant batch?)"
    elif "data-dependent" in text or "data dependent" in text or "DataDependent" in type(exc).__name__:
        why = "its forward branches on tensor values (data-dependent control flow), which an exported graph cannot hold"
    elif fmt == "onnx" and "onnx" in type(exc).__module__.lower():
        why = "torch.onnx could not translate the exported graph"
    else:
        why = "torch could not trace the model"
    return FTNError(f"cannot export task {name!r} as {fmt}: {why}. ({_first_line(exc)})")


def _onnx_bytes(module: nn.Module, inputs: tuple[Tensor, ...], shapes: tuple[tuple[dict[int, Any], ...]],
                input_names: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise FTNError(f"ONNX export needs {' and '.join(missing)}: pip install 'factorized-tensor-networks[export]'")
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # Quiet: axis-renaming warnings when inputs share a Dim, and the exporter prints its
        # progress ("[torch.onnx] Obtain model graph...") even with verbose=False.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=shapes, input_names=list(input_names),
                                    output_names=["output"], verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if proto.ByteSize() >= _ONNX_LIMIT:
        raise FTNError("the model is larger than ONNX's 2 GB single-file limit; use --format torch-export")
    return proto.SerializeToString()


def export_task(model: Any, name: str, inputs: Sequence[Tensor], path: str | Path, fmt: str = "onnx", *,
                dynamic_dims: Sequence[Mapping[int, str]] | None = None,
                input_names: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write task ``name`` of ``model`` (an :class:`~ftn.core.model.FTNModel`) merged, as
    ``fmt`` (``onnx`` or ``torch-export``), to ``path``; return the path.

    ``inputs`` is an example batch (at least 2 examples; its values do not matter, its shapes and
    dtypes do). ``dynamic_dims`` says, per input, which axes may change size in the file (default:
    the batch axis, plus the sequence axis of token inputs); axis 0 is the batch, the same for every
    input and refused if the model fixes it, other axes get the range the model allows.
    The ONNX file's inputs are named ``input_names`` (default ``input`` / ``input0, input1, ...``),
    its output ``output``. ``metadata`` (e.g. the task's labels and input preparation as JSON)
    goes into the ONNX file's ``metadata_props`` or the program's ``extra_files``. The file is
    written atomically, and only if the export succeeded.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {list(FORMATS)}, got {fmt!r}")
    inputs = tuple(inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ConfigError("export needs an example input batch (one or more tensors)")
    dims = list(dynamic_dims) if dynamic_dims is not None else default_dynamic_dims(inputs)
    if len(dims) != len(inputs):
        raise ConfigError(f"dynamic_dims has {len(dims)} entries for {len(inputs)} inputs")
    names = list(input_names) if input_names is not None else (
        ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))])
    module = MergedTask(merge_task(model, name)).eval()
    module.requires_grad_(False)
    shapes = (_dynamic_shapes(inputs, dims),)  # one entry: forward's *inputs, a tuple of tensors
    try:
        if fmt == "onnx":
            data = _onnx_bytes(module, inputs, shapes, names, metadata or {})
        else:
            program = torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
            buffer = io.BytesIO()
            torch.export.save(program, buffer, extra_files=dict(metadata or {}))
            data = buffer.getvalue()
    except FTNError:
        raise
    except Exception as exc:  # torch's export and ONNX errors have no common base class
        raise _refused(name, fmt, exc) from exc
    return atomic_write_bytes(path, data)
