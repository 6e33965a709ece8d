"""All tasks in one pass vs the per-task loop: eval latency for T = 2, 4, 8 tasks.

For each model, T tasks (ΔW and norms perturbed so they differ) run on the same batch, either
as ``{t: model(x, task=t) for t in tasks}`` or as ``ftn.core.multitask.forward_all_tasks(model, x)``.
The two are interleaved and the median of each is reported with the speed-up (loop / one pass);
outputs are checked to agree first. Random weights (speed does not depend on the values).

    python benchmarks/bench_multitask.py [--threads 1] [--rounds 10] [--quick]
    python benchmarks/bench_multitask.py --device cuda --configs "resnet18@224 b1" --rounds 50

On CUDA every timed region ends with ``torch.cuda.synchronize()``, and the correctness check
runs with TF32 convolutions off (TF32 rounding differs between a grouped conv and T plain ones
by more than the check's 1e-4).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time

import torch
import torchvision
from torch import nn

from ftn import FTNModel
from ftn.training.backbones import strip_classifier
from ftn.core.multitask import forward_all_tasks

CONFIGS = {  # name: (arch, image size, batch)
    "mobilenet_v2@224 b1": ("mobilenet_v2", 224, 1),
    "mobilenet_v2@64 b16": ("mobilenet_v2", 64, 16),
    "resnet18@224 b1": ("resnet18", 224, 1),
    "resnet18@224 b8": ("resnet18", 224, 8),
    "resnet34@224 b1": ("resnet34", 224, 1),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make_model(arch: str, num_tasks: int) -> FTNModel:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)(weights=None))
    model = FTNModel(backbone, rank=8)
    for i in range(num_tasks):
        model.add_task(f"t{i}", head=nn.Linear(dim, 10))
        with torch.no_grad():
            for p in model.task_parameters(f"t{i}"):
                p.add_(torch.randn_like(p) * 1e-2)
    return model.eval()


@torch.no_grad()
def measure(model: FTNModel, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    try:
        with no_tf32():
            forward_all_tasks(model, x, check=True, fallback=False)  # warm-up + correctness
    except AssertionError as e:  # report and still time it
        print("  check against the loop FAILED:", " ".join(str(e).split())[:300])
    for name in model.tasks:  # warm-up at the timed settings
        model(x, task=name)
    forward_all_tasks(model, x, fallback=False)
    loop_t, one_t = [], []
    for _ in range(rounds):
        sync(x.device)
        t0 = time.perf_counter()
        for name in model.tasks:
            model(x, task=name)
        sync(x.device)
        t1 = time.perf_counter()
        forward_all_tasks(model, x, fallback=False)
        sync(x.device)
        t2 = time.perf_counter()
        loop_t.append(t1 - t0)
        one_t.append(t2 - t1)
    return statistics.median(loop_t), statistics.median(one_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2@64 b16, T=2,4, 3 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.configs, args.tasks, args.rounds = ["mobilenet_v2@64 b16"], [2, 4], 3
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, {where}")
    print(f"{'config':22s} {'T':>2s} {'loop ms':>9s} {'one pass ms':>11s} {'speed-up':>8s}")
    for config in args.configs:
        arch, size, batch = CONFIGS[config]
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        for t in args.tasks:
            loop, one = measure(make_model(arch, t).to(device), x, args.rounds)
            print(f"{config:22s} {t:2d} {loop * 1e3:9.1f} {one * 1e3:11.1f} {loop / one:8.2f}", flush=True)


if __name__ == "__main__":
    main()
