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


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "a": 1}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")))


class TokenizedModel(torch.nn.Module):
    """A stand-in with what GISTEmbedLoss checks (a tokenizer, a max_seq_length); its embeddings
    are the features' ``field``."""

    def __init__(self, field, tokenizer, max_seq_length=128):
        super().__init__()
        self.field, self.tokenizer, self.max_seq_length = field, tokenizer, max_seq_length

    def forward(self, features):
        return {"sentence_embedding": features[self.field]}

    def get_embedding_dimension(self):
        return None


def compare_guided(host, mine, n_columns, batch, dtype, tol):
    """Random columns (width 8) and guide embeddings (width 5) through both GIST losses: equal
    loss, and equal gradients of every column's embeddings."""
    columns = [torch.randn(batch, 8, dtype=dtype) for _ in range(n_columns)]
    guides = [torch.randn(batch, 5, dtype=dtype) for _ in range(n_columns)]
    a = [c.clone().requires_grad_() for c in columns]
    b = [c.clone().requires_grad_() for c in columns]
    want = host([{"emb": x, "guide": g} for x, g in zip(a, guides)], None)
    got = mine([{"emb": x, "guide": g} for x, g in zip(b, guides)], None)
    assert_close("loss", got, want, tol, floor=1.0)
    want.backward()
    got.backward()
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(f"d_column{i}", y.grad, x.grad, tol, floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_columns", [2, 3])
@pytest.mark.parametrize("config", [
    {}, {"margin": 0.05}, {"margin_strategy": "relative", "margin": 0.1}, {"contrast_anchors": False},
    {"contrast_positives": False, "temperature": 0.05}, {"contrast_anchors": False, "contrast_positives": False},
], ids=["default", "absolute_margin", "relative_margin", "no_anchor_block", "no_positive_block", "pairs_only"])
def test_gist_matches_host(dtype, n_columns, config):
    """fastcl's GISTEmbedLoss against sentence-transformers': value and every column's gradient,
    with a guide whose mask removes a good part of each block (random guide embeddings)."""
    tok = _tokenizer()
    model, guide = TokenizedModel("emb", tok), TokenizedModel("guide", tok)
    host = st_losses.GISTEmbedLoss(model, guide, **config)
    mine = compat.GISTEmbedLoss(model, guide, **config)
    assert not mine.unfused_options()
    assert mine.get_config_dict() == host.get_config_dict() and mine.citation == host.citation
    compare_guided(host, mine, n_columns, 9, dtype, TOL[dtype] * 10)


def test_gist_hands_a_retokenizing_guide_to_the_host_and_checks_like_it():
    tok, other = _tokenizer(), _tokenizer()
    model = TokenizedModel("emb", tok)
    short_guide = TokenizedModel("guide", other, max_seq_length=16)  # shorter: the host re-tokenizes
    assert compat.GISTEmbedLoss(model, short_guide).unfused_options()
    for cls in (st_losses.GISTEmbedLoss, compat.GISTEmbedLoss):
        with pytest.raises(ValueError, match="margin_strategy"):
            cls(model, TokenizedModel("guide", tok), margin_strategy="sideways")
        with pytest.raises(ValueError, match="tokenizer attribute"):
            cls(ColumnModel(), TokenizedModel("guide", tok))


class ModuleListModel(ColumnModel):
    """A stand-in the cached losses accept: ``model[0]`` is its (non-static) input module."""

    def __getitem__(self, index):
        return torch.nn.Identity()


CACHED_MODEL = ModuleListModel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["default", "symmetric", "dot_score_scale"])
@pytest.mark.parametrize("n_columns", [2, 3])
def test_cached_mnrl_matches_host(dtype, config, n_columns):
    """The cached class's GradCache steps (mini-batches of 4 of a batch of 10) with the fused loss
    stage against the host's own: value, and the gradients the replayed embedding passes on."""
    kwargs = {"default": {}, "symmetric": SYMMETRIC,
              "dot_score_scale": {"scale": 7.0, "similarity_fct": util.dot_score}}[config]
    host = st_losses.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=4, **kwargs)
    mine = compat.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=4, **kwargs)
    assert isinstance(mine, st_losses.CachedMultipleNegativesRankingLoss) and mine.fused_loss() is not None
    assert mine.get_config_dict() == host.get_config_dict()
    compare(host, mine, _columns(n_columns, b=10, dtype=dtype), dtype)


def test_cached_mnrl_under_matryoshka_and_delegated_options():
    """MatryoshkaLoss decorates the cached class's loss stage (it is a gradient-caching loss); an
    option the fused MNRL delegates runs the host's loss stage."""
    dims = [8, 4]
    host = st_losses.MatryoshkaLoss(CACHED_MODEL, st_losses.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=3),
                                    dims)
    mine = st_losses.MatryoshkaLoss(CACHED_MODEL, compat.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=3), dims)
    compare(host, mine, _columns(3, b=7), torch.float64)
    joint = {"directions": ("query_to_doc", "query_to_query")}
    mine = compat.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=3, **joint)
    assert mine.fused_loss() is None
    compare(st_losses.CachedMultipleNegativesRankingLoss(CACHED_MODEL, mini_batch_size=3, **joint), mine, _columns(2, b=7),
            torch.float64)


class CachedTokenizedModel(TokenizedModel):
    def __getitem__(self, index):
        return torch.nn.Identity()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_columns", [2, 4])
@pytest.mark.parametrize("config", [{}, {"margin_strategy": "relative", "margin": 0.1, "contrast_anchors": False}],
                         ids=["default", "relative_no_anchor_block"])
def test_cached_gist_matches_host(dtype, n_columns, config):
    """The host's GradCache steps (mini-batches of 4 of 10) with the fused GIST loss stage, two
    negative columns included, against the host's own stage."""
    tok = _tokenizer()
    model, guide = CachedTokenizedModel("emb", tok), CachedTokenizedModel("guide", tok)
    host = st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **config)
    mine = compat.CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **config)
    assert isinstance(mine, st_losses.CachedGISTEmbedLoss)
    compare_guided(host, mine, n_columns, 10, dtype, TOL[dtype] * 10)


def test_gist_under_matryoshka():
    """sentence-transformers' MatryoshkaLoss shrinks the model's embeddings (not the guide's)
    before each width's GIST call: fastcl's GISTEmbedLoss under it matches the host's."""
    tok = _tokenizer()

    class Model(TokenizedModel):
        def get_embedding_dimension(self):
            return 8

    model, guide = Model("emb", tok), TokenizedModel("guide", tok)
    dims = [8, 3]
    host = st_losses.MatryoshkaLoss(model, st_losses.GISTEmbedLoss(model, guide), dims)
    mine = st_losses.MatryoshkaLoss(model, compat.GISTEmbedLoss(model, guide), dims)
    compare_guided(host, mine, 3, 9, torch.float64, 1e-9)
