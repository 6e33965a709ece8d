import itertools

import pytest
import torch

from ftn.cp import (conv_modes, cp_num_params, cp_to_tensor, khatri_rao, linear_modes,
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
