"""Public loss functions. Each validates its inputs, lowers the call to a spec (``_spec.py``),
picks a backend (``_dispatch.py``) and reduces the per-anchor losses the backend returns.

Shapes: ``N`` anchors (rows), ``M`` key columns, ``K`` extra negative columns, ``D`` features.
Losses come back in float32 (float64 for float64 inputs) whatever the input dtype; gradients
come back in the dtype of the tensor they belong to.

Every function takes ``group=None, gather="all_gather", local_loss=False``. With a
``torch.distributed`` process group, each rank passes its shard and the loss is the one over the
concatenated global batch (every rank's keys are negatives for every rank's anchors); see
:mod:`fastcl.distributed` for the two gather modes and the gradient convention: the mean over
ranks of the returned losses is the single-process loss, and after DDP averages gradients over
the W ranks every gradient (features, scale or temperature, bias) is the single-process one.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import _checks
from . import distributed as _dist
from ._dispatch import resolve
from ._spec import SigmoidSpec, SoftmaxSpec
from .backends.common import compute_dtype

__all__ = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl"]

_REDUCTIONS = ("mean", "sum", "none")


class _DefaultFloat(float):
    """A float default that can be told apart from the same value passed explicitly."""


_DEFAULT_TEMPERATURE = _DefaultFloat(0.1)
Number = Union[float, torch.Tensor]



def _as_scale(value: Number, reciprocal: bool, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or [N] scale tensor from a validated float/tensor scale or temperature."""
    if isinstance(value, torch.Tensor):
        return 1.0 / value if reciprocal else value
    value = 1.0 / value if reciprocal else value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def _as_bias(value: Optional[Number], like: torch.Tensor) -> Optional[torch.Tensor]:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def _reduce(row_loss, col_loss, row_valid, col_valid, symmetric: bool, reduction: str):
    if reduction == "none":
        return (row_loss, col_loss) if symmetric else row_loss
    if reduction == "sum":
        total = row_loss.sum()
        return (total + col_loss.sum()) / 2 if symmetric else total
    rows = row_loss.sum() / row_valid.sum().clamp(min=1)
    if not symmetric:
        return rows
    cols = col_loss.sum() / col_valid.sum().clamp(min=1)
    return (rows + cols) / 2


def _softmax(query, key, scale, bias, spec: SoftmaxSpec, reduction: str, backend, negatives=None, dist=None):
    """Per-anchor losses over the columns ``[key; negatives]``, reduced; with a distributed
    context ``dist``, over every rank's keys followed by this rank's negatives."""
    module = resolve(backend, query.device)
    if dist is not None:
        outs = _dist.softmax_loss(dist, module, query, key, negatives, scale, bias, spec)
        return _dist.reduce(dist, *outs, spec.symmetric, reduction)
    columns = key if negatives is None else torch.cat([key, negatives])
    row_loss, col_loss, row_valid, col_valid = module.softmax_loss(query, columns, scale, bias, spec)
    return _reduce(row_loss, col_loss, row_valid, col_valid, spec.symmetric, reduction)


def _per_row(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 1


def _requires_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _pair_positions(n: int, device: torch.device) -> torch.Tensor:
    """Positive of row i in ``cat([view1, view2])``: i + n for the first view, i - n for the second."""
    first = torch.arange(n, 2 * n, device=device)
    return torch.cat([first, first - n])


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: Number = _DEFAULT_TEMPERATURE,
    scale: Optional[Number] = None,
    positive_index: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    negatives: Optional[torch.Tensor] = None,
    negative_labels: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
    decoupled: bool = False,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: Optional[str] = None,
    group=None,
    gather: str = "all_gather",
    local_loss: bool = False,
):
    r"""InfoNCE / softmax contrastive loss without materialising the N x (M+K) logits.

    Logits ``L_ij = s_i * <q_i, k_j>`` over the columns ``[key; negatives]``, with
    ``s = scale`` if given, else ``1 / temperature``. Per anchor row::

        loss_i = -mean_{j in P_i} L_ij + log sum_{j in D_i} exp(L_ij)

    Args:
        query: ``[N, D]`` anchors (float16/bfloat16/float32/float64).
        key: ``[M, D]`` candidates, same dtype and device as ``query``.
        temperature: float > 0, or a tensor of shape ``()``, ``(1,)`` or ``(N,)`` (per row).
        scale: the multiplier ``1/temperature`` given directly (e.g. CLIP's exponentiated
            ``logit_scale``): float or tensor ``()``, ``(1,)``, ``(N,)``. Set at most one of
            ``temperature`` and ``scale``.
        positive_index: Long ``[N]``, the column of each row's positive (any of the ``M + K``
            columns). The grouped hard-negative layout ``[p, n1..nk]`` is ``i * (k + 1)``.
            Default: column ``i`` (needs ``M >= N``).
        labels: Long ``[N]``; positives are the columns with an equal label (SupCon: the row loss
            is the mean over its positives of ``-log p``). Needs ``key_labels`` (defaults to
            ``labels`` when ``M == N``).
        key_labels: Long ``[M]`` labels of the key columns.
        negatives: ``[K, D]`` extra negative columns (a MoCo queue, shared hard negatives).
            They get a gradient only if they require one.
        negative_labels: Long ``[K]``; with ``labels``, lets queue entries be positives.
            Without it, ``negatives`` are never positives.
        exclude_self: ``query`` and the first ``N`` keys are the same samples: column ``i`` is
            removed from row ``i`` everywhere.
        decoupled: remove the positives from the denominator (DCL).
        symmetric: also the key -> query direction (each positive column is an anchor over the
            ``N`` rows); the loss is ``(rows + columns) / 2``, as CLIP. Needs one-to-one
            positives among the keys.
        reduction: ``"mean"`` over anchors that have a positive and a non-empty denominator,
            ``"sum"``, or ``"none"``: per-row losses ``[N]``; with ``symmetric`` a tuple
            ``(row_losses[N], column_losses[N])`` where ``column_losses[i]`` belongs to the
            positive column of row ``i``. Anchors without a positive have loss 0.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; default ``FASTCL_BACKEND``
            or ``"auto"``.
        group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``). Every rank
            passes its own shard (shards may differ in size) and the loss is the one over the
            concatenated global batch: every rank's keys are columns for every rank's rows.
            ``positive_index`` and ``exclude_self`` refer to this rank's keys (the local
            ``i``-th key is column ``offset_r + i`` globally); ``labels`` are compared across
            ranks; ``negatives`` (and ``negative_labels``) stay local to the rank that passes
            them (a MoCo queue replicated on every rank gives the single-process loss over that
            queue); a per-row ``temperature``/``scale`` belongs to this rank's rows. ``None``
            (default): this process's batch only.
        gather: ``"all_gather"`` (gather the keys, and the queries of symmetric losses; any
            backend; O(N_global * D) memory per rank) or ``"ring"`` (key blocks passed around
            the ring; O(N_local * D) extra memory whatever the world size; per-block arithmetic
            of the torch backend). Ignored without ``group``.
        local_loss: return this rank's anchors' share of the global loss times W (open_clip's
            ``local_loss``: with equal shards and every anchor valid, the mean over the local
            anchors) instead of the global loss. Ignored without ``group``.

    Gradient convention with ``group``: the mean over ranks of the returned losses equals the
    single-process loss over the concatenated batch, and gradients are summed over ranks (each
    rank's feature gradient is W times its slice of the single-process gradient), so after DDP
    averages over W ranks every gradient -- features, scale/temperature, bias -- equals the
    single-process one. With ``reduction="none"`` the local anchors' losses are returned as they
    are, and the same summing applies to whatever each rank backpropagates.

    Returns:
        The loss, float32 (float64 for float64 inputs). If no anchor has a positive the mean is
        0 with zero gradients.
    """
    query = _checks.features("query", query)
    key = _checks.features("key", key)
    _checks.same_width("key", key, "query", query)
    _checks.same_kind("key", key, "query", query)
    n, m, device = query.shape[0], key.shape[0], query.device
    _checks.choice("reduction", reduction, _REDUCTIONS)

    if scale is not None and temperature is not _DEFAULT_TEMPERATURE:
        raise ValueError("set either temperature or scale, not both")
    if scale is not None:
        s = _as_scale(_checks.scalar_or_rows("scale", scale, n, device, positive=False), False, query)
    else:
        s = _as_scale(_checks.scalar_or_rows("temperature", temperature, n, device, positive=True), True, query)

    n_grad_cols = None
    n_neg = 0
    if negatives is not None:
        negatives = _checks.features("negatives", negatives)
        _checks.same_width("negatives", negatives, "query", query)
        _checks.same_kind("negatives", negatives, "query", query)
        n_neg = negatives.shape[0]
        if not negatives.requires_grad:
            n_grad_cols = m
    elif negative_labels is not None:
        raise ValueError("negative_labels was given without negatives")
    n_cols = m + n_neg

    if exclude_self and m < n:
        raise ValueError(f"exclude_self needs key to hold the N={n} query samples first; key has M={m} rows")

    row_labels = col_labels = col_has_label = pos = None
    if labels is not None:
        if positive_index is not None:
            raise ValueError("give either labels or positive_index, not both")
        if symmetric:
            raise ValueError("symmetric needs one-to-one positives (positive_index or the default), not labels")
        row_labels = _checks.integer_vector("labels", labels, n, device)
        if key_labels is None:
            if m != n:
                raise ValueError(f"key_labels is required when key has M={m} rows and query has N={n}")
            key_labels = labels
        col_labels = _checks.integer_vector("key_labels", key_labels, m, device)
        if n_neg:
            if negative_labels is not None:
                col_labels = torch.cat([col_labels, _checks.integer_vector("negative_labels", negative_labels, n_neg, device)])
            else:
                col_labels = torch.cat([col_labels, torch.zeros(n_neg, dtype=torch.long, device=device)])
                col_has_label = torch.arange(n_cols, device=device) < m
    else:
        if key_labels is not None or negative_labels is not None:
            raise ValueError("key_labels / negative_labels need labels")
        if positive_index is None:
            if m < n:
                raise ValueError(
                    f"default positives (column i for row i) need M >= N; got N={n} query rows and M={m} keys. "
                    "Pass positive_index or labels."
                )
            if exclude_self:
                raise ValueError("exclude_self removes column i from row i, which is the default positive; pass positive_index or labels")
            pos = torch.arange(n, device=device)
        else:
            pos = _checks.integer_vector("positive_index", positive_index, n, device)
            if bool(((pos < 0) | (pos >= n_cols)).any()):
                raise ValueError(f"positive_index values must lie in [0, {n_cols}) (M={m} keys + K={n_neg} negatives)")
            if exclude_self and bool((pos == torch.arange(n, device=device)).any()):
                raise ValueError("positive_index points a row at its own column, which exclude_self removes")
        if symmetric:
            if bool((pos >= m).any()) or torch.unique(pos).numel() != n:
                raise ValueError("symmetric needs one-to-one positives: positive_index must be distinct key columns (< M)")

    # a symmetric exclude_self loss gathered by all_gather needs this layout (checked on every rank alike)
    permutation = bool(group is not None and gather == "all_gather" and symmetric and exclude_self
                       and (torch.sort(pos).values == torch.arange(n, device=device)).all())
    dist = _dist.prepare(
        group, gather, local_loss, op="info_nce", query=query, n_keys=m,
        options={"reduction": _REDUCTIONS.index(reduction), "labels": labels is not None, "negatives": n_neg,
                 "negative_labels": negative_labels is not None, "negatives_require_grad": _requires_grad(negatives),
                 "key_requires_grad": key.requires_grad, "per_row_scale": _per_row(s), "exclude_self": exclude_self,
                 "decoupled": decoupled, "symmetric": symmetric, "positive_index_is_permutation": permutation},
        scalars={"scale": s})
    spec = SoftmaxSpec(
        positive_index=pos, row_labels=row_labels, col_labels=col_labels, col_has_label=col_has_label,
        exclude_self=exclude_self, decoupled=decoupled, symmetric=symmetric, n_grad_cols=n_grad_cols,
    )
    return _softmax(query, key, s, None, spec, reduction, backend, negatives, dist)


def _two_towers(names, a, b):
    a = _checks.features(names[0], a)
    b = _checks.features(names[1], b)
    _checks.same_width(names[1], b, names[0], a)
    _checks.same_kind(names[1], b, names[0], a)
    _checks.same_rows(names[1], b, names[0], a)
    return a, b


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, backend=None, group=None,
              gather="all_gather", local_loss=False):
    r"""CLIP's symmetric contrastive loss, equal to open_clip ``ClipLoss``.

    ``L = logit_scale * image @ text.T (+ logit_bias)``;
    ``loss = (CE(L, arange(N)) + CE(L.T, arange(N))) / 2``, each a mean over the N pairs.

    Args:
        image_features, text_features: ``[N, D]``, used as given (open_clip normalises in the
            model, not the loss).
        logit_scale: the already-exponentiated scale: float or tensor ``()`` / ``(1,)``.
        logit_bias: optional float or tensor ``()`` / ``(1,)``.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            each rank passes its ``N_r`` pairs and the loss is CLIP's over all ``sum N_r`` pairs
            (open_clip ``gather_with_grad=True``), exact in value and gradient: the mean over
            ranks of the returned losses is the single-process loss, and after DDP's averaging
            the gradients of the features, ``logit_scale`` and ``logit_bias`` are the
            single-process ones (not W times too large).
    """
    image_features, text_features = _two_towers(("image_features", "text_features"), image_features, text_features)
    n, device = image_features.shape[0], image_features.device
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (shape () or (1,)); got {tuple(logit_scale.shape)}")
    s = _as_scale(_checks.scalar_or_rows("logit_scale", logit_scale, n, device, positive=False), False, image_features)
    bias = _as_bias(_checks.optional_bias("logit_bias", logit_bias, device), image_features)
    dist = _dist.prepare(group, gather, local_loss, op="clip_loss", query=image_features, n_keys=n,
                         options={"bias": bias is not None, "text_requires_grad": text_features.requires_grad},
                         scalars={"logit_scale": s, "logit_bias": bias})
    spec = SoftmaxSpec(positive_index=torch.arange(n, device=device), symmetric=True)
    return _softmax(image_features, text_features, s, bias, spec, "mean", backend, dist=dist)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend=None, group=None,
                gather="all_gather", local_loss=False):
    r"""SigLIP's pairwise sigmoid loss, equal to open_clip ``SigLipLoss`` and big_vision.

    ``L = logit_scale * image @ text.T + logit_bias``;
    ``loss = -(1/N) * sum_ij log sigmoid(z_ij * L_ij)`` with ``z = +1`` on the diagonal and
    ``-1`` elsewhere (summed over columns, averaged over rows).

    Args:
        image_features, text_features: ``[N, D]``, used as given.
        logit_scale: already-exponentiated scale (float or tensor ``()`` / ``(1,)``).
        logit_bias: float or tensor ``()`` / ``(1,)``.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            every (image, text) pair of the global batch is counted exactly once (open_clip's
            neighbour exchange): a rank's images meet their own texts with the positives and
            every other rank's texts as negatives only; the sum is divided by the global N.
    """
    image_features, text_features = _two_towers(("image_features", "text_features"), image_features, text_features)
    n, device = image_features.shape[0], image_features.device
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (shape () or (1,)); got {tuple(logit_scale.shape)}")
    if logit_bias is None:
        raise ValueError("siglip_loss needs logit_bias (a float or a scalar tensor); SigLIP initialises it to -10")
    s = _as_scale(_checks.scalar_or_rows("logit_scale", logit_scale, n, device, positive=False), False, image_features)
    bias = _as_bias(_checks.optional_bias("logit_bias", logit_bias, device), image_features)
    dist = _dist.prepare(group, gather, local_loss, op="siglip_loss", query=image_features, n_keys=n,
                         options={"text_requires_grad": text_features.requires_grad},
                         scalars={"logit_scale": s, "logit_bias": bias})
    spec = SigmoidSpec(positive_index=torch.arange(n, device=device), n_rows_norm=n)
    module = resolve(backend, device)
    if dist is not None:
        return _dist.finish(dist, _dist.sigmoid_loss(dist, module, image_features, text_features, s, bias, spec))
    return module.sigmoid_loss(image_features, text_features, s, bias, spec)


def _views(names, z1, z2, normalize: bool):
    z1, z2 = _two_towers(names, z1, z2)
    x = torch.cat([z1, z2])
    if normalize:
        # norms in fp32 at least; the kernels then get features in the input dtype again
        x = F.normalize(x.to(compute_dtype(x.dtype)), dim=1).to(x.dtype)
    return x


def nt_xent(z1, z2, temperature: Number = 0.5, *, normalize: bool = True, backend=None, group=None,
            gather="all_gather", local_loss=False):
    r"""SimCLR's NT-Xent over the 2N views (lightly ``NTXentLoss``'s value).

    The anchors are the 2N rows of ``x = [z1; z2]`` (L2-normalised when ``normalize``); each row
    is contrasted with the other 2N - 1 rows at temperature ``t``, its positive being its other
    view. ``loss = mean_i [-x_i.x_pos(i)/t + log sum_{j != i} exp(x_i.x_j/t)]``.

    Args:
        z1, z2: ``[N, D]`` the two views.
        temperature: float > 0 or a tensor ``()`` / ``(1,)``.
        normalize: L2-normalise the views inside the op (its backward included).
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            each rank passes its ``N_r`` pairs and the loss is over all ``2 * sum N_r`` views.
    """
    x = _views(("z1", "z2"), z1, z2, normalize)
    n2 = x.shape[0]
    t = _checks.scalar_or_rows("temperature", temperature, 1, x.device, positive=True)
    if isinstance(t, torch.Tensor) and t.dim():
        raise ValueError(f"temperature must be a scalar; got {tuple(t.shape)}")
    scale = _as_scale(t, True, x)
    dist = _dist.prepare(group, gather, local_loss, op="nt_xent", query=x, n_keys=n2,
                         options={"normalize": normalize, "requires_grad": x.requires_grad}, scalars={"temperature": t})
    spec = SoftmaxSpec(positive_index=_pair_positions(n2 // 2, x.device), exclude_self=True)
    return _softmax(x, x, scale, None, spec, "mean", backend, dist=dist)


def supcon(features, labels=None, *, temperature: Number = 0.1, base_temperature: Optional[float] = None,
           contrast_mode: str = "all", backend=None, group=None, gather="all_gather", local_loss=False):
    r"""Supervised contrastive loss (Khosla et al. 2020).

    ``features [B, V, D]`` holds V views of B samples. The contrast set is all B*V views; anchors
    are all of them (``contrast_mode="all"``) or the first view (``"one"``). For anchor i with
    positives P_i (same label, other than itself) and denominator all views but itself::

        loss_i = -(t / base_t) * mean_{p in P_i} [ z_i.z_p / t - log sum_{a != i} exp(z_i.z_a / t) ]

    Anchors with no positive are left out of the mean (HobbitLong's reference divides by zero).

    Args:
        features: ``[B, V, D]``, used as given (normalise them first, as the paper does).
        labels: Long ``[B]`` or ``None`` (each sample its own class: positives are its views).
        temperature: float > 0 or a tensor ``()`` / ``(1,)``.
        base_temperature: defaults to ``temperature``.
        contrast_mode: ``"all"`` or ``"one"``.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            each rank passes its ``B_r`` samples (and their labels, compared across ranks); the
            contrast set is every rank's views and the mean is over every rank's anchors that
            have a positive. ``labels=None`` means each sample is its own class across ranks.
    """
    features = _checks.features("features", features, rank=3)
    _checks.choice("contrast_mode", contrast_mode, ("all", "one"))
    b, v, _ = features.shape
    device = features.device
    if labels is None:
        labels = torch.arange(b, device=device)
        if group is not None:
            labels = _dist.unique_labels(group, b, device)
    labels = _checks.integer_vector("labels", labels, b, device)
    t = _checks.scalar_or_rows("temperature", temperature, 1, device, positive=True)
    if isinstance(t, torch.Tensor) and t.dim():
        raise ValueError(f"temperature must be a scalar; got {tuple(t.shape)}")
    if base_temperature is None:
        base_temperature = t
    else:
        base_temperature = _checks.scalar_or_rows("base_temperature", base_temperature, 1, device, positive=True)
    contrast = features.transpose(0, 1).reshape(b * v, -1)
    contrast_labels = labels.repeat(v)
    if contrast_mode == "all":
        anchors, anchor_labels = contrast, contrast_labels
    else:
        anchors, anchor_labels = features[:, 0], labels
    scale = _as_scale(t, True, features)
    dist = _dist.prepare(group, gather, local_loss, op="supcon", query=anchors, n_keys=contrast.shape[0],
                         options={"contrast_mode": contrast_mode == "all", "views": v,
                                  "requires_grad": features.requires_grad},
                         scalars={"temperature": t, "base_temperature": base_temperature})
    spec = SoftmaxSpec(row_labels=anchor_labels, col_labels=contrast_labels, exclude_self=True)
    loss = _softmax(anchors, contrast, scale, None, spec, "mean", backend, dist=dist)
    return loss * (t / base_temperature)


def _von_mises_fisher_weights(x1: torch.Tensor, x2: torch.Tensor, sigma: float, dist=None) -> torch.Tensor:
    """DCLW's positive weights ``2 - N * softmax(<x1_i, x2_i> / sigma)`` (no gradient); with a
    distributed context the softmax and N run over every rank's pairs."""
    sim = (x1.detach() * x2.detach()).sum(dim=1).to(compute_dtype(x1.dtype)) / sigma
    if dist is not None:
        return 2 - (dist.total_rows // 2) * torch.exp(sim - _dist.logsumexp(sim, dist))
    return 2 - x1.shape[0] * torch.softmax(sim, dim=0)


def dcl(z1, z2, temperature: Number = 0.1, *, weight_sigma: Optional[float] = None, normalize: bool = True,
        backend=None, group=None, gather="all_gather", local_loss=False):
    r"""Decoupled contrastive loss (Yeh et al. 2022), lightly ``DCLLoss`` / ``DCLWLoss``'s value.

    Like :func:`nt_xent` but the positive is removed from the denominator, and the positive term
    can be weighted::

        loss_i = -w_i * x_i.x_pos(i)/t + log sum_{j != i, pos(i)} exp(x_i.x_j/t)

    averaged over the 2N anchors (the mean of the two directions). ``w = 1``, or with
    ``weight_sigma=sigma`` the von Mises-Fisher weights ``w = 2 - N softmax(<z1_i, z2_i>/sigma)``
    computed on detached (normalised) features, shared by both directions.

    Args:
        z1, z2: ``[N, D]`` the two views.
        temperature: float > 0 or a tensor ``()`` / ``(1,)``.
        weight_sigma: ``None`` (DCL) or sigma > 0 (DCLW).
        normalize: L2-normalise inside the op.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            the loss is over every rank's ``2 * N_r`` views, and the DCLW weights' softmax and
            ``N`` run over every rank's pairs.
    """
    x = _views(("z1", "z2"), z1, z2, normalize)
    n = x.shape[0] // 2
    t = _checks.scalar_or_rows("temperature", temperature, 1, x.device, positive=True)
    if isinstance(t, torch.Tensor) and t.dim():
        raise ValueError(f"temperature must be a scalar; got {tuple(t.shape)}")
    scale = _as_scale(t, True, x)
    dist = _dist.prepare(group, gather, local_loss, op="dcl", query=x, n_keys=2 * n,
                         options={"normalize": normalize, "weighted": weight_sigma is not None,
                                  "requires_grad": x.requires_grad},
                         scalars={"temperature": t, "weight_sigma": weight_sigma})
    pos_weight = None
    if weight_sigma is not None:
        sigma = _checks.scalar_or_rows("weight_sigma", weight_sigma, 1, x.device, positive=True)
        w = _von_mises_fisher_weights(x[:n], x[n:], sigma, dist)
        pos_weight = torch.cat([w, w])
    spec = SoftmaxSpec(positive_index=_pair_positions(n, x.device), exclude_self=True, decoupled=True,
                       pos_weight=pos_weight)
    return _softmax(x, x, scale, None, spec, "mean", backend, dist=dist)

