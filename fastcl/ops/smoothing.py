"""Label smoothing of the softmax family: one more per-anchor statistic, formed outside the tiles
(docs/design.md §4).

``F.cross_entropy(label_smoothing=eps)`` over a row's denominator columns ``D_i`` is

    (1 - eps) (LSE_i - p_i) + eps (LSE_i - m_i)  =  LSE_i - (1 - eps) p_i - eps m_i

with ``p_i`` the positive logit (the mean label-positive logit for labels) and ``m_i`` the mean
logit over ``D_i``. The fused passes already give ``LSE_i`` and ``p_i`` with exact gradients in
every mode (local, all_gather, ring). ``m_i`` is linear in the logits: with ``S_i`` the sum of
row ``i``'s logits over every column but its excluded self column,

    m_i = (S_i - [decoupled] |P_i| p_i) / |D_i|,     S_i = s_i <q_i, sum_j k_j - k_i [exclude_self]>

so beside the passes it needs one sum of the columns and O((N + C) D) per-row dot products,
never a tile. :func:`logit_sums` forms ``S_i`` (and a symmetric loss's column sums ``S'_j``, over
the rows) in plain differentiable PyTorch; the epilogue (``epilogues._smoothed``) combines it
with ``LSE_i``, ``p_i`` and the counts the passes report, and autograd takes its gradient on to
the features. Across ranks the column sum is every rank's: the gathered columns' sum
(all_gather), or a ``[D]`` all-reduce of the local sums (ring, ``reduce``). The bias cancels.
"""

from typing import Callable, Optional, Tuple

import torch

from .._spec import SoftmaxSpec
from ..backends.common import compute_dtype


def logit_sums(query, key, negatives, scale, spec: SoftmaxSpec, reduce: Callable[[torch.Tensor], torch.Tensor]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(S [N], S' [N] or None)``: each row's bias-free logit sum over ``[key; negatives]``
    without its self column, and (symmetric) each row's positive column's over the rows
    without its own row.

    ``reduce([k, D]) -> [k, D]`` sums the key sum and the rows' ``sum_i s_i q_i`` over whatever
    the columns object spans (the identity for one block, an all-reduce over ranks for the
    ring); ``negatives`` are local columns and stay out of it. Differentiable in ``query``,
    ``key``, ``negatives`` and ``scale`` (through ``reduce`` too).
    """
    cd = compute_dtype(query.dtype)
    q = query.to(cd)
    n = q.shape[0]
    s = scale.to(cd).reshape(-1).expand(n)
    parts = [key.sum(0, dtype=cd)]
    if spec.symmetric:
        parts.append(s @ q)
    sums = reduce(torch.stack(parts))
    col_sum = sums[0] if negatives is None else sums[0] + negatives.sum(0, dtype=cd)
    row = s * (q @ col_sum)
    if spec.exclude_self:  # the lowering guarantees the first N keys are the N rows' samples
        row = row - s * (q * key[:n].to(cd)).sum(dim=1)
    if not spec.symmetric:
        return row, None

    # column j = positive_index[i] over the rows; with exclude_self, without its own row j
    j = spec.positive_index
    col_j = key[j].to(cd)
    col = col_j @ sums[1]
    if spec.exclude_self:
        own = j < n
        r = j.clamp(max=n - 1)
        col = col - torch.where(own, s[r] * (q[r] * col_j).sum(dim=1), torch.zeros_like(col))
    return row, col
