"""Mixed-task batches: `FTNModel.forward_mixed` (one pass, each layer runs each task on its own
samples) against (a) a loop of `model(x[task's samples], task=t)` passes and (b) the naive way,
every task on the whole batch then keeping its rows. Interleaved medians, eval mode, no grad.

    python benchmarks/bench_mixed.py --threads 1 [--arch resnet18 --size 64 --batch 64] [--device cuda]
"""

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from ftn import FTNModel
from ftn.training.backbones import strip_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronize)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"{args.arch} @ {args.size}px, batch {args.batch}, {where}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"{'T':>3} {'mixed ms':>9} {'sub-batch loop ms':>18} {'whole-batch loop ms':>20} {'× sub loop':>10} {'× whole loop':>12}")
    for num_tasks in args.tasks:
        torch.manual_seed(0)
        backbone, dim = strip_classifier(getattr(torchvision.models, args.arch)(weights=None))
        model = FTNModel(backbone, rank=8).eval()
        names = [f"t{i}" for i in range(num_tasks)]
        for name in names:
            model.add_task(name, head=nn.Linear(dim, 10))
        model.to(device)
        x = torch.randn(args.batch, 3, args.size, args.size).to(device)
        tasks = [names[i % num_tasks] for i in range(args.batch)]
        index = {t: torch.tensor([i for i, n in enumerate(tasks) if n == t], device=device) for t in names}

        def mixed():
            return model.forward_mixed(x, tasks)

        def sub_loop():
            return {t: model(x[idx], task=t) for t, idx in index.items()}

        def whole_loop():
            return {t: model(x, task=t)[idx] for t, idx in index.items()}

        runs = {"mixed": mixed, "sub": sub_loop, "whole": whole_loop}
        times = {k: [] for k in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{num_tasks:>3} {med['mixed']:9.1f} {med['sub']:18.1f} {med['whole']:20.1f} "
              f"{med['sub'] / med['mixed']:10.2f} {med['whole'] / med['mixed']:12.2f}")


if __name__ == "__main__":
    main()
