"""Thousands of tasks in one `ftn serve` process: the resident set under churn, in process.

    python benchmarks/bench_serving_resident.py [--backbone mobilenet_v2 --tasks 1000 --max-resident 64
                                                 --requests 1000 --batch 8 --threads 1] [--json out.json]

A folder of ``--tasks`` rank-8 adapters (10 classes) on a random-weight backbone (seeded; weights do not
change the costs measured here) is served by one :class:`~ftn.apps.serving.registry.TaskService`
with ``--max-resident`` tasks loaded at most, driven directly (no HTTP: the HTTP path is
``benchmarks/bench_serving.py``). Prints:

1. the folder scan (every file checked from its header, nothing loaded) and the start-up fill;
2. memory: the backbone's tensor bytes, each resident task's tensor bytes, the model's tensor bytes
   (= backbone + resident set, checked), and the process RSS per resident task (RSS after the
   start-up fill minus RSS with the model alone, over the resident count);
3. churn: ``--requests`` requests in batches of ``--batch``, tasks drawn uniformly over every task
   (worst case: nearly every request is a cold load) and Zipf-distributed (s = 1.1, a few popular
   tasks), against the same batches over resident tasks only: throughput, hit rate, loads,
   evictions, cold-load latency p50/p99, and RSS after the churn (bounded: no growth per load);
4. the ratio of cold to warm batch time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil
import torch

from ftn.apps.serving.loadtest import generate_adapters, percentile
from ftn.apps.serving.predict import build_model
from ftn.apps.serving.registry import TaskService

SIZE = 64
CLASSES = 10


def model_for(backbone: str) -> "torch.nn.Module":
    torch.manual_seed(0)  # the same random backbone in every model
    return build_model(backbone, pretrained=False)


def make_adapters(folder: Path, backbone: str, count: int, rank: int, seed: int = 0) -> list[str]:
    """One adapter saved by ``save_task``, cloned with new random factors and heads."""
    names = [f"task{i:04d}" for i in range(count)]
    generate_adapters(folder, names, backbone=backbone, rank=rank, classes=CLASSES, size=SIZE, seed=seed)
    return names


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def churn(service: TaskService, names: list[str], draws: list[int], batch: int) -> dict[str, float]:
    """Requests for ``names[draws[i]]`` in batches of ``batch``; what the resident set did."""
    cold: list[float] = []
    service.on_load = lambda task, reason, s: cold.append(s) if reason == "request" else None
    loads, evictions = service.loads["request"], service.evictions
    x = [torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    batch_s = []
    started = time.perf_counter()
    for start in range(0, len(draws), batch):
        tasks = [names[i] for i in draws[start:start + batch]]
        t0 = time.perf_counter()
        out = service.run_batch(tasks, x[:len(tasks)])
        batch_s.append(time.perf_counter() - t0)
        assert all(isinstance(y, torch.Tensor) for y in out), out
        assert len(service.resident) <= service.max_resident
    wall = time.perf_counter() - started
    service.on_load = None
    cold_loads = service.loads["request"] - loads
    return {"requests": len(draws), "req_per_s": len(draws) / wall, "cold_loads": cold_loads,
            "hit_rate": 1 - cold_loads / len(draws), "evictions": service.evictions - evictions,
            "cold_load_p50_ms": 1e3 * percentile(cold, 50), "cold_load_p99_ms": 1e3 * percentile(cold, 99),
            "batch_p50_ms": 1e3 * percentile(batch_s, 50), "batch_p99_ms": 1e3 * percentile(batch_s, 99),
            "rss_mib_after": rss_mib()}


def zipf_draws(count: int, n: int, s: float, g: torch.Generator) -> list[int]:
    weights = torch.tensor([1.0 / (k + 1) ** s for k in range(count)])
    order = torch.randperm(count, generator=g)  # popular tasks spread over the names
    return [int(order[i]) for i in torch.multinomial(weights, n, replacement=True, generator=g)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-resident", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1000, help="requests per churn pattern")
    parser.add_argument("--batch", type=int, default=8, help="requests per batch (distinct tasks drawn)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"args": vars(args)}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        folder.mkdir()
        t0 = time.perf_counter()
        names = make_adapters(folder, args.backbone, args.tasks, args.rank)
        print(f"generated {len(names)} adapters of {args.backbone} (rank {args.rank}) in "
              f"{time.perf_counter() - t0:.1f} s, {(folder / f'{names[0]}.safetensors').stat().st_size / 2**20:.2f} "
              f"MiB each on disk")

        model = model_for(args.backbone).eval()
        backbone_bytes = sum(t.nbytes for t in model.state_dict().values())
        rss_model = rss_mib()
        service = TaskService(model, folder, max_resident=args.max_resident, hot_tasks=8)
        fill: list[float] = []
        service.on_load = lambda task, reason, s: fill.append(s)
        t0 = time.perf_counter()
        service.load_folder()
        start_s = time.perf_counter() - t0
        service.on_load = None
        scan = {"tasks": len(service.catalog), "resident": len(service.resident), "start_s": start_s,
                "catalog_s": start_s - sum(fill), "fill_s": sum(fill)}
        print(f"\n1. start in {start_s:.1f} s: {scan['tasks']} tasks catalogued (header checks, file SHA-256) in "
              f"{scan['catalog_s']:.1f} s ({1e3 * scan['catalog_s'] / scan['tasks']:.1f} ms a file), "
              f"{scan['resident']} loaded in {scan['fill_s']:.1f} s")

        per_task = service.catalog[names[0]].tensor_bytes
        model_bytes = sum(t.nbytes for t in service.model.state_dict().values())
        assert model_bytes == backbone_bytes + service.resident_bytes, (model_bytes, backbone_bytes)
        rss_filled = rss_mib()
        memory = {"backbone_mib": backbone_bytes / 2**20, "task_tensor_mib": per_task / 2**20,
                  "resident_tensor_mib": service.resident_bytes / 2**20,
                  "model_tensor_mib": model_bytes / 2**20, "rss_model_mib": rss_model, "rss_filled_mib": rss_filled,
                  "rss_per_resident_task_mib": (rss_filled - rss_model) / max(1, len(service.resident))}
        print(f"2. memory: backbone {memory['backbone_mib']:.2f} MiB of tensors; a task {memory['task_tensor_mib']:.3f} "
              f"MiB; model = backbone + {len(service.resident)} resident = {memory['model_tensor_mib']:.2f} MiB "
              f"(checked); RSS {rss_model:.0f} MiB with the model alone, {rss_filled:.0f} MiB with "
              f"{len(service.resident)} resident: {memory['rss_per_resident_task_mib']:.2f} MiB per resident task")

        g = torch.Generator().manual_seed(0)
        resident_now = [names.index(t) for t in service.resident]
        warm = churn(service, names, [resident_now[int(i)] for i in torch.randint(len(resident_now), (args.requests,),
                                                                              generator=g)], args.batch)
        uniform = churn(service, names, torch.randint(args.tasks, (args.requests,), generator=g).tolist(), args.batch)
        zipf = churn(service, names, zipf_draws(args.tasks, args.requests, 1.1, g), args.batch)
        print(f"3. churn over {args.tasks} tasks, at most {args.max_resident} resident, batches of {args.batch}:")
        print(f"   {'pattern':<22}{'req/s':>8}{'hit rate':>10}{'cold loads':>12}{'evictions':>11}"
              f"{'cold p50 ms':>13}{'cold p99 ms':>13}{'batch p50 ms':>14}{'batch p99 ms':>14}{'RSS MiB':>9}")
        for label, r in (("resident tasks only", warm), ("uniform over all", uniform), ("zipf s=1.1", zipf)):
            print(f"   {label:<22}{r['req_per_s']:>8.1f}{r['hit_rate']:>10.2f}{r['cold_loads']:>12}{r['evictions']:>11}"
                  f"{r['cold_load_p50_ms']:>13.1f}{r['cold_load_p99_ms']:>13.1f}{r['batch_p50_ms']:>14.1f}"
                  f"{r['batch_p99_ms']:>14.1f}{r['rss_mib_after']:>9.0f}")
        ratio = uniform["batch_p50_ms"] / warm["batch_p50_ms"]
        print(f"4. a batch of {args.batch} cold tasks takes {ratio:.2f}x a batch of resident ones (p50); uniform "
              f"churn serves {uniform['req_per_s'] / warm['req_per_s']:.2f}x the warm throughput")
        results.update(scan=scan, memory=memory, warm=warm, uniform=uniform, zipf=zipf, cold_over_warm_batch=ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
