"""Σ ppᵀ over a stride-1 conv input's patches from shifted products (svgd_fx.kernels.patch_gram)
against the patch matrix itself, float64."""

import random

import pytest
import torch

from svgd_fx.kernels import kron_op
from svgd_fx.kernels.applier import eager
from svgd_fx.kernels.patch_gram import applies, patch_gram, patch_statistic, patch_sums

GEOMETRIES = [  # kernel, dilation, padding, input height × width
    ((3, 3), (1, 1), (1, 1), (6, 6)),        # the common 'same' 3×3
    ((1, 1), (1, 1), (0, 0), (4, 5)),        # pointwise
    ((3, 3), (1, 1), (0, 0), (7, 5)),        # 'valid'
    ((5, 5), (2, 2), (4, 4), (9, 8)),        # dilated 'same'
    ((2, 4), (1, 2), (1, 3), (5, 9)),        # even, rectangular, padding wider than the kernel's reach
    ((3, 3), (1, 1), (2, 2), (2, 3)),        # an image smaller than the kernel
    ((5, 3), (1, 1), (0, 1), (5, 1)),        # one column
]


def _patches_gram(x, kernel, dilation, padding):
    p = kron_op.patches(x, kernel, dilation, padding, (1, 1))
    return p @ p.T, p.sum(1), p.shape[1]


def _check(x, kernel, dilation, padding):
    ref, ref_sums, count = _patches_gram(x, kernel, dilation, padding)
    scale = (x * x).sum()                      # (a block of only padding is 0: compare against the input's size)
    torch.testing.assert_close(patch_gram(eager, x, kernel, dilation, padding), ref, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(patch_sums(eager, x, kernel, dilation, padding), ref_sums, rtol=0,
                               atol=1e-13 * x.abs().sum())
    bordered, n = patch_statistic(eager, x, kernel, dilation, padding, has_bias=True)
    assert n == count
    torch.testing.assert_close(bordered[:-1, :-1], ref, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(bordered[-1, :-1], ref_sums, rtol=0, atol=1e-13 * x.abs().sum())
    torch.testing.assert_close(bordered[:-1, -1], ref_sums, rtol=0, atol=1e-13 * x.abs().sum())
    assert bordered[-1, -1] == count


@pytest.mark.parametrize("kernel,dilation,padding,size", GEOMETRIES)
def test_shifted_products_equal_the_patch_matrix(kernel, dilation, padding, size):
    torch.manual_seed(0)
    _check(torch.randn(3, 4, *size, dtype=torch.float64), kernel, dilation, padding)


def test_random_geometries():
    rng = random.Random(0)
    torch.manual_seed(0)
    tried = 0
    while tried < 60:
        kernel, dilation = (rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3])), (rng.choice([1, 2]), rng.choice([1, 3]))
        padding, size = (rng.randint(0, 3), rng.randint(0, 3)), (rng.randint(1, 10), rng.randint(1, 10))
        if any(s + 2 * p - d * (k - 1) < 1 for s, p, d, k in zip(size, padding, dilation, kernel)):
            continue                                 # no output location
        _check(torch.randn(rng.randint(1, 3), rng.randint(1, 3), *size, dtype=torch.float64), kernel, dilation, padding)
        tried += 1


def test_which_convs_it_serves():
    assert applies((8, 3, 6, 6), (1, 1))
    assert not applies((8, 3, 6, 6), (2, 2)) and not applies((8, 3, 6, 6), (1, 2))
    h = object()                                     # any non-int size: a symbolic height or width
    assert not applies((8, 3, h, 6), (1, 1)) and not applies((8, 3, 6, h), (1, 1))
    assert applies((object(), 3, 6, 6), (1, 1))      # a symbolic batch size is fine
