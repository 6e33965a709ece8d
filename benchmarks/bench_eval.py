"""Unmerged-inference overhead: plain backbone vs FTN merged vs FTN unmerged (cached W + ΔW).

Interleaves the models round by round in one process (``no_grad``, eval) and prints the
medians, the ratios to the plain backbone and the absolute per-forward overhead of the wrappers
(unmerged − merged). With a tiny input (``32 px, batch 1``) the convs cost almost nothing, so
that difference is the framework's Python, which a benchmark batch then divides by its forward
time. ``unmerged`` is ``model(x, task=...)``: the task's backbone as plain modules with the cached
W + ΔW, checked once per pass; ``wrappers`` runs the same model through its wrappers
(``backbone_features``, the path of mixed batches and of models it cannot flatten), the way
every unmerged forward ran before. ``check`` and ``view`` split ``unmerged`` into its two parts,
timed in the same rounds: the per-pass check that the task's view is still valid
(``_PlainBackbone.valid()``: the factors compared by value with the copies kept, the rest by
identity and stamp) and the view's forward alone (plain modules with the cached W + ΔW, then
the head: what unmerged inference costs without the check).

    python benchmarks/bench_eval.py --threads 1 --rounds 300 --configs resnet18@32:1 mobilenet_v2@32:1
    python benchmarks/bench_eval.py --threads 1 --rounds 40     # the bench_training.py configs
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

import bench_training as bt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+",
                        default=["mobilenet_v2@64", "mobilenet_v2@224", "resnet18@224", "resnet34@224"],
                        help="arch@size[:batch]; arch@size of bench_training.py takes its batch")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="as in bench_training.py: glibc's malloc keeps freed memory (no page-fault noise)")
    args = parser.parse_args()
    if args.malloc == "tuned":
        bt.restart_with_tuned_malloc()
    print(f"malloc: {os.environ.get('GLIBC_TUNABLES', 'default')}, threads {args.threads or torch.get_num_threads()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for config in args.configs:
        name, _, batch = config.partition(":")
        if name in bt.CONFIGS:
            arch, size, default_batch = bt.CONFIGS[name]
        else:
            arch, size, default_batch = name.split("@")[0], int(name.split("@")[1]), 1
        batch = int(batch) if batch else default_batch
        backbone, dim = bt.make_backbone(arch)
        m = bt.build("ftn", backbone, dim)
        ftn_model = m.train_model
        # In this order each round: ``check`` runs after another model (its tensors as cold as
        # in ``unmerged``, which runs after the plain backbone), ``view`` after it, as in ``unmerged``.
        models = {"backbone": bt.Net(copy.deepcopy(backbone), nn.Linear(dim, bt.NUM_CLASSES)),
                  "unmerged": ftn_model, "merged": bt.merged_eval_model(m),
                  "check": lambda x: ftn_model._plain_views["t"].valid(),
                  "view": lambda x: ftn_model.heads["t"](ftn_model._plain_views["t"].module(x)),
                  "wrappers": lambda x: ftn_model.heads["t"](ftn_model.backbone_features(x, task="t"))}
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        times = {k: [] for k in models}
        with torch.no_grad():
            for model in models.values():
                if isinstance(model, nn.Module):
                    model.eval()
                model(x)
                model(x)
            assert models["check"](x), "the view is not valid after two forwards: nothing to time"
            for _ in range(args.rounds):
                for k, model in models.items():
                    t0 = time.perf_counter()
                    model(x)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        # Spread: the ratio of each round's unmerged time to the backbone's in the same round.
        per_round = sorted(u / b for u, b in zip(times["unmerged"], times["backbone"]))
        q1, q3 = per_round[len(per_round) // 4], per_round[(3 * len(per_round)) // 4]
        paired = statistics.median(per_round)
        paired_view = statistics.median(v / b for v, b in zip(times["view"], times["backbone"]))
        factors = ftn_model._plain_views["t"].watch.tensors
        print(f"{arch}@{size} b{batch} ({args.rounds} rounds): backbone {med['backbone']:.2f} ms, "
              f"merged {med['merged']:.2f} ms (× {med['merged'] / med['backbone']:.3f}), "
              f"unmerged {med['unmerged']:.2f} ms (× {med['unmerged'] / med['backbone']:.3f}; paired "
              f"{paired:.3f}, per-round IQR {q1:.3f}–{q3:.3f}); through the wrappers {med['wrappers']:.2f} ms "
              f"(× {med['wrappers'] / med['backbone']:.3f}); overhead unmerged − merged "
              f"{med['unmerged'] - med['merged']:.3f} ms over {len(ftn_model.adapted_layers())} "
              f"adapted layers; its parts: check {med['check']:.3f} ms, view forward {med['view']:.2f} ms "
              f"(× {med['view'] / med['backbone']:.3f}; paired {paired_view:.3f}); the check compares "
              f"{len(factors)} factor tensors, {sum(t.numel() for t in factors):,} numbers, by value", flush=True)


if __name__ == "__main__":
    main()
