"""fastcl.compat.lightly against lightly itself: loss values, gradients of both views and the
memory bank's state, float64 and float32."""

from functools import partial

import pytest
import torch
from helpers import assert_close

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is not installed")
from lightly.loss.dcl_loss import negative_mises_fisher_weights as lightly_vmf  # noqa: E402

from fastcl.compat import lightly as compat  # noqa: E402

# lightly's own DCLW weights copy-construct a tensor and warn about it
pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def compare(host, mine, dtype, b=11, d=9, grad=True):
    out0, out1 = torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype)
    a = [t.clone().requires_grad_(grad) for t in (out0, out1)]
    c = [t.clone().requires_grad_(grad) for t in (out0, out1)]
    want, got = host(*a), mine(*c)
    assert got.dtype == want.dtype
    assert_close("loss", got, want, TOL[dtype], floor=1.0)
    if grad:
        want.backward()
        got.backward()
        for name, x, y in zip(("out0", "out1"), a, c):
            assert_close(f"d{name}", y.grad, x.grad, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.1}, {"gather_distributed": True}])
def test_ntxent_without_bank(dtype, kwargs):
    compare(lightly_loss.NTXentLoss(**kwargs), compat.NTXentLoss(**kwargs), dtype)


def _bank_pair(dtype, bank_size, d, temperature=0.2):
    torch.manual_seed(1234)
    host = lightly_loss.NTXentLoss(temperature, memory_bank_size=(bank_size, d))
    torch.manual_seed(1234)  # same random initial bank
    mine = compat.NTXentLoss(temperature, memory_bank_size=(bank_size, d))
    assert torch.equal(host.memory_bank.bank, mine.memory_bank.bank)
    if dtype == torch.float64:  # lightly's einsum needs the bank in the features' dtype
        host, mine = host.double(), mine.double()
    return host, mine


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_memory_bank(dtype):
    """MoCo mode over steps that wrap the bank (25 is not a multiple of 7): bank read before the
    enqueue, one direction, the tail of a wrapping batch dropped."""
    d = 9
    host, mine = _bank_pair(dtype, 25, d)
    for step in range(6):
        compare(host, mine, dtype, b=7, d=d, grad=step != 3)  # step 3: no grad, no enqueue
        assert torch.equal(host.memory_bank.bank, mine.memory_bank.bank)
        assert torch.equal(host.memory_bank.bank_ptr, mine.memory_bank.bank_ptr)


def test_memory_bank_buffers_and_size_checks():
    mine = compat.NTXentLoss(memory_bank_size=(6, 4))
    assert mine.memory_bank.bank.shape == (6, 4) and mine.memory_bank.bank.dtype == torch.float32
    assert "memory_bank.bank" not in mine.state_dict()  # non-persistent, as lightly
    with pytest.raises(ValueError, match="does not specify the feature"):
        compat.NTXentLoss(memory_bank_size=128)
    with pytest.raises(ValueError, match="Illegal temperature"):
        compat.NTXentLoss(temperature=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_dcl(dtype, temperature):
    compare(lightly_loss.DCLLoss(temperature), compat.DCLLoss(temperature), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma", [0.5, 0.2])
def test_dclw(dtype, sigma):
    compare(lightly_loss.DCLWLoss(0.1, sigma=sigma), compat.DCLWLoss(0.1, sigma=sigma), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dcl_with_lightly_vmf_weight_fn_is_fused(dtype):
    weight_fn = partial(lightly_vmf, sigma=0.3)
    assert compat._vmf_sigma(weight_fn) == 0.3
    compare(lightly_loss.DCLLoss(weight_fn=weight_fn), compat.DCLLoss(weight_fn=weight_fn), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dcl_custom_weight_fn_with_gradient(dtype):
    """lightly's docstring example: the weights depend on the views and carry gradient."""
    def weight_fn(a, b):
        return torch.sum((a - b) ** 2, dim=1)

    compare(lightly_loss.DCLLoss(0.2, weight_fn=weight_fn), compat.DCLLoss(0.2, weight_fn=weight_fn), dtype)


def test_dclw_keeps_lightly_attributes():
    loss = compat.DCLWLoss(sigma=0.7)
    assert isinstance(loss.weight_fn, partial) and loss.weight_fn.keywords == {"sigma": 0.7}
    assert not hasattr(loss, "sigma")


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_negative_temperature_is_accepted_as_the_host_does(name):
    compare(getattr(lightly_loss, name)(temperature=-0.7), getattr(compat, name)(temperature=-0.7), torch.float64)


def test_negative_temperature_with_a_memory_bank():
    host, mine = _bank_pair(torch.float64, 13, 9, temperature=-0.4)
    for _ in range(3):
        compare(host, mine, torch.float64, b=5, d=9)
