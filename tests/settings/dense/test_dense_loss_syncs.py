"""The dense losses read no value back to the host (on a GPU such a read waits for every queued
kernel, each step)."""

from __future__ import annotations

import pytest
import torch

from ftn.core.opcount import count_ops

@pytest.mark.parametrize("all_invalid", [False, True])
def test_the_dense_losses_read_no_value_on_the_host(all_invalid):
    """Each dense loss divides by its valid-pixel count without reading it (an all-invalid batch,
    a crop that fell into padding, gives 0 and a backward that works)."""
    from ftn.settings.dense.metrics import depth_loss, edge_loss, normals_loss, semseg_loss
    from ftn.settings.dense.metrics.common import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6, 8), generator=g)
    depth = torch.rand(2, 6, 8, generator=g) + 0.1
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 6, 8, generator=g), dim=1)
    edges = (torch.rand(2, 6, 8, generator=g) > 0.8).float()
    if all_invalid:
        labels[:], depth[:], normals[:], edges[:] = IGNORE_INDEX, 0.0, 0.0, IGNORE_INDEX
    losses = {
        "semseg": lambda: semseg_loss(logits, labels),
        "depth": lambda: depth_loss(logits[:, :1], depth),
        "normals": lambda: normals_loss(logits[:, :3], normals),
        "edge": lambda: edge_loss(logits[:, 0], edges),
    }
    for name, loss_fn in losses.items():
        logits.grad = None
        loss, count = count_ops(lambda: (lambda loss: (loss.backward(), loss)[1])(loss_fn()))
        assert count.host_syncs == 0, (name, dict(count.syncs))
        assert torch.isfinite(loss) and logits.grad is not None, name
        if all_invalid:
            assert loss.item() == 0.0 and not logits.grad.any(), name
        else:
            assert loss.item() > 0.0, name
