import itertools

import pytest
import torch

from ftn.core.cp import (conv_modes, cp_add, cp_num_params, cp_to_tensor, khatri_rao, linear_modes,
                    max_efficient_rank, weight_modes)


def naive_cp(factors):
    """Σ_r a_r ⊗ b_r ⊗ ... by an explicit loop over the rank and outer products."""
    rank = factors[0].shape[1]
    total = torch.zeros([f.shape[0] for f in factors], dtype=factors[0].dtype)
    for r in range(rank):
        term = factors[0][:, r]
        for f in factors[1:]:
            term = torch.tensordot(term, f[:, r], dims=0)
        total += term
    return total


@pytest.mark.parametrize("modes", [(5, 3), (4, 3, 9), (2, 3, 4, 5), (7, 1, 9)])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_cp_to_tensor_matches_sum_of_outer_products(modes, rank):
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in modes]
    torch.testing.assert_close(cp_to_tensor(factors), naive_cp(factors), rtol=0, atol=1e-12)


def test_cp_to_tensor_reshapes_to_conv_weight_layout():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(d, 2, generator=g, dtype=torch.float64) for d in (4, 3, 6))
    dense = cp_to_tensor([a, b, c], (4, 3, 2, 3))
    # element (o, i, kh, kw) uses kernel index kh*kw_size + kw of the third factor
    for o, i, kh, kw in itertools.product(range(4), range(3), range(2), range(3)):
        expected = (a[o] * b[i] * c[kh * 3 + kw]).sum()
        assert torch.isclose(dense[o, i, kh, kw], expected)


@pytest.mark.parametrize("shape", [(96, 16, 1, 1), (960, 1, 3, 3), (64, 64, 3, 3), (1280, 320, 1, 1), (384, 64)])
def test_cp_add_is_the_two_step_sum(shape):
    """W + ΔW accumulated inside the GEMM (the fast path's rebuild) equals W + cp_to_tensor to
    float rounding, for conv (3 factors) and Linear (2) weights (bit for bit with the MKL of the
    development machine; a BLAS that fuses the add into its FMAs may differ in the last bit);
    gradients reach every factor as through the sum."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g)
    modes = (shape[0], shape[1], *([shape[2] * shape[3]] if len(shape) == 4 else []))
    factors = [torch.randn(d, 8, generator=g).requires_grad_() for d in modes]
    two_step = weight + cp_to_tensor(factors, shape)
    one_gemm = cp_add(weight, factors)
    assert one_gemm.shape == weight.shape and one_gemm.is_contiguous()
    torch.testing.assert_close(one_gemm, two_step, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(shape, generator=g)
    grads_two = torch.autograd.grad(two_step, factors, upstream)
    grads_one = torch.autograd.grad(one_gemm, factors, upstream)
    for a, b in zip(grads_two, grads_one):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_cp_add_keeps_type_promotion_across_dtypes():
    """A float16 base with float32 factors (addmm takes one dtype) sums as ``+`` would."""
    weight = torch.randn(6, 4, 3, 3).half()
    factors = [torch.randn(d, 2) for d in (6, 4, 9)]
    out = cp_add(weight, factors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, weight.float() + cp_to_tensor(factors, weight.shape))
    with pytest.raises(ValueError, match="two factors"):
        cp_add(weight, factors[:1])


def test_khatri_rao_is_columnwise_kronecker():
    g = torch.Generator().manual_seed(0)
    b, c = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    kr = khatri_rao([b, c])
    for r in range(4):
        torch.testing.assert_close(kr[:, r], torch.kron(b[:, r], c[:, r]))


def test_modes_and_parameter_count():
    assert conv_modes((64, 3, 7, 7)) == (64, 3, 49)
    assert conv_modes((32, 1, 3, 3)) == (32, 1, 9)  # depthwise
    assert linear_modes((10, 20)) == (10, 20)
    assert weight_modes((10, 20)) == (10, 20)
    assert weight_modes((8, 4, 3)) == (8, 4, 3)  # Conv1d
    assert cp_num_params((64, 3, 49), 40) == 40 * (64 + 3 + 49)
    with pytest.raises(ValueError):
        weight_modes((5,))


def test_max_efficient_rank_is_the_largest_rank_below_dense_size():
    for modes in [(32, 1, 9), (64, 64, 9), (128, 64, 1), (10, 20), (1, 1, 1)]:
        r = max_efficient_rank(modes)
        dense = torch.Size(modes).numel()
        assert cp_num_params(modes, r) < dense or r == 0
        assert cp_num_params(modes, r + 1) >= dense
    assert max_efficient_rank((32, 1, 9)) == 6
