"""Where a cold request's time goes in one ``ftn serve`` process (in process, no HTTP), one request
at a time: 64 of 200 generated MobileNetV2 adapters resident (64 px, 1 torch thread).

    python benchmarks/profile_cold_request.py [--tasks 200 --max-resident 64 --requests 16]

Prints the medians of: evicting the least recently used task, loading the requested one (file
read, checks, ``load_task``), the whole cold batch, and the same tasks again (warm); then cProfile's
top entries over a few more cold batches, and how many mixed-batch
slots (one per task and module, :mod:`ftn.core.mixed`) the cold and warm batches built. Used for the cold-request paragraph of docs/serving.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ftn.apps.serving.loadtest import generate_adapters
from ftn.apps.serving.predict import build_model
from ftn.apps.serving.registry import TaskService
from ftn.core import mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--max-resident", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        names = [f"task{i:04d}" for i in range(args.tasks)]
        generate_adapters(folder, names, backbone=args.backbone)
        torch.manual_seed(0)  # as ftn serve --no-pretrained --seed 0
        model = build_model(args.backbone, [folder / f"{names[0]}.safetensors"], pretrained=False)
        service = TaskService(model, folder, max_resident=args.max_resident, hot_tasks=8)
        service.load_folder()
        times: dict[str, list[float]] = {"evict": [], "load": [], "cold batch": [], "warm batch": []}
        evict = service._evict

        def timed_evict(name: str) -> None:
            t0 = time.perf_counter()
            evict(name)
            times["evict"].append(time.perf_counter() - t0)

        service._evict = timed_evict
        service.on_load = lambda task, reason, s: times["load"].append(s)
        x = [torch.randn(3, 64, 64)]
        cold = names[args.max_resident + 36:][:args.requests]  # none resident
        builds = {}
        for kind in ("cold batch", "warm batch"):
            mixed.slot_builds.clear()
            for name in cold:
                t0 = time.perf_counter()
                service.run_batch([name], x)
                times[kind].append(time.perf_counter() - t0)
            builds[kind] = sum(mixed.slot_builds.values())
        for kind, values in times.items():
            print(f"{kind:<12} {len(values):>3} times, median {1e3 * statistics.median(values):8.1f} ms")
        for kind, count in builds.items():  # ftn.core.mixed's per-task slots (re)built, all modules
            print(f"{kind:<12} mixed-batch slots built: {count} ({count / len(cold):.0f} per request)")
        profile = cProfile.Profile()
        profile.enable()
        for name in names[-8:]:
            service.run_batch([name], x)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
