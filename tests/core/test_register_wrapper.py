"""A new layer type is two places: a wrapper class and one `register_wrapper` call, both here, in
user code. Everything else (task selection, adapter files, the parameter report, merge) works
through the wrapper as it does for the built-in types."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftn import FTNModel, ShapeError, register_wrapper
from ftn.core.injection import WRAPPERS
from ftn.core.layers import FTNLayer


class ScaledLinear(nn.Module):
    """A user's layer: not an nn.Linear, a weight it uses its own way."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * F.linear(x, self.weight)


class FTNScaledLinear(FTNLayer):  # place 1: the wrapper (the base runs with W + ΔW via its own forward)
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.base.weight.shape[1]:
            raise ShapeError(f"layer {self.layer_name!r} expects {self.base.weight.shape[1]} features")


def test_a_user_layer_type_is_a_wrapper_and_one_registration(tmp_path):
    register_wrapper(ScaledLinear, lambda m, site: FTNScaledLinear(m, site.context, site.name) if site.chosen else None)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(ScaledLinear(6, 5), nn.ReLU(), ScaledLinear(5, 4))
        x = torch.randn(3, 6)
        frozen = net(x)
        model = FTNModel(net, rank=2).eval()
        assert len(model.adapted_layers()) == 2
        model.add_task("a")
        torch.testing.assert_close(model(x, task="a"), frozen, rtol=0, atol=0)  # ΔW = 0 at the start
        with torch.no_grad():
            for p in model.task_parameters("a"):
                p.add_(0.1)
        y = model(x, task="a")
        assert not torch.allclose(y, frozen)
        # the task's weights, run by hand through the user's own forward
        expected = x
        for i, layer in enumerate(model.adapted_layers().values()):
            expected = 2.0 * F.linear(expected, layer.base.weight + layer.tasks["a"].delta(layer.base.weight.shape))
            if i == 0:
                expected = F.relu(expected)
        torch.testing.assert_close(y, expected)
        with pytest.raises(ShapeError, match="expects 6 features"):
            model(torch.randn(3, 7), task="a")
        model.save_task("a", tmp_path / "a.safetensors")
        model.load_task(tmp_path / "a.safetensors", name="b")
        torch.testing.assert_close(model(x, task="b"), y)
        torch.testing.assert_close(model.merge("a").eval()(x), y, rtol=1e-5, atol=1e-5)
        assert model.parameter_report().tasks["a"].delta == 2 * (5 + 6) + 2 * (4 + 5)  # R·(d_out + d_in) per layer
    finally:
        WRAPPERS.pop(ScaledLinear, None)
