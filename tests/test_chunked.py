"""The chunked gradient pass (``fastcl.backends.chunked``): its settings, the choice rule, the
memory budget, and bf16 accuracy against a plain bf16 PyTorch loss; and no host reads on the GPU
path (meta tensors). The chunked pass's correctness over the whole variant matrix is the
``*-chunked`` backend axis of test_losses.py (conftest.py)."""

import os

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_skip_reason, force_chunked, use_emulated_cuda
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastcl
from fastcl.backends import chunked

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FASTCL_BACKWARD", raising=False)
    monkeypatch.delenv("FASTCL_MEMORY_BUDGET_MB", raising=False)


def test_budget_sets_the_rows_per_chunk(monkeypatch):
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", "1")
    # one row of G: c logits of 2 (bf16), 4 (fp32) or 8 (fp64) bytes; off CUDA a bf16 row is
    # widened to fp32 for its products, 4 more bytes per logit
    gpu = torch.device("cuda")
    assert chunked.chunk_rows(10 ** 6, 1000, torch.bfloat16, device=gpu) == MiB // 2000
    assert chunked.chunk_rows(10 ** 6, 1000, torch.bfloat16) == MiB // 6000
    assert chunked.chunk_rows(10 ** 6, 1000, torch.float32) == MiB // 4000
    assert chunked.chunk_rows(10 ** 6, 1000, torch.float64) == MiB // 8000
    assert chunked.chunk_rows(10 ** 6, 1000, torch.float32, extra_row_bytes=96) == MiB // 4096
    assert chunked.chunk_rows(7, 1000, torch.float32) == 7  # never more rows than there are
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", "0.5")
    assert chunked.chunk_rows(10 ** 6, 1000, torch.float32) == (MiB // 2) // 4000
    monkeypatch.delenv("FASTCL_MEMORY_BUDGET_MB")
    assert chunked.chunk_rows(10 ** 6, 1000, torch.float32) == (512 * MiB) // 4000  # the documented default


@pytest.mark.parametrize("name, value", [("FASTCL_BACKWARD", "fast"), ("FASTCL_MEMORY_BUDGET_MB", "abc"),
                                         ("FASTCL_MEMORY_BUDGET_MB", "0"), ("FASTCL_MEMORY_BUDGET_MB", "-3"),
                                         ("FASTCL_MEMORY_BUDGET_MB", "inf")])
def test_bad_settings_raise_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    q = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        fastcl.clip_loss(q, torch.randn(4, 3), 10.0, backend="torch").backward()


def test_forced_chunked_below_one_row_raises(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKWARD", "chunked")
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", "0.0001")  # 104 bytes: less than one row of 64 fp32 logits
    q = torch.randn(64, 8, requires_grad=True)
    with pytest.raises(ValueError, match="FASTCL_MEMORY_BUDGET_MB"):
        fastcl.info_nce(q, torch.randn(64, 8), backend="torch").backward()


def test_choice_rule():
    """``auto``: fused off a GPU; on a GPU the cost model's choice (a model until measured)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert chunked.choose(cpu, torch.bfloat16, 65536, 65536, 768, 2) == "fused"
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 768, 2) == "chunked"  # wide: S rebuilt 3x fused
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 1024, 2) == "chunked"
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 64, 2) == "fused"  # narrow: G traffic dominates
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 768, 0) == "fused"  # no gradient wanted


def test_choice_rule_respects_the_budget(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", "1")  # 8 rows of 65536 bf16 logits: too few to be worth it
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 768, 2) == "fused"
    monkeypatch.setenv("FASTCL_BACKWARD", "fused")
    monkeypatch.delenv("FASTCL_MEMORY_BUDGET_MB")
    assert chunked.choose(gpu, torch.bfloat16, 65536, 65536, 768, 2) == "fused"


def test_model_counts_the_fused_split():
    """The fused pass builds S once while the owned tile stays on chip (D <= 256 in bf16), once
    per 128-wide chunk beyond; the chunked one builds it once."""
    bf16, n = torch.bfloat16, 65536
    one = chunked.modelled_seconds("fused", bf16, n, n, 256, 2)
    six = chunked.modelled_seconds("fused", bf16, n, n, 768, 2)
    # per direction: S (2NMD) once per chunk plus the product (2NMD); D tripled as well
    assert six / one == pytest.approx((6 + 1) * 3 / (1 + 1), rel=1e-3)
    # the chunked pass's FLOPs are linear in D; its G traffic is not: less than doubling
    ratio = chunked.modelled_seconds("chunked", bf16, n, n, 768, 2) / chunked.modelled_seconds("chunked", bf16, n, n,
                                                                                                384, 2)
    assert 1 < ratio < 2


def _count_chunks(monkeypatch):
    calls = []
    run = chunked.run

    def spy(fill, *args, **kwargs):
        def counted(r0, r1, g):
            calls.append((r0, r1))
            return fill(r0, r1, g)

        return run(counted, *args, **kwargs)

    monkeypatch.setattr(chunked, "run", spy)
    return calls


LOSSES = {
    "clip": lambda q, k, b: fastcl.clip_loss(q, k, 10.0, backend=b),
    "info_nce_labels": lambda q, k, b: fastcl.info_nce(q, k, labels=torch.arange(q.shape[0], device=DEVICE) % 3,
                                                       backend=b),
    "siglip": lambda q, k, b: fastcl.siglip_loss(q, k, 10.0, -5.0, backend=b),
}


def _set_up(name, monkeypatch, dtype=None):
    reason = backend_skip_reason(name, dtype)
    if reason:
        pytest.skip(reason)
    if name == "cuda" and DEVICE == "cpu":
        use_emulated_cuda(monkeypatch)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_forced_chunked_runs_every_chunk(monkeypatch, name, loss):
    _set_up(name, monkeypatch)
    force_chunked(monkeypatch, rows=4)
    calls = _count_chunks(monkeypatch)
    n = 11
    q = torch.randn(n, 5, device=DEVICE, requires_grad=True)
    k = torch.randn(n, 5, device=DEVICE, requires_grad=True)
    LOSSES[loss](q, k, name).backward()
    rows = sorted(set(calls))
    assert rows == [(0, 4), (4, 8), (8, 11)], calls


class LargestBytes(TorchDispatchMode):
    """The largest tensor (in bytes) any op of this thread produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_workspace_stays_inside_the_budget(monkeypatch, loss):
    """Triton (its launchers allocate on this thread): largest tensor <= budget + O((N + M) D)."""
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    n, d = 160, 16
    budget = 40 * n * 4 + 40 * 2 * 4 * 10  # 40 rows of 160 fp32 logits (+ sigmoid's per-tile sums)
    monkeypatch.setenv("FASTCL_BACKWARD", "chunked")
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", repr(budget / MiB))
    calls = _count_chunks(monkeypatch)
    q = F.normalize(torch.randn(n, d, device=DEVICE), dim=1).requires_grad_()
    k = F.normalize(torch.randn(n, d, device=DEVICE), dim=1).requires_grad_()
    fn = {"clip": lambda: fastcl.clip_loss(q, k, 10.0, backend="triton"),
          "siglip": lambda: fastcl.siglip_loss(q, k, 10.0, -5.0, backend="triton")}[loss]
    with LargestBytes() as mode:
        fn().backward()
    assert len(calls) == 4  # 160 rows in chunks of 40
    assert mode.largest <= budget + 4 * (2 * n) * d * 4, mode.largest
    assert mode.largest < n * n * 4


def test_workspace_is_n_by_m_only_when_the_budget_holds_it(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKWARD", "chunked")
    monkeypatch.setenv("FASTCL_MEMORY_BUDGET_MB", "64")
    calls = _count_chunks(monkeypatch)
    q = torch.randn(300, 8, requires_grad=True)
    fastcl.clip_loss(q, torch.randn(300, 8), 10.0, backend="torch").backward()
    assert sorted(set(calls)) == [(0, 300)]


def _plain_bf16_clip(q, k, scale):
    """What a user writes without fastcl: the logits and the loss in the input dtype."""
    logits = scale * q @ k.T
    target = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _plain_bf16_siglip(q, k, scale, bias):
    logits = scale * q @ k.T + bias
    z = 2 * torch.eye(q.shape[0], device=q.device, dtype=q.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / q.shape[0]


@pytest.mark.parametrize("mode", ["fused", "chunked"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("name", ["torch", pytest.param("triton", marks=pytest.mark.gpu), "cuda"])
def test_bf16_gradients_no_worse_than_plain_bf16(monkeypatch, name, loss, mode):
    """Every gradient's max error against float64 <= a plain bf16 PyTorch loss's on the same inputs."""
    _set_up(name, monkeypatch, torch.bfloat16)
    if mode == "chunked":
        force_chunked(monkeypatch, rows=48)
    n, d = 256, 64
    q64 = F.normalize(torch.randn(n, d, dtype=torch.float64, device=DEVICE), dim=1).to(torch.bfloat16).double()
    k64 = F.normalize(torch.randn(n, d, dtype=torch.float64, device=DEVICE), dim=1).to(torch.bfloat16).double()
    scale, bias = 20.0, -8.0

    def grads(fn, dtype):
        q, k = (x.detach().to(dtype).clone().requires_grad_() for x in (q64, k64))
        fn(q, k).backward()
        return q.grad.double(), k.grad.double()

    if loss == "clip":
        ref = grads(lambda q, k: oracle.clip_loss(q, k, scale), torch.float64)
        plain = grads(lambda q, k: _plain_bf16_clip(q, k, scale), torch.bfloat16)
        ours = grads(lambda q, k: fastcl.clip_loss(q, k, scale, backend=name), torch.bfloat16)
    else:
        ref = grads(lambda q, k: oracle.siglip_loss(q, k, scale, bias), torch.float64)
        plain = grads(lambda q, k: _plain_bf16_siglip(q, k, scale, bias), torch.bfloat16)
        ours = grads(lambda q, k: fastcl.siglip_loss(q, k, scale, bias, backend=name), torch.bfloat16)
    for which, r, p, o in zip(("query", "key"), ref, plain, ours):
        plain_err, our_err = (p - r).abs().max().item(), (o - r).abs().max().item()
        assert our_err <= plain_err, f"d{which}: fastcl {our_err:.3e} > plain bf16 {plain_err:.3e}"


@pytest.mark.parametrize("mode", ["fused", "chunked"])
def test_torch_backend_passes_never_sync_off_the_cpu(monkeypatch, mode):
    """On a device that is not the CPU the torch backend's passes read nothing on the host (no
    ``.item()``, ``nonzero``, data-dependent branch): on meta tensors, which hold no data, any
    such read raises. Labels are left out (their classes come from ``torch.unique``)."""
    from fastcl._spec import SoftmaxSpec
    from fastcl.backends import torch as torch_backend

    meta = torch.device("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(torch.empty((), device=meta))  # what a host read would do
    monkeypatch.setenv("FASTCL_BACKWARD", mode)
    n, c, d = 37, 41, 8
    q, k = torch.empty(n, d, device=meta), torch.empty(c, d, device=meta)
    s, w = torch.empty(n, device=meta), torch.empty(n, device=meta)
    pos = torch.empty(n, dtype=torch.long, device=meta)
    for spec in (SoftmaxSpec(positive_index=pos), SoftmaxSpec(positive_index=pos, decoupled=True, n_grad_cols=30),
                 SoftmaxSpec(positive_index=pos, symmetric=True, exclude_self=True)):
        st = torch_backend.softmax_stats(q, k, s, spec)
        w_col = torch.empty(c, device=meta) if spec.symmetric else None
        acc_q, acc_k = torch_backend.softmax_grad(q, k, s, spec, st.lse_row, w, w, st.lse_col, w_col)
        assert acc_q.shape == (n, d) and acc_k.shape == (c, d)
    sums = torch_backend.sigmoid_pass(q, k, s, torch.empty((), device=meta), pos)
    assert sums.acc_q.shape == (n, d) and sums.acc_k.shape == (c, d)


META_CALLS = {
    "clip": lambda q, k, s: fastcl.clip_loss(q, k, s, s * 0.1, backend="torch"),
    "siglip": lambda q, k, s: fastcl.siglip_loss(q, k, s, -s, backend="torch"),
    "info_nce_positives_rows_queue": lambda q, k, s: fastcl.info_nce(
        q, k, positive_index=torch.empty(q.shape[0], dtype=torch.long, device="meta"), negatives=k[:5].detach(),
        temperature=s.expand(q.shape[0]), backend="torch"),
    "info_nce_symmetric_exclude_self": lambda q, k, s: fastcl.info_nce(
        q, k, positive_index=torch.empty(q.shape[0], dtype=torch.long, device="meta"), symmetric=True,
        exclude_self=True, scale=s, backend="torch"),
    "nt_xent": lambda q, k, s: fastcl.nt_xent(q, k, backend="torch"),
    "dcl": lambda q, k, s: fastcl.dcl(q, k, backend="torch"),
}


@pytest.mark.parametrize("mode", ["fused", "chunked"])
@pytest.mark.parametrize("call", sorted(META_CALLS))
def test_public_losses_read_nothing_on_the_host_during_a_graph_capture(monkeypatch, call, mode):
    """A training step can be captured in a CUDA graph: while capturing, the value checks are
    skipped and nothing else on the path (checks, lowering, autograd layer, torch backend) reads a
    tensor on the host. Meta tensors hold no data, so any host read raises."""
    from fastcl import _checks

    monkeypatch.setenv("FASTCL_BACKWARD", mode)
    q = torch.empty(16, 8, device="meta", requires_grad=True)
    k = torch.empty(16, 8, device="meta", requires_grad=True)
    s = torch.empty((), device="meta", requires_grad=True)
    if call == "info_nce_positives_rows_queue":  # outside a capture the checks read the values
        with pytest.raises((RuntimeError, NotImplementedError)):
            META_CALLS[call](q, k, s)
    monkeypatch.setattr(_checks, "values_readable", lambda device: False)
    META_CALLS[call](q, k, s).backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("mode", ["fused", "chunked"])
@pytest.mark.parametrize("name", ["torch", "cuda"])
def test_float16_small_gradients_do_not_underflow(monkeypatch, name, mode):
    """The fp16 gradient scale (``common.float16_gradient_scale``) in the torch and CUDA passes:
    G_ij = w_i p_ij ~ 1.6e-7 would sink into fp16 subnormals where G is rounded to fp16 (the CUDA
    kernels, every chunked workspace). test_triton.py has the Triton twin."""
    import oracle
    from helpers import check_against_oracle

    _set_up(name, monkeypatch, torch.float16)
    if mode == "chunked":
        force_chunked(monkeypatch, rows=256)
    n, d, weight = 640, 16, 1e-4
    unit = lambda: F.normalize(torch.randn(n, d, dtype=torch.float64, device=DEVICE), dim=1)  # noqa: E731
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, temperature=1.0, symmetric=True, reduction="sum", backend=name) * weight,
        lambda **kw: oracle.info_nce(**kw, temperature=1.0, symmetric=True, reduction="sum") * weight,
        {"query": unit(), "key": unit()}, torch.float16, grad_floor=weight)
