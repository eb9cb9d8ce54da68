"""Block-level pieces of the softmax and sigmoid losses, in PyTorch, for callers that hold the
key columns in blocks that are never all in one place (:mod:`fastcl.distributed`'s ring).

The whole-loss autograd Functions of :mod:`fastcl.backends.torch` see every column at once.
Here one call sees one block of columns and returns what that block contributes:

* :func:`softmax_block_forward`: the block's row partials ``(max, sum exp(L - max))`` over the
  denominator columns, label-positive logit sums and counts, and, for symmetric losses, the
  column partials over these rows. Partials from several blocks combine with :func:`merge_lse`.
* :func:`softmax_losses`: per-anchor losses from the merged statistics.
* :func:`softmax_block_backward`: given the final row (and column) LSEs and the weight of each
  anchor, accumulate ``dQ`` into a buffer and return the block's ``dK`` and ``d(bias)``.
  :func:`softmax_positive_backward` adds the one-hot target terms, which live outside the tiles.
* :func:`sigmoid_block_forward` / :func:`sigmoid_block_backward`: the same for SigLIP.

Logits are ``L_ij = s_i <q_i, k_j> + b`` (DESIGN §2). A spec handed to these functions describes
the block alone: ``positive_index`` (or ``None`` when the block holds no one-hot positive) and
``exclude_self`` index the block's own columns; ``col_labels`` are the block's labels.
Like the rest of the torch backend, nothing larger than one tile of the block is created, and
statistics are fp32 (fp64 for fp64 inputs).
"""

from typing import NamedTuple, Optional

import torch

from .._spec import SigmoidSpec, SoftmaxSpec
from .common import NEG_INF, compute_dtype, finite_or_zero, row_scale
from .torch import _Buffer, _bias_value, _fill_diagonal, _hide_positives, _label_match, _merge_exact, _tiles


class SoftmaxPartial(NamedTuple):
    """Statistics of one block of columns (compute dtype).

    ``row_max/row_sum``: ``[N]`` with ``row_sum = sum_j exp(L_ij - row_max)`` over the block's
    denominator columns (``row_max = -inf`` and ``row_sum = 0`` when there are none).
    ``pos_sum/pos_cnt``: ``[N]`` label-positive logit sum and count (``None`` without labels).
    ``col_max/col_sum``: ``[C]`` the same over rows, for symmetric specs (else ``None``).
    """

    row_max: torch.Tensor
    row_sum: torch.Tensor
    pos_sum: Optional[torch.Tensor]
    pos_cnt: Optional[torch.Tensor]
    col_max: Optional[torch.Tensor]
    col_sum: Optional[torch.Tensor]


def _scaled_rows(query, scale, cd):
    """``s_i * q_i`` in the compute dtype."""
    q = query.to(cd)
    return q * row_scale(scale, q.shape[0], cd)[:, None]


def _tile(qs, k, bias, spec: SoftmaxSpec, r0, r1, c0, c1, out):
    """``L[r0:r1, c0:c1]`` with excluded entries at -inf, and the tile's label-positive mask."""
    tile = torch.matmul(qs[r0:r1], k[c0:c1].T, out=out)
    if bias:
        tile.add_(bias)
    match = _label_match(spec, r0, r1, c0, c1) if spec.uses_labels else None
    if spec.exclude_self:
        _fill_diagonal(tile, r0, c0, NEG_INF)
    return tile, match


def merge_lse(m1: torch.Tensor, l1: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor):
    """Combine two ``(max, sum exp(x - max))`` partials of disjoint sets into one."""
    m = torch.maximum(m1, m2)
    safe = finite_or_zero(m)
    return m, l1 * torch.exp(m1 - safe) + l2 * torch.exp(m2 - safe)


def softmax_block_forward(query, key, scale, bias, spec: SoftmaxSpec) -> SoftmaxPartial:
    """Statistics of the softmax loss of ``query`` over the columns ``key`` only.

    Args:
        query: ``[N, D]``; key: ``[C, D]`` (any floating dtypes; computed in fp32, fp64 for fp64
            queries).
        scale: tensor ``()`` or ``[N]``; bias: scalar tensor or ``None``.
        spec: the block's spec (see the module docstring); ``spec.symmetric`` asks for column
            partials.
    """
    cd = compute_dtype(query.dtype)
    qs = _scaled_rows(query, scale, cd)
    k = key.to(cd)
    n, c, dev = qs.shape[0], k.shape[0], qs.device
    b = _bias_value(bias)
    tile_buf, work_buf = _Buffer(n, c, cd, dev), _Buffer(n, c, cd, dev)

    row_max = torch.full((n,), NEG_INF, dtype=cd, device=dev)
    row_sum = torch.zeros(n, dtype=cd, device=dev)
    pos_sum = pos_cnt = col_max = col_sum = None
    if spec.uses_labels:
        pos_sum = torch.zeros(n, dtype=cd, device=dev)
        pos_cnt = torch.zeros(n, dtype=cd, device=dev)
    if spec.symmetric:
        col_max = torch.full((c,), NEG_INF, dtype=cd, device=dev)
        col_sum = torch.zeros(c, dtype=cd, device=dev)

    for r0, r1, c0, c1 in _tiles(n, c):
        tile, match = _tile(qs, k, b, spec, r0, r1, c0, c1, tile_buf.view(r1 - r0, c1 - c0))
        work = work_buf.view(r1 - r0, c1 - c0)
        if match is not None:
            pos_sum[r0:r1] += torch.where(match, tile, 0).sum(1)
            pos_cnt[r0:r1] += match.sum(1)
        _hide_positives(tile, spec, match, r0, r1, c0, c1)
        _merge_exact(row_max[r0:r1], row_sum[r0:r1], tile, 1, work)
        if spec.symmetric:
            _merge_exact(col_max[c0:c1], col_sum[c0:c1], tile, 0, work)
    return SoftmaxPartial(row_max, row_sum, pos_sum, pos_cnt, col_max, col_sum)


def positive_logit(query, key, scale, bias, positive_index) -> torch.Tensor:
    """``L_{i, positive_index[i]}`` for every row (compute dtype)."""
    cd = compute_dtype(query.dtype)
    qs = _scaled_rows(query, scale, cd)
    return (qs * key[positive_index].to(cd)).sum(dim=1) + _bias_value(bias)


def softmax_block_backward(query, key, scale, bias, spec: SoftmaxSpec, lse_row, w_row, dq_acc, *,
                           label_coef=None, lse_col=None, w_col=None, need_key: bool = True):
    """Gradient contributions of one block of columns, from the final statistics.

    With ``G_ij = w_row_i [j in D_i] exp(L_ij - LSE_i) + w_col_j [i in D'_j] exp(L_ij - LSE'_j)
    - label_coef_i [j in P_i]`` over the block:

    * ``dq_acc [N, D]`` (compute dtype) gains ``sum_j G_ij k_j`` (the row scale not applied);
    * returns ``(dk, db)``: ``dk [C, D] = G^T (s q)`` (zero beyond ``spec.n_grad_cols``; ``None``
      unless ``need_key``) and ``db = sum_ij G_ij``.

    ``lse_row``/``w_row``: ``[N]``; ``lse_col``/``w_col``: ``[C]`` for symmetric losses (columns
    with ``w_col = 0`` are skipped whatever their LSE). One-hot target terms are not included:
    see :func:`softmax_positive_backward`.
    """
    cd = dq_acc.dtype
    qs = _scaled_rows(query, scale, cd)
    k = key.to(cd)
    n, c, dev = qs.shape[0], k.shape[0], qs.device
    b = _bias_value(bias)
    n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols
    lse_r = finite_or_zero(lse_row.to(cd))
    w_r = w_row.to(cd)
    if w_col is not None:
        w_c = w_col.to(cd)
        # +inf where a column carries no weight: exp(L - LSE') is then 0 instead of inf * 0
        lse_c = torch.where(w_c != 0, lse_col.to(cd), float("inf"))
    dk = torch.zeros_like(k) if need_key else None
    db = torch.zeros((), dtype=cd, device=dev)

    tile_buf, grad_buf = _Buffer(n, c, cd, dev), _Buffer(n, c, cd, dev)
    for r0, r1, c0, c1 in _tiles(n, c):
        tile, match = _tile(qs, k, b, spec, r0, r1, c0, c1, tile_buf.view(r1 - r0, c1 - c0))
        _hide_positives(tile, spec, match, r0, r1, c0, c1)
        g = grad_buf.view(r1 - r0, c1 - c0)
        torch.sub(tile, lse_r[r0:r1, None], out=g).exp_().mul_(w_r[r0:r1, None])
        if w_col is not None:
            g.add_(tile.sub_(lse_c[None, c0:c1]).exp_().mul_(w_c[None, c0:c1]))
        if match is not None:
            g.sub_(match * label_coef[r0:r1, None].to(cd))
        dq_acc[r0:r1].addmm_(g, k[c0:c1])
        if need_key and c0 < n_grad_cols:
            hi = min(c1, n_grad_cols)
            dk[c0:hi].addmm_(g[:, : hi - c0].T, qs[r0:r1])
        db += g.sum()
    return dk, db


def softmax_positive_backward(query, key, scale, positive_index, coef, dq_acc, dk=None, n_grad_cols=None):
    """Add ``G_{i, positive_index[i]} += coef_i`` (the one-hot target terms) to ``dq_acc`` and
    ``dk`` (columns below ``n_grad_cols``); returns their ``d(bias)``, ``sum_i coef_i``."""
    cd = dq_acc.dtype
    qs = _scaled_rows(query, scale, cd)
    coef = coef.to(cd)
    dq_acc.add_(coef[:, None] * key[positive_index].to(cd))
    if dk is not None:
        if n_grad_cols is not None:
            coef = coef * (positive_index < n_grad_cols)
        dk.index_add_(0, positive_index, coef[:, None] * qs)
    return coef.sum()


def _sigmoid_tiles(qs, k, bias, positive_index):
    """Yield ``(r0, r1, c0, c1, tile, positive mask or None)`` of ``L = qs k^T + b``."""
    n, c = qs.shape[0], k.shape[0]
    buf = _Buffer(n, c, qs.dtype, qs.device)
    has_pos = bool((positive_index >= 0).any())
    for r0, r1, c0, c1 in _tiles(n, c):
        tile = torch.matmul(qs[r0:r1], k[c0:c1].T, out=buf.view(r1 - r0, c1 - c0))
        if bias:
            tile.add_(bias)
        pos = None
        if has_pos:
            cols = torch.arange(c0, c1, device=qs.device)
            pos = positive_index[r0:r1, None] == cols[None, :]
        yield r0, r1, c0, c1, tile, pos


def sigmoid_block_forward(query, key, scale, bias, spec: SigmoidSpec) -> torch.Tensor:
    """``(1 / n_rows_norm) * sum_ij softplus(-z_ij L_ij)`` over this block (compute dtype);
    ``z = +1`` on ``(i, positive_index[i])`` (``-1`` there marks a row with no positive here)."""
    cd = compute_dtype(query.dtype)
    qs = _scaled_rows(query, scale, cd)
    k = key.to(cd)
    total = torch.zeros((), dtype=cd, device=qs.device)
    for _, _, _, _, tile, pos in _sigmoid_tiles(qs, k, _bias_value(bias), spec.positive_index):
        if pos is not None:
            tile = torch.where(pos, -tile, tile)
        total += torch.nn.functional.softplus(tile, threshold=50.0).sum()
    return total / spec.n_rows_norm


def sigmoid_block_backward(query, key, scale, bias, spec: SigmoidSpec, weight, dq_acc, need_key: bool = True):
    """Gradient contributions of one block of the sigmoid loss.

    ``G_ij = weight / n_rows_norm * (sigmoid(L_ij) - [j = positive_index[i]])``; ``dq_acc`` gains
    ``G k``; returns ``(dk = G^T (s q) or None, db = sum G)``.
    """
    cd = dq_acc.dtype
    qs = _scaled_rows(query, scale, cd)
    k = key.to(cd)
    coef = weight / spec.n_rows_norm
    dk = torch.zeros_like(k) if need_key else None
    db = torch.zeros((), dtype=cd, device=qs.device)
    for r0, r1, c0, c1, tile, pos in _sigmoid_tiles(qs, k, _bias_value(bias), spec.positive_index):
        g = tile.sigmoid_()
        if pos is not None:
            g.sub_(pos.to(cd))
        g.mul_(coef)
        dq_acc[r0:r1].addmm_(g, k[c0:c1])
        if need_key:
            dk[c0:c1].addmm_(g.T, qs[r0:r1])
        db += g.sum()
    return dk, db
