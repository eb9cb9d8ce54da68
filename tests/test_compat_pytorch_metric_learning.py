"""fastcl.compat.pytorch_metric_learning against pytorch-metric-learning itself: loss values and
embedding gradients, float64 and float32, fused options and delegated ones."""

import sys

import pytest
import torch
from helpers import assert_close

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import distances, miners, reducers  # noqa: E402

from fastcl.compat import pytorch_metric_learning as compat  # noqa: E402

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
LOSSES = ["NTXentLoss", "SupConLoss"]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def compare(host, mine, dtype, float_args, other_args=(), kwargs=None):
    """Call ``host(*float_args, *other_args)`` and ``mine(...)`` on fresh leaves; compare the loss and
    the gradient of every float argument."""
    kwargs = kwargs or {}
    a = [_leaf(t) for t in float_args]
    b = [_leaf(t) for t in float_args]
    want = host(*a, *other_args, **kwargs)
    got = mine(*b, *other_args, **kwargs)
    assert got.dtype == want.dtype
    assert_close("loss", got, want, TOL[dtype], floor=1.0)
    want.backward()
    got.backward()
    for i, (x, y) in enumerate(zip(a, b)):
        if x.grad is None:
            assert y.grad is None or not y.grad.any(), f"arg {i}: fastcl has a gradient, PML none"
        else:
            assert_close(f"d_arg{i}", y.grad, x.grad, TOL[dtype])
    return got


def _pair(name, *args, **kwargs):
    return getattr(pml_losses, name)(*args, **kwargs), getattr(compat, name)(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("classes", [3, 6])
def test_labels(dtype, name, classes):
    e = torch.randn(17, 9, dtype=dtype)
    labels = torch.randint(0, classes, (17,))
    compare(*_pair(name, temperature=0.2), dtype, [e], [labels])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
def test_default_temperature_and_ref_emb(dtype, name):
    e, r = torch.randn(10, 8, dtype=dtype), torch.randn(14, 8, dtype=dtype)
    labels, ref_labels = torch.randint(0, 4, (10,)), torch.randint(0, 4, (14,))
    host, mine = _pair(name)
    compare(host, mine, dtype, [e], [labels], {"ref_emb": r, "ref_labels": ref_labels})
    # gradients reach ref_emb too
    compare(lambda x, y: host(x, labels, ref_emb=y, ref_labels=ref_labels),
            lambda x, y: mine(x, labels, ref_emb=y, ref_labels=ref_labels), dtype, [e, r])


@pytest.mark.parametrize("name", LOSSES)
def test_self_pair_rule(name):
    """PML drops the self pair iff ref_labels is None or is the labels object itself."""
    e, r = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (9,))
    host, mine = _pair(name)
    for ref_labels in (None, labels, labels.clone()):
        compare(lambda x, y: host(x, labels, ref_emb=y, ref_labels=ref_labels),
                lambda x, y: mine(x, labels, ref_emb=y, ref_labels=ref_labels), torch.float64, [e, r])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", ["all_distinct", "one_class", "one_pair", "anchor_without_negatives"])
def test_degenerate_batches(name, case):
    labels = {
        "all_distinct": torch.arange(7),
        "one_class": torch.zeros(7, dtype=torch.long),
        "one_pair": torch.tensor([0, 0]),  # one positive pair each way, no negative
        "anchor_without_negatives": None,
    }[case]
    e = torch.randn(7 if labels is None or len(labels) == 7 else 2, 5, dtype=torch.float64)
    if case == "anchor_without_negatives":
        # every column has label 1: rows 0-2 have positives and no negative, the others the reverse
        labels = torch.tensor([1, 1, 1, 2, 2, 3, 3])
        r = torch.randn(4, 5, dtype=torch.float64)
        host, mine = _pair(name)
        got = compare(host, mine, torch.float64, [e], [labels], {"ref_emb": r, "ref_labels": torch.ones(4).long()})
        assert got.item() == 0 if name == "NTXentLoss" else got.item() > 0
        return
    compare(*_pair(name), torch.float64, [e], [labels])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("normalize", [True, False])
def test_dot_product_distance_is_fused(name, normalize):
    mine = getattr(compat, name)(temperature=3.0, distance=distances.DotProductSimilarity(
        normalize_embeddings=normalize))
    assert mine.fusable
    host = getattr(pml_losses, name)(temperature=3.0, distance=distances.DotProductSimilarity(
        normalize_embeddings=normalize))
    compare(host, mine, torch.float64, [torch.randn(12, 5, dtype=torch.float64)], [torch.randint(0, 3, (12,))])


def test_explicit_default_reducers_are_fused():
    assert compat.NTXentLoss(reducer=reducers.MeanReducer()).fusable
    assert compat.SupConLoss(reducer=reducers.AvgNonZeroReducer()).fusable
    assert not compat.SupConLoss(reducer=reducers.MeanReducer()).fusable


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("option", ["distance", "reducer", "indices_tuple", "regularizer"])
def test_unfused_options_are_delegated(name, option):
    e, labels = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    kwargs, call = {}, {}
    if option == "distance":
        kwargs["distance"] = distances.LpDistance()
    elif option == "reducer":
        kwargs["reducer"] = reducers.SumReducer()
    elif option == "regularizer":
        from pytorch_metric_learning.regularizers import LpRegularizer
        kwargs["embedding_regularizer"] = LpRegularizer()
    else:
        call["indices_tuple"] = miners.MultiSimilarityMiner()(e, labels)
    host, mine = _pair(name, **kwargs)
    compare(host, mine, torch.float64, [e], [labels], call)


def test_missing_host_names_the_option(monkeypatch):
    e, labels = torch.randn(6, 4), torch.randint(0, 2, (6,))
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.losses", None)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        compat.NTXentLoss()(e, labels, indices_tuple=pairs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised(dtype, name, symmetric):
    host = pml_losses.SelfSupervisedLoss(getattr(pml_losses, name)(), symmetric=symmetric)
    mine = compat.SelfSupervisedLoss(getattr(compat, name)(), symmetric=symmetric)
    compare(host, mine, dtype, [torch.randn(13, 7, dtype=dtype), torch.randn(13, 7, dtype=dtype)])


def test_self_supervised_accepts_pml_losses():
    mine = compat.SelfSupervisedLoss(pml_losses.TripletMarginLoss())
    host = pml_losses.SelfSupervisedLoss(pml_losses.TripletMarginLoss())
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    assert_close("loss", mine(x, y), host(x, y), 1e-6, floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["queue", "enqueue_mask", "single_row"])
def test_cross_batch_memory(dtype, name, mode):
    """Several steps through a ring buffer that wraps; same losses, gradients and queue state."""
    d, memory = 6, 17
    host = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(), d, memory_size=memory)
    mine = compat.CrossBatchMemory(getattr(compat, name)(), d, memory_size=memory)
    for _ in range(5):
        b = 1 if mode == "single_row" else 7
        e, labels = torch.randn(b, d, dtype=dtype), torch.randint(0, 3, (b,))
        mask = torch.rand(b) < 0.5 if mode == "enqueue_mask" else None
        compare(host, mine, dtype, [e], [labels], {"enqueue_mask": mask})
        assert mine.queue_idx == host.queue_idx and mine.has_been_filled == host.has_been_filled
        assert torch.equal(mine.embedding_memory, host.embedding_memory)
        assert torch.equal(mine.label_memory, host.label_memory)


def test_cross_batch_memory_single_row_quirk():
    """A one-row batch keeps its own queue slot as a positive (PML's wrap check misses it)."""
    host = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(), 4, memory_size=8)
    mine = compat.CrossBatchMemory(compat.SupConLoss(), 4, memory_size=8)
    first, row = torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    for loss in (host, mine):
        loss(first, torch.tensor([1, 2, 3]))
    # label 9 is new: its only positive is its own slot, which a correct self-pair removal would drop
    got = compare(host, mine, torch.float64, [row], [torch.tensor([9])])
    assert got.item() > 0


@pytest.mark.parametrize("option", ["miner", "indices_tuple", "pml_loss"])
def test_cross_batch_memory_delegation_shares_the_queue(option):
    d, memory = 5, 13
    inner = pml_losses.ContrastiveLoss() if option == "pml_loss" else None
    miner = miners.MultiSimilarityMiner() if option == "miner" else None
    host = pml_losses.CrossBatchMemory(inner or pml_losses.NTXentLoss(), d, memory_size=memory, miner=miner)
    mine = compat.CrossBatchMemory(inner or compat.NTXentLoss(), d, memory_size=memory, miner=miner)
    for step in range(4):
        e, labels = torch.randn(6, d, dtype=torch.float64), torch.randint(0, 3, (6,))
        call = {}
        if option == "indices_tuple" and step % 2:
            call["indices_tuple"] = miners.MultiSimilarityMiner()(e, labels)
        compare(host, mine, torch.float64, [e], [labels], call)
        assert mine.queue_idx == host.queue_idx
        assert torch.equal(mine.embedding_memory, host.embedding_memory)


@pytest.mark.parametrize("name", LOSSES)
def test_negative_temperature_is_accepted_as_the_host_does(name):
    e = torch.randn(15, 7, dtype=torch.float64)
    labels = torch.randint(0, 4, (15,))
    compare(*_pair(name, temperature=-0.5), torch.float64, [e], [labels])
