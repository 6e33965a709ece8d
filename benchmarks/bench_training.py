"""Training-step time, parameters, eval latency (and optionally peak memory) of FTN against full
fine-tuning, linear probe, BN + head and PEFT LoRA / LoHa / LoKr, on the same backbone and data.

Every method runs interleaved in one process (one step of each method per round, so a slow
spell on a shared machine hits all of them), and medians over rounds are reported with their
ratio to full fine-tuning. Backbones use random weights (speed does not depend on the values).

    python benchmarks/bench_training.py                 # all models, ~10 min on 2 cores
    python benchmarks/bench_training.py --quick         # one small config, ~1 min
    python benchmarks/bench_training.py --memory        # + peak RSS and tensor peak per method, fresh processes
    python benchmarks/bench_training.py --device cuda --amp bf16 --memory --configs resnet18@224:32

On the CPU the steps are timed with glibc's malloc told to keep freed memory (``--malloc tuned``,
the default; see ``MALLOC_TUNABLES``), which removes page-fault noise; memory is measured in
children with the allocator as it is.

A configuration may carry its own batch size (``resnet18@224:32``). On CUDA, ``--memory``
measures the peak GPU memory of building + 3 training steps of each method in-process
(``torch.cuda.max_memory_allocated`` above what was allocated before, empty cache in between);
``--amp bf16`` runs training and eval steps under ``torch.autocast`` (bfloat16).

Methods: ``full`` (all weights), ``linear`` (head only), ``bn_head`` (BatchNorm affine + head),
``ftn_autograd`` (FTN, W + ΔW built per step, autograd backward), ``ftn`` (FTN, default
per-layer choice of the custom thin-contraction backward), ``ftn_custom`` (opt-in: custom
backward forced on every plain layer, depthwise included), ``ftn_lora_layers`` (FTN on PEFT
LoRA's targets only, depthwise convs left frozen: the same placement as ``lora``), and PEFT ``lora`` / ``loha`` / ``lokr`` with
their rank chosen so that their adapter parameters are closest to FTN's ΔW parameters. PEFT
requires the rank to be divisible by the groups of a conv, so grouped / depthwise convs are
left out of its targets (FTN adapts them). All methods use AdamW and cross-entropy on random
labels; BatchNorm layers are in train mode (PEFT methods: frozen affine, moving statistics).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from ftn import FTNConfig, FTNModel
from ftn.training.backbones import strip_classifier
from ftn.training.methods import ftn_delta_budget, lora_targets

METHODS = ["full", "linear", "bn_head", "ftn_autograd", "ftn", "lora", "loha", "lokr"]
# ftn_custom (thin contractions on depthwise convs too) is slow: opt-in; ftn_recompute: FTN with
# FTNModel.recompute_depthwise (less memory, one more depthwise conv per layer in the backward);
# ftn_lora_layers: FTN on PEFT LoRA's targets only (placement matched to lora).
ALL_METHODS = [*METHODS, "ftn_custom", "ftn_recompute", "ftn_lora_layers"]
CONFIGS = {  # name: (torchvision model, image size, batch)
    "mobilenet_v2@64": ("mobilenet_v2", 64, 64),
    "mobilenet_v2@224": ("mobilenet_v2", 224, 16),
    "resnet18@224": ("resnet18", 224, 8),
    "resnet34@224": ("resnet34", 224, 32),  # the GPU script's configuration (benchmarks/gpu.sh)
}
DEVICE = torch.device("cpu")
AMP: torch.dtype | None = None  # autocast dtype for training and eval steps (--amp)
# --channels-last: backbones and batches in NHWC, the faster layout for every method on the CPU.
MEMORY_FORMAT = torch.contiguous_format


def autocast():
    return torch.autocast(DEVICE.type, dtype=AMP) if AMP is not None else contextlib.nullcontext()


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
NUM_CLASSES = 10
FTN_RANK = 8


class Net(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


@dataclass
class Method:
    name: str
    train_model: nn.Module  # called as train_model(x)
    params: list
    stored: int  # numbers kept per task (trainable + per-task buffers)
    eval_unmerged: nn.Module | None = None
    eval_merged: nn.Module | None = None
    info: dict = field(default_factory=dict)
    compiled: nn.Module | None = None  # --compile: what train_step calls instead of train_model


def make_backbone(arch: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)(weights=None))
    return backbone.to(DEVICE, memory_format=MEMORY_FORMAT), dim


def peft_targets(backbone: nn.Module) -> list[str]:
    # The same targets as the training harness's LoRA baseline (grouped / depthwise convs left
    # out: PEFT needs rank % groups == 0).
    return lora_targets(backbone, "")


def peft_model(kind: str, backbone: nn.Module, dim: int, rank: int):
    import peft

    targets = [f"backbone.{n}" for n in peft_targets(backbone)]
    cfg = {"lora": lambda: peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                           modules_to_save=["head"]),
           "loha": lambda: peft.LoHaConfig(r=rank, alpha=rank, target_modules=targets, modules_to_save=["head"]),
           "lokr": lambda: peft.LoKrConfig(r=rank, alpha=rank, target_modules=targets, modules_to_save=["head"])}[kind]()
    net = Net(copy.deepcopy(backbone), nn.Linear(dim, NUM_CLASSES)).to(DEVICE)
    return peft.get_peft_model(net, cfg)


def adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "modules_to_save" not in n)


def matched_rank(kind: str, backbone: nn.Module, dim: int, budget: int) -> tuple[int, int]:
    """PEFT rank whose adapter parameter count is closest to ``budget``."""
    best = None
    for rank in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
        n = adapter_params(peft_model(kind, backbone, dim, rank))
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (rank, n)
        if n > budget:
            break
    return best


def build(method: str, backbone: nn.Module, dim: int, ftn_budget: int | None = None,
          peft_rank: int | None = None) -> Method:
    if method in ("full", "linear", "bn_head"):
        net = Net(copy.deepcopy(backbone), nn.Linear(dim, NUM_CLASSES)).to(DEVICE)
        if method == "full":
            params = list(net.parameters())
            stored = params_count(net) + sum(b.numel() for b in net.buffers())
        else:
            net.backbone.requires_grad_(False)
            params = list(net.head.parameters())
            if method == "bn_head":
                for m in net.backbone.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.requires_grad_(True)
                        params += list(m.parameters())
            stored = sum(p.numel() for p in params)
            if method == "bn_head":
                stored += sum(b.numel() for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)
                              for b in m.buffers())
        return Method(method, net, params, stored, eval_unmerged=net, eval_merged=net)
    if method.startswith("ftn"):
        # ftn_lora_layers: FTN on exactly PEFT LoRA's targets (no depthwise convs), to compare
        # the two methods' costs at the same placement.
        include = peft_targets(backbone) if method == "ftn_lora_layers" else None
        model = FTNModel(copy.deepcopy(backbone), config=FTNConfig(rank=FTN_RANK, include=include))
        model.add_task("t", head=nn.Linear(dim, NUM_CLASSES))
        with torch.no_grad():  # a trained-looking ΔW (A = 0 at init would make merge trivial)
            for layer in model.adapted_layers().values():
                if "t" in layer.tasks:
                    layer.tasks["t"].factors[0].normal_(0, 1e-3)
        mode = {"ftn_autograd": False, "ftn_custom": True}.get(method)  # None: the automatic choice
        if method == "ftn_recompute":  # depthwise outputs rebuilt in the backward (memory)
            model.recompute_depthwise()
        for layer in model.adapted_layers().values():
            layer.fast_backward = mode
        model.set_task("t")
        report = model.parameter_report().tasks["t"]
        custom = sum(1 for layer in model.adapted_layers().values()
                     if "t" in layer.tasks and layer._use_fast_backward(layer.tasks["t"]))
        return Method(method, model, model.task_parameters("t"),
                      report.delta + report.norms + report.norm_buffers + report.head,
                      eval_unmerged=model, eval_merged=None,
                      info={"delta_params": report.delta, "custom_backward_layers": custom,
                            "adapted_layers": len(model.adapted_layers())})
    kind = method
    if peft_rank is None:
        rank, n = matched_rank(kind, backbone, dim, ftn_budget)
    else:
        rank, n = peft_rank, None
    model = peft_model(kind, backbone, dim, rank)
    n = adapter_params(model) if n is None else n
    params = [p for p in model.parameters() if p.requires_grad]
    return Method(method, model, params, sum(p.numel() for p in params), eval_unmerged=model,
                  info={"rank": rank, "adapter_params": n})


def params_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Timing on the CPU: glibc returns freed blocks of 128 KB to 32 MB to the kernel (its mmap and
# trim thresholds adapt), so a step may allocate fresh pages again and pay their page faults: on
# MobileNetV2 64 px b64 we counted 0 to 37,000 minor faults and 0 to 68 ms of system time per
# step of the same method, at random. Keeping freed memory (what PyTorch's caching allocator does
# on a GPU) removes that noise: 0 faults per step. --malloc default measures without it.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"


def restart_with_tuned_malloc() -> None:
    """Re-executes this script with MALLOC_TUNABLES (glibc reads them only at start-up); does
    nothing off Linux or where GLIBC_TUNABLES is already set (the header reports what ran)."""
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, "FTN_BENCH_MALLOC_SET": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def make_optimizer(params):
    """AdamW as the engine builds it (``ftn.training.engine._optimizers``: multi-tensor updates)."""
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def train_step(m: Method, opt, x, y, loss_fn) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = loss_fn((m.compiled if m.compiled is not None else m.train_model)(x), y)
    loss.backward()
    opt.step()


def merged_eval_model(m: Method) -> nn.Module | None:
    if m.name.startswith("ftn"):
        return m.train_model.merge("t").eval()
    if m.name in ("lora", "loha", "lokr"):
        return copy.deepcopy(m.train_model).merge_and_unload().eval()
    return m.eval_merged


@torch.no_grad()
def eval_latency(models: dict[str, nn.Module], x, rounds: int) -> dict[str, float]:
    for model in models.values():
        model.eval()
        with autocast():
            model(x)  # warm-up; builds the FTN eval cache
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, model in models.items():
            sync()
            t0 = time.perf_counter()
            with autocast():
                model(x)
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_batch(size: int, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(DEVICE, memory_format=MEMORY_FORMAT)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(DEVICE)
    return x, y


def run_config(name: str, methods: list[str], rounds: int, warmup: int, eval_rounds: int,
               compile_step: bool = False) -> dict:
    arch, size, batch = CONFIGS[name]
    backbone, dim = make_backbone(arch)
    budget = ftn_delta_budget(backbone, rank=FTN_RANK)
    built = {m: build(m, backbone, dim, budget) for m in methods}
    if compile_step:  # --compile: each training model through torch.compile (inductor); eval stays eager
        for m in built.values():
            m.compiled = torch.compile(m.train_model)
        warmup = max(warmup, 2)  # the first call compiles the forward, the first backward its graph
    x, y = make_batch(size, batch)
    loss_fn = nn.CrossEntropyLoss()
    opts = {k: make_optimizer(m.params) for k, m in built.items()}
    for m in built.values():
        m.train_model.train()
    for _ in range(warmup):
        for k, m in built.items():
            train_step(m, opts[k], x, y, loss_fn)
    times = {k: [] for k in built}
    for _ in range(rounds):
        for k, m in built.items():
            sync()
            t0 = time.perf_counter()
            train_step(m, opts[k], x, y, loss_fn)
            sync()
            times[k].append(time.perf_counter() - t0)
    step = {k: statistics.median(v) for k, v in times.items()}
    step_min = {k: min(v) for k, v in times.items()}

    # Eval latency: the plain backbone (+ head) is the reference every method is compared with.
    eval_models = {"backbone": Net(copy.deepcopy(backbone), nn.Linear(dim, NUM_CLASSES)).to(DEVICE)}
    for k, m in built.items():
        if k in ("ftn", "lora", "loha", "lokr"):
            eval_models[f"{k}:unmerged"] = m.eval_unmerged
            eval_models[f"{k}:merged"] = merged_eval_model(m)
    latency = eval_latency(eval_models, x, eval_rounds)

    full = step.get("full")
    rows = {}
    for k, m in built.items():
        rows[k] = {"step_ms": step[k] * 1e3, "step_min_ms": step_min[k] * 1e3,
                   "ratio_vs_full": step[k] / full if full else None,
                   "ratio_min_vs_full": step_min[k] / step_min["full"] if full else None,
                   # Median over rounds of this round's step / full's step in the same round: the
                   # paired ratio, less moved by slow drifts of the machine than a ratio of medians.
                   "ratio_paired_vs_full": statistics.median(a / b for a, b in zip(times[k], times["full"]))
                   if full else None,
                   "trainable": sum(p.numel() for p in m.params), "stored": m.stored, **m.info}
    return {"config": name, "arch": arch, "size": size, "batch": batch, "rounds": rounds,
            "methods": rows, "eval_ms": {k: v * 1e3 for k, v in latency.items()},
            "eval_ratio_vs_backbone": {k: v / latency["backbone"] for k, v in latency.items()}}


def memory_child_env() -> dict[str, str]:
    """The environment of a memory-measuring child: the tunables this script set for timing are
    dropped, so peaks are those of the allocator as users run it."""
    env = dict(os.environ)
    if env.pop("FTN_BENCH_MALLOC_SET", None):
        env.pop("GLIBC_TUNABLES", None)
    return env


def child_memory(config: str, method: str, steps: int, tensors: bool = False) -> dict:
    """Runs in a fresh process: the peak memory of building + ``steps`` training steps of one
    method. Default: the process's peak RSS. ``tensors``: the peak of live tensor bytes above
    what was allocated before (the CPU counterpart of :func:`cuda_memory`), counted from the
    allocator's events under ``torch.profiler`` (``profile_memory``); unlike the RSS it leaves
    out the interpreter, the libraries and the allocator's retained pages (about 700 MB that no
    method changes)."""
    from torch.profiler import ProfilerActivity, profile

    arch, size, batch = CONFIGS[config]
    backbone, dim = make_backbone(arch)
    rank = None
    if method in ("lora", "loha", "lokr"):  # the rank search builds models: before the measured part
        rank, _ = matched_rank(method, backbone, dim, ftn_delta_budget(backbone, rank=FTN_RANK))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=MEMORY_FORMAT)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    measured = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if tensors else contextlib.nullcontext()
    with measured as prof:
        m = build(method, backbone, dim, peft_rank=rank)
        if not tensors:  # the source copy is no part of the method's RSS (the tensor count
            del backbone  # starts above it: freeing it there would only lower the baseline)
        opt = make_optimizer(m.params)
        m.train_model.train()
        before = rss_mb()
        for _ in range(steps):
            train_step(m, opt, x, y, nn.CrossEntropyLoss())
    if not tensors:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec,
        # so every child would report the (larger) benchmark parent's peak.
        return {"peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": before}
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return {"tensor_peak_mb": round(peak / 2**20, 1)}


def cuda_memory(config: str, method: str, steps: int, peft_rank: int | None) -> dict:
    """In-process on CUDA: peak GPU memory of building + ``steps`` training steps of one method,
    above what was allocated before (the shared frozen backbone and the batch)."""
    arch, size, batch = CONFIGS[config]
    backbone, dim = make_backbone(arch)
    x, y = make_batch(size, batch)
    gc.collect()
    torch.cuda.empty_cache()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    m = build(method, backbone, dim, peft_rank=peft_rank)
    opt = make_optimizer(m.params)
    m.train_model.train()
    for _ in range(steps):
        train_step(m, opt, x, y, nn.CrossEntropyLoss())
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del m, opt, backbone, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return {"gpu_peak_mb": round(peak, 1)}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_config(res: dict) -> None:
    print(f"\n## {res['config']} (batch {res['batch']}, {res['rounds']} interleaved rounds)")
    print(f"{'method':14s} {'step ms':>9s} {'× full':>7s} {'× full(min)':>11s} {'paired':>7s} {'trainable':>10s} "
          f"{'stored':>10s}  info")
    for k, r in res["methods"].items():
        info = {i: v for i, v in r.items() if i not in ("step_ms", "step_min_ms", "ratio_vs_full", "ratio_min_vs_full",
                                                         "ratio_paired_vs_full", "trainable", "stored")}
        print(f"{k:14s} {r['step_ms']:9.1f} {r['ratio_vs_full']:7.2f} {r['ratio_min_vs_full']:11.2f} "
              f"{r['ratio_paired_vs_full']:7.2f} {r['trainable']:10,d} {r['stored']:10,d}  {info or ''}")
    print(f"{'eval':20s} {'ms':>8s} {'× backbone':>10s}")
    for k, v in res["eval_ms"].items():
        print(f"{k:20s} {v:8.2f} {res['eval_ratio_vs_backbone'][k]:10.2f}")


def summary(res: dict) -> dict:
    """The issue's target quantities: floor f = BN+head / full, overhead over the floor
    (method − f) / (1 − f), FTN vs LoRA, memory and unmerged-eval ratios."""
    rows, out = res["methods"], {}
    if "full" in rows and "bn_head" in rows:
        f = rows["bn_head"]["ratio_vs_full"]
        out["floor"] = round(f, 3)
        fp = rows["bn_head"]["ratio_paired_vs_full"]  # the same from paired per-round ratios
        out["floor_paired"] = round(fp, 3)
        for k in rows:
            if k not in ("full", "linear", "bn_head"):  # every adapter method run
                out[f"overhead_{k}"] = round((rows[k]["ratio_vs_full"] - f) / (1 - f), 3)
                out[f"overhead_paired_{k}"] = round((rows[k]["ratio_paired_vs_full"] - fp) / (1 - fp), 3)
    if "ftn" in rows and "lora" in rows:
        out["ftn_over_lora"] = round(rows["ftn"]["step_ms"] / rows["lora"]["step_ms"], 3)
    if "ftn_lora_layers" in rows and "lora" in rows:
        out["ftn_lora_layers_over_lora"] = round(rows["ftn_lora_layers"]["step_ms"] / rows["lora"]["step_ms"], 3)
    mem = res.get("memory", {})
    for key in ("gpu_peak_mb", "tensor_peak_mb", "peak_rss_mb"):
        if key in mem.get("full", {}):
            name = {"peak_rss_mb": "memory_vs_full"}.get(key, f"{key.removesuffix('_mb')}_vs_full")
            out[name] = {k: round(v[key] / mem["full"][key], 3) for k, v in mem.items()}
    if "ftn:unmerged" in res["eval_ratio_vs_backbone"]:
        out["ftn_unmerged_eval_vs_backbone"] = round(res["eval_ratio_vs_backbone"]["ftn:unmerged"], 3)
    return out


def parse_config(text: str) -> str:
    """``name`` or ``name:batch`` (registers the batch override under the full text)."""
    name, _, batch = text.partition(":")
    if name not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown config {name!r}; choose from {list(CONFIGS)}")
    if batch:
        CONFIGS[text] = (*CONFIGS[name][:2], int(batch))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "resnet34@224"],
                        type=parse_config, help=f"{list(CONFIGS)}, optionally with :batch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off",
                        help="torch.autocast dtype for training and eval steps")
    parser.add_argument("--batch", type=int, help="override the configurations' batch size")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=ALL_METHODS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2@64 only, 5 rounds")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS per method in a fresh process (CUDA: peak GPU memory, in-process)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each method's training model (inductor); timing excludes compilation")
    parser.add_argument("--channels-last", action="store_true",
                        help="backbones and batches in channels-last (NHWC) memory format")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned (CPU, glibc): time the steps with glibc's malloc keeping freed memory "
                             "(see MALLOC_TUNABLES); default: the process's allocator as it is")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--child-tensors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, AMP, MEMORY_FORMAT
    DEVICE = torch.device(args.device)
    if args.malloc == "tuned" and DEVICE.type == "cpu" and not args.child:
        restart_with_tuned_malloc()
    if args.channels_last:
        MEMORY_FORMAT = torch.channels_last
    AMP = {"off": None, "bf16": torch.bfloat16}[args.amp]
    if args.batch:
        for name, (arch, size, _) in list(CONFIGS.items()):
            if ":" in name:  # an explicit name:batch wins
                continue
            CONFIGS[name] = (arch, size, args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(parse_config(args.child[0]), args.child[1], steps=3,
                                      tensors=args.child_tensors)))
        return
    if args.quick:
        args.configs, args.rounds, args.eval_rounds = ["mobilenet_v2@64"], 5, 5
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "malloc": os.environ.get("GLIBC_TUNABLES", "default"), "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "command": " ".join(sys.argv)}
    print(json.dumps(header))
    results = []
    for config in args.configs:
        res = run_config(config, args.methods, args.rounds, args.warmup, args.eval_rounds, args.compile)
        if args.memory and DEVICE.type == "cuda":
            res["memory"] = {method: cuda_memory(config, method, 3, res["methods"][method].get("rank"))
                             for method in args.methods}
        elif args.memory:
            res["memory"] = {}
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", config, method, "--amp", args.amp]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.channels_last:
                    cmd += ["--channels-last"]
                res["memory"][method] = {}
                for extra in ([], ["--child-tensors"]):  # RSS and tensor peak, a process each
                    out = subprocess.run(cmd + extra, capture_output=True, text=True, check=True,
                                         env=memory_child_env()).stdout
                    res["memory"][method].update(json.loads(out.strip().splitlines()[-1]))
        print_config(res)
        if args.memory:
            keys = ["gpu_peak_mb"] if DEVICE.type == "cuda" else ["tensor_peak_mb", "peak_rss_mb"]
            label = {"gpu_peak_mb": "GPU", "tensor_peak_mb": "tensors", "peak_rss_mb": "RSS"}
            for key in keys:
                full = res["memory"].get("full", {}).get(key)
                for method, mem in res["memory"].items():
                    ratio = f"{mem[key] / full:.3f}" if full else "-"
                    print(f"memory {method:14s} peak {label[key]:7s} {mem[key]:8.0f} MB  (× full {ratio})")
        res["summary"] = summary(res)
        print(f"summary {res['config']} (amp {args.amp}): {json.dumps(res['summary'])}")
        results.append(res)
        sys.stdout.flush()
        if args.json:  # after every configuration, so a run stopped by a timeout keeps what it did
            with open(args.json, "w") as f:
                json.dump({"header": header, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
