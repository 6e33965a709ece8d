"""``ftn serve`` and ``ftn predict``: argument definitions and the commands themselves, so that
``ftn.apps.cli`` only registers them."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ...core.errors import ConfigError

__all__ = ["add_predict_arguments", "add_serve_arguments", "cmd_predict", "cmd_serve", "build_service",
           "serve_settings"]

log = logging.getLogger("ftn.serve")


def _backbone_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone the adapters were trained on: a torchvision name, timm:NAME or hf:PATH_OR_ID (docs/backbones.md)")
    p.add_argument("--weights-path", help="local state dict of the backbone (instead of its pretrained weights)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="randomly initialised backbone (only for adapters trained on one: seeded, see --seed)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the backbone (with --no-pretrained)")
    p.add_argument("--image-size", type=int, default=224,
                   help="input size for adapters whose file does not say (older files)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's choice; 1 is often best on a busy or small machine)")


def _byte_size(text: str) -> int:
    """``123``, ``64K``, ``512M``, ``2G`` (powers of 1024) as bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512M, 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a byte size must be >= 0, got {text!r}")
    return int(value)


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _backbone_arguments(p)
    p.add_argument("--adapter", dest="adapters", action="append", required=True,
                   help="an adapter file or a folder of them (repeat for more)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output-dir", default="predictions", help="where dense tasks write prediction images")
    p.add_argument("--json", action="store_true", help="print one JSON list")


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from .predict import format_predictions, run_predict

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.k}")
    torch.manual_seed(args.seed)
    results = run_predict(args.backbone, args.adapters, args.images, k=args.k, batch_size=args.batch_size,
                          image_size=args.image_size, pretrained=not args.no_pretrained,
                          weights_path=args.weights_path, output_dir=args.output_dir)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _backbone_arguments(p)
    p.add_argument("--adapters", required=True, help="folder of <task>.safetensors files (created if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most requests per batched pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a request waits for others to batch with (default 5 ms)")
    p.add_argument("--batching", choices=["mixed", "subbatch"], default="mixed",
                   help="one forward_mixed pass per batch (measured faster served, the default; docs/serving.md) "
                        "or one pass per task's sub-batch (needed for --merged)")
    p.add_argument("--hot-tasks", type=int, default=8,
                   help="tasks whose dense W+ΔW stays cached (LRU); others rebuild it per batch")
    p.add_argument("--merged", type=int, default=0, help="most used tasks also kept as merged plain models")
    p.add_argument("--max-resident", type=int, default=0,
                   help="most tasks loaded in the model at once (LRU by use; others load on their first "
                        "request); 0 = no limit: every task loads at start")
    p.add_argument("--max-resident-bytes", type=_byte_size, default=0,
                   help="most bytes of adapter tensors loaded at once (e.g. 512M, 2G; LRU as above); 0 = no limit")
    p.add_argument("--rescan-s", type=float, default=0.0,
                   help="rescan the adapter folder every N seconds (replicas sharing a folder); 0 = never")
    p.add_argument("--max-image-bytes", type=int, default=10 * 2**20)
    p.add_argument("--max-adapter-bytes", type=int, default=256 * 2**20)
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest decoded image (width × height)")
    p.add_argument("--admin-token-env", default="FTN_ADMIN_TOKEN",
                   help="environment variable holding the admin token (admin endpoints are off without one)")
    p.add_argument("--prep-threads", type=int, default=1, help="threads decoding and preparing images")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ray", action="store_true",
                   help="scale out on Ray Serve (the 'ray' extra): --replicas processes, each task a multiplexed model "
                        "(docs/serving.md); RAY_ADDRESS joins an existing cluster")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: replicas (processes, --threads CPUs each)")
    p.add_argument("--tasks-per-replica", type=int, default=64,
                   help="with --ray: tasks a replica keeps loaded (LRU; Ray Serve's max_num_models_per_replica)")


def build_service(args: argparse.Namespace):
    """The model (backbone and adapted layers fitting the folder's adapters) and its service."""
    import torch

    from .predict import adapter_info, build_model
    from .registry import SUFFIX, TASK_NAME, TaskService

    folder = Path(args.adapters)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--adapters must be a folder, got the file {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    # Which layers are adapted: those of the first adapter that reads (all adapters of one server
    # share them); with an empty folder, every Conv/Linear.
    reference = None
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        if TASK_NAME.fullmatch(path.name[:-len(SUFFIX)]):
            try:
                adapter_info(path)
                reference = path
                break
            except Exception as exc:  # noqa: BLE001 - reported again when the folder loads
                log.warning("skipping %s when choosing the adapted layers: %s", path, exc)
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, [reference] if reference else [], pretrained=not args.no_pretrained,
                        weights_path=args.weights_path)
    return TaskService(model, folder, default_image_size=args.image_size, batching=args.batching,
                       hot_tasks=args.hot_tasks, merged=args.merged, max_resident=args.max_resident,
                       max_resident_bytes=args.max_resident_bytes)


def serve_settings(args: argparse.Namespace):
    """The HTTP app's settings from the command line; the admin token from the environment."""
    from .app import ServeSettings

    token = os.environ.get(args.admin_token_env) or None
    if token is None:
        log.warning("no admin token in $%s: adding and removing adapters over HTTP is disabled",
                    args.admin_token_env)
    return ServeSettings(admin_token=token, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_image_bytes=args.max_image_bytes, max_adapter_bytes=args.max_adapter_bytes,
                         max_pixels=args.max_pixels, rescan_s=args.rescan_s, prep_threads=args.prep_threads)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ConfigError(f"ftn serve needs the serve extra: pip install 'factorized-tensor-networks[serve]' "
                          f"({exc})") from None
    import torch

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    service = build_service(args)
    app = create_app(service, serve_settings(args))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=30, access_log=False)
    uvicorn.Server(config).run()
    return 0
