"""`ftn serve` under load, on MobileNetV2 (offline ImageNet weights) at 64 px, measured as users see
it: server processes on 127.0.0.1, 32 concurrent HTTP clients (httpx), closed loop.

    python benchmarks/bench_serving.py [--duration 20 --rounds 3 --threads 1] [--json out.json]

Prints, with ratios:
1. batching method: forward_mixed vs per-task sub-batches, in process (batch 32 over 8 tasks);
2. throughput and p50/p99: 8 tasks with mixed traffic vs one plain (merged) backbone serving one
   task through the same server and batching; configurations interleaved over ``--rounds``
   rounds (the machine may be shared), medians reported;
3. the batching window's effect on p50/p99 at 32 and at 4 clients;
4. memory (RSS) of a server with 8 and 64 tasks vs processes holding 8 and 64 merged models;
5. two replicas sharing one adapter folder behind a small round-robin proxy: same answers, and an
   adapter uploaded through the proxy reaches both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch
from torch import nn

from ftn.apps.serving.loadtest import ServerProcess, free_port, run_load
from ftn.apps.serving.predict import build_model

HERE = Path(__file__).resolve().parent
SIZE = 64
CLASSES = 10


def make_adapters(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` rank-8 adapters on the offline MobileNetV2 with random factors, norms and heads."""
    model = build_model("mobilenet_v2")
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        name = f"task{i:02d}"
        model.add_task(name, head=nn.Linear(1280, CLASSES), rank=8)
        with torch.no_grad():
            for key, p in model.named_task_parameters(name):
                if key.startswith("delta.") and p.abs().sum() == 0:
                    p.normal_(0, 0.02, generator=g)
        info = {"labels": [f"{name}/c{j}" for j in range(CLASSES)],
                "input": {"size": SIZE, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "resize": "stretch"}}
        model.save_task(name, folder / f"{name}.safetensors", info=info)
        model.remove_task(name)
        names.append(name)
    return names


def png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mixed_vs_subbatch(threads: int, rounds: int = 15) -> dict[str, float]:
    torch.set_num_threads(threads)
    model = build_model("mobilenet_v2", pretrained=False)
    names = [f"t{i}" for i in range(8)]
    for n in names:
        model.add_task(n, head=nn.Linear(1280, CLASSES))
    x = torch.randn(32, 3, SIZE, SIZE)
    tasks = [names[i % 8] for i in range(32)]
    index = {t: [i for i, n in enumerate(tasks) if n == t] for t in names}
    runs = {"mixed": lambda: model.forward_mixed(x, tasks),
            "subbatch": lambda: {t: model(x[idx], task=t) for t, idx in index.items()}}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        for _ in range(rounds):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20


def merged_models_rss(folder: Path, count: int) -> float:
    """RSS of a process that holds ``count`` merged plain models (one per task), nothing else."""
    code = f"""
import gc, psutil, torch
from pathlib import Path
from ftn.apps.serving.predict import build_model
files = sorted(Path({str(folder)!r}).glob('*.safetensors'))[:{count}]
model = build_model('mobilenet_v2', files)
merged = []
for f in files:
    name = model.load_task(f)
    merged.append(model.merge(name).eval().requires_grad_(False))
    model.remove_task(name)
del model; gc.collect()
with torch.inference_mode():
    for m in merged:
        m(torch.randn(1, 3, {SIZE}, {SIZE}))
print(psutil.Process().memory_info().rss / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--sweep-duration", type=float, default=10.0, help="seconds per batching-window point")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--skip", nargs="*", default=[], choices=["mixed", "throughput", "window", "memory", "replicas"])
    args = parser.parse_args()
    results: dict = {"threads": args.threads, "clients": args.clients, "image_size": SIZE}
    tmp = Path(tempfile.mkdtemp(prefix="ftn-bench-serving-"))
    logs = tmp / "logs"
    logs.mkdir()
    all_folder = tmp / "all64"
    all_folder.mkdir()
    t0 = time.perf_counter()
    names = make_adapters(all_folder, 64)
    folders = {}
    for count in (1, 8, 64):
        f = tmp / f"tasks{count}"
        f.mkdir()
        for n in names[:count]:
            os.link(all_folder / f"{n}.safetensors", f / f"{n}.safetensors")
        folders[count] = f
    print(f"64 adapters written in {time.perf_counter() - t0:.0f} s "
          f"({(all_folder / 'task00.safetensors').stat().st_size / 1024:.0f} KiB each); torch threads per server "
          f"{args.threads}, {args.clients} clients, {SIZE}px, CPU cores {os.cpu_count()}")
    images = [png(i) for i in range(8)]
    common = ["--backbone", "mobilenet_v2", "--threads", str(args.threads), "--log-level", "warning"]

    def work(count: int) -> list[tuple[str, bytes]]:  # mixed traffic: every request to the next task
        return [(names[i % count], images[i % len(images)]) for i in range(8 * count)]

    # 1. forward_mixed vs per-task sub-batches
    if "mixed" not in args.skip:
        ms = mixed_vs_subbatch(args.threads)
        results["batching_method_ms"] = ms
        print(f"\n[1] batch 32 over 8 tasks, {SIZE}px, in process: forward_mixed {ms['mixed']:.1f} ms, "
              f"per-task sub-batches {ms['subbatch']:.1f} ms (mixed / sub-batches = {ms['mixed'] / ms['subbatch']:.2f})")

    # 2. throughput: 8 tasks mixed vs one plain merged backbone serving one task
    if "throughput" not in args.skip:
        configs = {
            "plain backbone, 1 task (merged)": (folders[1], ["--batching", "subbatch", "--merged", "1"], work(1)),
            "FTN, 8 tasks, per-task sub-batches": (folders[8], ["--batching", "subbatch"], work(8)),
            "FTN, 8 tasks, forward_mixed": (folders[8], ["--batching", "mixed"], work(8)),
            "FTN, 8 tasks, all merged": (folders[8], ["--batching", "subbatch", "--merged", "8"], work(8)),
        }
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for label, (folder, extra, load) in configs.items():
                with ServerProcess(folder, [*common, *extra], log_path=logs / "throughput.log") as srv:
                    run_load(srv.url, load, clients=args.clients, duration_s=3)  # warm-up (and merging)
                    res = run_load(srv.url, load, clients=args.clients, duration_s=args.duration)
                    assert res.errors == 0, res.error_samples
                    runs[label].append(res.summary())
                print(f"  round {r + 1} {label}: {runs[label][-1]}", flush=True)
        base = statistics.median(x["throughput_rps"] for x in runs["plain backbone, 1 task (merged)"])
        print(f"\n[2] served throughput, {args.clients} clients, median of {args.rounds} × {args.duration:.0f} s:")
        print(f"{'configuration':<34} {'req/s':>7} {'× plain':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
        table = {}
        for label, rs in runs.items():
            rps = statistics.median(x["throughput_rps"] for x in rs)
            p50 = statistics.median(x["p50_ms"] for x in rs)
            p99 = statistics.median(x["p99_ms"] for x in rs)
            errors = sum(x["errors"] for x in rs)
            table[label] = {"rps": rps, "ratio": rps / base, "p50_ms": p50, "p99_ms": p99, "errors": errors,
                            "requests": sum(x["requests"] for x in rs), "rounds": rs}
            print(f"{label:<34} {rps:7.1f} {rps / base:8.2f} {p50:7.1f} {p99:7.1f} {errors:6d}")
        results["throughput"] = table

    # 3. batching window
    if "window" not in args.skip:
        print(f"\n[3] batching window (8 tasks, mixed traffic, {args.sweep_duration:.0f} s per point):")
        print(f"{'max wait ms':>11} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
        sweep = []
        for wait in (0, 2, 5, 20):
            with ServerProcess(folders[8], [*common, "--max-wait-ms", str(wait)], log_path=logs / "window.log") as srv:
                run_load(srv.url, work(8), clients=args.clients, duration_s=2)
                for clients in (args.clients, 4):
                    s = run_load(srv.url, work(8), clients=clients, duration_s=args.sweep_duration).summary()
                    assert s["errors"] == 0
                    sweep.append({"max_wait_ms": wait, "clients": clients, **s})
                    print(f"{wait:>11} {clients:>7} {s['throughput_rps']:7.1f} {s['p50_ms']:7.1f} {s['p99_ms']:7.1f}",
                          flush=True)
        results["window"] = sweep

    # 4. memory
    if "memory" not in args.skip:
        print("\n[4] memory (RSS, MiB), after every task served at least once:")
        mem = {}
        for count in (8, 64):
            with ServerProcess(folders[count], common, log_path=logs / "memory.log", startup_timeout=600) as srv:
                run_load(srv.url, work(count), clients=8, max_requests=2 * count, duration_s=120)
                mem[f"server_{count}"] = rss_mb(srv.proc.pid)
            mem[f"merged_{count}"] = merged_models_rss(all_folder, count)
        with ServerProcess(folders[1], common, log_path=logs / "memory.log") as srv:
            run_load(srv.url, work(1), clients=8, max_requests=16, duration_s=60)
            mem["server_1"] = rss_mb(srv.proc.pid)
        for count in (8, 64):
            print(f"  {count:>2} tasks: ftn serve {mem[f'server_{count}']:.0f} MiB; {count} merged models "
                  f"{mem[f'merged_{count}']:.0f} MiB ({mem[f'merged_{count}'] / mem[f'server_{count}']:.2f}×)")
        print(f"  ftn serve with 1 task: {mem['server_1']:.0f} MiB; per extra task "
              f"{(mem['server_64'] - mem['server_8']) / 56:.2f} MiB (8 → 64 tasks)")
        results["memory_mib"] = mem

    # 5. replicas behind a proxy
    if "replicas" not in args.skip:
        folder = tmp / "replicas"
        folder.mkdir()
        for n in names[:8]:
            os.link(all_folder / f"{n}.safetensors", folder / f"{n}.safetensors")
        a = ServerProcess(folder, [*common, "--rescan-s", "1"], token="bench", log_path=logs / "replica_a.log").start()
        b = ServerProcess(folder, [*common, "--rescan-s", "1"], token="bench", log_path=logs / "replica_b.log").start()
        port = free_port()
        env = {**os.environ, "FTN_BACKENDS": f"{a.url},{b.url}"}
        proxy = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "replica_proxy:app",
                                  "--port", str(port), "--log-level", "warning"], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            with httpx.Client(timeout=60) as http:
                direct = {(t, u): http.post(f"{u}/tasks/{t}/predict", content=images[0]).json()
                          for t in names[:8] for u in (a.url, b.url)}
                same_replicas = all(direct[(t, a.url)] == direct[(t, b.url)] for t in names[:8])
                via = [http.post(f"{url}/tasks/{names[i % 8]}/predict", content=images[0]) for i in range(16)]
                served_by = {r.headers.get("x-backend") for r in via}
                same_proxy = all(r.json() == direct[(names[i % 8], a.url)] for i, r in enumerate(via))
                up = http.put(f"{url}/tasks/{names[10]}", content=(all_folder / f"{names[10]}.safetensors").read_bytes(),
                              headers={"Authorization": "Bearer bench"})
                time.sleep(2.5)  # one rescan period and a bit
                seen = [http.get(f"{u}/tasks/{names[10]}").status_code for u in (a.url, b.url)]
            load = run_load(url, work(8), clients=args.clients, duration_s=10)
            print(f"\n[5] two replicas on one folder behind a round-robin proxy: answers identical across replicas "
                  f"{same_replicas}, through the proxy {same_proxy} (served by {len(served_by)} backends); "
                  f"adapter uploaded through the proxy ({up.status_code}) visible on both replicas: {seen}; "
                  f"load through the proxy: {load.summary()}")
            results["replicas"] = {"identical": same_replicas and same_proxy, "backends": len(served_by),
                                   "upload": up.status_code, "visible": seen, "load": load.summary()}
        finally:
            proxy.terminate()
            proxy.wait(30)
            a.close()
            b.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nnumbers in {args.json}")


if __name__ == "__main__":
    main()
