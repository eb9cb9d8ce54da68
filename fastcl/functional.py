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

from dataclasses import replace
from typing import Optional, Sequence, Union

import torch

from . import _checks, _lower, ops
from . import distributed as _dist
from ._dispatch import resolve
from ._lower import DEFAULT_TEMPERATURE, NT_XENT_TEMPERATURE, Lowered
from ._spec import DistillSpec
from .backends.common import compute_dtype

__all__ = ["info_nce", "clip_loss", "distill_clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl"]

_REDUCTIONS = ("mean", "sum", "none")
Number = Union[float, torch.Tensor]


def _checked(op: str, group, gather, local_loss, backend, lower):
    """The local half of a call: ``lower()`` (validation and lowering) and the backend choice.

    Under a process group, a rank whose own inputs fail tells the others before raising (the
    first collective of :func:`fastcl.distributed.prepare` listens), so every rank raises at
    once instead of the healthy ones waiting for the group's timeout."""
    try:
        _dist.check_options(gather, local_loss)
        call = lower()  # a Lowered, or (Lowered, extras...)
        lowered = call if isinstance(call, Lowered) else call[0]
        if torch.compiler.is_compiling() and group is None:
            # chosen inside the operators at run time (a compiled graph holds the name only)
            module = backend or ""
        else:
            module = resolve(backend, lowered.query.device, lowered.spec)
    except (ValueError, TypeError, RuntimeError) as exc:
        if group is not None:
            _dist.share_failure(group, op, exc)
        raise
    return call, module


def _prepare(call: Lowered, group, gather, local_loss, op: str, reduction: str = "mean", scalars=None):
    """The distributed context of a call (``None`` without ``group``), agreed on by every rank."""
    return _dist.prepare(group, gather, local_loss, op=op, query=call.query, key=call.key, negatives=call.negatives,
                         scale=call.scale, bias=call.bias, spec=call.spec, reduction=reduction, scalars=scalars)


def _softmax(call: Lowered, module, reduction: str, dist, op: str):
    """Per-anchor losses of ``call`` on the chosen backend, reduced; with a distributed context,
    over every rank's keys (followed by this rank's negatives)."""
    query, key, negatives, scale, bias, spec = call
    if dist is None:
        n_cols = key.shape[0] + (0 if negatives is None else negatives.shape[0])
        columns = ops.LocalColumns(module, query.shape[0], n_cols)
        outs = ops.softmax.softmax_loss(columns, query, key, negatives, scale, bias, spec)
    else:
        if spec.debias is not None and spec.symmetric and scale.dim() == 1:
            raise ValueError(f"{op}: debias with symmetric=True and a per-row temperature/scale is not supported "
                             "across ranks (its column floor sums every rank's scales); use a scalar scale")
        outs = _dist.softmax_loss(dist, module, query, key, negatives, scale, bias, spec)
    return _reduce(*outs, spec.symmetric, reduction, dist)


def _prefixes(call: Lowered, dims, weights, op: str):
    """``None`` without ``matryoshka_dims``, else ``(dims, weights)`` checked and sorted by width."""
    if dims is None:
        if weights is not None:
            raise ValueError(f"{op}: matryoshka_weights needs matryoshka_dims")
        return None
    return ops.matryoshka.check_dims(dims, weights, call.query.shape[1], op)


def _matryoshka(call: Lowered, module, reduction: str, op: str, prefixes, group, gather, local_loss):
    """``sum_p w_p * loss_p`` over the normalised prefixes. One process: every prefix from one
    pass (:mod:`fastcl.ops.matryoshka`). Across ranks, or with a false-negative or guide mask
    (whose thresholds the prefix passes do not take): one loss per prefix."""
    dims, weights = prefixes
    symmetric = call.spec.symmetric
    masked = call.spec.false_negative_margin is not None or call.spec.fn_row is not None
    if group is None and not masked:
        query, key, negatives, scale, bias, spec = call
        per = ops.matryoshka.losses(module, query, key, negatives, scale, bias, spec, dims)
        parts = [_reduce(*outs, symmetric, reduction) for outs in per]
    else:
        parts = []
        for d in dims:
            sub = call._replace(**{name: ops.matryoshka.normalized_prefix(x, d, call.query.dtype) for name, x in
                                   (("query", call.query), ("key", call.key), ("negatives", call.negatives))})
            parts.append(_softmax(sub, module, reduction, _prepare(sub, group, gather, local_loss, op, reduction), op))
    if reduction == "none" and symmetric:
        return tuple(sum(w * part[i] for w, part in zip(weights, parts)) for i in range(2))
    return sum(w * part for w, part in zip(weights, parts))


def _reduce(row_loss, col_loss, row_valid, col_valid, symmetric: bool, reduction: str, dist=None):
    """The one reduction: ``"none"`` (this rank's per-anchor losses), ``"sum"``, or ``"mean"``
    over the valid anchors (of every rank, with a distributed context); the two directions of
    a symmetric loss are averaged."""
    if reduction == "none":
        return (row_loss, col_loss) if symmetric else row_loss
    if reduction == "sum":
        share = row_loss.sum()
        if symmetric:
            share = (share + col_loss.sum()) / 2
    else:
        counts = torch.stack([row_valid.sum(), col_valid.sum()]).to(row_loss.dtype)
        if dist is not None:
            counts = _dist.all_reduce_sum(counts, dist)
        share = row_loss.sum() / counts[0].clamp(min=1)
        if symmetric:
            share = (share + col_loss.sum() / counts[1].clamp(min=1)) / 2
    return share if dist is None else _dist.finish(dist, share)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: Number = DEFAULT_TEMPERATURE,
    scale: Optional[Number] = None,
    positive_index: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    negatives: Optional[torch.Tensor] = None,
    negative_labels: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
    decoupled: bool = False,
    symmetric: bool = False,
    debias: Optional[float] = None,
    hardness: Optional[float] = None,
    label_smoothing: float = 0.0,
    false_negative_margin: Optional[float] = None,
    matryoshka_dims: Optional[Sequence[int]] = None,
    matryoshka_weights: Optional[Sequence[float]] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_key: Optional[torch.Tensor] = None,
    guide_negatives: Optional[torch.Tensor] = None,
    guide_margin: float = 0.0,
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
        debias: ``tau_plus`` in ``[0, 1)``, the debiased contrastive loss of Chuang et al.
            (2020): with ``p_i`` the positive logit and ``Q_i`` negatives (the denominator
            columns other than the positive), ``loss_i = -p_i + log(e^{p_i} + Ng_i)``,
            ``Ng_i = max((sum_neg e^{L_ij} - Q_i tau_plus e^{p_i}) / (1 - tau_plus),
            sum_neg e^{-s_ij + b})`` (the floor is the smallest logit unit vectors can have).
            ``0`` is InfoNCE with the positive's own term kept apart. Needs one-hot positives
            (not ``labels``) and ``decoupled=False``; works with ``symmetric`` (the column
            direction over the N rows likewise), queues, ``exclude_self`` and every scale form
            (per-row scales with ``symmetric`` only without ``group``).
        hardness: ``beta >= 0``, hard-negative reweighting of the debiased loss (Robinson et al.
            2021): in ``Ng_i`` the negatives' sum ``sum_neg e^{L_ij}`` becomes
            ``Q_i sum_neg e^{(1+beta) L_ij} / sum_neg e^{beta L_ij}``, tilting the denominator
            toward hard negatives; the rest (the ``tau_plus`` correction, the floor) is unchanged.
            Without ``debias`` it means ``debias=0``. The tilted statistic is a second pass over
            the tiles (about twice the debiased loss's cost), on every backend.
        symmetric: also the key -> query direction (each positive column is an anchor over the
            ``N`` rows); the loss is ``(rows + columns) / 2``, as CLIP. Needs one-to-one
            positives among the keys.
        label_smoothing: ``eps`` in ``[0, 1)``, ``F.cross_entropy(label_smoothing=eps)`` over each
            anchor's denominator columns: ``(1 - eps) (LSE_i - p_i) + eps (LSE_i - mean_{j in
            D_i} L_ij)``, with ``p_i`` the positive logit (labels: the SupCon row term). Costs
            O((N + M + K) D) beside the fused loss. Not with ``debias``. With ``group``, both gather
            modes (the ring adds one ``[D]`` all-reduce, ``[2, D]`` for ``symmetric``, per call).
        false_negative_margin: ``m`` (a float), or ``None``: mask likely false negatives (the
            Qwen3-Embedding / GTE recipe). Column ``j``, not row ``i``'s positive, leaves row
            ``i``'s denominator when ``<q_i, k_j> > <q_i, k_pos(i)> + m``; with ``symmetric``,
            row ``i`` leaves column ``j``'s when ``<q_i, k_j> > <q_pos(j), k_j> + m``. Decided
            inside the tiles from the positive's similarity (an ``[N]`` vector); the mask has no
            gradient. Needs one-hot positives and a positive scale (a scalar one with
            ``symmetric``); not with ``decoupled``, ``debias`` or ``label_smoothing``. Torch and
            Triton backends (``backend="cuda"`` raises; ``auto`` skips it).
        matryoshka_dims: distinct widths ``d <= D`` (Matryoshka representation learning): the
            loss becomes ``sum_d w_d * loss_d``, ``loss_d`` this loss with every other option on
            ``query``, ``key`` and ``negatives`` cut to their first ``d`` features and
            L2-normalised (sentence-transformers' ``MatryoshkaLoss``; the full width is
            normalised too when listed). One process: every width from one pass over the tiles
            (torch backend; other backends one pass per width), with exact gradients through
            the normalisation. With ``group``, ``false_negative_margin`` or the guide mask: one
            loss per width (each width's margin thresholds from its own positives).
        matryoshka_weights: ``w_d``, one number per entry of ``matryoshka_dims`` (default 1).
        guide_query, guide_key, guide_negatives: a guide model's embeddings of the rows, keys and
            negatives (GISTEmbed; ``[N, G]``, ``[M, G]``, ``[K, G]``, any width ``G``, no gradient):
            column ``j``, not row ``i``'s positive, leaves row ``i``'s denominator when
            ``cos(gq_i, gk_j) > cos(gq_i, gk_pos(i)) - guide_margin``. The guide similarity is
            computed inside the tiles (one more matmul per tile), never stored. Needs one-hot
            positives; not with ``labels``, ``decoupled``, ``debias``, ``label_smoothing``,
            ``symmetric`` or ``false_negative_margin``. With ``group``, every rank's guide keys
            are gathered beside the keys (``all_gather``) or travel with their key block (``ring``).
            Torch and Triton backends (``auto`` skips CUDA for it; naming CUDA raises).
        guide_margin: the guide's margin (sentence-transformers' ``margin`` with
            ``margin_strategy="absolute"``), a finite float.
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
    def lower():
        _checks.choice("reduction", reduction, _REDUCTIONS)
        tau_plus, beta = _lower.hardness(hardness, debias, labels, decoupled)
        call = _lower.info_nce(query, key, temperature=temperature, scale=scale, positive_index=positive_index,
                               labels=labels, key_labels=key_labels, negatives=negatives,
                               negative_labels=negative_labels, exclude_self=exclude_self, decoupled=decoupled,
                               symmetric=symmetric, debias=tau_plus, label_smoothing=label_smoothing,
                               false_negative_margin=false_negative_margin, hardness=beta, guide_query=guide_query,
                               guide_key=guide_key, guide_negatives=guide_negatives, guide_margin=guide_margin)
        return call, _prefixes(call, matryoshka_dims, matryoshka_weights, "info_nce")

    (call, prefixes), module = _checked("info_nce", group, gather, local_loss, backend, lower)
    if prefixes is not None:
        return _matryoshka(call, module, reduction, "info_nce", prefixes, group, gather, local_loss)
    dist = _prepare(call, group, gather, local_loss, "info_nce", reduction)
    return _softmax(call, module, reduction, dist, "info_nce")


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, label_smoothing=0.0,
              false_negative_margin=None, matryoshka_dims=None, matryoshka_weights=None, backend=None, group=None,
              gather="all_gather", local_loss=False):
    r"""CLIP's symmetric contrastive loss, equal to open_clip ``ClipLoss``.

    ``L = logit_scale * image @ text.T (+ logit_bias)``;
    ``loss = (CE(L, arange(N)) + CE(L.T, arange(N))) / 2``, each a mean over the N pairs.

    Args:
        image_features, text_features: ``[N, D]``, used as given (open_clip normalises in the
            model, not the loss).
        logit_scale: the already-exponentiated scale: float or tensor ``()`` / ``(1,)``.
        logit_bias: optional float or tensor ``()`` / ``(1,)``.
        label_smoothing: ``eps`` in ``[0, 1)``: both cross-entropies as
            ``F.cross_entropy(label_smoothing=eps)``; see :func:`info_nce`.
        false_negative_margin: ``m``: in both directions, a pair other than the positive leaves
            the denominator when its similarity exceeds the positive's by more than ``m``; see
            :func:`info_nce` (not with ``label_smoothing``).
        matryoshka_dims, matryoshka_weights: the loss summed over normalised feature prefixes;
            see :func:`info_nce`.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            each rank passes its ``N_r`` pairs and the loss is CLIP's over all ``sum N_r`` pairs
            (open_clip ``gather_with_grad=True``), exact in value and gradient: the mean over
            ranks of the returned losses is the single-process loss, and after DDP's averaging
            the gradients of the features, ``logit_scale`` and ``logit_bias`` are the
            single-process ones (not W times too large).
    """
    def lower():
        call = _lower.towers(image_features, text_features, logit_scale, logit_bias, sigmoid=False,
                             label_smoothing=label_smoothing, false_negative_margin=false_negative_margin)
        return call, _prefixes(call, matryoshka_dims, matryoshka_weights, "clip_loss")

    (call, prefixes), module = _checked("clip_loss", group, gather, local_loss, backend, lower)
    if prefixes is not None:
        return _matryoshka(call, module, "mean", "clip_loss", prefixes, group, gather, local_loss)
    dist = _prepare(call, group, gather, local_loss, "clip_loss")
    return _softmax(call, module, "mean", dist, "clip_loss")


def _teacher_fields(t_image, t_text) -> dict:
    """What every rank must agree on about the teacher, beside the student's call: its width
    (the gathered or travelling blocks have one shape) and which of its features need gradients
    (the backward's collectives carry the teacher's key gradients then)."""
    return {"teacher feature width": t_image.shape[1], "dist_image_features.requires_grad": t_image.requires_grad,
            "dist_text_features.requires_grad": t_text.requires_grad}


def distill_clip_loss(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                      dist_logit_scale, *, backend=None, group=None, gather="all_gather", local_loss=False):
    r"""CLIP's loss and its distillation from a teacher, ``(contrastive, distill)``, equal to open_clip
    ``DistillClipLoss``.

    With student logits ``L = logit_scale * image @ text.T`` and teacher logits
    ``T = dist_logit_scale * dist_image @ dist_text.T``::

        contrastive = (CE(L, arange(N)) + CE(L.T, arange(N))) / 2
        distill     = (H(T, L) + H(T.T, L.T)) / 2,   H(T, S) = -mean_i sum_j softmax(T)_ij log softmax(S)_ij

    Neither ``N x N`` matrix is formed: each tile computes both logits (two matmuls), one sweep
    keeps the student's LSEs and the teacher-weighted mean of the student's logits per anchor,
    and the backward recomputes the tiles. Every tensor that requires a gradient gets its exact
    one, the teacher's included (as open_clip's autograd gives them).

    Args:
        image_features, text_features: the student's ``[N, D]`` features, used as given.
        logit_scale: the student's exponentiated scale, float or tensor ``()`` / ``(1,)``.
        dist_image_features, dist_text_features: the teacher's ``[N, D']`` features (``D'`` may
            differ from ``D``; the same dtype and device as the student's).
        dist_logit_scale: the teacher's scale.
        backend: see :func:`info_nce`; torch and Triton run it (the CUDA backend has no
            distillation kernels: ``auto`` skips it, naming it raises).
        group, local_loss: across ranks, each rank passes its ``N_r`` pairs and the loss is the
            one over all pairs (open_clip ``gather_with_grad=True``), with the convention of
            :func:`info_nce`: every rank returns the global losses (or, ``local_loss``, its
            share times W), and after DDP's averaging every gradient is the single-process one.
        gather: ``"all_gather"`` (the four feature tensors are gathered; each rank computes its
            own rows against every rank's columns) or ``"ring"`` (the student's and teacher's
            key blocks travel together, and their gradients travel behind them; extra memory
            O(max_r N_r (D + D')) per rank, independent of the world size). The teacher's width
            and which teacher features need gradients must agree across ranks.

    Returns:
        ``(contrastive_loss, distill_loss)``, each float32 (float64 for float64 inputs).
    """
    def lower():
        student = _lower.towers(image_features, text_features, logit_scale, None, sigmoid=False)
        teacher = _lower.towers(dist_image_features, dist_text_features, dist_logit_scale, None, sigmoid=False)
        if teacher.query.shape[0] != student.query.shape[0]:
            raise ValueError(f"distill_clip_loss: the teacher has {teacher.query.shape[0]} pairs and the student "
                             f"{student.query.shape[0]}; both must score the same pairs")
        if teacher.query.device != student.query.device or teacher.query.dtype != student.query.dtype:
            raise TypeError("distill_clip_loss: the teacher's features must have the student's dtype and device "
                            f"(got {teacher.query.dtype} on {teacher.query.device}, student {student.query.dtype} "
                            f"on {student.query.device})")
        return student._replace(spec=DistillSpec()), teacher

    (student, teacher), module = _checked("distill_clip_loss", group, gather, local_loss, backend, lower)
    name = module if isinstance(module, str) else module.__name__.rsplit(".", 1)[-1]
    image, text, scale = student.query, student.key, student.scale
    t_image, t_text, t_scale = teacher.query, teacher.key, teacher.scale
    n = image.shape[0]
    pos = torch.arange(n, device=image.device)
    if group is None:
        rows, cols = ops.distill.anchor_terms(name, image, text, scale, t_image, t_text, t_scale, pos, True)
        return tuple((r.mean() + c.mean()) / 2 for r, c in zip(rows, cols))
    dist = _dist.prepare(group, gather, local_loss, op="distill_clip_loss", query=image, key=text, scale=scale,
                         spec=teacher.spec, scalars={"dist_logit_scale": t_scale, **_teacher_fields(t_image, t_text)})
    # each rank's images against every rank's texts, and its texts against every rank's images
    i2t = _dist.distill_terms(dist, module, image, text, scale, t_image, t_text, t_scale)
    t2i = _dist.distill_terms(dist, module, text, image, scale, t_text, t_image, t_scale)
    total = 2 * dist.total_rows
    return tuple(_dist.finish(dist, (a.sum() + b.sum()) / total) for a, b in zip(i2t, t2i))


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, labels=None, backend=None, group=None,
                gather="all_gather", local_loss=False):
    r"""SigLIP's pairwise sigmoid loss, equal to open_clip ``SigLipLoss`` and big_vision.

    ``L = logit_scale * image @ text.T + logit_bias``;
    ``loss = -(1/N) * sum_ij log sigmoid(z_ij * L_ij)`` with ``z = +1`` on the diagonal and
    ``-1`` elsewhere (summed over columns, averaged over rows).

    Args:
        image_features, text_features: ``[N, D]``, used as given.
        logit_scale: already-exponentiated scale (float or tensor ``()`` / ``(1,)``).
        logit_bias: float or tensor ``()`` / ``(1,)``.
        labels: optional Long ``[N]`` group ids of the pairs (several captions of one image,
            duplicates): ``z_ij = +1`` whenever ``labels[i] == labels[j]``, the diagonal
            included. With ``group``, each rank passes its own pairs' labels and they compare
            across ranks: a rank's images are positives with any rank's texts of an equal label.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            every (image, text) pair of the global batch is counted exactly once (open_clip's
            neighbour exchange): without ``labels`` a rank's images meet their own texts with the
            positives and every other rank's texts as negatives only; the sum is divided by the
            global N. The loss and gradients equal the single process's over the concatenated
            batch (labels included), under the convention of :func:`info_nce`.
    """
    call, module = _checked("siglip_loss", group, gather, local_loss, backend,
                            lambda: _lower.towers(image_features, text_features, logit_scale, logit_bias, sigmoid=True,
                                                  labels=labels))
    query, key, _, scale, bias, spec = call
    dist = _prepare(call, group, gather, local_loss, "siglip_loss")
    if dist is None:
        return ops.sigmoid.sigmoid_loss(ops.LocalColumns(module, query.shape[0], key.shape[0]), query, key, scale,
                                        bias, spec)
    return _dist.finish(dist, _dist.sigmoid_loss(dist, module, query, key, scale, bias, spec))


def nt_xent(z1, z2, temperature: Number = NT_XENT_TEMPERATURE, *, scale: Optional[Number] = None,
            normalize: bool = True, backend=None, group=None,
            gather="all_gather", local_loss=False):
    r"""SimCLR's NT-Xent over the 2N views (lightly ``NTXentLoss``'s value).

    The anchors are the 2N rows of ``x = [z1; z2]`` (L2-normalised when ``normalize``); each row
    is contrasted with the other 2N - 1 rows at temperature ``t``, its positive being its other
    view. ``loss = mean_i [-x_i.x_pos(i)/t + log sum_{j != i} exp(x_i.x_j/t)]``.

    Args:
        z1, z2: ``[N, D]`` the two views.
        temperature: float > 0 or a tensor ``()`` / ``(1,)``.
        scale: ``1 / temperature`` given directly (any sign; e.g. a drop-in for a library that
            accepts negative temperatures); set at most one of the two.
        normalize: L2-normalise the views inside the op (its backward included).
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            each rank passes its ``N_r`` pairs and the loss is over all ``2 * sum N_r`` views.
    """
    call, module = _checked("nt_xent", group, gather, local_loss, backend,
                            lambda: _lower.views(z1, z2, temperature, normalize, scale=scale))
    return _softmax(call, module, "mean", _prepare(call, group, gather, local_loss, "nt_xent"), "nt_xent")


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
    def lower():
        rank_world = _dist.rank_and_world(group) if group is not None else None
        return _lower.supcon(features, labels, temperature, base_temperature, contrast_mode, rank_world)

    (call, t, base_t), module = _checked("supcon", group, gather, local_loss, backend, lower)
    dist = _prepare(call, group, gather, local_loss, "supcon", scalars={"base_temperature": base_t})
    return _softmax(call, module, "mean", dist, "supcon") * (t / base_t)


def _von_mises_fisher_weights(x1: torch.Tensor, x2: torch.Tensor, sigma: float, dist=None) -> torch.Tensor:
    """DCLW's positive weights ``2 - N * softmax(<x1_i, x2_i> / sigma)`` (no gradient); with a
    distributed context the softmax and N run over every rank's pairs."""
    sim = (x1.detach() * x2.detach()).sum(dim=1).to(compute_dtype(x1.dtype)) / sigma
    if dist is not None:
        return 2 - (dist.total_rows // 2) * torch.exp(sim - _dist.logsumexp(sim, dist))
    return 2 - x1.shape[0] * torch.softmax(sim, dim=0)


def dcl(z1, z2, temperature: Number = DEFAULT_TEMPERATURE, *, scale: Optional[Number] = None,
        weight_sigma: Optional[float] = None, normalize: bool = True,
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
        scale: ``1 / temperature`` given directly (any sign); set at most one of the two.
        weight_sigma: ``None`` (DCL) or sigma > 0 (DCLW).
        normalize: L2-normalise inside the op.
        backend: see :func:`info_nce`.
        group, gather, local_loss: cross-rank negatives, see :func:`info_nce`. With ``group``,
            the loss is over every rank's ``2 * N_r`` views, and the DCLW weights' softmax and
            ``N`` run over every rank's pairs.
    """
    def lower():
        sigma = None if weight_sigma is None else _checks.scalar("weight_sigma", weight_sigma, z1.device, True)
        return _lower.views(z1, z2, temperature, normalize, scale=scale, decoupled=True,
                            weighted=sigma is not None), sigma

    (call, sigma), module = _checked("dcl", group, gather, local_loss, backend, lower)
    dist = _prepare(call, group, gather, local_loss, "dcl", scalars={"weight_sigma": sigma})
    if sigma is not None:
        x, n = call.query, call.query.shape[0] // 2
        w = _von_mises_fisher_weights(x[:n], x[n:], sigma, dist)
        call = call._replace(spec=replace(call.spec, pos_weight=torch.cat([w, w])))
    return _softmax(call, module, "mean", dist, "dcl")
