"""fastcl.compat.info_nce against info-nce-pytorch itself: loss values (every reduction) and the
gradients of query, positive and negative keys, float64 and float32."""

import sys

import pytest
import torch
from helpers import assert_close

host = pytest.importorskip("info_nce", reason="info-nce-pytorch is not installed")

from fastcl.compat import info_nce as compat  # noqa: E402

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def compare(host_fn, mine_fn, tensors, dtype, **kwargs):
    a = [t.clone().requires_grad_() for t in tensors]
    b = [t.clone().requires_grad_() for t in tensors]
    want, got = host_fn(*a, **kwargs), mine_fn(*b, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close("loss", got, want, TOL[dtype], floor=1.0)
    upstream = torch.rand(want.shape, dtype=dtype) + 0.5
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(f"d_arg{i}", y.grad, x.grad, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_in_batch_negatives(dtype, reduction):
    q, k = torch.randn(13, 10, dtype=dtype), torch.randn(13, 10, dtype=dtype)
    compare(host.info_nce, compat.info_nce, [q, k], dtype, temperature=0.07, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unpaired_negatives(dtype, reduction):
    q, k, n = torch.randn(9, 6, dtype=dtype), torch.randn(9, 6, dtype=dtype), torch.randn(21, 6, dtype=dtype)
    compare(host.info_nce, compat.info_nce, [q, k, n], dtype, temperature=0.2, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_defaults(dtype):
    q, k, n = torch.randn(8, 5, dtype=dtype), torch.randn(8, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    compare(host.InfoNCE(), compat.InfoNCE(), [q, k, n], dtype)
    compare(host.InfoNCE(), compat.InfoNCE(), [q, k], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_negatives_delegated(dtype):
    q, k, n = torch.randn(7, 5, dtype=dtype), torch.randn(7, 5, dtype=dtype), torch.randn(7, 3, 5, dtype=dtype)
    compare(host.InfoNCE(negative_mode="paired"), compat.InfoNCE(negative_mode="paired"), [q, k, n], dtype)


def test_paired_without_host_names_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "info_nce", None)
    with pytest.raises(NotImplementedError, match="paired"):
        compat.info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 2, 4), negative_mode="paired")


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3), torch.randn(3, 4)), "<query> must have 2 dimensions"),
    ((torch.randn(3, 4), torch.randn(2, 4)), "same number of samples"),
    ((torch.randn(3, 4), torch.randn(3, 5)), "same number of components"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 2, 4)), "2 dimensions if <negative_mode> == 'unpaired'"),
])
def test_errors_match_host(args, message):
    for fn in (host.info_nce, compat.info_nce):
        with pytest.raises(ValueError, match=message):
            fn(*args)


@pytest.mark.parametrize("negatives", [False, True])
def test_negative_temperature_is_accepted_as_the_host_does(negatives):
    q, k, n = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    tensors = [q, k, n] if negatives else [q, k]
    compare(host.info_nce, compat.info_nce, tensors, torch.float64, temperature=-0.3)
    compare(lambda *t: host.InfoNCE(temperature=-0.3)(*t), lambda *t: compat.InfoNCE(temperature=-0.3)(*t), tensors,
            torch.float64)
