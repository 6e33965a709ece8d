"""``ftn export``: one task, merged (backbone + W + ΔW + task norms + head), as an ONNX file or a
``torch.export`` program with a dynamic batch size, checked against the merged PyTorch model.

The backbone is built exactly as ``ftn predict`` builds it (same options, same fingerprint check
when the adapter loads), so a file that predicts also exports. The example input comes from the
adapter's own ``input`` info (image size), or is a token batch for a text backbone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import AdapterFileError, ConfigError, TaskError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["add_export_arguments", "cmd_export", "example_batch", "check_export", "FORMAT_NAMES"]

#: ``ftn.core.export.FORMATS``' keys, here so that building the parser does not import torch.
FORMAT_NAMES = ("onnx", "torch-export")
_CHECK_BATCH = 3  # not the example's 2: the check also shows the batch size is not fixed


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="the backbone the adapter was trained on: a torchvision name, "
                                                     "torchvision:NAME, timm:NAME or hf:PATH_OR_ID")
    p.add_argument("--adapter", dest="adapters", action="append", required=True,
                   help="an adapter file or a folder of them (repeat for more); one task is exported per file")
    p.add_argument("--task", help="which task to export when the adapters hold several")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMAT_NAMES,
                   help="onnx (run it with onnxruntime) or torch-export (torch.export.load)")
    p.add_argument("-o", "--output", help="file to write, or an existing folder (default ./<task>.onnx / .pt2)")
    p.add_argument("--weights-path", help="local weights of the backbone (instead of its pretrained weights)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="randomly initialised backbone (only for adapters trained on one: seeded, see --seed)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the backbone (with --no-pretrained)")
    p.add_argument("--image-size", type=int, default=224, help="example input size for adapters whose file does not say")
    p.add_argument("--no-check", action="store_true", help="do not run the written file against the merged model")


def _adapter_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for a in map(Path, paths):
        if a.is_dir():
            files += sorted(a.glob("*.safetensors"))
        elif a.is_file():
            files.append(a)
        else:
            raise AdapterFileError(f"adapter file not found: {a}")
    if not files:
        raise AdapterFileError(f"no adapter files in {', '.join(paths)}")
    return files


def example_batch(model: Any, info: dict[str, Any], batch: int = 2, image_size: int = 224,
                  seed: int = 0) -> tuple[tuple[Tensor, ...], list[str]]:
    """An input batch for the task (random values from ``seed``) and the input names: token ids
    and attention mask for a text backbone, else images of the task's input size."""
    import torch

    from ..training.backbones import MeanPooler

    g = torch.Generator().manual_seed(seed)
    if isinstance(model.backbone, MeanPooler):
        vocab = int(getattr(model.backbone.encoder.config, "vocab_size", 1000))
        ids = torch.randint(0, vocab, (batch, 16), generator=g)
        mask = torch.ones(batch, 16, dtype=torch.long)
        mask[0, 8:] = 0  # one padded example: the mask is really used
        return (ids, mask), ["input_ids", "attention_mask"]
    size = (info.get("input") or {}).get("size") or image_size
    return (torch.randn(batch, 3, int(size), int(size), generator=g),), ["input"]


def check_export(path: Path, fmt: str, reference: nn.Module, inputs: tuple[Tensor, ...],
                 input_names: list[str]) -> float | None:
    """Largest |difference| between the written file's outputs and ``reference``'s on ``inputs``;
    None when onnxruntime is not installed (an ONNX file is then not checked)."""
    import torch

    with torch.no_grad():
        expected = reference(*inputs)
    if fmt == "torch-export":
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(*inputs)
    else:
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})[0])
    return float((got - expected).abs().max())


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ..core.export import FORMATS, MergedTask, export_task
    from .serving.predict import build_model, load_adapter

    files = _adapter_files(args.adapters)
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, files, pretrained=not args.no_pretrained, weights_path=args.weights_path)
    names = [load_adapter(model, f) for f in files]
    if args.task is not None:
        if args.task not in names:
            raise TaskError(f"no task {args.task!r} in the adapters; they hold {', '.join(names)}")
        task = args.task
    elif len(names) > 1:
        raise ConfigError(f"the adapters hold {len(names)} tasks ({', '.join(names)}); an exported file holds one: "
                          f"choose it with --task")
    else:
        task = names[0]
    info = model.task_info(task)
    inputs, input_names = example_batch(model, info, image_size=args.image_size)
    suffix = FORMATS[args.fmt]
    out = Path(args.output) if args.output else Path(f"{task}{suffix}")
    if out.is_dir() or str(args.output or "").endswith(("/", "\\")):
        out = out / f"{task}{suffix}"
    if args.fmt == "torch-export" and out.suffix != suffix:
        raise ConfigError(f"a torch-export file must end in {suffix} (torch.export.load reads no other), got {out}")
    metadata = {"ftn.task": task, "ftn.backbone": args.backbone, "ftn.info": json.dumps(info)}
    export_task(model, task, inputs, out, args.fmt, input_names=input_names, metadata=metadata)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.fmt}, {size:.1f} MiB): task {task!r}, inputs {', '.join(input_names)} with a dynamic "
          f"batch size")
    if not args.no_check:
        check, _ = example_batch(model, info, batch=_CHECK_BATCH, image_size=args.image_size, seed=1)
        diff = check_export(out, args.fmt, MergedTask(model.merge(task)).eval(), check, input_names)
        print("  not checked: onnxruntime is not installed" if diff is None else
              f"  checked on a batch of {_CHECK_BATCH}: max |file - merged model| = {diff:.2e}")
    return 0
