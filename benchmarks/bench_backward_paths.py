"""Which backward each conv of a real network should take, measured layer by layer.

For every distinct conv of a torchvision model (its real input shape at the given size and
batch), one forward + backward with the input requiring grad, as inside a network, of:

* ``frozen``: the plain conv without weight gradient (what BN + head pays for this layer: the floor),
* ``full``:   the plain conv with its weight gradient (full fine-tuning),
* ``dense``:  FTN's Function with the dense weight gradient contracted onto the factors,
* ``thin``:   FTN's Function with the thin contractions,

interleaved, median of ``--repeats``. Printed per layer: each cost over ``frozen`` and the mode
the automatic choice (``ftn.core.functional.fast_backward_pays_off``) takes. The totals say how much
FTN pays beyond the floor, layer type by layer type. ``--depthwise`` adds the depthwise weight
gradient on small maps: the backend's own against the prepadded input (``ftn.core.functional``).

    python benchmarks/bench_backward_paths.py --threads 1 --model mobilenet_v2@64:64
    python benchmarks/bench_backward_paths.py --threads 1 --model mobilenet_v2@64:64 --channels-last
    python benchmarks/bench_backward_paths.py --threads 1 --model resnet18@224:8
    python benchmarks/bench_backward_paths.py --threads 1 --depthwise
    python benchmarks/bench_backward_paths.py --threads 1 --bound --model mobilenet_v2@64:64 resnet18@224:8

``--bound`` times nothing of the network: it counts, over every conv call, the FLOPs and bytes of
full fine-tuning's weight gradients and of FTN's cheapest factor gradients, and prices both on
this machine's roofline (its measured GEMM peak and read bandwidth): the least FTN's overhead
over the floor could be if its kernels were as efficient as the backend's.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ftn.core.functional import (_depthwise_weight_grad_prepadded, cp_conv, fast_backward_cost_ratio,
                            fast_backward_pays_off)

MODES = ("frozen", "full", "dense", "thin")


def conv_calls(arch: str, size: int, batch: int) -> list[tuple[nn.Conv2d, torch.Size, torch.Size]]:
    """Every conv call of ``arch`` in one forward, in order: (module, input shape, output shape)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    calls, hooks = [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda mod, inputs, out: calls.append((mod, inputs[0].shape, out.shape))))
    with torch.no_grad():
        model.eval()(torch.zeros(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return calls


def conv_inputs(arch: str, size: int, batch: int) -> list[tuple[nn.Conv2d, torch.Size]]:
    """Each distinct (weight shape, stride, input shape) conv of ``arch`` with its input shape."""
    seen, found = set(), []
    for module, in_shape, _ in conv_calls(arch, size, batch):
        key = (tuple(module.weight.shape), module.stride, tuple(in_shape))
        if key not in seen:
            seen.add(key)
            found.append((module, in_shape))
    return found


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def time_layer(conv: nn.Conv2d, in_shape, rank: int, repeats: int, fmt) -> dict[str, float]:
    x = torch.randn(in_shape).contiguous(memory_format=fmt).requires_grad_()
    conv = copy.deepcopy(conv).to(memory_format=fmt)
    gy = torch.randn_like(conv(x)).contiguous(memory_format=fmt)
    frozen = copy.deepcopy(conv).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(d, rank, generator=g) * 0.1).requires_grad_()
               for d in (conv.out_channels, conv.in_channels // conv.groups, conv.weight[0, 0].numel())]
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def run(mode):
        if mode == "frozen":
            y = frozen(x)
        elif mode == "full":
            y = conv(x)
        else:
            y = cp_conv(x, frozen.weight, None, factors, *args, thin=mode == "thin")
        y.backward(gy)
        x.grad = None
        conv.weight.grad = None
        for f in factors:
            f.grad = None

    times = interleaved({m: (lambda m=m: run(m)) for m in MODES}, repeats)
    return {m: statistics.median(v) * 1e3 for m, v in times.items()}


def kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "1x1" if conv.kernel_size == (1, 1) else f"{conv.kernel_size[0]}x{conv.kernel_size[1]}"


def layers_report(model: str, rank: int, repeats: int, fmt) -> None:
    name, _, rest = model.partition("@")
    size, _, batch = rest.partition(":")
    print(f"\n## {model} ({'channels-last' if fmt is torch.channels_last else 'contiguous'}), rank {rank}")
    print(f"{'layer (C_out, C_in/g, k, k) @ map':40s} {'est':>5s} {'auto':>5s} {'frozen':>7s} "
          f"{'full+':>6s} {'dense+':>6s} {'thin+':>6s}   (ms; + = over frozen)")
    totals: dict[str, dict[str, float]] = {}
    for conv, in_shape in conv_inputs(name, int(size), int(batch or 64)):
        t = time_layer(conv, in_shape, rank, repeats, fmt)
        est = fast_backward_cost_ratio(conv.weight.shape, rank, conv.groups)
        auto = "thin" if fast_backward_pays_off(conv.weight.shape, rank, conv.groups, conv.stride) else "dense"
        over = {m: t[m] - t["frozen"] for m in MODES}
        label = f"{tuple(conv.weight.shape)} s{conv.stride[0]} @{in_shape[-2]}x{in_shape[-1]}"
        print(f"{label:40s} {est:5.2f} {auto:>5s} {t['frozen']:7.2f} {over['full']:6.2f} "
              f"{over['dense']:6.2f} {over['thin']:6.2f}")
        total = totals.setdefault(kind(conv), {"full": 0.0, "auto": 0.0, "best": 0.0, "n": 0})
        total["full"] += over["full"]
        total["auto"] += over[auto]
        total["best"] += min(over["dense"], over["thin"])
        total["n"] += 1
    print("per kind (distinct shapes once), ms over frozen: full fine-tuning | FTN auto | FTN best of two")
    for k, v in totals.items():
        print(f"  {k:10s} n={v['n']:2d}  {v['full']:7.2f} | {v['auto']:7.2f} | {v['best']:7.2f}")


def machine_roofline() -> tuple[float, float]:
    """This machine's FLOP/s on a large float32 GEMM and its read bandwidth (B/s, a 256 MB sum),
    at the current thread count: the two slopes of a roofline."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = torch.randn(64 * 2 ** 20)
    best = {k: min(v) for k, v in interleaved({"gemm": lambda: a @ b, "sum": big.sum}, 5).items()}
    return 2 * 2048 ** 3 / best["gemm"], big.numel() * big.element_size() / best["sum"]


def bound_report(model: str, rank: int, peak: float, bandwidth: float) -> None:
    """The least work FTN's factor gradients can cost, against full fine-tuning's weight
    gradients, over every conv call of a forward (no timing of the network itself).

    Per conv: full fine-tuning's weight gradient takes 2·N·P·C_out·(C_in/g)·S FLOPs; FTN's factor
    gradients take the cheaper of that (the dense path also needs the whole weight gradient) and
    the thin contractions (``fast_backward_cost_ratio`` × that). Either reads X and dY at least
    once. A roofline time is max(FLOPs / peak, bytes / bandwidth). The ratio of the sums is what
    FTN's overhead over the floor would be if its kernels ran as close to the roofline as the
    backend's weight gradient does, and if nothing else (optimizer, rebuilding W + ΔW) counted:
    a lower bound for the overhead, not a prediction.
    """
    name, _, rest = model.partition("@")
    size, _, batch = rest.partition(":")
    totals: dict[str, dict[str, float]] = {}
    for conv, in_shape, out_shape in conv_calls(name, int(size), int(batch or 64)):
        positions = out_shape[0] * out_shape[2] * out_shape[3]
        dense = 2 * positions * conv.weight[0].numel() * conv.out_channels
        ratio = fast_backward_cost_ratio(conv.weight.shape, rank, conv.groups)
        auto = fast_backward_pays_off(conv.weight.shape, rank, conv.groups, conv.stride)
        traffic = 4 * (math.prod(in_shape) + math.prod(out_shape))  # float32 X and dY, read once

        def roof(flops):
            return max(flops / peak, traffic / bandwidth)

        row = {"full_flops": dense, "ftn_flops": min(dense, dense * ratio),
               "auto_flops": dense * ratio if auto else dense,
               "full_roof": roof(dense), "ftn_roof": roof(min(dense, dense * ratio)), "n": 1}
        for key in (kind(conv), "all"):
            total = totals.setdefault(key, dict.fromkeys(row, 0.0))
            for k, v in row.items():
                total[k] += v
    print(f"\n## {model}, rank {rank}: lower bound of FTN's factor-gradient work ÷ full fine-tuning's "
          f"weight gradients (all {int(totals['all']['n'])} conv calls)")
    print(f"{'kind':10s} {'calls':>5s} {'full GFLOP':>10s} {'FLOPs: FTN min':>14s} {'FTN auto':>8s} "
          f"{'full roofline ms':>16s} {'roofline: FTN min':>17s}")
    for k, v in sorted(totals.items(), key=lambda kv: kv[0] == "all"):  # the total last
        print(f"{k:10s} {int(v['n']):5d} {v['full_flops'] / 1e9:10.2f} {v['ftn_flops'] / v['full_flops']:14.3f} "
              f"{v['auto_flops'] / v['full_flops']:8.3f} {v['full_roof'] * 1e3:16.1f} "
              f"{v['ftn_roof'] / v['full_roof']:17.3f}")


def depthwise_report(repeats: int) -> None:
    print("\n## depthwise 3x3 weight gradient on small maps (batch 64): backend vs prepadded input")
    print(f"{'channels @ map, stride':26s} {'backend ms':>10s} {'prepadded ms':>12s}  rule (H < k + s - 1)")
    for c, h, s in [(960, 2, 1), (576, 2, 1), (384, 3, 2), (384, 3, 1), (384, 4, 2), (384, 5, 2), (144, 16, 1)]:
        x = torch.randn(64, c, h, h)
        w = torch.randn(c, 1, 3, 3)
        gy = torch.randn_like(F.conv2d(x, w, stride=s, padding=1, groups=c))
        conv = ([s, s], [1, 1], [1, 1], c)  # stride, padding, dilation, groups
        backend = lambda: torch.ops.aten.convolution_backward(gy, x, w, None, *conv[:3], False, [0, 0], c,
                                                              [False, True, False])
        padded = lambda: _depthwise_weight_grad_prepadded(gy, x, w, *conv)  # what FTN's backward runs
        times = interleaved({"backend": backend, "padded": padded}, repeats)
        b, p = (statistics.median(times[k]) * 1e3 for k in times)
        print(f"{f'{c} @ {h}x{h}, s{s}':26s} {b:10.2f} {p:12.2f}  {'prepad' if h < 3 + s - 1 else '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=[], help="arch@size:batch, e.g. mobilenet_v2@64:64")
    parser.add_argument("--depthwise", action="store_true")
    parser.add_argument("--bound", action="store_true",
                        help="for each --model, the FLOP and roofline lower bound of FTN's factor-gradient "
                             "work against full fine-tuning's weight gradients, instead of timing its layers")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.bound:
        peak, bandwidth = machine_roofline()
        print(f"roofline of this machine: {peak / 1e9:.1f} GFLOP/s (2048² GEMM), {bandwidth / 1e9:.1f} GB/s read")
    for model in args.model:
        if args.bound:
            bound_report(model, args.rank, peak, bandwidth)
        else:
            layers_report(model, args.rank, args.repeats, fmt)
    if args.depthwise:
        depthwise_report(args.repeats)


if __name__ == "__main__":
    main()
