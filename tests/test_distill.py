"""distill_clip_loss against the float64 oracle (both losses, every gradient, the teacher's
included), odd shapes and extreme scales, on the backend axis (the CUDA backend, which has no
distillation kernels, must refuse a named call); and its errors."""

import os

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_oracle

import fastcl

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def unit(n, d):
    return F.normalize(torch.randn(n, d, dtype=torch.float64, device=DEVICE), dim=1)


def scalar(value):
    return torch.tensor(value, dtype=torch.float64, device=DEVICE)


# name -> (N, D student, D teacher, student scale, teacher scale)
CASES = {
    "default": (13, 16, 9, 14.0, 20.0),
    "n_is_1": (1, 5, 3, 10.0, 10.0),
    "odd_widths_teacher_wider": (17, 7, 33, 5.0, 1.0),
    "scale_100": (12, 8, 8, 100.0, 100.0),
    "cold_teacher": (10, 6, 6, 10.0, 0.05),
}


def _combined(out):
    """Both losses as one vector, so every gradient is checked against both."""
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_distill_clip_loss(case, dtype, backend):
    n, d, dt, s, ts = CASES[case]
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d), "logit_scale": scalar(s),
              "dist_image_features": unit(n, dt), "dist_text_features": unit(n, dt), "dist_logit_scale": scalar(ts)}
    if backend == "cuda":
        with pytest.raises(ValueError, match="no distill_stats pass"):
            fastcl.distill_clip_loss(**inputs, backend=backend)
        backend = "auto"  # takes another backend
    check_against_oracle(lambda **kw: _combined(fastcl.distill_clip_loss(**kw, backend=backend)),
                         lambda **kw: _combined(oracle.distill_clip_loss(**kw)), inputs, dtype,
                         grad_floor=max(s, ts))


def test_teacher_without_gradient_and_each_loss_alone():
    """A frozen teacher gets no gradient (and costs no teacher products); each loss alone
    backpropagates its own gradient (the distillation term moves the student toward the teacher)."""
    n = 9
    x, y = unit(n, 6).requires_grad_(), unit(n, 6).requires_grad_()
    tx, ty = unit(n, 4), unit(n, 4)
    contrastive, distill = fastcl.distill_clip_loss(x, y, 10.0, tx, ty, 12.0, backend="torch")
    (gx_d,) = torch.autograd.grad(distill, x, retain_graph=True)
    (gx_c,) = torch.autograd.grad(contrastive, x)
    want_c, want_d = oracle.distill_clip_loss(x, y, 10.0, tx, ty, 12.0)
    (wx_d,) = torch.autograd.grad(want_d, x, retain_graph=True)
    (wx_c,) = torch.autograd.grad(want_c, x)
    torch.testing.assert_close(gx_d, wx_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_c, wx_c, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(gx_d, gx_c)


def test_teacher_equal_to_student():
    """The teacher holding the student's values (separate leaves, so both sides get gradients):
    the loss is the student's entropy, and all six gradients match the dense reference."""
    n = 8
    x, y = unit(n, 5), unit(n, 5)
    leaves = [t.clone().requires_grad_() for t in (x, y, scalar(9.0), x, y, scalar(9.0))]
    ref = [t.clone().detach().requires_grad_() for t in leaves]
    got = fastcl.distill_clip_loss(*leaves, backend="torch")[1]
    want = oracle.distill_clip_loss(*ref)[1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, ref)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise():
    x, t = unit(6, 4), unit(6, 3)
    with pytest.raises(ValueError, match="same pairs"):
        fastcl.distill_clip_loss(x, x, 10.0, t[:5], t[:5], 10.0)
    with pytest.raises(TypeError, match="student's dtype"):
        fastcl.distill_clip_loss(x, x, 10.0, t.float(), t.float(), 10.0)
    with pytest.raises(ValueError, match="text_features has 5 rows but image_features has 6"):
        fastcl.distill_clip_loss(x, x[:5], 10.0, t, t, 10.0)


@pytest.mark.slow
def test_never_materialises_n_by_m(monkeypatch):
    from test_autograd_memory import _largest_during

    monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    n = 2048
    leaves = [F.normalize(torch.randn(n, d), dim=1).requires_grad_() for d in (32, 32, 16, 16)]
    scales = [torch.tensor(14.0, requires_grad=True), torch.tensor(20.0, requires_grad=True)]

    def run():
        c, d = fastcl.distill_clip_loss(leaves[0], leaves[1], scales[0], leaves[2], leaves[3], scales[1],
                                        backend="torch")
        (c + d).backward()

    mode = _largest_during(run)
    assert all(t.grad is not None for t in leaves + scales)
    assert mode.largest < n * n // 4, f"{mode.op} produced {mode.largest} elements"
