"""Fast FTN training step (ftn.core.functional): exact gradients, layer integration, autocast, compile."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftn import FTNModel
from ftn.core.cp import cp_add, cp_to_tensor, weight_modes
from ftn.core.functional import (_FLAT_MAX_POSITIONS, _slow_depthwise_weight_grad, cp_add_grouped, cp_conv,
                            cp_linear, fast_backward_cost_ratio, fast_backward_pays_off)
from ftn.core.injection import wrap_layer
from ftn.core.layers import FTNLayer

from helpers import SmallCNN, randomize_norms

F64 = torch.float64

# (C_in, C_out, kernel, stride, padding, dilation, groups, bias, spatial dims)
GRADCHECK_CASES = {
    "3x3": (4, 6, 3, 1, 1, 1, 1, True, 2),
    "stride2_nopad_nobias": (4, 6, 3, 2, 0, 1, 1, False, 2),
    "dilation2": (4, 6, 3, 1, 2, 2, 1, True, 2),
    "pointwise": (4, 6, 1, 1, 0, 1, 1, True, 2),
    "pointwise_stride2": (4, 6, 1, 2, 0, 1, 1, False, 2),
    "grouped": (4, 6, 3, 1, 1, 1, 2, True, 2),
    "grouped_pointwise": (4, 6, 1, 1, 0, 1, 2, False, 2),
    "depthwise": (4, 4, 3, 1, 1, 1, 4, False, 2),
    "depthwise_multiplier_5x5": (4, 8, 5, 2, 2, 1, 4, True, 2),
    "conv1d": (4, 6, 3, 1, 1, 1, 2, True, 1),
    "conv3d": (2, 3, 3, 2, 1, 1, 1, True, 3),
    # Small maps take their own code paths: one GEMM over N·P for pointwise factor gradients,
    # and the prepadded depthwise weight gradient (see the sizes below).
    "pointwise_small_map": (4, 6, 1, 1, 0, 1, 1, True, 2),
    "depthwise_small_map": (4, 4, 3, 1, 1, 1, 4, True, 2),
    "depthwise_small_map_stride2": (4, 4, 3, 2, 1, 1, 4, False, 2),
}
MAP_SIZE = {"conv3d": 4, "pointwise_small_map": 3, "depthwise_small_map": 2, "depthwise_small_map_stride2": 3}


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "dense"])
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_cp_conv_gradcheck_float64(case, thin):
    c_in, c_out, k, stride, pad, dil, groups, bias, nd = GRADCHECK_CASES[case]
    g = torch.Generator().manual_seed(0)
    size = MAP_SIZE.get(case, 6)  # gradcheck is O(inputs × outputs): keep 3-D small
    x = torch.randn(2, c_in, *([size] * nd), dtype=F64, generator=g, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, *([k] * nd), dtype=F64, generator=g)
    b = torch.randn(c_out, dtype=F64, generator=g, requires_grad=True) if bias else None
    factors = [torch.randn(d, 2, dtype=F64, generator=g, requires_grad=True)
               for d in (c_out, c_in // groups, k ** nd)]
    args = ([nd * [stride], nd * [pad], nd * [dil], groups])

    def fast(x, b, *fs):
        return cp_conv(x, weight, b, fs, *args, thin=thin)

    assert torch.autograd.gradcheck(fast, (x, b, *factors))
    # And the same function as the plain formula (gradcheck alone would pass a wrong forward).
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    expected = conv(x, weight + cp_to_tensor(factors, weight.shape), b, stride, pad, dil, groups)
    torch.testing.assert_close(fast(x, b, *factors), expected)


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "dense"])
def test_cp_linear_gradcheck_float64(thin):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=F64, generator=g, requires_grad=True)  # extra leading dim
    weight = torch.randn(6, 4, dtype=F64, generator=g)
    b = torch.randn(6, dtype=F64, generator=g, requires_grad=True)
    a, bb = (torch.randn(d, 2, dtype=F64, generator=g, requires_grad=True) for d in (6, 4))
    assert torch.autograd.gradcheck(lambda x, b, a, bb: cp_linear(x, weight, b, (a, bb), thin=thin),
                                    (x, b, a, bb))
    torch.testing.assert_close(cp_linear(x, weight, b, (a, bb)), F.linear(x, weight + a @ bb.T, b))


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "dense"])
@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_backward_keeps_no_materialized_weight(linear, thin):
    # Only x, the frozen W (the same tensor, no copy) and the factors are saved: W + ΔW is
    # rebuilt in the backward (to save memory).
    g = torch.Generator().manual_seed(0)
    shape = (6, 4) if linear else (6, 1, 3, 3)
    weight = torch.randn(shape, dtype=F64, generator=g)
    factors = [torch.randn(d, 2, dtype=F64, generator=g, requires_grad=True)
               for d in ((6, 4) if linear else (6, 1, 9))]
    x = torch.randn((3, 4) if linear else (2, 6, 5, 5), dtype=F64, generator=g, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if linear:
            y = cp_linear(x, weight, None, factors, thin=thin)
        else:
            y = cp_conv(x, weight, None, factors, [1, 1], [1, 1], [1, 1], groups=6, thin=thin)
    big = [t for t in saved if t.shape == weight.shape]
    assert len(big) == 1 and big[0].data_ptr() == weight.data_ptr()
    y.square().sum().backward()  # and the backward still runs from what was saved
    assert all(f.grad is not None for f in factors) and x.grad is not None


def test_frozen_weight_that_requires_grad_is_refused():
    w = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        cp_linear(torch.randn(1, 2), w, None, (torch.randn(3, 1), torch.randn(2, 1)))


def _grads(layer, x, mode):
    layer.fast_backward = mode
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad, [f.grad for f in layer.tasks["t"].factors]


# Real layer shapes (float32): ResNet 3×3, MobileNetV2 1×1 expand/project, a depthwise conv, the
# stem, and layers whose padding is done outside the conv ("same", reflect).
REAL_LAYERS = {
    "resnet_3x3_128": (nn.Conv2d(128, 128, 3, padding=1, bias=False), (2, 128, 14, 14)),
    "resnet_down_1x1_s2": (nn.Conv2d(64, 128, 1, stride=2, bias=False), (2, 64, 14, 14)),
    "mbv2_expand": (nn.Conv2d(96, 576, 1, bias=False), (2, 96, 8, 8)),
    "mbv2_depthwise": (nn.Conv2d(144, 144, 3, padding=1, groups=144, bias=False), (2, 144, 8, 8)),
    "stem_7x7": (nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), (2, 3, 32, 32)),
    "same_even_kernel": (nn.Conv2d(16, 24, 4, padding="same"), (2, 16, 9, 9)),
    "reflect": (nn.Conv2d(16, 24, 3, padding=1, padding_mode="reflect"), (2, 16, 9, 9)),
    "linear": (nn.Linear(512, 256), (4, 512)),
}


@pytest.mark.parametrize("name", sorted(REAL_LAYERS))
def test_custom_backward_matches_autograd_on_real_layers_float32(name):
    torch.manual_seed(0)
    base, shape = REAL_LAYERS[name]
    layer = wrap_layer(base)
    layer.add_task("t", rank=8)
    with torch.no_grad():  # A = 0 at init would hide errors in dB and dC
        for f in layer.tasks["t"].factors:
            f.normal_(0, 0.1)
    layer.context.active = "t"
    x = torch.randn(shape)
    y_ref, gx_ref, gf_ref = _grads(layer, x, False)
    y, gx, gf = _grads(layer, x, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    for got, ref in zip(gf, gf_ref):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert base.weight.grad is None  # the frozen base weight gets no gradient


def test_fast_path_is_taken_only_when_a_backward_reaches_the_factors(monkeypatch):
    calls = []
    import ftn.core.layers as layers_mod

    real = layers_mod.cp_conv
    monkeypatch.setattr(layers_mod, "cp_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = wrap_layer(nn.Conv2d(4, 6, 3, padding=1))
    layer.add_task("t", rank=2)
    layer.context.active = "t"
    layer.fast_backward = True
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    assert calls == [1]
    with torch.no_grad():
        layer(x)
    layer.tasks["t"].requires_grad_(False)
    layer(x)
    assert calls == [1]
    layer.tasks["t"].requires_grad_(True)
    layer.fast_backward = False
    layer(x)
    assert calls == [1]


@pytest.mark.parametrize("size", [3, 6], ids=["small_map", "map"])
def test_pointwise_channels_last_gradcheck_float64(size):
    # Channels-last inputs take their own GEMMs on (N·P, C) views.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, dtype=F64, generator=g).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(6, 4, 1, 1, dtype=F64, generator=g)
    factors = [torch.randn(d, 2, dtype=F64, generator=g, requires_grad=True) for d in (6, 4, 1)]

    def fast(x, *fs):
        return cp_conv(x, weight, None, fs, [1, 1], [0, 0], [1, 1], 1, thin=True)

    assert torch.autograd.gradcheck(fast, (x, *factors))
    torch.testing.assert_close(fast(x, *factors), F.conv2d(x, weight + cp_to_tensor(factors, weight.shape)))


def test_whole_model_channels_last_same_gradients(images):
    model = _small_model()
    model.train()
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        model.zero_grad()
        model(images.contiguous(memory_format=fmt), task="a").square().mean().backward()
        grads.append([p.grad.clone() for p in model.task_parameters("a")])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_small_map_paths_are_the_ones_taken():
    # The gradchecks above cover these paths only if the shapes really select them.
    x = torch.zeros(2, 4, 2, 2)
    w = torch.zeros(4, 1, 3, 3)
    assert _slow_depthwise_weight_grad(x, w, [1, 1], [1, 1], [1, 1], 4)
    assert _slow_depthwise_weight_grad(torch.zeros(2, 4, 3, 3), w, [2, 2], [1, 1], [1, 1], 4)
    assert not _slow_depthwise_weight_grad(torch.zeros(2, 4, 6, 6), w, [1, 1], [1, 1], [1, 1], 4)
    assert not _slow_depthwise_weight_grad(torch.zeros(2, 4, 4, 4), w, [2, 2], [1, 1], [1, 1], 4)
    assert not _slow_depthwise_weight_grad(x, torch.zeros(4, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2)  # not depthwise
    assert 3 * 3 <= _FLAT_MAX_POSITIONS < 6 * 6


def test_small_map_paths_match_autograd_on_real_shapes():
    # MobileNetV2's last stage at 64 px (2×2 maps) in float32: factor gradients as autograd
    # through W + ΔW computes them.
    g = torch.Generator().manual_seed(0)
    cases = [((960, 1, 3, 3), 960, (16, 960, 2, 2), False), ((160, 960, 1, 1), 1, (16, 960, 2, 2), True)]
    for shape, groups, x_shape, thin in cases:
        x = torch.randn(x_shape, generator=g)
        weight = torch.randn(shape, generator=g) * 0.1
        factors = [(torch.randn(d, 8, generator=g) * 0.3).requires_grad_() for d in (shape[0], shape[1], 9 if shape[2] == 3 else 1)]
        padding = [1, 1] if shape[2] == 3 else [0, 0]
        gy = torch.randn_like(F.conv2d(x, weight, padding=padding, groups=groups))
        cp_conv(x, weight, None, factors, [1, 1], padding, [1, 1], groups, thin=thin).backward(gy)
        fast = [f.grad.clone() for f in factors]
        for f in factors:
            f.grad = None
        F.conv2d(x, weight + cp_to_tensor(factors, weight.shape), None, 1, padding, 1, groups).backward(gy)
        for got, want in zip(fast, (f.grad for f in factors)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_automatic_choice_follows_cost_estimate():
    # Depthwise: the thin convs need g·R channels, far more than the dense gradient.
    assert fast_backward_cost_ratio((144, 1, 3, 3), 8, groups=144) > 10
    assert not fast_backward_pays_off((144, 1, 3, 3), 8, groups=144)
    assert fast_backward_pays_off((512, 512, 3, 3), 8)
    assert not fast_backward_pays_off((16, 32, 1, 1), 8)  # estimate 1.5
    # Pointwise layers have their own, higher limit (a narrow dense GEMM runs far below peak).
    assert fast_backward_pays_off((24, 96, 1, 1), 8)  # estimate 0.83
    assert not fast_backward_pays_off((24, 96, 3, 3), 8)  # 0.69, a 3×3 kernel: limit 0.25
    assert not fast_backward_pays_off((96, 16, 1, 1), 8)  # estimate 1.17
    # A strided 1×1 conv (a ResNet downsample) runs the thin convs, not matmuls: the 3×3 limit.
    assert fast_backward_pays_off((128, 64, 1, 1), 8, stride=(1, 1))  # 0.38
    assert not fast_backward_pays_off((128, 64, 1, 1), 8, stride=(2, 2))
    assert fast_backward_pays_off((64, 64, 3, 3), 8)  # 0.28: ResNet's first stage
    assert FTNLayer.fast_backward is None  # automatic by default
    # Where the thin contractions do not pay off the layer still uses the custom Function, with
    # the dense weight gradient (nothing materialized is kept for the backward).
    layer = wrap_layer(nn.Conv2d(144, 144, 3, padding=1, groups=144, bias=False))
    layer.add_task("t", rank=8)
    assert layer._backward_kind(layer.tasks["t"]) == "dense"
    layer.fast_backward = False
    assert layer._backward_kind(layer.tasks["t"]) is None
    with torch.no_grad():
        assert wrap_layer(nn.Conv2d(512, 512, 3))._backward_kind(layer.tasks["t"]) is None


def test_automatic_choice_is_made_for_the_device():
    """On the CPU the thin contractions where they pay off by FLOPs; on any other device (a GPU
    step is bound by launches) plain autograd, whose W + ΔW the model builds for all layers
    together. The meta device stands in for CUDA here: the rule reads only the device type."""
    layer = wrap_layer(nn.Conv2d(512, 512, 3, bias=False))
    layer.add_task("t", rank=8)
    assert layer._backward_kind(layer.tasks["t"]) == "thin"
    assert layer._groupable("t") is None  # its factor gradients need its own input and output
    layer.to("meta")
    assert layer.base.weight.device.type == "meta"
    assert layer._backward_kind(layer.tasks["t"]) is None
    assert layer._groupable("t") is layer.tasks["t"]
    layer.fast_backward = True  # an explicit choice is kept on every device
    assert layer._backward_kind(layer.tasks["t"]) == "thin"


def _small_model(seed=0):
    torch.manual_seed(seed)
    model = FTNModel(randomize_norms(SmallCNN()), rank=3)
    model.add_task("a", head=nn.Linear(16, 5))
    with torch.no_grad():
        for p in model.task_parameters("a"):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_whole_model_training_step_same_gradients_with_and_without_custom_backward(images):
    model = _small_model()
    model.train()
    grads = {}
    for mode in (False, None, True):
        for layer in model.adapted_layers().values():
            layer.fast_backward = mode
        model.zero_grad()
        model(images, task="a").square().mean().backward()
        grads[mode] = [p.grad.clone() for p in model.task_parameters("a")]
    for mode in (None, True):
        for got, ref in zip(grads[mode], grads[False]):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_autocast_bf16_training_step_uses_custom_backward(images):
    model = _small_model()
    model.train()
    for layer in model.adapted_layers().values():
        layer.fast_backward = True
    opt = torch.optim.SGD(model.task_parameters("a"), lr=0.1)
    before = [p.detach().clone() for p in model.task_parameters("a")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, task="a")
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    factor_grads = [f.grad for layer in model.adapted_layers().values() for f in layer.tasks["a"].factors]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in factor_grads)
    assert any(g.abs().sum() > 0 for g in factor_grads)
    # bf16 gradients roughly agree with the float32 custom backward
    model.zero_grad()
    model(images, task="a").square().mean().backward()
    ref = [f.grad for layer in model.adapted_layers().values() for f in layer.tasks["a"].factors]
    num = sum((g - r).norm() ** 2 for g, r in zip(factor_grads, ref)) ** 0.5
    den = sum(r.norm() ** 2 for r in ref) ** 0.5
    assert num / den < 0.1
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.task_parameters("a")))


def _has_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None or shutil.which("clang") is not None


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile's CPU backend needs a C/C++ compiler")
def test_torch_compile_matches_eager(images):
    torch._dynamo.reset()
    model = _small_model().eval()
    with torch.no_grad():
        eager = model(images, task="a")
        compiled = torch.compile(model, backend="inductor")
        out = compiled(images, task="a")
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_torch_compile_training_step_with_custom_backward(images):
    # aot_eager traces the autograd.Function forward and backward (no C compiler needed).
    torch._dynamo.reset()
    model = _small_model().train()
    for layer in model.adapted_layers().values():
        layer.fast_backward = True
    model.zero_grad()
    model(images, task="a").square().mean().backward()
    ref = [p.grad.clone() for p in model.task_parameters("a")]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(images, task="a").square().mean().backward()
    for got, expected in zip((p.grad for p in model.task_parameters("a")), ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_torch_compile_compiles_once_for_repeated_steps_and_passes(images):
    # A compiled model must not recompile at every call (the eval-pass counter on the model was
    # a guard that changed each call: 8 recompilations, then a silent fall-back to eager).
    torch._dynamo.reset()
    model = _small_model()
    model.recompute_depthwise()  # ignored under compile
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.task_parameters("a"), lr=1e-3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            compiled(images, task="a").square().mean().backward()
            opt.step()
        torch._dynamo.reset()
        model.eval()
        with torch.no_grad():
            outs = [compiled(images, task="a") for _ in range(3)]
    torch.testing.assert_close(outs[0], outs[2])
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(images, task="a"), rtol=1e-5, atol=1e-5)


def test_autocast_forward_builds_w_plus_delta_in_float32():
    # Under autocast the forward's W + ΔW must be the one the backward rebuilds (in the factors'
    # dtype, then cast): a bf16 matmul for ΔW in the forward made the two differ.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g)
    weight = torch.randn(16, 8, 3, 3, generator=g)
    factors = [torch.randn(d, 4, generator=g, requires_grad=True) for d in (16, 8, 9)]
    lin_w = torch.randn(16, 8, generator=g)
    a, b = (torch.randn(d, 4, generator=g, requires_grad=True) for d in (16, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv_out = cp_conv(x, weight, None, factors, [1, 1], [1, 1], [1, 1], 1)
        lin_out = cp_linear(x.mean((2, 3)), lin_w, None, (a, b))
    with torch.no_grad():
        # built as the fast path builds it (cp_add, in float32), then cast
        merged = cp_add(weight, factors).bfloat16()
        assert torch.equal(conv_out, F.conv2d(x.bfloat16(), merged, None, 1, 1))
        assert torch.equal(lin_out, F.linear(x.mean((2, 3)).bfloat16(), cp_add(lin_w, (a, b)).bfloat16()))


# ------------------------------------------------------------------ W + ΔW of all layers together
def _repeated_shapes_backbone():
    """Groups of equal shapes (three 8→8 3×3 convs, two 8→8 Linear layers), single layers, a
    Linear layer next to convs: what the grouped build must handle."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_grouped_build_equals_the_per_layer_build_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (6, 8, 1, 1), (8, 4, 3, 3), (5, 7), (5, 7), (3, 9), (4, 4, 3, 3)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    factors = [[torch.randn(d, 3, generator=g, requires_grad=True) for d in weight_modes(s)] for s in shapes]
    flat = [f for fs in factors for f in fs]
    grouped = cp_add_grouped(weights, factors)
    single = [cp_add(w, fs) for w, fs in zip(weights, factors)]
    assert all(torch.equal(a, b) for a, b in zip(grouped, single))  # the same products and sums
    outputs = [torch.randn(s, generator=g) for s in shapes]
    used = [0, 2, 3, 4, 6]  # layer 1, 5 and 7 not used: their groups' other layers still are
    got = torch.autograd.grad(sum((grouped[i] * outputs[i]).sum() for i in used), flat, allow_unused=True)
    ref = torch.autograd.grad(sum((single[i] * outputs[i]).sum() for i in used), flat, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-6)
        assert a.is_contiguous() and a.shape == flat[i].shape  # no copy when the optimizer takes it


def test_training_step_builds_the_weights_together_with_the_same_gradients(monkeypatch):
    import ftn.core.layers as layers_module

    torch.manual_seed(0)
    model = FTNModel(_repeated_shapes_backbone(), rank=3)
    model.add_task("a", head=nn.Linear(8, 5))
    with torch.no_grad():
        for p in model.task_parameters("a"):
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    for layer in model.adapted_layers().values():
        layer.fast_backward = False
    x = torch.randn(4, 3, 8, 8)
    calls = []
    original = layers_module.cp_add_grouped
    monkeypatch.setattr(layers_module, "cp_add_grouped", lambda *a: calls.append(len(a[0])) or original(*a))
    grads = {}
    for grouped in (True, False):
        if not grouped:  # the per-layer path, as a layer that builds its own weight takes it
            monkeypatch.setattr(FTNLayer, "_groupable", lambda self, task: None)
        for amp in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model(x, task="a").float().square().mean().backward()
            grads[grouped, amp] = [p.grad.clone() for p in model.task_parameters("a")]
    assert calls == [8, 8]  # every adapted layer in one call per training forward (one rank)
    for a, b in zip(grads[True, False], grads[False, False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Under autocast the grouped W + ΔW is built in float32 and cast once; autograd's per-layer
    # path builds ΔW in bfloat16 (autocast's matmul): equal to bfloat16's precision.
    for a, b in zip(grads[True, True], grads[False, True]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


def test_ops_of_the_grouped_build_do_not_grow_with_the_layers_of_a_group():
    """Eight more layers of a shape already present add no op to the step's weight build."""
    from ftn.core.opcount import count_ops

    def ops(n_layers):
        torch.manual_seed(0)
        ws = [torch.randn(8, 8, 3, 3) for _ in range(n_layers)]
        fs = [[torch.randn(d, 2, requires_grad=True) for d in (8, 8, 9)] for _ in range(n_layers)]
        return count_ops(lambda: torch.stack(cp_add_grouped(ws, fs)).sum().backward())[1].ops

    assert ops(4) == ops(12)
