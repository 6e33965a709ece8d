"""Per-layer training-step cost: custom thin-contraction backward vs autograd through W + ΔW.

Runs forward + backward of one FTN layer (input requiring grad, as inside a network) for a few
layer shapes of MobileNetV2 / ResNet-18, alternating the two implementations, and prints the
median time of each, the ratio of medians and of minima (less
sensitive to other processes on a shared machine), next to the FLOP estimate that the automatic per-layer
choice uses (``ftn.core.functional.fast_backward_cost_ratio``).

    python benchmarks/bench_layers.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ftn.core.functional import fast_backward_cost_ratio
from ftn.core.injection import wrap_layer

# (name, C_in, C_out, kernel, stride, groups, batch, spatial)
SHAPES = [
    ("mbv2 1x1 16->96 @32px", 16, 96, 1, 1, 1, 64, 32),
    ("mbv2 1x1 96->24 @16px", 96, 24, 1, 1, 1, 64, 16),
    ("mbv2 1x1 24->144 @16px", 24, 144, 1, 1, 1, 64, 16),
    ("mbv2 1x1 144->32 @8px", 144, 32, 1, 1, 1, 64, 8),
    ("mbv2 1x1 64->384 @4px", 64, 384, 1, 1, 1, 64, 4),
    ("mbv2 1x1 960->320 @2px", 960, 320, 1, 1, 1, 64, 2),
    ("mbv2 dw3x3 144 @16px", 144, 144, 3, 1, 144, 64, 16),
    ("r18 3x3 64->64 @56px", 64, 64, 3, 1, 1, 8, 56),
    ("r18 3x3 128->128 @28px", 128, 128, 3, 1, 1, 8, 28),
    ("r18 3x3 256->256 @14px", 256, 256, 3, 1, 1, 8, 14),
    ("r18 3x3 512->512 @7px", 512, 512, 3, 1, 1, 8, 7),
]


def step(layer, x):
    y = layer(x)
    y.backward(torch.ones_like(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'layer':28s} {'est':>5s} {'autograd ms':>12s} {'custom ms':>10s} {'ratio':>6s} {'min-ratio':>8s}")
    for name, cin, cout, k, stride, groups, batch, hw in SHAPES:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        layer = wrap_layer(conv)
        layer.add_task("t", rank=args.rank)
        layer.context.active = "t"
        x = torch.randn(batch, cin, hw, hw, requires_grad=True)
        times = {False: [], True: []}
        for _ in range(2):  # warm-up
            for mode in times:
                layer.fast_backward = mode
                step(layer, x)
        for _ in range(args.repeats):
            for mode in times:
                layer.fast_backward = mode
                t0 = time.perf_counter()
                step(layer, x)
                times[mode].append(time.perf_counter() - t0)
        auto, fast = (statistics.median(times[m]) * 1e3 for m in (False, True))
        auto_min, fast_min = (min(times[m]) * 1e3 for m in (False, True))
        est = fast_backward_cost_ratio(conv.weight.shape, args.rank, groups)
        print(f"{name:28s} {est:5.2f} {auto:12.2f} {fast:10.2f} {fast / auto:6.2f} {fast_min / auto_min:8.2f}")


if __name__ == "__main__":
    main()
