"""sentence-transformers' in-batch-negatives losses (6.2.0) on fastcl's fused kernels.

Swap ``from sentence_transformers.losses import MultipleNegativesRankingLoss`` (or
``...SymmetricRankingLoss``, ``CachedMultipleNegativesRankingLoss``, ``MatryoshkaLoss``,
``GISTEmbedLoss``, ``CachedGISTEmbedLoss``) for ``from fastcl.compat.sentence_transformers import
...``. The cached classes, ``MatryoshkaLoss`` and ``GISTEmbedLoss`` are described on their classes;
the rest of this note is about the MNRL classes.

``forward(sentence_features, labels)`` embeds the columns ``(anchor, positive, negative_1, ...,
negative_n)`` with ``model`` (as sentence-transformers does) and calls
``compute_loss_from_embeddings(embeddings, labels)``, which takes the ``[B, D]`` embeddings of
each column; ``labels`` are unused. The candidates are laid out in column blocks
``[P | N1 | N2 ...]`` (``B * (1 + n)`` documents); anchor i's target is document i.

Fused (one :func:`fastcl.info_nce` call, scale ``s`` = ``scale``):

* ``directions=("query_to_doc",)`` (any ``partition_mode``): ``CE(s * cos(q, docs), i)``, mean
  over the B anchors;
* ``directions=("query_to_doc", "doc_to_query")`` with ``partition_mode="per_direction"``
  (``MultipleNegativesSymmetricRankingLoss``): the mean of that and of each positive document
  against the B anchors (``symmetric=True``; hard negatives are candidates of the first term
  only, as in sentence-transformers);
* ``similarity_fct`` ``cos_sim`` (normalised inside) or ``dot_score``;
* ``hardness_mode`` with ``hardness_strength=0`` (no effect, as in sentence-transformers);
* ``gather_across_devices=True``: in one process the local batch (as sentence-transformers);
  with several, each rank's anchors against every rank's documents (and, symmetric, each rank's
  positives against every rank's anchors), reporting the mean over the local anchors, with
  sentence-transformers' exact gradient: fastcl's ``group=..., local_loss=True``.

Delegated to sentence-transformers (raises ``NotImplementedError`` naming the option if it is not
installed): other ``similarity_fct``, ``query_to_query`` / ``doc_to_doc`` directions, joint
``doc_to_query``, hardness weighting.

``MatryoshkaLoss`` (this module's) fuses every width of a Matryoshka step into one call when its
inner loss is one of these classes: the columns are embedded once, and the normalised prefixes
never get a logit matrix. sentence-transformers' own wrappers (``MatryoshkaLoss``,
``AdaptiveLayerLoss``) decorate ``model.forward`` for non-cached losses, which these classes call
through ``model``, so they keep working too (one fused call per width).

Difference: the loss is float32 for float16/bfloat16 embeddings.
"""

import logging
import random
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as F
from .._spec import SoftmaxSpec
from . import _import_host, _process_group, _world_size

# the cached classes are built on first access (module __getattr__)
__all__ = ["CachedGISTEmbedLoss", "CachedMultipleNegativesRankingLoss", "GISTEmbedLoss", "MatryoshkaLoss",  # noqa: F822
           "MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "cos_sim", "dot_score"]

logger = logging.getLogger(__name__)

_ST = "sentence-transformers"
_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """``sentence_transformers.util.cos_sim`` for dense ``[N, D]`` x ``[M, D]`` tensors."""
    return torch.mm(TF.normalize(a, p=2, dim=-1), TF.normalize(b, p=2, dim=-1).transpose(0, 1))


def dot_score(a: Tensor, b: Tensor) -> Tensor:
    """``sentence_transformers.util.dot_score`` for dense ``[N, D]`` x ``[M, D]`` tensors."""
    return torch.mm(a, b.transpose(0, 1))


def _similarity_kind(fn) -> str:
    """'cos', 'dot', or '' for a similarity function fastcl does not fuse."""
    name = getattr(fn, "__name__", "")
    host_fn = getattr(fn, "__module__", "").startswith("sentence_transformers.")
    if fn is cos_sim or (host_fn and name == "cos_sim"):
        return "cos"
    if fn is dot_score or (host_fn and name == "dot_score"):
        return "dot"
    return ""


def _similarity_fct_name(fn) -> str:
    """The name sentence-transformers' config dict gives ``fn``."""
    if _similarity_kind(fn):
        return fn.__name__
    try:
        from sentence_transformers.util import similarity_fct_name
    except ImportError:
        return getattr(fn, "__name__", type(fn).__name__)
    return similarity_fct_name(fn)


def _embed_columns(model, sentence_features):
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # older sentence-transformers: one forward per column
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


class MultipleNegativesRankingLoss(nn.Module):
    """``sentence_transformers.losses.MultipleNegativesRankingLoss`` with the same constructor,
    ``forward(sentence_features, labels)``, ``compute_loss_from_embeddings(embeddings, labels)``,
    ``get_config_dict()``, ``temperature`` (``1 / scale``) and ``citation``.

    Default: ``loss = mean_i [ -s cos(q_i, d_i) + log sum_j e^{s cos(q_i, d_j)} ]`` over the
    candidates ``d = [P | N1 | ...]`` (InfoNCE at temperature ``1/scale``). See the module doc
    for what is fused and what is delegated.
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                 gather_across_devices: bool = False, directions=("query_to_doc",), partition_mode="joint",
                 hardness_mode=None, hardness_strength: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        if not scale > 0:
            raise ValueError("Scale must be a positive value.")
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        if not directions:
            raise ValueError("At least one direction must be specified.")
        if not set(directions).issubset(_DIRECTIONS):
            raise ValueError(f"Invalid directions: {set(directions) - set(_DIRECTIONS)}. Valid: {set(_DIRECTIONS)}")
        if "query_to_doc" not in directions:
            raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
        self.directions = tuple(directions)
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError(
                "partition_mode='per_direction' requires every direction's candidate pool to include the positive "
                "pair. 'query_to_query' and 'doc_to_doc' only contain same-type similarities and never include the "
                "positive, making the per-direction loss ill-defined. Use partition_mode='joint' instead."
            )
        self.partition_mode = partition_mode
        valid_hardness = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
        if hardness_mode not in valid_hardness:
            raise ValueError(f"hardness_mode must be one of {set(valid_hardness)}, got {hardness_mode!r}")
        self.hardness_mode = hardness_mode
        if hardness_strength < 0.0:
            raise ValueError("hardness_strength must be non-negative.")
        self.hardness_strength = hardness_strength
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting "
                           "has no effect. Set hardness_strength to a positive value to enable hardness weighting.")
        object.__setattr__(self, "_host", None)

    def forward(self, sentence_features: Iterable[dict], labels: Tensor) -> Tensor:
        embeddings = _embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def unfused_options(self) -> list:
        """The options of this configuration that fastcl does not fuse (delegated)."""
        out = []
        if not _similarity_kind(self.similarity_fct):
            out.append(f"similarity_fct={getattr(self.similarity_fct, '__name__', self.similarity_fct)!r}")
        directions = set(self.directions)
        if directions - {"query_to_doc", "doc_to_query"}:
            out.append(f"directions={self.directions}")
        elif directions == {"query_to_doc", "doc_to_query"} and self.partition_mode == "joint":
            out.append("directions=('query_to_doc', 'doc_to_query') with partition_mode='joint'")
        if self.hardness_mode is not None and self.hardness_strength > 0.0:
            out.append(f"hardness_mode={self.hardness_mode!r}")
        return out

    def _host_loss(self, option: str):
        if self._host is None:
            losses = _import_host("sentence_transformers.sentence_transformer.losses", option, _ST)
            util = _import_host("sentence_transformers.util", option, _ST)
            kind = _similarity_kind(self.similarity_fct)
            fn = {"cos": util.cos_sim, "dot": util.dot_score}.get(kind, self.similarity_fct)
            host = losses.MultipleNegativesRankingLoss(
                self.model, scale=self.scale, similarity_fct=fn, gather_across_devices=self.gather_across_devices,
                directions=self.directions, partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                hardness_strength=self.hardness_strength)
            object.__setattr__(self, "_host", host)
        return self._host

    def compute_loss_from_embeddings(self, embeddings: list, labels: Tensor) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        unfused = self.unfused_options()
        if unfused:
            return self._host_loss(", ".join(unfused)).compute_loss_from_embeddings(embeddings, labels)
        gathered = {}
        if self.gather_across_devices and _world_size() > 1:
            group = _process_group()
            gathered = {"group": group, "local_loss": True}
        queries, docs = embeddings[0], torch.cat(list(embeddings[1:]), dim=0)
        if _similarity_kind(self.similarity_fct) == "cos":
            queries, docs = TF.normalize(queries, p=2, dim=-1), TF.normalize(docs, p=2, dim=-1)
        symmetric = "doc_to_query" in self.directions
        return F.info_nce(queries, docs, scale=self.scale, symmetric=symmetric, **gathered)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        directions = set(self.directions)
        if directions == set(_DIRECTIONS) and self.partition_mode == "joint":
            return _CITATION_GTE
        if directions == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return _CITATION_JINA
        return _CITATION_CPC


class MatryoshkaLoss(nn.Module):
    """``sentence_transformers.losses.MatryoshkaLoss(model, loss, matryoshka_dims,
    matryoshka_weights=None, n_dims_per_step=-1)`` with the same validation, dimension order
    (sorted widest first, weights alongside), ``n_dims_per_step`` sampling (``random.sample``
    of the dimension indices, then sorted, as sentence-transformers does), ``get_config_dict()``
    and ``citation``.

    Fused when ``loss`` is this module's :class:`MultipleNegativesRankingLoss` (or its symmetric
    form) with no delegated option: the columns are embedded once and every sampled width comes
    from one :func:`fastcl.info_nce` call with ``matryoshka_dims`` (each width's embeddings cut
    and normalised, ``scale`` times their cosine; a ``dot_score`` inner loss sees the same
    normalised prefixes, as with sentence-transformers' ``shrink``). Any other inner loss is
    handed to sentence-transformers' own ``MatryoshkaLoss``.
    """

    def __init__(self, model, loss: nn.Module, matryoshka_dims, matryoshka_weights=None,
                 n_dims_per_step: int = -1) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        if not matryoshka_dims:
            raise ValueError("You must provide at least one dimension in matryoshka_dims.")
        if any(dim <= 0 for dim in matryoshka_dims):
            raise ValueError("All dimensions passed to a matryoshka loss must be > 0.")
        if matryoshka_weights is None:
            matryoshka_weights = [1] * len(matryoshka_dims)
        elif len(matryoshka_weights) != len(matryoshka_dims):
            raise ValueError("matryoshka_weights must be the same length as matryoshka_dims.")
        width = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
        if width is not None:
            if any(d > width for d in matryoshka_dims):
                raise ValueError(f"Dimensions in matryoshka_dims cannot exceed the model's embedding dimension of "
                                 f"{width}.")
            if width not in matryoshka_dims:
                logger.warning(f"The model's embedding dimension {width} is not included in matryoshka_dims: "
                               f"{matryoshka_dims}. This means that the full model dimension won't be trained.")
        pairs = sorted(zip(matryoshka_dims, matryoshka_weights), key=lambda x: x[0], reverse=True)
        self.matryoshka_dims, self.matryoshka_weights = (tuple(x) for x in zip(*pairs))
        self.n_dims_per_step = n_dims_per_step
        object.__setattr__(self, "_host", None)

    def fused(self) -> bool:
        """Whether :meth:`forward` runs fastcl's one-call Matryoshka loss (else the host's)."""
        return isinstance(self.loss, MultipleNegativesRankingLoss) and not self.loss.unfused_options()

    def _sampled(self):
        """The dimension indices of this step (all, or ``n_dims_per_step`` sampled and sorted)."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = sorted(random.sample(indices, self.n_dims_per_step))
        return list(indices)

    def forward(self, sentence_features: Iterable[dict], labels: Tensor) -> Tensor:
        if not self.fused():
            if self._host is None:
                losses = _import_host("sentence_transformers.sentence_transformer.losses",
                                      f"MatryoshkaLoss over {type(self.loss).__name__}", _ST)
                object.__setattr__(self, "_host", losses.MatryoshkaLoss(
                    self.model, self.loss, self.matryoshka_dims, self.matryoshka_weights, self.n_dims_per_step))
            return self._host(sentence_features, labels)
        indices = self._sampled()
        embeddings = _embed_columns(self.model, sentence_features)
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        inner = self.loss
        gathered = {"group": _process_group(), "local_loss": True} if inner.gather_across_devices and \
            _world_size() > 1 else {}
        return F.info_nce(embeddings[0], torch.cat(list(embeddings[1:]), dim=0), scale=inner.scale,
                          symmetric="doc_to_query" in inner.directions,
                          matryoshka_dims=[self.matryoshka_dims[i] for i in indices],
                          matryoshka_weights=[float(self.matryoshka_weights[i]) for i in indices], **gathered)

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.__class__.__name__, "matryoshka_dims": self.matryoshka_dims,
                "matryoshka_weights": self.matryoshka_weights, "n_dims_per_step": self.n_dims_per_step}

    @property
    def citation(self) -> str:
        return _CITATION_MATRYOSHKA


class GISTEmbedLoss(nn.Module):
    """``sentence_transformers.losses.GISTEmbedLoss(model, guide, temperature=0.01,
    margin_strategy="absolute", margin=0.0, contrast_anchors=True, contrast_positives=True,
    gather_across_devices=False)`` with the same checks, ``forward``, ``get_config_dict()`` and
    ``citation``.

    Fused: the columns ``(anchor, positive[, negative])`` are embedded by ``model`` and (without
    gradient) by ``guide``; each anchor's softmax runs over the blocks sentence-transformers
    concatenates -- anchor vs ``[positives | negatives]``, anchor vs anchors
    (``contrast_anchors``), positive vs positives (``contrast_positives``) -- at ``1/temperature``
    times the cosine, each block through fastcl's fused pass with the guide's mask inside the
    tiles (a candidate whose guide similarity exceeds the guide's anchor-positive similarity less
    the margin leaves, the anchor's own positive excepted), and the blocks' log-sum-exps joined
    per anchor. Both margin strategies. No block's logits or guide similarities are stored.

    Handed to sentence-transformers: a guide whose tokenizer differs (the host re-tokenizes), and
    ``gather_across_devices=True`` under several processes. Difference: the loss is float32 for
    float16/bfloat16 embeddings.
    """

    def __init__(self, model, guide, temperature: float = 0.01, margin_strategy: str = "absolute",
                 margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False) -> None:
        super().__init__()
        self.model, self.guide, self.temperature = model, guide, temperature
        if not hasattr(model, "tokenizer") or not hasattr(guide, "tokenizer"):
            raise ValueError("Both the training model and the guiding model must have a tokenizer attribute.")
        self.must_retokenize = (model.tokenizer.get_vocab() != guide.tokenizer.get_vocab()
                                or guide.max_seq_length < model.max_seq_length)
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
        self.margin_strategy, self.margin = margin_strategy, margin
        self.contrast_anchors, self.contrast_positives = contrast_anchors, contrast_positives
        self.gather_across_devices = gather_across_devices
        object.__setattr__(self, "_host", None)

    def unfused_options(self) -> list:
        """What this configuration hands to sentence-transformers."""
        out = []
        if self.must_retokenize:
            out.append("a guide with another tokenizer (re-tokenized)")
        if self.gather_across_devices and _world_size() > 1:
            out.append("gather_across_devices=True across processes")
        return out

    def forward(self, sentence_features: Iterable[dict], labels: Tensor) -> Tensor:
        unfused = self.unfused_options()
        if unfused:
            if self._host is None:
                losses = _import_host("sentence_transformers.sentence_transformer.losses", ", ".join(unfused), _ST)
                object.__setattr__(self, "_host", losses.GISTEmbedLoss(
                    self.model, self.guide, self.temperature, self.margin_strategy, self.margin,
                    self.contrast_anchors, self.contrast_positives, self.gather_across_devices))
            return self._host(sentence_features, labels)
        sentence_features = list(sentence_features)
        guide_features = [dict(f) for f in sentence_features]
        embeddings = _embed_columns(self.model, sentence_features)
        with torch.no_grad():
            guides = _embed_columns(self.guide, guide_features)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        return _gist_loss(self, embeddings, guides)

    def get_config_dict(self) -> dict[str, Any]:
        return {"guide": self.guide, "temperature": self.temperature, "margin_strategy": self.margin_strategy,
                "margin": self.margin, "contrast_anchors": self.contrast_anchors,
                "contrast_positives": self.contrast_positives, "gather_across_devices": self.gather_across_devices}

    @property
    def citation(self) -> str:
        return _CITATION_GIST


def _gist_loss(config, embeddings, guides) -> Tensor:
    """GISTEmbed's loss over the columns ``(anchor, positive, negatives...)`` and their guide
    embeddings, fused (see :class:`GISTEmbedLoss`); ``config`` holds the host's settings
    (``temperature``, ``margin_strategy``, ``margin``, ``contrast_anchors``, ``contrast_positives``)."""
    from .. import _dispatch
    from ..backends.common import compute_dtype
    from ..ops import library

    anchor, positive = (TF.normalize(x.to(compute_dtype(x.dtype)), dim=-1) for x in embeddings[:2])
    g_anchor, g_positive = (TF.normalize(g.to(anchor.dtype), dim=-1) for g in guides[:2])
    candidates = torch.cat([positive] + [TF.normalize(x.to(anchor.dtype), dim=-1) for x in embeddings[2:]])
    g_candidates = torch.cat([g_positive] + [TF.normalize(g.to(anchor.dtype), dim=-1) for g in guides[2:]])
    n = anchor.shape[0]
    g_pos = (g_anchor * g_positive).sum(dim=1)
    offset = config.margin if config.margin_strategy == "absolute" else g_pos.abs() * config.margin
    thresholds = g_pos - offset
    scale = torch.full((n,), 1.0 / config.temperature, dtype=anchor.dtype, device=anchor.device)
    blocks = [(anchor, candidates, torch.arange(n, device=anchor.device), g_anchor, g_candidates)]
    if config.contrast_anchors:
        blocks.append((anchor, anchor, None, g_anchor, g_anchor))
    if config.contrast_positives:
        blocks.append((positive, positive, None, g_positive, g_positive))
    lses, pos = [], None
    for rows, cols, index, g_rows, g_cols in blocks:
        spec = SoftmaxSpec(positive_index=index, fn_row=thresholds, guide_rows=g_rows, guide_cols=g_cols)
        backend = _dispatch.resolve(None, rows.device, spec).__name__.rsplit(".", 1)[-1]
        lse, block_pos = library.block_lse(backend, rows, cols, scale, spec)
        lses.append(lse)
        pos = block_pos if block_pos is not None else pos
    return (torch.logsumexp(torch.stack(lses), dim=0) - pos).mean()


def _cached_gist_class():
    """``CachedGISTEmbedLoss``: sentence-transformers' class with the loss stage fused."""
    losses = _import_host("sentence_transformers.sentence_transformer.losses", "CachedGISTEmbedLoss", _ST)

    class CachedGISTEmbedLoss(losses.CachedGISTEmbedLoss):
        """``sentence_transformers.losses.CachedGISTEmbedLoss`` (a subclass: same constructor,
        GradCache steps over the model and the guide, config and citation) whose loss stage
        (``calculate_loss``) is the fused GISTEmbed loss of :class:`GISTEmbedLoss` over the whole
        batch, any number of negative columns. ``gather_across_devices=True`` under several
        processes runs the host's stage."""

        def calculate_loss(self, reps, reps_guided, *, with_backward: bool = False):
            if len(reps) != len(reps_guided):
                raise ValueError("reps and reps_guided must have the same length")
            if self.gather_across_devices and _world_size() > 1:
                return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
            loss = _gist_loss(self, [torch.cat(r) for r in reps], [torch.cat(r) for r in reps_guided])
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    return CachedGISTEmbedLoss


def _cached_class():
    """``CachedMultipleNegativesRankingLoss``: sentence-transformers' class (its GradCache
    machinery, mini-batched embedding, cached gradients, every hook) with the loss stage fused."""
    losses = _import_host("sentence_transformers.sentence_transformer.losses", "CachedMultipleNegativesRankingLoss",
                          _ST)

    class CachedMultipleNegativesRankingLoss(losses.CachedMultipleNegativesRankingLoss):
        """``sentence_transformers.losses.CachedMultipleNegativesRankingLoss`` (a subclass: same
        constructor, GradCache steps, ``mini_batch_size``/``mini_batch_num_tokens``, config and
        citation) whose loss stage (``calculate_loss``) is fastcl's fused
        :class:`MultipleNegativesRankingLoss` over the whole batch at once: its value and its
        gradient with respect to the cached embeddings, without the ``[mini_batch, batch]``
        similarity chunks. Configurations that class delegates go to the host's loss stage."""

        def fused_loss(self):
            """The fused MNRL with this loss's settings, or ``None`` where it delegates."""
            mine = MultipleNegativesRankingLoss(
                self.model, scale=self.scale, similarity_fct=self.similarity_fct,
                gather_across_devices=self.gather_across_devices, directions=self.directions,
                partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                hardness_strength=self.hardness_strength)
            return None if mine.unfused_options() else mine

        def calculate_loss(self, reps, labels=None, *, with_backward: bool = False):
            fused = self.fused_loss()
            if fused is None:
                return super().calculate_loss(reps, labels, with_backward=with_backward)
            loss = fused.compute_loss_from_embeddings([torch.cat(r) for r in reps], labels)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    return CachedMultipleNegativesRankingLoss


_LAZY = {}


def __getattr__(name: str):
    """The cached classes are built on first use (they subclass the host's)."""
    builders = {"CachedMultipleNegativesRankingLoss": _cached_class, "CachedGISTEmbedLoss": _cached_gist_class}
    if name in builders:
        if name not in _LAZY:
            _LAZY[name] = builders[name]()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """``sentence_transformers.losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0,
    similarity_fct=cos_sim, gather_across_devices=False)``: ``MultipleNegativesRankingLoss`` with
    ``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``, as in
    sentence-transformers 6.2 (which deprecates the class; the same ``DeprecationWarning`` is
    given). Quirk kept: hard-negative columns are candidates of the query-to-doc term (the host's
    docstring says they are ignored; its code uses them).
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                 gather_across_devices: bool = False) -> None:
        warnings.warn(
            "The MultipleNegativesSymmetricRankingLoss is deprecated and will be removed in a future release. "
            "Please use MultipleNegativesRankingLoss with `directions=('query_to_doc', 'doc_to_query')` and "
            "`partition_mode='per_direction'` instead.", DeprecationWarning, stacklevel=2)
        super().__init__(model=model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=("query_to_doc", "doc_to_query"),
                         partition_mode="per_direction")


_CITATION_GTE = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""

_CITATION_JINA = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""

_CITATION_GIST = """
@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

_CITATION_MATRYOSHKA = """
@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

_CITATION_CPC = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
