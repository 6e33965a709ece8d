"""How fast a metadata bomb is refused: a ResNet-18 adapter (rank 8, 10 classes) whose head
metadata declares 4,000,000 outputs or 1e11 (the checksum intact: it covers tensors only), loaded
with ``load_task`` into a fresh model. Before the header checks this allocated for 106 s and grew
peak memory by 7.8 GB (4,000,000), or raised a bare RuntimeError (1e11).

    python benchmarks/bench_adapter_bomb.py
"""

from __future__ import annotations

import json
import resource
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from ftn import AdapterFileError
from ftn.apps.serving.predict import build_model
from ftn.core.adapters import read_adapter


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=False)
    model.add_task("t", head=nn.Linear(512, 10), rank=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_task("t", Path(tmp) / "t.safetensors")
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8:8 + n])["__metadata__"]
        tensors, _ = read_adapter(path)
        for out in (4_000_000, 1e11):
            bomb = Path(tmp) / "bomb.safetensors"
            head = {"type": "Linear", "in_features": 512, "out_features": out, "bias": True}
            bomb.write_bytes(st_save(tensors, metadata={**meta, "head": json.dumps(head)}))
            torch.manual_seed(0)
            fresh = build_model("resnet18", pretrained=False)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.perf_counter()
            try:
                fresh.load_task(bomb)
                raise SystemExit(f"out_features={out}: loaded, not refused")
            except AdapterFileError as exc:
                ms = 1e3 * (time.perf_counter() - started)
                grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
                print(f"out_features={out}: refused in {ms:.1f} ms, peak RSS +{grown:.0f} MiB, "
                      f"tasks after: {fresh.tasks}\n  {str(exc).split(': ', 1)[1]}")


if __name__ == "__main__":
    main()
