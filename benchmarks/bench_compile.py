"""``train.compile``: the training step (forward, backward and the AdamW step) compiled with
inductor, for FTN against full fine-tuning: graph breaks, kernels inductor generates for one step
(the loss's forward + backward and the optimizer's step apart), compile time, and the step time
compiled ÷ eager (interleaved, medians).

    python benchmarks/bench_compile.py                          # ResNet-18, 64 px, batch 4, CPU
    python benchmarks/bench_compile.py --models resnet18 mobilenet_v2 --device cuda --batch 32 --mode reduce-overhead

What is compiled is what the engine compiles (``ftn.training.engine._compiled``): the loss of a
batch, whose backward AOTAutograd compiles too, and the AdamW (foreach) step, its rate a tensor
and ``capturable=True`` as ``ftn.training.engine._optimizers`` builds it under ``train.compile``. On a CPU
the kernels are C++ loops (a fused elementwise chain is one kernel); on CUDA, Triton kernels, and
``--mode reduce-overhead`` replays the whole graph as one CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402  (the methods' builders)

from ftn.training.engine import _compiled  # noqa: E402


def step_fn(m: bt.Method, loss_fn, compiled: bool, mode: str):
    """The step's parts: (loss and backward, optimizer step), each compiled or eager."""
    if compiled:
        opt = torch.optim.AdamW(m.params, lr=torch.tensor(1e-3, device=bt.DEVICE), foreach=True, capturable=True)
    else:
        opt = bt.make_optimizer(m.params)
    loss_of = _compiled(lambda batch: loss_fn(m.train_model(batch[0]), batch[1]), mode if compiled else "off")
    opt_step = _compiled(opt.step, mode if compiled else "off")

    def backward(x, y):
        opt.zero_grad(set_to_none=True)
        loss_of((x, y)).backward()

    return backward, opt_step


def whole(parts):
    backward, opt_step = parts

    def step(x, y):
        backward(x, y)
        opt_step()
        bt.sync()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"])
    p.add_argument("--methods", nargs="+", default=["full", "ftn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mode", default="default", help="train.compile's value (default, reduce-overhead, ...)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    bt.DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    from torch._inductor import metrics

    results = {}
    for arch in args.models:
        backbone, dim = bt.make_backbone(arch)
        x = torch.randn(args.batch, 3, args.size, args.size, device=bt.DEVICE)
        y = torch.randint(0, bt.NUM_CLASSES, (args.batch,), device=bt.DEVICE)
        loss_fn = nn.CrossEntropyLoss()
        steps = {}
        for method in args.methods:
            m = bt.build(method, backbone, dim)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda a, b: loss_fn(m.train_model(a), b))(x, y)
            torch._dynamo.reset()
            metrics.reset()
            backward, opt_step = parts = step_fn(m, loss_fn, True, args.mode)
            started = time.perf_counter()
            backward(x, y)  # compiles forward and backward
            kernels = metrics.generated_kernel_count
            opt_step()  # compiles the optimizer's step
            bt.sync()
            compile_s = time.perf_counter() - started
            opt_kernels = metrics.generated_kernel_count - kernels
            steps[method] = {"eager": whole(step_fn(m, loss_fn, False, args.mode)), "compiled": whole(parts)}
            results[f"{arch} {method}"] = {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                                           "kernels": kernels, "optimizer_kernels": opt_kernels,
                                           "compile_seconds": round(compile_s, 1)}
            print(f"{arch} {method:5s}: {explained.graph_count} graph(s), {explained.graph_break_count} break(s), "
                  f"{kernels} kernels generated for forward + backward and {opt_kernels} for the AdamW step, "
                  f"compiled in {compile_s:.0f} s", flush=True)
        times = {(mth, kind): [] for mth in steps for kind in ("eager", "compiled")}
        for _ in range(args.rounds):  # interleaved: the machine's load hits every variant alike
            for (mth, kind), ts in times.items():
                started = time.perf_counter()
                steps[mth][kind](x, y)
                ts.append(time.perf_counter() - started)
        for mth in steps:
            eager, comp = (statistics.median(times[(mth, k)]) for k in ("eager", "compiled"))
            results[f"{arch} {mth}"].update(eager_ms=round(eager * 1e3, 2), compiled_ms=round(comp * 1e3, 2))
            print(f"{arch} {mth:5s}: step {eager * 1e3:.1f} ms eager, {comp * 1e3:.1f} ms compiled "
                  f"({comp / eager:.2f}×)")
        if {"ftn", "full"} <= steps.keys():
            ftn, full = results[f"{arch} ftn"], results[f"{arch} full"]
            k = (ftn["kernels"] + ftn["optimizer_kernels"]) / max(full["kernels"] + full["optimizer_kernels"], 1)
            print(f"{arch}: FTN ÷ full fine-tuning, kernels per compiled step (optimizer included): {k:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
