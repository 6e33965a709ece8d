"""Load test at scale, over HTTP as users see it: a folder of 1,000 adapters served by one
``ftn serve --max-resident K`` process and by ``ftn serve --ray --replicas 2``, concurrent clients.

    python benchmarks/loadtest_scale.py [--tasks 1000 --max-resident 64 --clients 16 --duration 30
                                         --rounds 2 --replicas 2] [--no-ray] [--quick] [--json out.json]

``--quick`` is the CI-sized run (tiny_convnet, 48 tasks, 8 resident, 2 s phases; seconds, not
minutes). The adapters are generated (rank 8, 10 classes, random factors and heads) for the seeded
random backbone that ``--no-pretrained --seed 0`` builds; the weights do not change the costs
measured. Each deployment is a real server process on 127.0.0.1 (local Ray for ``--ray``: loopback
only, the machine's CPUs), the clients httpx in this process (closed loop). Per deployment:

1. start: seconds to the first answer; RSS with the K resident tasks loaded at start; for the single
   process also the RSS of a server holding one task, so memory per resident task =
   (RSS with K - RSS with 1) / (K - 1);
2. phases of ``--duration`` s: requests over the resident tasks only (no loads: the warm reference),
   then ``--rounds`` interleaved rounds of uniform (every task alike: nearly every request a cold
   load, the worst case) and Zipf (s = ``--zipf``: a few popular tasks) task choice. Each: req/s,
   p50/p99 request latency, hit rate (1 - cold loads / requests), cold loads and evictions and the
   server's cold-load time (mean, and p50/p99 interpolated in ``ftn_adapter_cold_load_seconds``'
   buckets) from ``/metrics`` (each replica's, summed), RSS (per replica for Ray) and the load average;
3. a quiet probe: one request at a time for ``--probe`` tasks no replica holds (cold: the load is in
   its latency), then once more each (warm); their p50/p99;
4. checks (the run fails, exit 1, if one fails): every response 200; every answer for a sample of
   ``--sample`` tasks (half the most requested, half drawn) equal to ``ftn predict``'s (same
   labels in order, probabilities within ``--tolerance``); loads > 0, and evictions > 0 when
   tasks > K; at most K resident per replica at every scrape; RSS growth from the first churn round
   to the last within ``--rss-slack-mib`` + ``--rss-mib-per-load`` x cold loads (a task left behind
   at each eviction would exceed it).

The machine may be shared: the load average is printed with each phase; the figures are for
orientation, the counts and checks are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from ftn.apps.serving.loadtest import (
    ServerProcess, generate_adapters, histogram_quantile, per_replica, percentile, read_metrics, rss_mib, run_load)

QUICK = {"backbone": "tiny_convnet", "image_size": 16, "rank": 2, "classes": 5, "tasks": 48, "max_resident": 8,
         "clients": 8, "duration": 2.0, "rounds": 1, "sample": 8, "probe": 4}
WORK = 50_000  # requests drawn per phase: more than any phase can send


def png(seed: int, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def zipf_draws(count: int, n: int, s: float, rng: random.Random) -> list[int]:
    order = list(range(count))
    rng.shuffle(order)  # popular tasks spread over the names
    return [order[k] for k in rng.choices(range(count), weights=[1.0 / (k + 1) ** s for k in range(count)], k=n)]


class Deployment:
    """A running server (one process, or Ray's tree of processes) as the load test sees it."""

    def __init__(self, name: str, server: ServerProcess, replicas: int, replica_header: str | None,
                 task_header: str | None) -> None:
        self.name, self.server, self.replicas = name, server, replicas
        self.replica_header, self.task_header = replica_header, task_header

    @property
    def url(self) -> str:
        return self.server.url

    def scrape(self, path: str, wait_s: float = 120.0) -> dict[str, httpx.Response]:
        """``GET path`` from every replica (Ray's proxy may route to a just-started one only later)."""
        deadline = time.monotonic() + wait_s
        while True:
            seen = per_replica(self.url, path, replicas=self.replicas, header=self.replica_header)
            if len(seen) >= self.replicas:
                return seen
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: only replicas {sorted(seen)} answered {path} in {wait_s:.0f} s")
            time.sleep(1.0)

    def resident(self) -> set[str]:
        """Tasks resident on any replica."""
        return {t["name"] for r in self.scrape("/tasks").values() for t in r.json()["tasks"] if t["resident"]}

    def counters(self) -> dict[str, object]:
        """Loads, evictions and the cold-load histogram, summed over the replicas; resident counts."""
        total: dict[str, object] = {"loads": 0.0, "evictions": 0.0, "cold_sum": 0.0, "cold_count": 0.0,
                                    "cold_buckets": {}, "resident": []}
        for response in self.scrape("/metrics").values():
            m = read_metrics(response.text)
            total["loads"] += sum(v for labels, v in m.get("ftn_adapter_loads_total", []) if labels["reason"] == "request")
            total["evictions"] += sum(v for _, v in m.get("ftn_adapter_evictions_total", []))
            total["cold_sum"] += sum(v for _, v in m.get("ftn_adapter_cold_load_seconds_sum", []))
            total["cold_count"] += sum(v for _, v in m.get("ftn_adapter_cold_load_seconds_count", []))
            for labels, v in m.get("ftn_adapter_cold_load_seconds_bucket", []):
                le = float(labels["le"])
                total["cold_buckets"][le] = total["cold_buckets"].get(le, 0.0) + v
            total["resident"] += [int(v) for _, v in m.get("ftn_resident_tasks", [])]
        return total

    def memory(self) -> dict[str, float]:
        """RSS in MiB: the server process, or for Ray each replica's process and the whole tree."""
        pid = self.server.proc.pid
        if self.replicas == 1 and self.replica_header is None:
            return {"server": rss_mib(pid)}
        out = {"tree": rss_mib(pid, children=True)}
        for i, proc in enumerate(p for p in psutil.Process(pid).children(recursive=True) if _is_replica(p)):
            out[f"replica{i}"] = proc.memory_info().rss / 2**20
        return out

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.server.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _is_replica(proc: psutil.Process) -> bool:
    try:
        return "ServeReplica" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Answers:
    """Every 200's predictions by (task, image index), to check a sample against ``ftn predict``."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, int], list[list[dict]]] = {}
        self.requests_per_task: dict[str, int] = {}

    def watch(self, work_images: list[int]):
        def on_answer(index: int, response: httpx.Response) -> None:
            body = response.json()
            self.by_key.setdefault((body["task"], work_images[index]), []).append(body["predictions"])
            self.requests_per_task[body["task"]] = self.requests_per_task.get(body["task"], 0) + 1
        return on_answer

    def add(self, task: str, image: int, response: httpx.Response) -> None:
        self.by_key.setdefault((task, image), []).append(response.json()["predictions"])
        self.requests_per_task[task] = self.requests_per_task.get(task, 0) + 1


def phase(dep: Deployment, label: str, tasks: list[str], images: list[bytes], draws: list[int], args,
          answers: Answers, rng: random.Random) -> dict[str, object]:
    before = dep.counters()
    image_of = [rng.randrange(len(images)) for _ in draws]
    work = [(tasks[d], images[i]) for d, i in zip(draws, image_of)]
    result = run_load(dep.url, work, clients=args.clients, duration_s=args.duration, max_requests=len(work),
                      timeout=300, task_header=dep.task_header, on_answer=answers.watch(image_of))
    after = dep.counters()
    loads = after["loads"] - before["loads"]
    cold_n = after["cold_count"] - before["cold_count"]
    buckets = [(le, after["cold_buckets"][le] - before["cold_buckets"].get(le, 0.0)) for le in after["cold_buckets"]]
    out = {"pattern": label, **result.summary(), "error_samples": result.error_samples,
           "hit_rate": round(1 - loads / result.requests, 3) if result.requests else float("nan"),
           "cold_loads": int(loads), "evictions": int(after["evictions"] - before["evictions"]),
           "cold_load_mean_ms": round(1e3 * (after["cold_sum"] - before["cold_sum"]) / cold_n, 1) if cold_n else None,
           "cold_load_p50_ms": round(1e3 * histogram_quantile(buckets, 0.5), 1) if cold_n else None,
           "cold_load_p99_ms": round(1e3 * histogram_quantile(buckets, 0.99), 1) if cold_n else None,
           "resident_max": max(after["resident"] + before["resident"]),
           "memory_mib": {k: round(v, 1) for k, v in dep.memory().items()},
           "load_avg": round(os.getloadavg()[0], 1)}
    return out


def probe(dep: Deployment, names: list[str], image: bytes, count: int, answers: Answers,
          rng: random.Random) -> dict[str, object]:
    """One request at a time for tasks no replica holds (cold), then the same again (warm)."""
    resident = dep.resident()
    chosen = rng.sample([n for n in names if n not in resident], min(count, len(names) - len(resident)))
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    errors: list[str] = []
    with httpx.Client(base_url=dep.url, timeout=300) as http:
        for kind in ("cold", "warm"):
            for task in chosen:
                headers = {dep.task_header: task} if dep.task_header else {}
                t0 = time.perf_counter()
                r = http.post(f"/tasks/{task}/predict", content=image, headers=headers)
                times[kind].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{task}: {r.status_code} {r.text[:200]}")
                    continue
                answers.add(task, 0, r)
            if dep.task_header:
                time.sleep(0.5)  # replicas report the tasks they hold to Ray's router every 0.1 s
    return {"tasks": len(chosen), "errors": len(errors), "error_samples": errors[:5],
            **{f"{kind}_p{q}_ms": round(1e3 * percentile(v, q), 1) for kind, v in times.items() for q in (50, 99)}}


def run_deployment(dep: Deployment, names: list[str], images: list[bytes], args, answers: Answers) -> dict:
    rng = random.Random(args.seed)
    started = time.perf_counter()
    dep.server.start()
    out: dict[str, object] = {"start_s": round(time.perf_counter() - started, 1)}
    try:
        first = dep.counters()
        out["memory_at_start_mib"] = {k: round(v, 1) for k, v in dep.memory().items()}
        out["resident_at_start"] = first["resident"]
        print(f"\n[{dep.name}] answering after {out['start_s']} s; RSS {out['memory_at_start_mib']} MiB with "
              f"{first['resident']} resident", flush=True)
        resident = sorted(names.index(t) for t in dep.resident())
        phases = [phase(dep, "resident only", names, images, rng.choices(resident, k=WORK), args, answers, rng)]
        for r in range(args.rounds):
            phases.append(phase(dep, f"uniform #{r + 1}", names, images, [rng.randrange(len(names)) for _ in range(WORK)],
                                args, answers, rng))
            phases.append(phase(dep, f"zipf s={args.zipf} #{r + 1}", names, images,
                                zipf_draws(len(names), WORK, args.zipf, rng), args, answers, rng))
        for p in phases:
            print_phase(dep.name, p)
        out["phases"] = phases
        out["probe"] = probe(dep, names, images[0], args.probe, answers, rng)
        print(f"[{dep.name}] probe, one request at a time, {out['probe']['tasks']} tasks: cold p50/p99 "
              f"{out['probe']['cold_p50_ms']} / {out['probe']['cold_p99_ms']} ms, warm p50/p99 "
              f"{out['probe']['warm_p50_ms']} / {out['probe']['warm_p99_ms']} ms", flush=True)
    finally:
        procs = dep.descendants()
        code = dep.server.stop(timeout=120)
        gone, alive = psutil.wait_procs(procs, timeout=30)
        for proc in alive:  # a Ray process the server's shutdown left behind: ours, stop it
            proc.kill()
        out["stop"] = {"exit_code": code, "processes_left_killed": len(alive)}
    return out


HEADER = (f"{'deployment':<10}{'phase':<18}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}{'hit':>6}{'loads':>7}"
          f"{'evict':>7}{'cold mean/p50/p99 ms':>24}{'RSS MiB':>22}{'load':>6}")


def print_phase(name: str, p: dict) -> None:
    cold = "—" if p["cold_load_mean_ms"] is None else \
        f"{p['cold_load_mean_ms']:.0f}/{p['cold_load_p50_ms']:.0f}/{p['cold_load_p99_ms']:.0f}"
    mem = "/".join(f"{v:.0f}" for k, v in p["memory_mib"].items())
    print(f"{name:<10}{p['pattern']:<18}{p['throughput_rps']:>7.1f}{p['p50_ms']:>9.0f}{p['p99_ms']:>9.0f}"
          f"{p['hit_rate']:>6.2f}{p['cold_loads']:>7}{p['evictions']:>7}{cold:>24}{mem:>22}{p['load_avg']:>6.1f}",
          flush=True)


def offline_answers(folder: Path, tasks: list[str], image_files: list[Path], backbone: str) -> dict:
    """``ftn predict --backbone B --no-pretrained --seed 0 --adapter <each sampled task> IMAGES``."""
    import torch

    from ftn.apps.serving.predict import run_predict

    torch.manual_seed(0)
    results = run_predict(backbone, [folder / f"{t}.safetensors" for t in tasks], image_files, k=5, pretrained=False)
    return {(r["task"], int(Path(r["image"]).stem[3:])): r["top_k"] for r in results}


def check_answers(answers: Answers, folder: Path, image_files: list[Path], args, rng: random.Random) -> dict:
    by_use = sorted(answers.requests_per_task, key=lambda t: (-answers.requests_per_task[t], t))
    half = args.sample // 2
    sample = by_use[:half] + rng.sample(by_use[half:], min(args.sample - half, len(by_use[half:])))
    expected = offline_answers(folder, sample, image_files, args.backbone)
    checked = mismatched = 0
    worst = 0.0
    examples = []
    for (task, image), got_all in answers.by_key.items():
        if task not in sample:
            continue
        want = expected[(task, image)]
        for got in got_all:
            checked += 1
            diff = max(abs(g["prob"] - w["prob"]) for g, w in zip(got, want))
            worst = max(worst, diff)
            if [g["label"] for g in got] != [w["label"] for w in want] or diff > args.tolerance:
                mismatched += 1
                if len(examples) < 3:
                    examples.append({"task": task, "image": image, "got": got, "want": want})
    return {"sample_tasks": len(sample), "answers_checked": checked, "mismatched": mismatched,
            "max_prob_diff": worst, "examples": examples}


def churn_checks(name: str, dep_out: dict, tasks: int, k: int, args) -> list[tuple[str, bool, str]]:
    phases = dep_out["phases"]
    churn = [p for p in phases if p["pattern"] != "resident only"]
    loads = sum(p["cold_loads"] for p in churn)
    evictions = sum(p["evictions"] for p in churn)
    # The server process, or Ray's replicas together (not Ray's own processes: GCS, dashboard, proxy).
    first, last = (sum(v for k, v in p["memory_mib"].items() if k != "tree") for p in (churn[0], churn[-1]))
    key = "server" if "server" in churn[0]["memory_mib"] else "replicas'"
    growth = last - first
    later_loads = sum(p["cold_loads"] for p in churn[1:])
    bound = args.rss_slack_mib + args.rss_mib_per_load * later_loads
    return [
        (f"{name}: every response 200", all(p["errors"] == 0 for p in phases) and not dep_out["probe"]["errors"],
         f"{sum(p['requests'] for p in phases)} requests, {sum(p['errors'] for p in phases)} errors; probe: "
         f"{2 * dep_out['probe']['tasks']} requests, {dep_out['probe']['errors']} errors"),
        (f"{name}: cold loads > 0", loads > 0, f"{loads} cold loads"),
        (f"{name}: evictions > 0 (tasks > K)", evictions > 0 or tasks <= k, f"{evictions} evictions"),
        (f"{name}: resident <= K per replica", max(p["resident_max"] for p in phases) <= k,
         f"max {max(p['resident_max'] for p in phases)} <= {k}"),
        (f"{name}: no RSS growth per load", growth <= bound,
         f"{key} RSS {first:.0f} -> {last:.0f} MiB over {later_loads} loads "
         f"({growth / max(1, later_loads):+.3f} MiB a load; bound {bound:.0f} MiB)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--max-resident", type=int, default=64, help="K: tasks resident per process / replica")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved uniform + zipf rounds")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--sample", type=int, default=32, help="tasks whose every answer is checked against ftn predict")
    parser.add_argument("--probe", type=int, default=16, help="tasks requested one at a time, cold then warm")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest probability difference accepted")
    parser.add_argument("--rss-slack-mib", type=float, default=48.0)
    parser.add_argument("--rss-mib-per-load", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process / replica")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="only the single process")
    parser.add_argument("--no-single", action="store_true", help="only Ray Serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="generate the adapters here and keep them (default: a temporary folder)")
    parser.add_argument("--json", help="write every number here")
    if parser.parse_known_args(argv)[0].quick:  # --quick sets the defaults; options given still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import ftn

    results: dict[str, object] = {"args": vars(args), "cpus": os.cpu_count(), "ftn": str(Path(ftn.__file__).parent),
                                  "load_avg_at_start": [round(x, 1) for x in os.getloadavg()]}

    with tempfile.TemporaryDirectory(prefix="ftn-loadtest-") as tmp:
        root = Path(args.keep or tmp)
        folder = root / "adapters"
        names = [f"task{i:04d}" for i in range(args.tasks)]
        t0 = time.perf_counter()
        generate_adapters(folder, names, backbone=args.backbone, rank=args.rank, classes=args.classes,
                          size=args.image_size, seed=args.seed)
        file_mib = (folder / f"{names[0]}.safetensors").stat().st_size / 2**20
        print(f"generated {len(names)} adapters of {args.backbone} (rank {args.rank}, {args.classes} classes, "
              f"{file_mib:.3f} MiB each) in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, load average "
              f"{results['load_avg_at_start']}", flush=True)
        images = [png(100 + i, args.image_size) for i in range(4)]
        image_files = []
        for i, data in enumerate(images):
            image_files.append(root / f"img{i}.png")
            image_files[-1].write_bytes(data)
        common = ["--backbone", args.backbone, "--no-pretrained", "--seed", "0", "--threads", str(args.threads)]
        answers = Answers()
        checks: list[tuple[str, bool, str]] = []
        results.update(adapter_file_mib=file_mib, tasks=args.tasks, max_resident=args.max_resident)

        if not args.no_single:
            one = root / "one"
            one.mkdir()
            (one / f"{names[0]}.safetensors").write_bytes((folder / f"{names[0]}.safetensors").read_bytes())
            with ServerProcess(one, common, log_path=root / "one.log") as srv:
                rss_one = rss_mib(srv.proc.pid)
            dep = Deployment("single", ServerProcess(folder, [*common, "--max-resident", str(args.max_resident)],
                                                     log_path=root / "single.log", startup_timeout=600), 1, None, None)
            out = run_deployment(dep, names, images, args, answers)
            rss_k = out["memory_at_start_mib"]["server"]
            out["rss_one_task_mib"] = round(rss_one, 1)
            out["rss_per_resident_task_mib"] = round((rss_k - rss_one) / max(1, args.max_resident - 1), 3)
            print(f"[single] memory: RSS {rss_one:.0f} MiB with 1 task, {rss_k:.0f} MiB with {args.max_resident} "
                  f"resident at start: {out['rss_per_resident_task_mib']:.2f} MiB per resident task", flush=True)
            results["single"] = out
            checks += churn_checks("single", out, args.tasks, args.max_resident, args)

        if not args.no_ray:
            try:
                from ftn.apps.serving.ray_serve import MODEL_ID_HEADER, REPLICA_HEADER
            except ImportError as exc:
                results["ray"] = {"skipped": f"the ray extra is not installed: {exc}"}
                print(f"\n[ray] skipped: {exc}")
            else:
                port_args = [*common, "--ray", "--replicas", str(args.replicas), "--tasks-per-replica",
                             str(args.max_resident), "--max-resident", str(args.max_resident)]
                # Ray on loopback only (every Ray process on 127.0.0.1), as the Ray test does.
                server = ServerProcess(folder, port_args, log_path=root / "ray.log", startup_timeout=600,
                                       env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
                dep = Deployment(f"ray x{args.replicas}", server, args.replicas, REPLICA_HEADER, MODEL_ID_HEADER)
                try:
                    out = run_deployment(dep, names, images, args, answers)
                except RuntimeError as exc:  # Ray did not start: say why, keep the single-process figures
                    log = (root / "ray.log").read_text(errors="replace")[-3000:]
                    results["ray"] = {"failed": str(exc), "log_tail": log}
                    print(f"\n[ray] failed to start: {exc}\n{log}")
                    checks.append(("ray: started", False, str(exc)))
                else:
                    results["ray"] = out
                    checks += churn_checks("ray", out, args.tasks, args.max_resident, args)

        try:
            correctness = check_answers(answers, folder, image_files, args, random.Random(args.seed))
        except Exception as exc:  # noqa: BLE001 - the figures above are still reported, the check fails
            results["answers"] = {"failed": f"{type(exc).__name__}: {exc}"}
            checks.append(("answers equal ftn predict's on the sample", False, results["answers"]["failed"]))
        else:
            results["answers"] = correctness
            checks.append(("answers equal ftn predict's on the sample", correctness["mismatched"] == 0
                           and correctness["answers_checked"] > 0,
                           f"{correctness['answers_checked']} answers of {correctness['sample_tasks']} tasks checked, "
                           f"{correctness['mismatched']} differ, max |prob diff| {correctness['max_prob_diff']:.2e}"))

    print(f"\n{HEADER}")
    for key in ("single", "ray"):
        for p in (results.get(key) or {}).get("phases", []):
            print_phase(key, p)
    print("\nchecks:")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    results["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["load_avg_at_end"] = [round(x, 1) for x in os.getloadavg()]
    print(f"wall {results['wall_s']} s; load average at end {results['load_avg_at_end']} on {os.cpu_count()} CPUs "
          f"(shared machine: figures for orientation)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
