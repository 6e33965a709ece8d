"""Ops dispatched per training step and per eval forward, and host-device syncs, for FTN against
full fine-tuning, BN + head and PEFT LoRA (same builders as ``bench_training.py``).

At the batch sizes people use, a GPU step is bound by kernel launches and Python dispatch, so
the number of non-view aten ops a step dispatches predicts the GPU step's cost without a GPU (the
H100 step ratios of docs/performance.md follow these op ratios). Counts do not depend on timing
or machine load: one step of each method is enough, and the numbers are exact.

    python benchmarks/bench_ops.py                      # MobileNetV2, ResNet-18/34, ViT-Tiny; fp32 and bf16 autocast
    python benchmarks/bench_ops.py --models resnet18 --json out.json
    python benchmarks/bench_ops.py --device cuda --sync-debug   # on a GPU: any host sync in a step raises

Counted with ``ftn.core.opcount.count_ops``: forward, backward and the AdamW (foreach) step; the
``.item()`` reads of AdamW's CPU step counters are host bookkeeping and not counted. Images
64 px, batch 4, FTN rank 8, PEFT LoRA at FTN's ΔW budget on the layers PEFT can adapt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402  (the methods' builders)

from ftn.core.opcount import count_ops  # noqa: E402

METHODS = ["full", "bn_head", "ftn", "ftn_autograd", "ftn_lora_layers", "lora"]
MODELS = ["mobilenet_v2", "resnet18", "resnet34", "vit_tiny"]


def vit_tiny() -> tuple[nn.Module, int]:
    """A ViT-Tiny-sized torchvision ViT (random weights) for 64 px: 4 layers of width 192."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768)
    vit.heads = nn.Identity()
    return vit, 192


def sync_debug():
    """On CUDA with --sync-debug: any host-device synchronisation inside raises (torch's own
    detector, ``torch.cuda.set_sync_debug_mode("error")``), which a CPU count can only infer."""
    if not (SYNC_DEBUG and bt.DEVICE.type == "cuda"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return mode()


SYNC_DEBUG = False


def train_step_ops(m: bt.Method, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None):
    opt = bt.make_optimizer(m.params)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(bt.DEVICE.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = loss_fn(m.train_model(x), y)
        loss.backward()
        opt.step()

    step()  # the optimizer's state exists from the second step on, as in training
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    with sync_debug():
        return count_ops(step, host_tensors=steps)[1]


def eval_ops(m: bt.Method, x: torch.Tensor):
    model = m.eval_unmerged.eval()
    with torch.no_grad():
        model(x)  # fills the eval cache
        with sync_debug():
            return count_ops(lambda: model(x))[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--json", help="write the counts here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the counts are the same; cuda adds --sync-debug)")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: run each counted step under torch.cuda.set_sync_debug_mode('error')")
    args = p.parse_args()
    global SYNC_DEBUG
    SYNC_DEBUG = args.sync_debug
    bt.DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    results = {}
    for arch in args.models:
        backbone, dim = vit_tiny() if arch == "vit_tiny" else bt.make_backbone(arch)
        if arch == "vit_tiny":
            backbone = backbone.to(bt.DEVICE)
        x = torch.randn(4, 3, 64, 64, device=bt.DEVICE)
        y = torch.randint(0, bt.NUM_CLASSES, (4,), device=bt.DEVICE)
        built = {}
        for method in args.methods:
            try:
                budget = built["ftn"].info["delta_params"] if "ftn" in built else None
                built[method] = bt.build(method, backbone, dim, ftn_budget=budget)
            except Exception as exc:  # a PEFT method that cannot adapt this model: say so, go on
                print(f"{arch} {method}: not built ({type(exc).__name__}: {exc})")
        for amp in (None, torch.bfloat16):
            tag = f"{arch} {'bf16' if amp else 'fp32'}"
            rows = {}
            for name, m in built.items():
                try:
                    rows[name] = train_step_ops(m, x, y, amp)
                except RuntimeError as exc:  # --sync-debug: a host sync in the step
                    print(f"  {name:16s} {tag} training step synchronised with the host: {exc}")
                    results[f"{tag} train {name}"] = {"sync_error": str(exc)}
            full = rows["full"].ops if "full" in rows else None
            print(f"\n{tag}: ops per training step (ratio to full fine-tuning), host syncs")
            for name, c in rows.items():
                ratio = f"{c.ops / full:5.2f}×" if full else "  -  "
                print(f"  {name:16s} {c.ops:6d}  {ratio}  syncs {c.host_syncs}   top: "
                      + ", ".join(f"{k} {v}" for k, v in c.top(5)))
                results[f"{tag} train {name}"] = {"ops": c.ops, "syncs": c.host_syncs, "top": c.top(12)}
        size = 64 if arch == "vit_tiny" else 32
        x1 = torch.randn(1, 3, size, size, device=bt.DEVICE)
        plain = eval_ops(built["full"], x1) if "full" in built else None
        print(f"\n{arch} fp32: ops per eval forward, batch 1")
        for name in ("full", "ftn", "lora"):
            if name in built and built[name].eval_unmerged is not None:
                try:
                    c = eval_ops(built[name], x1)
                except RuntimeError as exc:  # --sync-debug: a host sync in the forward
                    print(f"  {name:16s} eval forward synchronised with the host: {exc}")
                    results[f"{arch} eval {name}"] = {"sync_error": str(exc)}
                    continue
                ratio = f"{c.ops / plain.ops:5.2f}×" if plain else "  -  "
                print(f"  {name:16s} {c.ops:6d}  {ratio}  syncs {c.host_syncs}")
                results[f"{arch} eval {name}"] = {"ops": c.ops, "syncs": c.host_syncs}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
