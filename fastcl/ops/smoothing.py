"""Label smoothing of the softmax family: a term outside the tiles (docs/design.md §4).

``F.cross_entropy(label_smoothing=eps)`` over a row's denominator columns ``D_i`` is

    (1 - eps) (LSE_i - p_i) + eps (LSE_i - mean_{j in D_i} L_ij)  =  CE_i + eps (p_i - m_i)

with ``p_i`` the positive logit (the mean label-positive logit for labels) and ``m_i`` the mean
logit over ``D_i``. Both are linear in the logits, so ``m_i = s_i <q_i, sum_{j in D_i} k_j> /
|D_i|`` needs one sum of the columns and O((N + C) D) corrections (the excluded self column, the
positives of a decoupled loss), never a tile: the fused passes compute ``CE_i`` unchanged and the
term below is plain differentiable PyTorch, so its gradients come from autograd. The bias
cancels in ``p_i - m_i``. A symmetric loss's column anchors get the same with the roles of rows
and columns swapped.
"""

from typing import Optional, Tuple

import torch

from .._spec import SoftmaxSpec
from ..backends.common import compute_dtype


def _label_sums(spec: SoftmaxSpec, cols: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_{j in P_i} col_j [N, D], |P_i| [N])`` for label positives (per-class sums)."""
    labels = torch.cat([spec.row_labels, spec.col_labels])
    _, inverse = torch.unique(labels, return_inverse=True)
    row_class, col_class = inverse[:n], inverse[n:]
    has = spec.col_has_label if spec.col_has_label is not None else torch.ones_like(col_class, dtype=torch.bool)
    weight = has.to(cols.dtype)
    n_classes = labels.numel()
    sums = cols.new_zeros(n_classes, cols.shape[1]).index_add(0, col_class, cols * weight[:, None])
    counts = cols.new_zeros(n_classes).index_add(0, col_class, weight)
    pos_sum, pos_cnt = sums[row_class], counts[row_class]
    if spec.exclude_self:  # column i is not a positive of row i
        m = min(n, cols.shape[0])
        self_pos = torch.zeros(n, dtype=cols.dtype, device=cols.device)
        self_pos[:m] = ((row_class[:m] == col_class[:m]) & has[:m]).to(cols.dtype)
        pos_sum = pos_sum - self_pos[:, None] * torch.cat([cols[:m], cols.new_zeros(n - m, cols.shape[1])])
        pos_cnt = pos_cnt - self_pos
    return pos_sum, pos_cnt


def terms(query, key, negatives, scale, spec: SoftmaxSpec, eps: float
          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(eps (p_i - m_i) [N], eps (p'_j - m'_j) per row's positive column [N] or None)``.

    Differentiable in ``query``, ``key``, ``negatives`` and ``scale``; the caller zeroes invalid
    anchors (no positive, empty denominator) and adds the terms to the fused per-anchor losses.
    Written as per-row dot products (``[N]`` vectors) so that only the gathers of the positive
    (and, with ``exclude_self``, the self) columns touch ``[N, D]``.
    """
    cd = compute_dtype(query.dtype)
    q = query.to(cd)
    cols = key.to(cd) if negatives is None else torch.cat([key, negatives]).to(cd)
    n, c = q.shape[0], cols.shape[0]
    s = scale.to(cd).reshape(-1).expand(n)
    zeros = torch.zeros(n, dtype=cd, device=q.device)

    # <q_i, sum over P_i> and |P_i|; <q_i, sum over D_i> and |D_i|
    pos_cols = None
    if spec.uses_labels:
        pos_sum, pos_cnt = _label_sums(spec, cols, n)
        pos_dot = (q * pos_sum).sum(dim=1)
    else:
        pos_cols = cols[spec.positive_index]
        pos_dot, pos_cnt = (q * pos_cols).sum(dim=1), torch.ones_like(zeros)
    den_dot, den_cnt = q @ cols.sum(0), torch.full_like(zeros, float(c))
    if spec.exclude_self:  # column i leaves row i (rows beyond the columns have none to leave)
        m = min(n, c)
        has_self = torch.cat([torch.ones(m, dtype=cd, device=q.device), zeros[m:]])
        self_dot = torch.cat([(q[:m] * cols[:m]).sum(dim=1), zeros[m:]])
        den_dot, den_cnt = den_dot - self_dot, den_cnt - has_self
    if spec.decoupled:
        den_dot, den_cnt = den_dot - pos_dot, den_cnt - pos_cnt
    row_term = eps * s * (pos_dot / pos_cnt.clamp(min=1) - den_dot / den_cnt.clamp(min=1))
    if not spec.symmetric:
        return row_term, None

    # column anchors j = positive_index[i] over the N rows: p'_j is the same logit as p_i, the mean
    # runs over the rows without column j's own row (exclude_self) or its positive row (decoupled)
    j = spec.positive_index
    qs = q * s[:, None]
    col_j = pos_cols
    pos_logit = s * pos_dot
    rows_dot, rows_cnt = col_j @ qs.sum(0), torch.full_like(zeros, float(n))
    if spec.exclude_self:
        own = (j < n).to(cd)
        own_row = j.clamp(max=n - 1)
        rows_dot = rows_dot - own * (qs[own_row] * col_j).sum(dim=1)
        rows_cnt = rows_cnt - own
    if spec.decoupled:
        rows_dot, rows_cnt = rows_dot - pos_logit, rows_cnt - 1
    col_term = eps * (pos_logit - rows_dot / rows_cnt.clamp(min=1))
    return row_term, col_term


def add(loss: torch.Tensor, valid: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``loss + term`` on the valid anchors; invalid ones keep their loss (0) and get no gradient."""
    return loss + torch.where(valid, term, torch.zeros_like(term))
