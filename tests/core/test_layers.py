"""FTN layers: exact init equivalence, merge equivalence, shapes, eval caching."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ftn import FactorInit, FTNConv, FTNLinear, ShapeError, TaskContext
from ftn.core.injection import wrap_layer

from helpers import Conv2dSame

CONV_VARIANTS = {
    "3x3": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "stride2_nobias": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, bias=False),
    "tuple_kernel_dilation": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), dilation=(2, 1), padding=(2, 2)),
    "same": dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
    "valid": dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="circular"),
    "replicate": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
    "grouped": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
    "depthwise_multiplier": dict(in_channels=4, out_channels=8, kernel_size=5, padding=2, groups=4),
    "pointwise": dict(in_channels=4, out_channels=6, kernel_size=1),
    "stem7x7": dict(in_channels=4, out_channels=6, kernel_size=7, stride=2, padding=3, bias=False),
}


def make_conv(name, cls=nn.Conv2d):
    torch.manual_seed(0)
    return cls(**CONV_VARIANTS[name])


def activate(layer, task):
    layer.context.active = task
    return layer


def perturb(layer, task, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in layer.tasks[task].factors:
            f.copy_(torch.randn(f.shape, generator=g) * 0.3)


@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
def test_conv_init_is_bit_identical_to_frozen_layer(variant):
    conv = make_conv(variant)
    x = torch.randn(2, 4, 11, 13)
    expected = conv(x)
    layer = wrap_layer(conv)
    assert isinstance(layer, FTNConv)
    assert torch.equal(layer(x), expected)  # no task active
    layer.add_task("a", rank=3)
    assert torch.equal(activate(layer, "a")(x), expected)  # ΔW = 0
    assert torch.count_nonzero(layer.delta_weight("a")) == 0


@pytest.mark.parametrize("variant", ["3x3", "stride2_nobias", "depthwise", "tuple_kernel_dilation"])
def test_same_padding_subclass_init_identical_and_merge_matches(variant):
    conv = make_conv(variant, cls=Conv2dSame)
    x = torch.randn(2, 4, 9, 12)
    expected = conv(x)
    layer = wrap_layer(conv)
    layer.add_task("a", rank=2)
    activate(layer, "a")
    assert torch.equal(layer(x), expected)
    perturb(layer, "a")
    merged = layer.merged_module("a")
    assert type(merged) is Conv2dSame
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), expected)  # ΔW really changes the output


@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
def test_conv_merge_matches_unmerged_and_reference(variant):
    conv = make_conv(variant)
    x = torch.randn(2, 4, 11, 13)
    layer = wrap_layer(conv)
    layer.add_task("a", rank=3)
    perturb(layer, "a")
    out = activate(layer, "a")(x)
    # Reference: a fresh conv with the weight W + ΔW computed independently.
    ref = make_conv(variant)
    with torch.no_grad():
        a, b, c = (f.double() for f in layer.tasks["a"].factors)
        delta = torch.einsum("or,ir,kr->oik", a, b, c).reshape(ref.weight.shape)
        ref.weight.add_(delta.float())
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.merged_module("a")(x), out, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    in_groups=st.integers(1, 3), out_mult=st.integers(1, 3), groups=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
    padding=st.sampled_from(["same", "valid", 0, 1, 2]),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(), rank=st.integers(1, 5), seed=st.integers(0, 2**16),
)
def test_property_random_conv_init_identical_and_merge_close(in_groups, out_mult, groups, kh, kw, stride,
                                                           dilation, padding, padding_mode, bias, rank, seed):
    if padding == "same":
        stride = 1  # PyTorch forbids strided 'same' convs
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_groups * groups, out_mult * groups, (kh, kw), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    x = torch.randn(2, in_groups * groups, 12, 12)
    expected = conv(x)
    layer = wrap_layer(conv)
    layer.add_task("t", rank=rank)
    activate(layer, "t")
    assert torch.equal(layer(x), expected)
    perturb(layer, "t", seed)
    torch.testing.assert_close(layer.merged_module("t")(x), layer(x), rtol=1e-4, atol=1e-4)


def test_linear_init_identical_merge_and_subclass():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    for cls in (nn.Linear, ScaledLinear):
        torch.manual_seed(0)
        lin = cls(5, 7)
        x = torch.randn(3, 2, 5)
        expected = lin(x)
        layer = wrap_layer(lin)
        assert isinstance(layer, FTNLinear)
        layer.add_task("a", rank=2)
        assert torch.equal(activate(layer, "a")(x), expected)
        perturb(layer, "a")
        a, b = layer.tasks["a"].factors
        ref = 2.0 if cls is ScaledLinear else 1.0
        torch.testing.assert_close(layer(x), ref * (x @ (lin.weight + a @ b.T).T + lin.bias))
        torch.testing.assert_close(layer.merged_module("a")(x), layer(x))


def test_factor_init_options():
    layer = wrap_layer(nn.Conv2d(6, 8, 3))
    layer.add_task("orth", rank=3)
    a, b, c = layer.tasks["orth"].factors
    assert torch.count_nonzero(a) == 0
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal columns
    layer.add_task("z2", rank=3, init=FactorInit("normal", zero_mode=2))
    f = layer.tasks["z2"].factors
    assert torch.count_nonzero(f[2]) == 0 and torch.count_nonzero(f[0]) > 0
    with pytest.raises(ValueError):
        FactorInit("xavier")


def test_wrong_input_shape_names_the_layer():
    layer = wrap_layer(nn.Conv2d(4, 6, 3), name="block.conv")
    layer.add_task("a", rank=2)
    activate(layer, "a")
    with pytest.raises(ShapeError, match=r"block.conv.*\(N, 4, H, W\).*\(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    lin = activate(wrap_layer(nn.Linear(4, 3), name="fc"), None)
    lin.add_task("a", rank=1)
    activate(lin, "a")
    with pytest.raises(ShapeError, match="fc"):
        lin(torch.randn(2, 5))


def test_eval_cache_reuses_weight_and_rebuilds_after_change():
    layer = wrap_layer(nn.Conv2d(4, 6, 3), context=TaskContext())
    layer.add_task("a", rank=2)
    perturb(layer, "a")
    layer.eval()
    with torch.no_grad():
        w1 = layer.task_weight("a")
        assert layer.task_weight("a") is w1  # built once, reused
        layer.tasks["a"].factors[0].add_(1.0)  # an optimizer step changes the factors in place
        w2 = layer.task_weight("a")
    assert w2 is not w1
    torch.testing.assert_close(w2, layer.base.weight + layer.delta_weight("a"))
    # Training mode or autograd never uses the cache, so gradients reach the factors.
    layer.train()
    assert layer.task_weight("a") is not w2
    assert layer.task_weight("a").requires_grad
