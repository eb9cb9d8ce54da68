"""Blockwise PyTorch backend: the readable specification and the CPU fallback.

The similarity ``S = s * Q K^T + b`` is visited one (row block x column block) tile at a time.
The forward keeps online (max, sum-exp) statistics per row, and per column for symmetric losses;
the backward recomputes each tile from the saved inputs and statistics (FlashAttention's trade).
No tensor larger than one tile is ever created, so the extra memory is
O((N + C) * D + block_rows * block_cols) whatever N and C are.

Runs on any device PyTorch runs on; statistics and accumulation are fp32 (fp64 for fp64 inputs).
"""

import os
from typing import Optional

import torch

from .._spec import SigmoidSpec, SoftmaxSpec

# Largest tile, in elements: 2**19 fp32 values (2 MiB) keep a tile and its temporaries in a
# CPU's last-level cache. FASTCL_TORCH_BLOCK="rows,cols" overrides the shape (tests use tiny
# blocks to exercise every boundary).
_TILE_ELEMENTS = 1 << 19
_MAX_BLOCK_COLS = 1024

NEG_INF = float("-inf")


def _tile_shape(n_rows: int, n_cols: int):
    override = os.environ.get("FASTCL_TORCH_BLOCK")
    if override:
        rows, cols = (int(v) for v in override.split(","))
        return max(1, min(n_rows, rows)), max(1, min(n_cols, cols))
    block_cols = min(n_cols, _MAX_BLOCK_COLS)
    block_rows = max(1, min(n_rows, _TILE_ELEMENTS // block_cols))
    return block_rows, block_cols


def _blocks(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_scale(scale: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return scale.detach().to(dtype).expand(n).contiguous()


def _bias_value(bias: Optional[torch.Tensor]) -> float:
    return 0.0 if bias is None else float(bias.detach())


def _sum_to_scale(ds_rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    ds = ds_rows.sum() if scale.dim() == 0 else ds_rows
    return ds.to(scale.dtype)


class _Tile:
    """One recomputed tile ``S[r0:r1, c0:c1]``, excluded entries set to -inf.

    ``match`` is the tile's label-positive mask (``None`` for one-hot positives). The decoupled
    mask is applied separately by :meth:`hide_positives`, because the forward first needs the
    positive logits it hides.
    """

    def __init__(self, q, k, s_rows, bias, spec: SoftmaxSpec, r0, r1, c0, c1, out):
        self.spec, self.bounds = spec, (r0, r1, c0, c1)
        torch.matmul(q[r0:r1], k[c0:c1].T, out=out)
        tile = out
        tile.mul_(s_rows[r0:r1, None])
        if bias:
            tile.add_(bias)
        self.match = None
        if spec.uses_labels:
            match = spec.row_labels[r0:r1, None] == spec.col_labels[None, c0:c1]
            if spec.col_has_label is not None:
                match &= spec.col_has_label[None, c0:c1]
            if spec.exclude_self:
                _fill_diagonal(match, r0, c0, False)
            self.match = match
        if spec.exclude_self:
            _fill_diagonal(tile, r0, c0, NEG_INF)
        self.s = tile

    def hide_positives(self) -> "_Tile":
        """Remove the positives from the denominator when the spec is decoupled."""
        if self.spec.decoupled:
            if self.match is not None:
                self.s.masked_fill_(self.match, NEG_INF)
            else:
                rows, cols = _positives_in_tile(self.spec.positive_index, *self.bounds)
                self.s[rows, cols] = NEG_INF
        return self


def _fill_diagonal(tile: torch.Tensor, r0: int, c0: int, value) -> None:
    """Set entries whose global row index equals their global column index."""
    lo, hi = max(r0, c0), min(r0 + tile.shape[0], c0 + tile.shape[1])
    if lo < hi:
        idx = torch.arange(lo, hi, device=tile.device)
        tile[idx - r0, idx - c0] = value


def _positives_in_tile(positive_index, r0, r1, c0, c1):
    pos = positive_index[r0:r1]
    rows = torch.nonzero((pos >= c0) & (pos < c1)).flatten()
    return rows, pos[rows] - c0


def _online_update(m: torch.Tensor, l: torch.Tensor, tile: torch.Tensor, dim: int, work):
    """Merge one tile into a running (max, sum exp(x - max)) along ``dim``.

    Fully masked lines keep max -inf; the subtraction uses 0 there so no -inf - -inf appears.
    """
    m_new = torch.maximum(m, tile.amax(dim=dim))
    m_safe = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    shifted = torch.sub(tile, m_safe.unsqueeze(dim), out=work)
    l.mul_(torch.exp(m - m_safe)).add_(shifted.exp_().sum(dim=dim))
    m.copy_(m_new)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (an empty denominator) by 0 so exp(S - x) stays 0 for masked entries."""
    return torch.where(x == NEG_INF, torch.zeros_like(x), x)


def _positive_logit(q, k, s_rows, bias, positive_index):
    dots = (q * k[positive_index]).sum(dim=1)
    return s_rows * dots + bias


class SoftmaxLoss(torch.autograd.Function):
    """Per-anchor softmax-family losses, blockwise, with recompute in the backward.

    Returns ``(row_loss[N], col_loss[N] or empty, row_valid[N], col_valid[N] or empty)`` in the
    compute dtype. ``col_loss[i]`` is the loss of column ``positive_index[i]`` as an anchor.
    Invalid anchors (no positive, or an empty denominator) have loss 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SoftmaxSpec):
        cd = _compute_dtype(query.dtype)
        q, k = query.to(cd), key.to(cd)
        n, c = q.shape[0], k.shape[0]
        s_rows = _row_scale(scale, n, cd)
        b = _bias_value(bias)
        br, bc = _tile_shape(n, c)
        work = torch.empty(br * bc, dtype=cd, device=q.device)
        tile_buf = torch.empty(br * bc, dtype=cd, device=q.device)

        m_row = torch.full((n,), NEG_INF, dtype=cd, device=q.device)
        l_row = torch.zeros(n, dtype=cd, device=q.device)
        if spec.symmetric:
            m_col = torch.full((c,), NEG_INF, dtype=cd, device=q.device)
            l_col = torch.zeros(c, dtype=cd, device=q.device)
        if spec.uses_labels:
            pos_sum = torch.zeros(n, dtype=cd, device=q.device)
            pos_cnt = torch.zeros(n, dtype=cd, device=q.device)

        for r0, r1 in _blocks(n, br):
            for c0, c1 in _blocks(c, bc):
                shape = (r1 - r0, c1 - c0)
                t = _Tile(q, k, s_rows, b, spec, r0, r1, c0, c1, tile_buf[: shape[0] * shape[1]].view(shape))
                w = work[: shape[0] * shape[1]].view(shape)
                if t.match is not None:
                    pos_sum[r0:r1] += torch.where(t.match, t.s, 0).sum(1)
                    pos_cnt[r0:r1] += t.match.sum(1)
                t.hide_positives()
                _online_update(m_row[r0:r1], l_row[r0:r1], t.s, 1, w)
                if spec.symmetric:
                    _online_update(m_col[c0:c1], l_col[c0:c1], t.s, 0, w)

        lse_row = m_row + torch.log(l_row)
        if spec.uses_labels:
            row_valid = (pos_cnt > 0) & (lse_row != NEG_INF)
            pos_term = pos_sum / pos_cnt.clamp(min=1)
        else:
            row_valid = lse_row != NEG_INF
            pos_term = _positive_logit(q, k, s_rows, b, spec.positive_index)
        if spec.pos_weight is not None:
            pos_term = pos_term * spec.pos_weight.to(cd)
        row_loss = torch.where(row_valid, lse_row - pos_term, torch.zeros_like(lse_row))

        if spec.symmetric:
            lse_col = (m_col + torch.log(l_col))[spec.positive_index]
            col_valid = lse_col != NEG_INF
            col_loss = torch.where(col_valid, lse_col - pos_term, torch.zeros_like(lse_col))
        else:
            lse_col = col_loss = torch.empty(0, dtype=cd, device=q.device)
            col_valid = torch.empty(0, dtype=torch.bool, device=q.device)

        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(query, key, scale, bias if bias is not None else torch.empty(0),
                              lse_row, lse_col, row_valid, col_valid,
                              pos_cnt if spec.uses_labels else torch.empty(0))
        ctx.mark_non_differentiable(row_valid, col_valid)
        return row_loss, col_loss, row_valid, col_valid

    @staticmethod
    def backward(ctx, grad_row, grad_col, _gv1, _gv2):
        query, key, scale, bias, lse_row, lse_col, row_valid, col_valid, pos_cnt = ctx.saved_tensors
        spec: SoftmaxSpec = ctx.spec
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        cd = lse_row.dtype
        q, k = query.to(cd), key.to(cd)
        n, c = q.shape[0], k.shape[0]
        s_rows = _row_scale(scale, n, cd)
        b = _bias_value(bias if ctx.has_bias else None)
        n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols

        # Per-row / per-column weights of the softmax terms: the incoming gradient, zero on
        # invalid anchors.
        w_row = torch.where(row_valid, grad_row.to(cd), torch.zeros_like(lse_row))
        w_col_by_row = None
        if spec.symmetric:
            w_col_by_row = torch.where(col_valid, grad_col.to(cd), torch.zeros_like(lse_col))
            w_col = torch.zeros(c, dtype=cd, device=q.device)
            w_col[spec.positive_index] = w_col_by_row
            lse_col_full = torch.zeros(c, dtype=cd, device=q.device)
            lse_col_full[spec.positive_index] = _finite_or_zero(lse_col)
        lse_row_safe = _finite_or_zero(lse_row)
        pos_w = None if spec.pos_weight is None else spec.pos_weight.to(cd)
        if spec.uses_labels:
            # -t_ij * w_row_i on every label positive: t_ij = pos_weight_i / |P_i|
            label_coef = w_row / pos_cnt.clamp(min=1)
            if pos_w is not None:
                label_coef = label_coef * pos_w

        qs = q * s_rows[:, None]
        dq_acc = torch.zeros_like(q)  # sum_j G_ij k_j, before the row scale
        dk = torch.zeros_like(k) if need_k else None
        db = torch.zeros((), dtype=cd, device=q.device)

        br, bc = _tile_shape(n, c)
        tile_buf = torch.empty(br * bc, dtype=cd, device=q.device)
        grad_buf = torch.empty(br * bc, dtype=cd, device=q.device)
        for r0, r1 in _blocks(n, br):
            for c0, c1 in _blocks(c, bc):
                shape = (r1 - r0, c1 - c0)
                t = _Tile(q, k, s_rows, b, spec, r0, r1, c0, c1, tile_buf[: shape[0] * shape[1]].view(shape))
                t.hide_positives()
                g = grad_buf[: shape[0] * shape[1]].view(shape)
                torch.sub(t.s, lse_row_safe[r0:r1, None], out=g).exp_().mul_(w_row[r0:r1, None])
                if spec.symmetric:
                    t.s.sub_(lse_col_full[None, c0:c1]).exp_().mul_(w_col[None, c0:c1])
                    g.add_(t.s)
                if t.match is not None:
                    g.sub_(t.match * label_coef[r0:r1, None])
                dq_acc[r0:r1].addmm_(g, k[c0:c1])
                if need_k and c0 < n_grad_cols:
                    hi = min(c1, n_grad_cols)
                    dk[c0:hi].addmm_(g[:, : hi - c0].T, qs[r0:r1])
                if need_b:
                    db += g.sum()

        if not spec.uses_labels:
            # the one-hot target term -t_ij lives on one entry per row: apply it outside the tiles
            coef = w_row if w_col_by_row is None else w_row + w_col_by_row
            coef = -coef if pos_w is None else -coef * pos_w
            pos = spec.positive_index
            dq_acc.add_(coef[:, None] * k[pos])
            if need_k:
                grad_pos = (coef * (pos < n_grad_cols))[:, None] * qs
                dk.index_add_(0, pos, grad_pos)
            if need_b:
                db += coef.sum()

        grad_q = (dq_acc * s_rows[:, None]).to(query.dtype) if need_q else None
        grad_k = dk.to(key.dtype) if need_k else None
        grad_s = _sum_to_scale((dq_acc * q).sum(dim=1), scale) if need_s else None
        grad_b = db.to(bias.dtype).reshape(bias.shape) if need_b else None
        return grad_q, grad_k, grad_s, grad_b, None


class SigmoidLoss(torch.autograd.Function):
    """Sigmoid-family loss (a scalar), blockwise.

    The gradient of a logit needs no global statistic, so when autograd will need gradients
    the forward forms them tile by tile and the backward only scales them (6NMD FLOPs in all).
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SigmoidSpec):
        cd = _compute_dtype(query.dtype)
        q, k = query.to(cd), key.to(cd)
        n, c = q.shape[0], k.shape[0]
        s_rows = _row_scale(scale, n, cd)
        b = _bias_value(bias)
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        need_grad = need_q or need_k or need_s or need_b
        inv_n = 1.0 / spec.n_rows_norm

        qs = q * s_rows[:, None]
        total = torch.zeros((), dtype=cd, device=q.device)
        if need_grad:
            dq_acc = torch.zeros_like(q)
            dk = torch.zeros_like(k)
            db = torch.zeros((), dtype=cd, device=q.device)
        br, bc = _tile_shape(n, c)
        tile_buf = torch.empty(br * bc, dtype=cd, device=q.device)
        work = torch.empty(br * bc, dtype=cd, device=q.device)
        for r0, r1 in _blocks(n, br):
            for c0, c1 in _blocks(c, bc):
                shape = (r1 - r0, c1 - c0)
                tile = tile_buf[: shape[0] * shape[1]].view(shape)
                torch.matmul(qs[r0:r1], k[c0:c1].T, out=tile)
                if b:
                    tile.add_(b)
                # every entry as a negative: softplus(L); positives are corrected below
                w = work[: shape[0] * shape[1]].view(shape)
                total += torch.nn.functional.softplus(tile, threshold=50.0).sum()
                if need_grad:
                    g = torch.sigmoid(tile, out=w)
                    dq_acc[r0:r1].addmm_(g, k[c0:c1])
                    dk[c0:c1].addmm_(g.T, qs[r0:r1])
                    if need_b:
                        db += g.sum()

        has_pos = spec.positive_index >= 0
        rows = torch.nonzero(has_pos).flatten()
        pos = spec.positive_index[rows]
        pos_logit = _positive_logit(q[rows], k, s_rows[rows], b, pos)
        # softplus(-x) = softplus(x) - x on each positive
        loss = (total - pos_logit.sum()) * inv_n

        if need_grad:
            dq_acc.index_add_(0, rows, -k[pos])
            dk.index_add_(0, pos, -qs[rows])
            if need_b:
                db -= rows.numel()
            dq_acc *= inv_n
            dk *= inv_n
            ctx.save_for_backward(
                (dq_acc * s_rows[:, None]).to(query.dtype) if need_q else None,
                dk.to(key.dtype) if need_k else None,
                _sum_to_scale((dq_acc * q).sum(dim=1), scale) if need_s else None,
                (db * inv_n).to(bias.dtype).reshape(bias.shape) if need_b else None,
            )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors) + (None,)


def softmax_loss(query, key, scale, bias, spec: SoftmaxSpec):
    """Softmax-family per-anchor losses; see :class:`SoftmaxLoss`."""
    return SoftmaxLoss.apply(query, key, scale, bias, spec)


def sigmoid_loss(query, key, scale, bias, spec: SigmoidSpec):
    """Sigmoid-family scalar loss; see :class:`SigmoidLoss`."""
    return SigmoidLoss.apply(query, key, scale, bias, spec)


def available(device: torch.device) -> Optional[str]:
    """``None`` if this backend can run on ``device``, else the reason it cannot."""
    return None
