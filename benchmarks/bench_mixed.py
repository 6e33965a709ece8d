"""Mixed-task batches: `FTNModel.forward_mixed` (grouped: the frozen W once for the whole batch,
each row's low-rank correction and norm gathered per row) against (a) one task merged into a
plain backbone (W + ΔW folded in: the speed of serving a single task), (b) per-task sub-batches
(a loop of `model(x[task's samples], task=t)`) and (c) `forward_mixed(grouped=False)` (each layer
runs each task on its own slice: the training path, and the eval path before the grouped one).
Interleaved round by round, medians; eval mode, no grad. Numbers are ratios: the machine may be
shared (the load average is printed before and after), so with ``--clock cpu`` (the default on
the CPU) each call is timed by the process's CPU time, which waiting for a core shared with other
jobs does not inflate as it does wall time (``--clock wall`` for wall time; CUDA: always wall).

    python benchmarks/bench_mixed.py [--archs mobilenet_v2 resnet18] [--size 64] [--batch 32]
        [--tasks 1 2 8 32 64] [--rounds 7] [--threads 1] [--device cpu|cuda]

Targets (docs/serving.md, "Numbers"): grouped mixed ≥ 0.9× the merged single task's throughput
at T = 8, and cost sub-linear in T up to T = 64.
"""

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn

from ftn import FTNModel
from ftn.core import mixed
from ftn.training.backbones import strip_classifier


def build(arch: str, num_tasks: int, rank: int, device: torch.device) -> tuple[FTNModel, list[str]]:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)(weights=None))
    model = FTNModel(backbone, rank=rank).eval()
    names = [f"t{i}" for i in range(num_tasks)]
    g = torch.Generator().manual_seed(1)
    for name in names:
        model.add_task(name, head=nn.Linear(dim, 10))
        with torch.no_grad():  # non-zero ΔW and norms (the zero-initialised factor too)
            for _, p in model.named_task_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device), names


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "load n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 2, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronize)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="time each call by process CPU time (robust on a shared machine) or wall time")
    parser.add_argument("--check-cost", action="store_true",
                        help="also time forward_mixed with each task's once-per-batch staleness check (its watch) skipped "
                             "(a diagnostic of where the time goes: unsafe, never for serving)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["subbatch", "slices"],
                        help="methods not to time (the slow ones at large T)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    print(f"batch {args.batch}, {args.size}px, rank {args.rank}, {where}, {args.rounds} rounds, "
          f"{'process CPU' if clock is time.process_time else 'wall'} time; {load()}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for arch in args.archs:
        print(f"\n{arch}: median ms per batch; '× merged' = merged ms / method ms (throughput relative to "
              f"one merged task)")
        print(f"{'T':>3} {'mixed':>8} {'merged':>8} {'sub-batch':>10} {'slices':>8} {'× merged':>9} "
              f"{'sub/mixed':>10} {'slices/mixed':>13} {'mixed/mixed(T=first)':>21}")
        first = None
        for num_tasks in args.tasks:
            model, names = build(arch, num_tasks, args.rank, device)
            merged = model.merge(names[0]).eval().to(device)
            x = torch.randn(args.batch, 3, args.size, args.size, device=device)
            # Each round a different window of tasks (all T appear over the rounds when T > batch).
            batches = [[names[(r * args.batch + i) % num_tasks] for i in range(args.batch)] for r in range(2)]
            state = {"round": 0}

            def tasks() -> list[str]:
                return batches[state["round"] % 2]

            def sub_batches():
                current = tasks()
                out = {}
                for t in dict.fromkeys(current):
                    idx = torch.tensor([i for i, n in enumerate(current) if n == t], device=device)
                    out[t] = model(x.index_select(0, idx), task=t)
                return out

            def unchecked():
                checked = mixed._watch_ok
                mixed._watch_ok = lambda watch: True  # each task's slots trusted while in its watch
                try:
                    return model.forward_mixed(x, tasks())
                finally:
                    mixed._watch_ok = checked

            runs = {"mixed": lambda: model.forward_mixed(x, tasks()), "merged": lambda: merged(x),
                    "subbatch": sub_batches, "slices": lambda: model.forward_mixed(x, tasks(), grouped=False)}
            if args.check_cost:
                runs["unchecked"] = unchecked
            for skipped in args.skip:
                runs.pop(skipped)
            times: dict[str, list[float]] = {k: [] for k in runs}
            with torch.inference_mode():
                for fn in runs.values():  # warm-up: builds every cache
                    for state["round"] in range(2):
                        fn()
                for state["round"] in range(args.rounds):
                    for k, fn in runs.items():
                        sync()
                        t0 = clock()
                        fn()
                        sync()
                        times[k].append(clock() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            first = first or med["mixed"]
            sub = med.get("subbatch", float("nan"))
            slices = med.get("slices", float("nan"))
            extra = ""
            if "unchecked" in med:
                extra = (f"   without the staleness check: {med['unchecked']:.1f} ms, "
                         f"× merged {med['merged'] / med['unchecked']:.2f}")
            print(f"{num_tasks:>3} {med['mixed']:8.1f} {med['merged']:8.1f} {sub:10.1f} {slices:8.1f} "
                  f"{med['merged'] / med['mixed']:9.2f} {sub / med['mixed']:10.2f} {slices / med['mixed']:13.2f} "
                  f"{med['mixed'] / first:21.2f}{extra}", flush=True)
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
