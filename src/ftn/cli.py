"""The ``ftn`` command line. Each sub-command lives in a small function; library errors are
printed as one clear line (exit code 2) rather than a stack trace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import FTNError

__all__ = ["main"]


def _cmd_params(args: argparse.Namespace) -> int:
    from .backbones import build_backbone
    from .model import FTNModel

    backbone, _ = build_backbone(args.backbone, pretrained=False)
    options = {}
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    model = FTNModel(backbone, rank=args.rank, rank_cap=not args.no_rank_cap, **options)
    for t in range(args.tasks):
        model.add_task(f"task{t + 1}")
    report = model.parameter_report()
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(f"{args.backbone}, rank {args.rank}, {args.tasks} task(s); heads not included\n")
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ftn", description="Factorized Tensor Networks for PyTorch")
    parser.add_argument("--version", action="version", version=f"ftn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter report for a torchvision architecture (no weights needed)")
    p.add_argument("--backbone", default="resnet34", help="torchvision model name (default resnet34)")
    p.add_argument("--rank", type=int, default=40)
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--include", nargs="*", help="glob patterns of layers to adapt (default: all)")
    p.add_argument("--exclude", nargs="*", help="glob patterns of layers not to adapt")
    p.add_argument("--no-rank-cap", action="store_true", help="do not cap ranks at the dense size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FTNError as exc:
        print(f"ftn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
