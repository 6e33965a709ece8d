"""The factorization itself: a CP (canonical polyadic) tensor from its factors.

This module is the one place where ΔW is defined. For a weight seen as a K-way tensor with mode
sizes (d_0, ..., d_{K-1}) and rank R, each factor F_k is a (d_k × R) matrix and

    ΔW[i_0, ..., i_{K-1}] = Σ_r F_0[i_0, r] · F_1[i_1, r] · ... · F_{K-1}[i_{K-1}, r].

For K = 2 this is A·Bᵀ (Linear layers); for a Conv2d weight (C_out, C_in/groups, kh, kw) the
three modes are C_out, C_in/groups and the flattened kernel kh·kw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "cp_add",
    "cp_add_unfolded",
    "conv_modes",
    "linear_modes",
    "weight_modes",
    "cp_num_params",
    "max_efficient_rank",
    "khatri_rao",
    "cp_to_tensor",
]


def conv_modes(weight_shape: Sequence[int]) -> tuple[int, int, int]:
    """CP modes of a conv weight (C_out, C_in/groups, *kernel): (C_out, C_in/groups, prod(kernel))."""
    c_out, c_in, *kernel = weight_shape
    return (int(c_out), int(c_in), int(math.prod(kernel)))


def linear_modes(weight_shape: Sequence[int]) -> tuple[int, int]:
    """CP modes of a Linear weight (out, in): the 2-way case."""
    out_features, in_features = weight_shape
    return (int(out_features), int(in_features))


def weight_modes(weight_shape: Sequence[int]) -> tuple[int, ...]:
    """Modes for a weight of any layer: 2-D weights are 2-way, conv weights are 3-way."""
    if len(weight_shape) == 2:
        return linear_modes(weight_shape)
    if len(weight_shape) >= 3:
        return conv_modes(weight_shape)
    raise ValueError(f"cannot factorize a weight of shape {tuple(weight_shape)}")


def cp_num_params(modes: Sequence[int], rank: int) -> int:
    """Numbers held by rank-R CP factors of a tensor with these modes: R · Σ d_k."""
    return int(rank) * int(sum(modes))


def max_efficient_rank(modes: Sequence[int]) -> int:
    """Largest rank whose factors hold fewer numbers than the dense tensor (R·Σd < Πd).

    Above this rank a dense ΔW would be smaller than its factorization; depthwise convs, whose
    input mode is 1, are the common case where a requested rank exceeds it.
    """
    return (math.prod(modes) - 1) // sum(modes)


def khatri_rao(factors: Sequence[Tensor]) -> Tensor:
    """Column-wise Kronecker product of (d_k × R) matrices: a (Π d_k × R) matrix.

    Row index runs over the modes in C order (the first factor varies slowest), matching
    ``Tensor.reshape`` of the dense tensor.
    """
    result = factors[0]
    for factor in factors[1:]:
        rank = result.shape[1]
        result = (result[:, None, :] * factor[None, :, :]).reshape(-1, rank)
    return result


def _unfolded(factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(F_0, KhatriRao(F_1, ..., F_{K-1})): the CP tensor unfolded along its first mode is
    F_0 · KRᵀ."""
    if len(factors) < 2:
        raise ValueError("a CP tensor needs at least two factors")
    return factors[0], khatri_rao(factors[1:])


def cp_add(base: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``base + cp_to_tensor(factors, base.shape)`` as one GEMM that accumulates onto ``base``
    (``addmm``): no ΔW-sized intermediate is written and read back. It equals the two-step sum
    to float rounding (bit for bit with the development machine's MKL; tests/core/test_cp.py)
    and is 1.1-1.6× faster there (a 512×512×3×3 weight at rank 8: 2.0 → 1.3 ms, 1 thread)."""
    first, other = _unfolded(factors)
    return cp_add_unfolded(base, first, other)


def cp_add_unfolded(base: Tensor, first: Tensor, other: Tensor) -> Tensor:
    """:func:`cp_add` from the unfolded factors: ``first`` (d_0 × R) and ``other`` =
    KhatriRao(F_1, ..., F_{K-1}) (Π_{k≥1} d_k × R), for callers that keep the Khatri-Rao product
    (the fast backward reuses the forward's instead of building it again)."""
    if base.dtype != first.dtype:  # addmm takes one dtype; keep the sum's type promotion
        return base + (first @ other.T).reshape(base.shape)
    return torch.addmm(base.reshape(base.shape[0], -1), first, other.T).reshape(base.shape)


def cp_to_tensor(factors: Sequence[Tensor], shape: Sequence[int] | None = None) -> Tensor:
    """Dense tensor Σ_r F_0[:, r] ⊗ ... ⊗ F_{K-1}[:, r], optionally reshaped to ``shape``.

    Built as F_0 · KhatriRao(F_1, ..., F_{K-1})ᵀ: one matmul, no loop over the rank, and no
    (d_0 × d_1 × R) intermediate such as a naive einsum would create.
    """
    first, other = _unfolded(factors)
    dense = first @ other.T
    modes = [f.shape[0] for f in factors]
    return dense.reshape(tuple(shape) if shape is not None else modes)
