"""gradcheck in float64, the never-N x M guarantee, and the nn modules."""

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import InsideOperators
from torch.utils._pytree import tree_flatten

import fastcl

# the torch backend: gradcheck's many calls and the N_BIG memory check would take minutes in
# Triton's interpreter (the Triton launcher has its own allocation test in test_triton.py)
BACKEND = "torch"


def _leaf(*shape, scale=0.5):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("case", ["labels_queue", "symmetric_rows_scale", "decoupled_exclude", "hard_negatives",
                                  "debias_symmetric_rows_scale"])
def test_gradcheck_info_nce(case, torch_blocks):
    n, m, d = 5, 7, 3
    q, k = _leaf(n, d), _leaf(m, d)
    if case == "labels_queue":
        neg = _leaf(4, d)
        lab = torch.tensor([0, 1, 0, 2, 1])
        fn = lambda q, k, neg, t: fastcl.info_nce(q, k, temperature=t, labels=lab, key_labels=torch.tensor([0, 1, 2, 0, 1, 2, 0]),
                                                  negatives=neg, negative_labels=torch.tensor([1, 3, 0, 3]), backend=BACKEND)
        args = (q, k, neg, torch.tensor(0.7, dtype=torch.float64, requires_grad=True))
    elif case == "symmetric_rows_scale":
        fn = lambda q, k, s: fastcl.info_nce(q, k, scale=s, symmetric=True, positive_index=torch.tensor([6, 2, 0, 3, 1]), backend=BACKEND)
        args = (q, k, (torch.rand(n, dtype=torch.float64) * 3 + 0.5).requires_grad_())
    elif case == "debias_symmetric_rows_scale":
        fn = lambda q, k, s: fastcl.info_nce(q, k, scale=s, symmetric=True, debias=0.4, positive_index=torch.tensor([6, 2, 0, 3, 1]), backend=BACKEND)
        args = (q, k, (torch.rand(n, dtype=torch.float64) * 3 + 0.5).requires_grad_())
    elif case == "decoupled_exclude":
        k = _leaf(n, d)
        fn = lambda q, k: fastcl.info_nce(q, k, exclude_self=True, decoupled=True, temperature=0.9,
                                          positive_index=torch.tensor([1, 2, 3, 4, 0]), reduction="sum", backend=BACKEND)
        args = (q, k)
    else:
        fn = lambda q, k: fastcl.info_nce(q, k, temperature=0.6, positive_index=torch.tensor([0, 2, 4, 6, 1]), reduction="none", backend=BACKEND)
        args = (q, k)
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_clip_siglip_supcon_dcl(torch_blocks):
    n, d = 6, 4
    img, txt = _leaf(n, d), _leaf(n, d)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s, b: fastcl.clip_loss(i, t, s, b, backend=BACKEND), (img, txt, s, b))
    assert torch.autograd.gradcheck(lambda i, t, s, b: fastcl.siglip_loss(i, t, s, b, backend=BACKEND), (img, txt, s, b))
    feats = _leaf(n, 2, d)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda f: fastcl.supcon(f, labels, temperature=0.5, backend=BACKEND), (feats,))
    # DCL only: DCLW's weights are computed from detached features by definition, so finite
    # differences see a dependence the analytic gradient rightly ignores (the oracle test covers it)
    assert torch.autograd.gradcheck(lambda a, c: fastcl.dcl(a, c, 0.5, backend=BACKEND), (img, txt))
    assert torch.autograd.gradcheck(lambda a, c: fastcl.nt_xent(a, c, 0.5, backend=BACKEND), (img, txt))


class LargestTensor(InsideOperators):
    """Records the largest tensor any op produces while active, inside fastcl's custom
    operators too."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def seen(self, func, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func


def _largest_during(fn):
    """The largest tensor ``fn`` creates. One intra-op thread: the torch backend then runs its
    tile pieces in this thread, where the (thread-local) dispatch mode sees them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LargestTensor() as mode:
            fn()
    finally:
        torch.set_num_threads(threads)
    return mode


def _unit(n, d):
    return F.normalize(torch.randn(n, d), dim=1).requires_grad_()


N_BIG = 2048
NEVER_NM = {
    "clip": lambda a, b: fastcl.clip_loss(a, b, torch.tensor(20.0, requires_grad=True), torch.tensor(1.0, requires_grad=True), backend=BACKEND),
    "siglip": lambda a, b: fastcl.siglip_loss(a, b, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True), backend=BACKEND),
    "info_nce_labels_queue": lambda a, b: fastcl.info_nce(a, b, labels=torch.arange(N_BIG) % 10, negatives=_unit(512, a.shape[1]), backend=BACKEND),
    "info_nce_rows_temperature": lambda a, b: fastcl.info_nce(a, b, temperature=torch.full((N_BIG,), 0.1, requires_grad=True), decoupled=True, backend=BACKEND),
    "nt_xent": lambda a, b: fastcl.nt_xent(a, b, backend=BACKEND),
    "clip_label_smoothing": lambda a, b: fastcl.clip_loss(a, b, torch.tensor(20.0, requires_grad=True), label_smoothing=0.1, backend=BACKEND),
    "info_nce_labels_smoothing": lambda a, b: fastcl.info_nce(a, b, labels=torch.arange(N_BIG) % 10, exclude_self=True, label_smoothing=0.1, backend=BACKEND),
    "clip_false_negative_margin": lambda a, b: fastcl.clip_loss(a, b, torch.tensor(20.0, requires_grad=True), false_negative_margin=0.0, backend=BACKEND),
    "info_nce_false_negative_margin_queue": lambda a, b: fastcl.info_nce(a, b, negatives=_unit(512, a.shape[1]), false_negative_margin=0.05, backend=BACKEND),
    "info_nce_hardness_symmetric": lambda a, b: fastcl.info_nce(a, b, debias=0.1, hardness=1.0, symmetric=True, backend=BACKEND),
    "dcl": lambda a, b: fastcl.dcl(a, b, weight_sigma=0.5, backend=BACKEND),
    "clip_matryoshka": lambda a, b: fastcl.clip_loss(a, b, torch.tensor(20.0, requires_grad=True), matryoshka_dims=[8, 16, 32], backend=BACKEND),
    "info_nce_matryoshka_labels_queue": lambda a, b: fastcl.info_nce(a, b, labels=torch.arange(N_BIG) % 10, negatives=_unit(512, a.shape[1]), matryoshka_dims=[4, 32], backend=BACKEND),
    "supcon": lambda a, b: fastcl.supcon(torch.stack([a, b], dim=1), torch.arange(N_BIG) % 7, backend=BACKEND),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(NEVER_NM))
def test_never_materialises_n_by_m(loss, monkeypatch):
    monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    a, b = _unit(N_BIG, 32), _unit(N_BIG, 32)
    mode = _largest_during(lambda: NEVER_NM[loss](a, b).backward())
    assert a.grad is not None and b.grad is not None
    assert mode.largest < N_BIG * N_BIG // 4, f"{mode.op} produced {mode.largest} elements"


def test_detector_catches_a_materialised_loss():
    """The check above can fail: a naive CLIP loss trips it."""
    a, b = _unit(256, 8), _unit(256, 8)
    mode = _largest_during(lambda: oracle.clip_loss(a, b, 10.0).backward())
    assert mode.largest >= 256 * 256


def test_nn_modules_match_functional():
    z1, z2 = torch.randn(9, 5), torch.randn(9, 5)
    s, bias = torch.tensor(10.0), torch.tensor(-3.0)
    feats, labels = torch.randn(9, 2, 5), torch.arange(9) % 3
    pairs = [
        (fastcl.nn.InfoNCELoss(temperature=0.2, decoupled=True)(z1, z2), fastcl.info_nce(z1, z2, temperature=0.2, decoupled=True)),
        (fastcl.nn.InfoNCELoss(scale=7.0)(z1, z2), fastcl.info_nce(z1, z2, scale=7.0)),
        (fastcl.nn.InfoNCELoss()(z1, z2, labels=labels), fastcl.info_nce(z1, z2, labels=labels)),
        (fastcl.nn.ClipLoss()(z1, z2, s, bias), fastcl.clip_loss(z1, z2, s, bias)),
        (fastcl.nn.SigLipLoss()(z1, z2, s, bias), fastcl.siglip_loss(z1, z2, s, bias)),
        (fastcl.nn.SigLipLoss()(z1, z2, s, bias, labels=labels), fastcl.siglip_loss(z1, z2, s, bias, labels=labels)),
        (fastcl.nn.ClipLoss(label_smoothing=0.1)(z1, z2, s), fastcl.clip_loss(z1, z2, s, label_smoothing=0.1)),
        (fastcl.nn.ClipLoss(false_negative_margin=0.05)(z1, z2, s),
         fastcl.clip_loss(z1, z2, s, false_negative_margin=0.05)),
        (fastcl.nn.NTXentLoss(temperature=0.3)(z1, z2), fastcl.nt_xent(z1, z2, 0.3)),
        (fastcl.nn.SupConLoss(temperature=0.2, contrast_mode="one")(feats, labels),
         fastcl.supcon(feats, labels, temperature=0.2, contrast_mode="one")),
        (fastcl.nn.DCLLoss(weight_sigma=0.5)(z1, z2), fastcl.dcl(z1, z2, weight_sigma=0.5)),
    ]
    for got, want in pairs:
        assert torch.equal(got, want)


@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_double_backward_raises(loss):
    """The tile gradients are formed without a graph: a second-order gradient must be an error,
    not a silently wrong number."""
    q, k = _leaf(6, 4), _leaf(6, 4)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    value = (fastcl.info_nce(q, k, scale=s, backend=BACKEND) if loss == "info_nce"
             else fastcl.siglip_loss(q, k, s, -1.0, backend=BACKEND))
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(value, (q, s), create_graph=True)


@pytest.mark.parametrize("which", ["positive_index", "labels"])
def test_index_tensors_changed_after_forward_do_not_reach_backward(which):
    q, k = _leaf(7, 3), _leaf(9, 3)
    index = torch.randint(0, 9, (7,)) if which == "positive_index" else torch.randint(0, 3, (7,))
    opts = {which: index} if which == "positive_index" else {"labels": index, "key_labels": torch.randint(0, 3, (9,))}
    want = torch.autograd.grad(fastcl.info_nce(q, k, **opts, backend=BACKEND), (q, k))
    loss = fastcl.info_nce(q, k, **opts, backend=BACKEND)
    index.copy_(torch.flip(index, [0]) if which == "positive_index" else (index + 1) % 3)
    got = torch.autograd.grad(loss, (q, k))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_minus_inf_feature_gives_a_non_finite_loss():
    """Every logit of row 0 is -inf: cross-entropy's answer is NaN, never a finite loss with the
    row quietly left out."""
    q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64).abs()
    q[0] = float("-inf")
    assert not torch.isfinite(fastcl.info_nce(q, k, backend=BACKEND))
    assert not torch.isfinite(F.cross_entropy(q @ k.T / 0.1, torch.arange(5)))
