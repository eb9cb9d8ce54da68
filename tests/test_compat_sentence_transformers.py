"""fastcl.compat.sentence_transformers against sentence-transformers itself: loss values and the
gradients of every column's embeddings, float64 and float32, through ``forward``,
``compute_loss_from_embeddings`` and ``MatryoshkaLoss``."""

import pytest
import torch
from helpers import assert_close

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses",
                                reason="sentence-transformers is not installed")
from sentence_transformers import util  # noqa: E402

from fastcl.compat import sentence_transformers as compat  # noqa: E402

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
SYMMETRIC = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}


class ColumnModel(torch.nn.Module):
    """Stands in for a SentenceTransformer: the 'features' of a column are its embeddings."""

    def forward(self, features):
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self):
        return None


MODEL = ColumnModel()


def compare(host, mine, columns, dtype, via="forward"):
    a = [c.clone().requires_grad_() for c in columns]
    b = [c.clone().requires_grad_() for c in columns]
    if via == "forward":
        want = host([{"emb": x} for x in a], None)
        got = mine([{"emb": x} for x in b], None)
    else:
        want, got = host.compute_loss_from_embeddings(a, None), mine.compute_loss_from_embeddings(b, None)
    assert got.dtype == want.dtype
    assert_close("loss", got, want, TOL[dtype], floor=1.0)
    want.backward()
    got.backward()
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(f"d_column{i}", y.grad, x.grad, TOL[dtype])


def _columns(n, b=9, d=8, dtype=torch.float64):
    return [torch.randn(b, d, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_columns", [2, 3, 5])
@pytest.mark.parametrize("config", ["default", "symmetric"])
def test_fused_configurations(dtype, n_columns, config):
    kwargs = SYMMETRIC if config == "symmetric" else {}
    host = st_losses.MultipleNegativesRankingLoss(MODEL, **kwargs)
    mine = compat.MultipleNegativesRankingLoss(MODEL, **kwargs)
    assert not mine.unfused_options()
    compare(host, mine, _columns(n_columns, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_score_and_scale(dtype):
    kwargs = {"scale": 1.5, "similarity_fct": util.dot_score}
    host = st_losses.MultipleNegativesRankingLoss(MODEL, **kwargs)
    mine = compat.MultipleNegativesRankingLoss(MODEL, **kwargs)
    assert not mine.unfused_options()
    compare(host, mine, _columns(3, dtype=dtype), dtype, via="embeddings")


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_class(dtype):
    with pytest.warns(DeprecationWarning):
        host = st_losses.MultipleNegativesSymmetricRankingLoss(MODEL, scale=10.0)
    with pytest.warns(DeprecationWarning):
        mine = compat.MultipleNegativesSymmetricRankingLoss(MODEL, scale=10.0)
    compare(host, mine, _columns(3, dtype=dtype), dtype)
    assert mine.get_config_dict() == host.get_config_dict() and mine.citation == host.citation


def test_gather_across_devices_in_one_process():
    host = st_losses.MultipleNegativesRankingLoss(MODEL, gather_across_devices=True)
    mine = compat.MultipleNegativesRankingLoss(MODEL, gather_across_devices=True)
    compare(host, mine, _columns(3), torch.float64)


@pytest.mark.parametrize("kwargs", [
    {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "joint"},
    {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")},
    {"hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    {"similarity_fct": util.manhattan_sim},
], ids=["joint_symmetric", "gte", "hardness", "manhattan"])
def test_unfused_options_are_delegated(kwargs):
    host = st_losses.MultipleNegativesRankingLoss(MODEL, **kwargs)
    mine = compat.MultipleNegativesRankingLoss(MODEL, **kwargs)
    assert mine.unfused_options()
    compare(host, mine, _columns(3), torch.float64)


@pytest.mark.parametrize("kwargs", [{}, SYMMETRIC, {"directions": ("query_to_doc", "query_to_query",
                                                                     "doc_to_query", "doc_to_doc")},
                                    {"scale": 7.0, "similarity_fct": util.dot_score}])
def test_config_citation_temperature(kwargs):
    host = st_losses.MultipleNegativesRankingLoss(MODEL, **kwargs)
    mine = compat.MultipleNegativesRankingLoss(MODEL, **kwargs)
    assert mine.get_config_dict() == host.get_config_dict()
    assert mine.citation == host.citation
    assert mine.temperature == host.temperature


@pytest.mark.parametrize("message, kwargs", [
    ("Scale must be a positive value", {"scale": 0.0}),
    ("'query_to_doc' direction is required", {"directions": ("doc_to_query",)}),
    ("requires every direction's candidate pool", {"directions": ("query_to_doc", "doc_to_doc"),
                                                   "partition_mode": "per_direction"}),
    ("hardness_strength must be non-negative", {"hardness_strength": -1.0}),
])
def test_constructor_errors_match_host(message, kwargs):
    for cls in (st_losses.MultipleNegativesRankingLoss, compat.MultipleNegativesRankingLoss):
        with pytest.raises(ValueError, match=message):
            cls(MODEL, **kwargs)


def test_under_matryoshka():
    """MatryoshkaLoss decorates model.forward; the fused loss goes through it unchanged."""
    dims = [8, 4, 2]
    host = st_losses.MatryoshkaLoss(MODEL, st_losses.MultipleNegativesRankingLoss(MODEL), dims)
    mine = st_losses.MatryoshkaLoss(MODEL, compat.MultipleNegativesRankingLoss(MODEL), dims)
    compare(host, mine, _columns(3), torch.float64)


class WidthModel(ColumnModel):
    """A stand-in that reports its embedding width (MatryoshkaLoss checks the dimensions)."""

    def get_embedding_dimension(self):
        return 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["default", "symmetric", "dot_score_scale"])
@pytest.mark.parametrize("n_dims_per_step", [-1, 2])
def test_fused_matryoshka_matches_host(dtype, config, n_dims_per_step):
    """fastcl's MatryoshkaLoss over its own MNRL against the host's over the host's MNRL: values,
    gradients of every column, the same sampled widths for the same random seed."""
    import random

    model = WidthModel()
    kwargs = {"default": {}, "symmetric": SYMMETRIC, "dot_score_scale": {"scale": 7.0, "similarity_fct": util.dot_score}}[config]
    dims, weights = [16, 3, 8, 5], [1.0, 0.5, 2.0, 0.25]
    host = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model, **kwargs), dims, weights,
                                    n_dims_per_step=n_dims_per_step)
    mine = compat.MatryoshkaLoss(model, compat.MultipleNegativesRankingLoss(model, **kwargs), dims, weights,
                                 n_dims_per_step=n_dims_per_step)
    assert mine.fused()
    assert mine.get_config_dict() == host.get_config_dict() and mine.citation == host.citation
    for seed in (0, 1):
        columns = [torch.randn(9, 16, dtype=dtype) for _ in range(3)]
        a = [c.clone().requires_grad_() for c in columns]
        b = [c.clone().requires_grad_() for c in columns]
        random.seed(seed)
        want = host([{"emb": x} for x in a], None)
        random.seed(seed)
        got = mine([{"emb": x} for x in b], None)
        assert_close("loss", got, want, TOL[dtype], floor=1.0)
        want.backward()
        got.backward()
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(f"d_column{i}", y.grad, x.grad, TOL[dtype])


def test_matryoshka_hands_other_inner_losses_to_the_host_and_checks_like_it():
    model = WidthModel()
    inner = compat.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
    mine = compat.MatryoshkaLoss(model, inner, [16, 4])
    host = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(
        model, directions=("query_to_doc", "query_to_query")), [16, 4])
    assert not mine.fused()
    compare(host, mine, [torch.randn(7, 16, dtype=torch.float64) for _ in range(2)], torch.float64)
    for args, message in (([[]], "at least one dimension"), ([[0, 4]], "must be > 0"),
                          ([[16, 4], [1.0]], "same length"), ([[32]], "cannot exceed")):
        for cls in (st_losses.MatryoshkaLoss, compat.MatryoshkaLoss):
            with pytest.raises(ValueError, match=message):
                cls(model, inner, *args)
