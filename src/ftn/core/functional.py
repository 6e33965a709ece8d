"""Fast training step for FTN layers: materialized forward, thin-contraction backward.

With autograd, ``conv(x, W + ΔW)`` back-propagates into the dense weight gradient dW̃ (as large
as a full fine-tuning step's weight gradient: one more pass the size of the forward) and only
then contracts it onto the factors. The functions here compute the same factor gradients without
ever forming dW̃. For a conv with ΔW[o, i, s] = Σ_r A[o, r]·B[i, r]·C[s, r] (s: flattened kernel
position) and output gradient dY:

* ``dX = conv_transpose(dY, W + ΔW)``       (exactly what any frozen-backbone method needs)
* ``Z  = conv(X, K)``,  K[r, i, s] = B[i, r]·C[s, r]       (a conv with only R output channels)
  ``dA[o, r] = Σ_{n,p} dY[n, o, p]·Z[n, r, p]``                (a matmul over batch × positions)
* ``G  = Aᵀ·dY``  (the output gradient projected onto R channels)
  ``H  = conv_weight_grad(X, G)``  (R × C_in × S: the weight gradient of an R-channel conv)
  ``dB[i, r] = Σ_s H[r, i, s]·C[s, r]``,   ``dC[s, r] = Σ_i H[r, i, s]·B[i, r]``

The two thin convs cost about R/C_out of the dense weight gradient each. For a grouped conv
(groups g) B spans C_in/g and the same K is applied to every group, so the thin convs get g·R
output channels: cost ≈ g·R/C_out each. That is a loss for depthwise convs (g = C_out), so
:func:`fast_backward_pays_off` takes the dense weight gradient there (in the same Function).

Linear layers (ΔW = A·Bᵀ) are the 2-way case: ``dA = dYᵀ·(X·B)``, ``dB = Xᵀ·(dY·A)``.

Autocast: the functions do their own casting (the conv runs in the autocast dtype, ΔW is built
in the factors' dtype first so the sum W + ΔW loses nothing more than the cast), and return
factor gradients in the factors' dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .cp import cp_add, cp_add_unfolded, khatri_rao

__all__ = [
    "cp_add_grouped",
    "cp_conv",
    "cp_conv_recompute",
    "cp_linear",
    "fast_backward_cost_ratio",
    "fast_backward_pays_off",
    "AUTO_MAX_COST_RATIO",
    "AUTO_MAX_COST_RATIO_POINTWISE",
]

# Per-layer automatic choice: use the custom backward when its estimated cost is at most this
# fraction of the dense weight gradient it replaces. Well below 1 because the thin ops are
# memory-bound (they re-read X and dY, in several small batched matmuls) while the dense weight
# gradient is one compute-bound GEMM. Set from benchmarks/bench_layers.py on a 2-core CPU:
# custom wins clearly at estimates <= 0.15, breaks even around 0.3, loses 10-20% at 0.6-1.2.
# Rechecked whole-layer (forward + backward): ResNet-18's 64-channel 3×3 convs at 56 px
# (0.28) take 16.6 ms over the frozen layer thin against 20.3 dense; the 7×7 stem (0.36) ties.
AUTO_MAX_COST_RATIO = 0.3
# Pointwise kernels (1×1 convs, Linear: S = 1) go through plain matmuls instead of thin convs, and
# their dense weight gradient is a narrow GEMM that oneDNN runs far below peak when a side is
# 16-144 channels wide (MobileNetV2's early 1×1 layers). Measured per layer with
# benchmarks/bench_backward_paths.py (docs/performance.md, "CPU, third round"): between estimates
# 0.3 and 0.83 neither path wins consistently (each by up to 2× on some layers, ties on most);
# above 1.1 dense wins on 64 px maps. So thin up to 0.9, where it is at least not the loser.
AUTO_MAX_COST_RATIO_POINTWISE = 0.9

_aten = torch.ops.aten


def fast_backward_cost_ratio(weight_shape: Sequence[int], rank: int, groups: int = 1) -> float:
    """FLOPs of the custom factor gradients / FLOPs of the dense weight gradient, per position.

    Dense: C_out·(C_in/g)·S.  Custom: Z conv and H weight-grad (g·R·(C_in/g)·S each) plus the
    dA matmul and the projection Aᵀ·dY (C_out·R each): 2·R·(C_in·S + C_out).
    For a Linear layer pass its (out, in) shape (S = 1, g = 1).
    """
    c_out, c_in_g, *kernel = weight_shape
    s = math.prod(kernel) if kernel else 1
    c_in = c_in_g * groups
    dense = c_out * c_in_g * s
    custom = 2 * rank * (c_in * s + c_out)
    return custom / dense


def fast_backward_pays_off(weight_shape: Sequence[int], rank: int, groups: int = 1,
                           stride: Sequence[int] = ()) -> bool:
    """Whether the thin contractions should replace the dense weight gradient for this layer
    (``stride``: the conv's, for the pointwise rule; a strided 1×1 conv runs the thin convs)."""
    pointwise = math.prod(weight_shape[2:]) == 1 and all(s == 1 for s in stride)
    limit = AUTO_MAX_COST_RATIO_POINTWISE if pointwise else AUTO_MAX_COST_RATIO
    return fast_backward_cost_ratio(weight_shape, rank, groups) <= limit


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv/matmul in here, or None when autocast is off."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _autocast_off(device_type: str):
    """A context with autocast off; a no-op where it is off already (entering and leaving
    ``torch.autocast`` costs microseconds of Python per call, twice per layer and step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _CPConv(torch.autograd.Function):
    """y = conv(x, W + A∘B∘C, bias); see the module docstring for the backward.

    Saves x, the frozen W (no copy), the factors and KR(B, C), never the materialized W + ΔW: the backward
    rebuilds it (one small matmul per layer) for the input gradient. ``thin`` picks how the
    factor gradients are computed: thin contractions, or (``thin=False``, where those do not pay
    off, e.g. depthwise convs) the dense weight gradient contracted onto the factors — what
    autograd through W + ΔW computes, without keeping W + ΔW alive until the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, c, stride, padding, dilation, groups, dtype, thin):
        y, x_c, kr = _cp_conv_value(x, weight, bias, (a, b, c), stride, padding, dilation, groups, dtype)
        # KR(B, C) is kept (Π kernel · C_in/g × R: tiny) so the backward does not build it again.
        ctx.save_for_backward(x_c, weight, a, b, c, kr)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.dtype, ctx.thin = dtype, thin
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b, c, kr = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, _, need_bias, need_a, need_b, need_c = ctx.needs_input_grad[:6]
        need_factors = need_a or need_b or need_c
        dense = need_factors and not ctx.thin
        nd = weight.dim() - 2
        out_pad = [0] * nd
        gy = _cast(gy, x.dtype)
        gx = gbias = ga = gb = gc = None
        with _autocast_off(x.device.type):
            if need_x or need_bias or dense:
                w = _cast(cp_add_unfolded(weight, a, kr), ctx.dtype)
                prepad = dense and _slow_depthwise_weight_grad(x, w, stride, padding, dilation, groups)
                gx, gw, gbias = _aten.convolution_backward(
                    gy, x, w, ctx.bias_shape, stride, padding, dilation, False, out_pad, groups,
                    [need_x, dense and not prepad, need_bias])
                if prepad:
                    gw = _depthwise_weight_grad_prepadded(gy, x, w, stride, padding, dilation, groups)
                del w
                gx = gx.to(ctx.x_dtype) if gx is not None else None
                gbias = gbias.to(ctx.bias_dtype) if gbias is not None else None
                if dense:
                    ga, gb, gc = _dense_factor_grads(gw, a, b, c, kr)
            if need_factors and ctx.thin:
                ga, gb, gc = _factor_grads(gy, x, a, b, c, kr, weight.shape, stride, padding, dilation, groups)
        return gx, None, gbias, ga, gb, gc, None, None, None, None, None, None


def _slow_depthwise_weight_grad(x: Tensor, weight: Tensor, stride, padding, dilation, groups) -> bool:
    """Whether the CPU backend would take its slow path for this depthwise weight gradient.

    Measured on torch 2.14 CPU (oneDNN): a 2-d depthwise conv's weight gradient runs 10-30× its
    forward when the input's height is below kernel + stride - 1 (MobileNetV2's last stage at
    64 px: 960 channels at 2×2, 11-16 ms against 0.4 ms forward; full fine-tuning pays that too).
    The same gradient on the zero-padded input with padding 0 takes the fast path (0.5 ms).
    Where the rule does not hold, padding first is slower, so it is applied only here.
    """
    if x.device.type != "cpu" or x.dim() != 4 or weight.shape[1] != 1 or groups != x.shape[1]:
        return False
    if not any(padding) or any(d != 1 for d in dilation):
        return False
    return x.shape[2] < weight.shape[2] + stride[0] - 1


def _depthwise_weight_grad_prepadded(gy, x, weight, stride, padding, dilation, groups) -> Tensor:
    """The weight gradient of conv(x, padding) as that of conv(zero-padded x, padding 0)."""
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph))
    return _aten.convolution_backward(gy, xp, weight, None, stride, [0, 0], dilation, False, [0, 0], groups,
                                      [False, True, False])[1]


def _cp_conv_value(x, weight, bias, factors, stride, padding, dilation, groups, dtype):
    """The forward's value and the (cast) input it saves: shared by :class:`_CPConv` and
    :func:`cp_conv_recompute`, so a recomputed output is bit-for-bit the original."""
    # Cast explicitly and run with autocast off, so forward and backward agree on dtypes: W + ΔW
    # is built in the factors' dtype (under autocast its matmul would run in bf16, and differ
    # from the rebuild in the backward, which runs outside autocast).
    x_c, b_c = _cast(x, dtype), _cast(bias, dtype)
    nd = weight.dim() - 2
    with _autocast_off(x.device.type):
        kr = khatri_rao(factors[1:])
        merged = _cast(cp_add_unfolded(weight, factors[0], kr), dtype)
        y = _aten.convolution(x_c, merged, b_c, stride, padding, dilation, False, [0] * nd, groups)
    return y, x_c, kr


def cp_conv_recompute(x: Tensor, weight: Tensor, bias: Tensor | None, factors: Sequence[Tensor],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      groups: int = 1):
    """A function that recomputes ``cp_conv(x, ...)``'s output with the autocast state of now
    (for :class:`ftn.core.recompute.OutputRecompute`: it runs in the backward, outside autocast)."""
    args = (list(stride), list(padding), list(dilation), int(groups), _compute_dtype(x))
    factors = tuple(factors)
    return lambda: _cp_conv_value(x, weight, bias, factors, *args)[0]


def _dense_factor_grads(gw: Tensor, a: Tensor, b: Tensor, c: Tensor, kr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Factor gradients from the dense weight gradient gW (C_out, C_in/g, *kernel), as autograd
    through ΔW = A·KhatriRao(B, C)ᵀ computes them: dA = gW·KR, dKR = gWᵀ·A, then dB and dC
    (``kr``: KhatriRao(B, C), (C_in/g · S, R), in the factors' dtype)."""
    rank = a.shape[1]
    gw2 = gw.to(a.dtype).reshape(a.shape[0], -1)  # (C_out, C_in/g · S)
    ga = gw2 @ kr
    gkr = (gw2.T @ a).reshape(b.shape[0], c.shape[0], rank)  # (C_in/g, S, R)
    gb = (gkr * c[None, :, :]).sum(1)
    gc = (gkr * b[:, None, :]).sum(0)
    return ga, gb.to(b.dtype), gc.to(c.dtype)


# Positions per sample up to which a pointwise layer's factor gradients use one GEMM over N·P.
_FLAT_MAX_POSITIONS = 16


def _factor_grads(gy, x, a, b, c, kr, w_shape, stride, padding, dilation, groups):
    c_out, c_in_g, *kernel = w_shape
    nd = len(kernel)
    rank = a.shape[1]
    g = groups
    n = gy.shape[0]
    a_c, b_c, c_c = _cast(a, x.dtype), _cast(b, x.dtype), _cast(c, x.dtype)
    # KR(B, C) in the compute dtype: the forward's when the dtypes agree (fp32), else built here.
    kr_c = kr if kr.dtype == x.dtype else khatri_rao([b_c, c_c])  # (C_in/g · S, R)
    pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if pointwise and g == 1 and (channels_last or math.prod(x.shape[2:]) <= _FLAT_MAX_POSITIONS):
        # One GEMM per contraction over all N·P positions, on (N·P, C) matrices: views of
        # channels-last maps (no copy at any size), one copy of small maps (N batched products
        # of P ≤ 16 columns run far below peak). Each product is written with the long N·P side
        # where MKL runs it well: the (N·P × C)·(C × R) forms were 3-10× slower on MobileNetV2.
        x2 = x.movedim(1, -1).reshape(-1, c_in_g)  # (N·P, C_in)
        gy2 = gy.movedim(1, -1).reshape(-1, c_out)  # (N·P, C_out)
        ga = (kr_c.T @ x2.T @ gy2).T  # dA = dYᵀ·Z, Zᵀ = Kᵀ·Xᵀ: (C_out, R)
        h = ((a_c.T @ gy2.T) @ x2)[:, :, None]  # H = (Aᵀ·dYᵀ)·X: (R, C_in, 1)
        return _factor_grads_from(ga, h, a, b, c, b_c, c_c)
    gy4 = gy.reshape(n, g, c_out // g, -1)  # (N, g, C_out/g, P)
    # Output gradient projected onto R channels per group: G[n, g, r, p] = Σ_o A[o, r]·dY[n, o, p].
    proj = torch.matmul(a_c.reshape(g, c_out // g, rank).transpose(-1, -2), gy4)
    if pointwise:
        # A 1×1 conv is a matmul over channels: skip the conv machinery (and its weight
        # reorders), which dominates for thin R-channel convs on small maps.
        x4 = x.reshape(n, g, c_in_g, -1)  # (N, g, C_in/g, P)
        k2 = kr_c.T  # (R, C_in/g), S = 1
        z4 = torch.matmul(k2, x4)  # (N, g, R, P)
        h = torch.matmul(proj, x4.transpose(-1, -2)).sum((0, 1))[:, :, None]  # (R, C_in/g, 1)
    else:
        # K[r, i, s] = B[i, r]·C[s, r], the same for every group: g·R output channels in all.
        k = kr_c.T.reshape(rank, c_in_g, *kernel)
        k_rep = k.repeat(g, *([1] * (nd + 1))) if g > 1 else k
        out_pad = [0] * nd
        z = _aten.convolution(x, k_rep, None, stride, padding, dilation, False, out_pad, g)
        z4 = z.reshape(n, g, rank, -1)  # (N, g, R, P)
        _, h, _ = _aten.convolution_backward(proj.reshape(n, g * rank, *gy.shape[2:]), x, k_rep, None,
                                             stride, padding, dilation, False, out_pad, g,
                                             [False, True, False])
        h = h.reshape(g, rank, c_in_g, -1).sum(0)  # (R, C_in/g, S)
    # dA: batched over N (no copy of dY into a (C_out, N·P) layout), then summed over N.
    ga = torch.matmul(gy4, z4.transpose(-1, -2)).sum(0).reshape(c_out, rank)
    return _factor_grads_from(ga, h, a, b, c, b_c, c_c)


def _factor_grads_from(ga, h, a, b, c, b_c, c_c):
    """dA as given; dB and dC from H (R, C_in/g, S), in the factors' dtypes."""
    gb = (h * c_c.T[:, None, :]).sum(-1).T  # Σ_s H[r, i, s]·C[s, r]
    gc = (h * b_c.T[:, :, None]).sum(1).T  # Σ_i H[r, i, s]·B[i, r]
    return ga.to(a.dtype), gb.to(b.dtype), gc.to(c.dtype)


class _CPLinear(torch.autograd.Function):
    """y = x·(W + A·Bᵀ)ᵀ + bias without the dense weight gradient (``thin``) or with it contracted
    onto A and B; saves x, W and the factors, never W + A·Bᵀ."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, dtype, thin):
        x_c, b_c = _cast(x, dtype), _cast(bias, dtype)
        with _autocast_off(x.device.type):  # W + A·Bᵀ in fp32, as in the backward
            merged = _cast(cp_add(weight, (a, b)), dtype)
            y = F.linear(x_c, merged, b_c)
        ctx.save_for_backward(x_c, weight, a, b)
        ctx.dtype, ctx.thin = dtype, thin
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        gy = _cast(gy, x.dtype)
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gx = gbias = ga = gb = None
        with _autocast_off(x.device.type):
            if need_x:
                gx = (gy @ _cast(cp_add(weight, (a, b)), ctx.dtype)).to(ctx.x_dtype)
            if need_bias:
                gbias = g2.sum(0).to(ctx.bias_dtype)
            if (need_a or need_b) and not ctx.thin:
                gw = (g2.T @ x2).to(a.dtype)  # the dense weight gradient (out, in)
                ga, gb = gw @ b, gw.T @ a
            else:
                if need_a:
                    ga = (g2.T @ (x2 @ b.to(x.dtype))).to(a.dtype)
                if need_b:
                    gb = (x2.T @ (g2 @ a.to(x.dtype))).to(b.dtype)
        return gx, None, gbias, ga, gb, None, None


def cp_conv(x: Tensor, weight: Tensor, bias: Tensor | None, factors: Sequence[Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int = 1, thin: bool = True) -> Tensor:
    """``conv(x, weight + cp_to_tensor(factors), bias)`` with the fast backward.

    ``thin``: factor gradients by thin contractions (default); False: through the dense weight
    gradient (cheaper where :func:`fast_backward_pays_off` says no). Either way only x, the
    factors and the frozen weight are kept for the backward, not W + ΔW.

    ``padding`` must be numeric (pad explicitly first for "same" or non-zero padding modes).
    ``weight`` gets no gradient (it is the frozen base); pass a weight that requires grad and
    this raises, since the dense weight gradient is exactly what it avoids.
    """
    if weight.requires_grad:
        raise ValueError("cp_conv treats the base weight as frozen; it must not require grad")
    a, b, c = factors
    return _CPConv.apply(x, weight, bias, a, b, c, list(stride), list(padding), list(dilation),
                         int(groups), _compute_dtype(x), bool(thin))


def cp_linear(x: Tensor, weight: Tensor, bias: Tensor | None, factors: Sequence[Tensor],
              thin: bool = True) -> Tensor:
    """``F.linear(x, weight + A·Bᵀ, bias)`` with the fast backward (frozen ``weight``); ``thin``
    as in :func:`cp_conv`."""
    if weight.requires_grad:
        raise ValueError("cp_linear treats the base weight as frozen; it must not require grad")
    a, b = factors
    return _CPLinear.apply(x, weight, bias, a, b, _compute_dtype(x), bool(thin))



# ---------------------------------------------------------------------------------------------
# W + ΔW for many layers at once (the launch-bound training step)
#
# Built one layer at a time, W + ΔW and its factor gradients cost about 8 small ops per layer
# (Khatri-Rao product, addmm; two GEMMs, two products and two sums back). On a GPU at the batch
# sizes people use each op is a kernel launch and sets the step's cost. cp_add_grouped builds
# them for all layers together, with a fixed number of ops per group of equally shaped layers:
#
#   F    = cat(every factor)                          all factors as rows of one (Σd × R) matrix
#   KR   = F[idx_b] * F[idx_c]                        every layer's KhatriRao(B, C) rows at once
#   W̃_g  = baddbmm(stack(W of group g), A_g, KR_gᵀ)   one batched GEMM per group of equal shapes
#
# and back, from each group's stacked weight gradient gW̃_g (what autograd's unbind gives):
#
#   dA_g  = gW̃_g · KR_g,   dKR_g = gW̃_gᵀ · A_g        two batched GEMMs per group
#   dB, dC: one index_add_ of dKR·C and dKR·B rows    for all layers at once
#
# A_g, KR_g and every factor's gradient are views of F, KR and dF (a group's factors are
# consecutive rows), so nothing is copied per layer. Linear layers (ΔW = A·Bᵀ) are the same
# with C one constant row of ones. The arithmetic is that of the per-layer path (the same
# products; the sums over the kernel / input positions run in the same order).


class _GroupPlan:
    """Where each factor sits in F, each group's KR rows, and the gather indices, for one list of
    layers (one rank, dtype and device), in call order. Built once per layout and cached: the
    index tensors are the only thing built from Python lists, and building them costs ops."""

    def __init__(self, weight_shapes: tuple, factor_shapes: tuple, dtype: torch.dtype, device: torch.device) -> None:
        self.rank = factor_shapes[0][0][1]
        by_shape: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(weight_shapes, factor_shapes)):
            by_shape.setdefault(key, []).append(i)
        groups = list(by_shape.values())  # layer indices of each group of equal shapes
        # Each group's size, C_out and Π of the other modes (W̃_g is (size, C_out, cols)).
        self.dims = [(len(m), factor_shapes[m[0]][0][0], math.prod(weight_shapes[m[0]][1:])) for m in groups]
        starts = [0]  # index of layer i's first factor in the flat argument list
        for shapes in factor_shapes:
            starts.append(starts[-1] + len(shapes))
        # Rows of F: every group's A's (consecutive, so A_g is one view), then all B's, all C's.
        self.cat_order: list[int] = []  # flat argument indices in F's row order
        self.row_of: list[int] = [0] * starts[-1]  # first row of each flat argument in F
        row = 0
        for k in range(3):
            for members in groups:
                for i in members:
                    if k < len(factor_shapes[i]):
                        self.cat_order.append(starts[i] + k)
                        self.row_of[starts[i] + k] = row
                        row += factor_shapes[i][k][0]
            if k == 0:
                self.a_rows = row
        self.group_rows = [self.row_of[starts[m[0]]] for m in groups]  # first A row of each group
        # A row of ones ends F where there are Linear layers (their KR is B times it).
        linear = any(len(shapes) == 2 for shapes in factor_shapes)
        self.ones = torch.ones(1, self.rank, dtype=dtype, device=device) if linear else None
        idx_b: list[int] = []
        idx_c: list[int] = []
        self.kr_rows: list[int] = []  # first KR row of each group; a layer's rows are (i, s), s fastest
        for members in groups:
            self.kr_rows.append(len(idx_b))
            for i in members:
                b_row = self.row_of[starts[i] + 1]
                if len(factor_shapes[i]) == 3:
                    c_row, d_c = self.row_of[starts[i] + 2], factor_shapes[i][2][0]
                else:
                    c_row, d_c = row, 1  # the ones row
                for b in range(factor_shapes[i][1][0]):
                    idx_b += [b_row + b] * d_c
                    idx_c += range(c_row, c_row + d_c)
        self.kr_count = len(idx_b)
        # Gathered as one (2, n) block [C rows; B rows]: KR is the product of its halves, and the
        # backward's [dKR·C; dKR·B] one broadcast product with it, summed into [B rows; C rows].
        self.idx_cb = torch.tensor(idx_c + idx_b, dtype=torch.long, device=device)
        self.idx_bc = torch.tensor(idx_b + idx_c, dtype=torch.long, device=device)
        self.groups = groups
        self.factor_shapes = [shape for shapes in factor_shapes for shape in shapes]


_PLANS: dict[tuple, _GroupPlan] = {}
_MAX_PLANS = 64  # layouts kept (a model has one per task and rank); beyond, start again


def _group_plan(weights: Sequence[Tensor], factors: Sequence[Tensor], counts: Sequence[int]) -> _GroupPlan:
    weight_shapes = tuple(tuple(w.shape) for w in weights)
    shapes, start = [], 0
    for n in counts:
        shapes.append(tuple(tuple(f.shape) for f in factors[start:start + n]))
        start += n
    key = (weight_shapes, tuple(shapes), factors[0].dtype, factors[0].device)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _GroupPlan(weight_shapes, tuple(shapes), *key[2:])
    return plan


class _GroupedCPAdd(torch.autograd.Function):
    """Every layer's W + ΔW, stacked per group of equal shapes (see the comment above);
    ``weights`` are frozen (no gradient), ``factors`` flat in layer order."""

    @staticmethod
    def forward(ctx, plan: _GroupPlan, weights: list[Tensor], *factors: Tensor):
        rank, n = plan.rank, plan.kr_count
        parts = [factors[j] for j in plan.cat_order]
        if plan.ones is not None:
            parts.append(plan.ones)
        with _autocast_off(factors[0].device.type):
            f = torch.cat(parts)
            sel = f.index_select(0, plan.idx_cb).view(2, n, rank)  # [C rows; B rows] of each KR row
            kr = sel[0] * sel[1]  # C·B = B·C exactly: the per-layer path's products
            outs = []
            for members, (g, out, cols), a_row, k_row in zip(plan.groups, plan.dims, plan.group_rows, plan.kr_rows):
                a = f.narrow(0, a_row, g * out).view(g, out, rank)
                k_t = kr.narrow(0, k_row, g * cols).view(g, cols, rank).transpose(1, 2)
                if g == 1:
                    outs.append(torch.baddbmm(weights[members[0]].reshape(1, out, cols), a, k_t))
                else:  # the stacked copy of the W's becomes W + ΔW in place: one buffer per group
                    stacked = torch.stack([weights[i].reshape(out, cols) for i in members])
                    outs.append(stacked.baddbmm_(a, k_t))
        ctx.save_for_backward(f, kr, sel)
        ctx.plan = plan
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        f, kr, sel = ctx.saved_tensors
        plan = ctx.plan
        rank, n = plan.rank, plan.kr_count
        gf = torch.empty_like(f)
        gf[plan.a_rows:].zero_()  # the B and C rows are summed into below
        gkr = torch.empty_like(kr)
        with _autocast_off(f.device.type):
            for (g, out, cols), rows, k_row, grad in zip(plan.dims, plan.group_rows, plan.kr_rows, grads):
                ga = gf.narrow(0, rows, g * out).view(g, out, rank)
                gk = gkr.narrow(0, k_row, g * cols).view(g, cols, rank)
                if grad is None:  # no layer of the group ran
                    ga.zero_()
                    gk.zero_()
                    continue
                grad = grad.to(f.dtype)
                torch.bmm(grad, kr.narrow(0, k_row, g * cols).view(g, cols, rank), out=ga)
                torch.bmm(grad.transpose(1, 2), f.narrow(0, rows, g * out).view(g, out, rank), out=gk)
            # [dKR·C; dKR·B] summed into the B and C rows they came from, for every layer at once.
            gf.index_add_(0, plan.idx_bc, (gkr * sel).view(2 * n, rank))
        grads_out = [gf.narrow(0, row, shape[0]) for row, shape in zip(plan.row_of, plan.factor_shapes)]
        return (None, None, *grads_out)


def cp_add_grouped(weights: Sequence[Tensor], factors: Sequence[Sequence[Tensor]],
                   dtype: torch.dtype | None = None) -> list[Tensor]:
    """``[W_l + cp_to_tensor(factors_l) for each layer l]`` in a fixed number of ops per group of
    equally shaped layers (see the comment above), differentiable in the factors; the frozen
    ``weights`` get no gradient. Every layer must have the same rank, dtype and device; its
    factors are (A, B, C) for a conv weight, (A, B) for a Linear one. Each result is a view of
    its group's stacked W + ΔW, in the weight's shape; with ``dtype`` (autocast's), W + ΔW is
    built in the factors' dtype and then cast, once per group."""
    if not weights:
        return []
    counts = [len(fs) for fs in factors]
    flat = [f for fs in factors for f in fs]
    plan = _group_plan(weights, flat, counts)
    stacked = _GroupedCPAdd.apply(plan, list(weights), *flat)
    result: list[Tensor | None] = [None] * len(weights)
    for members, w in zip(plan.groups, stacked):
        w = w if dtype is None else w.to(dtype)
        # unbind, not indexing: its backward is one stack of the group's gradients, where
        # indexing would cost a zeros and a copy per layer.
        parts = (w.view(-1),) if len(members) == 1 else w.unbind(0)
        for i, part in zip(members, parts):
            result[i] = part.view(weights[i].shape)
    return result  # type: ignore[return-value]
