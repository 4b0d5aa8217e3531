"""The compiled CPU kernels against torch."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.models.llama import SMALL_LINEAR_MAX_ROWS, Linear


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    return lib


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_LINEAR_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_equals_torch(kernel: ctypes.CDLL, rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(77, 130, bias=bias)  # sizes that are not multiples of the vector width
    with torch.no_grad():
        layer.weight.copy_(torch.randn(130, 77, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(130, generator=gen))
    x = torch.randn(rows, 77, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.kernel = kernel
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_linear_uses_torch_above_the_row_limit(kernel: ctypes.CDLL) -> None:
    layer = Linear(8, 8, bias=False)
    layer.kernel = kernel
    x = torch.randn(SMALL_LINEAR_MAX_ROWS + 1, 8)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_the_build_is_cached(kernel: ctypes.CDLL) -> None:
    assert native.load() is kernel
