"""Blockwise PyTorch backend: the passes of ``fastcl.backends`` in plain PyTorch, the readable
specification of the contract and the CPU path.

The similarity ``S = s * Q K^T`` is visited one (row block x column block) tile at a time; no
tensor larger than one tile is created, so the extra memory is O((N + C) * D + tile) whatever
N and C are. On a CPU the row blocks are cut into up to ``_GROUPS`` pieces that run on worker
threads (:mod:`._cpu_threads`: robust when other processes hold cores); each piece keeps its own
key-gradient and column-statistic sums, at most ``_PARTIAL_BYTES`` for all pieces together, and
the pieces are combined in a fixed order (the same bits for any thread count).

The statistics pass keeps online (reference, sum-exp) pairs per row, and per column for
symmetric specs; the gradient pass recomputes each tile from the final statistics
(FlashAttention's trade).

On a CPU the matmuls run near peak and the elementwise passes over each tile are what cost, so
the code counts passes:

* the row scale is folded into the queries once (``qs = s * q``);
* label positives are per-class sums outside the tiles (:class:`_LabelClasses`), so tiles
  carry a label mask only when positives leave the denominator;
* a symmetric tile shares one ``exp`` between its row and column statistics, referenced to the
  tile's maximum; rows or columns whose share would lose precision to underflow are redone
  exactly (``_SAFE_LOG`` says when);
* the gradient pass folds ``-LSE_i`` into the tile's matmul as one extra feature column, so
  ``exp`` of the matmul output is already the row softmax, and applies the one-hot target
  terms outside the tiles.

With ``FASTCL_BACKWARD=chunked`` the gradient pass writes ``G`` for chunks of rows into a
budgeted workspace instead and leaves the products to :mod:`.chunked` (on a CPU only when asked:
``auto`` keeps the tile loop there).

Runs on any device PyTorch runs on. Off a CPU the shared-``exp`` tricks, which read a maximum on
the host, give way to their exact two-``exp`` forms, so only labelled losses sync (``torch.unique``
of the labels); still a fallback on a GPU, not the fast path.
"""

import math
from typing import Optional

import torch

from .. import _config
from .._spec import SoftmaxSpec
from . import _cpu_epilogues, chunked
from ._cpu_threads import map_in_order, workers_for
from .common import (
    NEG_INF,
    DistillStats,
    SigmoidSums,
    SoftmaxStats,
    finite_or_zero,
    float16_gradient_scale,
    prefix_sums,
)

# Largest tile, in elements: 2**19 fp32 values (2 MiB) keep a tile and its temporaries in a
# CPU's last-level cache. FASTCL_TORCH_BLOCK="rows,cols" overrides the shape (tests use tiny
# blocks to exercise every boundary).
_TILE_ELEMENTS = 1 << 19
_MAX_BLOCK_COLS = 1024

# A tile loop runs as up to _GROUPS pieces (groups of row blocks) on the CPU worker threads; the
# pieces' own partial sums (key gradients, column statistics) may take _PARTIAL_BYTES together.
_GROUPS = 8
_PARTIAL_BYTES = 256 << 20


# A shared-exponent sum keeps full precision while every line's share of the tile is at least
# exp(-_SAFE_LOG) of the reference: the terms it drops then sit below the dtype's denormal floor
# relative to it. exp(_SAFE_LOG) must also stay finite, as it multiplies a softmax.
_SAFE_LOG = {torch.float32: 50.0, torch.float64: 500.0}


def _tile_shape(n_rows: int, n_cols: int):
    override = _config.torch_block()
    if override:
        rows, cols = override
        return max(1, min(n_rows, rows)), max(1, min(n_cols, cols))
    block_cols = min(n_cols, _MAX_BLOCK_COLS)
    block_rows = max(1, min(n_rows, _TILE_ELEMENTS // block_cols))
    return block_rows, block_cols


def _tiles(n_rows: int, n_cols: int, rows=None):
    """(r0, r1, c0, c1) of every tile, row blocks outermost; ``rows=(lo, hi)`` keeps the tiles of
    those rows (a group from :func:`_row_groups`)."""
    br, bc = _tile_shape(n_rows, n_cols)
    lo, hi = rows if rows is not None else (0, n_rows)
    for r0 in range(lo, hi, br):
        for c0 in range(0, n_cols, bc):
            yield r0, min(r0 + br, n_rows), c0, min(c0 + bc, n_cols)


def _chunk_tiles(r0: int, r1: int, n_cols: int):
    """(a0, a1, c0, c1) of the tiles of rows ``[r0, r1)`` (one chunk of the chunked pass)."""
    br, bc = _tile_shape(r1 - r0, n_cols)
    for a0 in range(r0, r1, br):
        for c0 in range(0, n_cols, bc):
            yield a0, min(a0 + br, r1), c0, min(c0 + bc, n_cols)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out += a @ b``, or ``out = a @ b`` for a piece's first row block (no zero fill)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _row_groups(n_rows: int, n_cols: int, partial_bytes: int = 0):
    """``(lo, hi)`` row ranges, each a run of whole row blocks: the pieces a tile loop is cut
    into for :mod:`._cpu_threads`. ``partial_bytes`` is what each piece keeps for its own until
    the pieces are combined (column statistics, key gradients); fewer pieces when they would
    hold more than ``_PARTIAL_BYTES`` together."""
    br, _ = _tile_shape(n_rows, n_cols)
    blocks = -(-n_rows // br)
    groups = min(blocks, _GROUPS)
    if partial_bytes:
        groups = max(1, min(groups, _PARTIAL_BYTES // partial_bytes))
    cuts = [i * blocks // groups * br for i in range(groups)] + [n_rows]
    return [(cuts[i], min(cuts[i + 1], n_rows)) for i in range(groups)]


class _Buffer:
    """A reusable flat buffer handing out views of the current tile's shape."""

    def __init__(self, n_rows, n_cols, dtype, device):
        br, bc = _tile_shape(n_rows, n_cols)
        self.data = torch.empty(br * bc, dtype=dtype, device=device)

    def view(self, rows: int, cols: int) -> torch.Tensor:
        return self.data[: rows * cols].view(rows, cols)


# ----------------------------------------------------------------------------------------------
# Tiles and masks


def _fill_diagonal(tile: torch.Tensor, r0: int, c0: int, value) -> None:
    """Set entries whose global row index equals their global column index."""
    lo, hi = max(r0, c0), min(r0 + tile.shape[0], c0 + tile.shape[1])
    if lo < hi:
        idx = torch.arange(lo, hi, device=tile.device)
        tile[idx - r0, idx - c0] = value


def _label_match(spec: SoftmaxSpec, r0, r1, c0, c1) -> torch.Tensor:
    match = spec.row_labels[r0:r1, None] == spec.col_labels[None, c0:c1]
    if spec.col_has_label is not None:
        match &= spec.col_has_label[None, c0:c1]
    if spec.exclude_self:
        _fill_diagonal(match, r0, c0, False)
    return match


def _hide_positives(tile, spec: SoftmaxSpec, match, r0, r1, c0, c1) -> None:
    """Decoupled losses drop the positives from the denominator (others keep them)."""
    if not spec.decoupled:
        return
    if match is not None:
        tile.masked_fill_(match, NEG_INF)
        return
    if spec.positive_index is None:
        return
    idx, in_tile = _positive_in_tile(spec.positive_index[r0:r1], c0, c1)
    tile.scatter_(1, idx, torch.where(in_tile, NEG_INF, tile.gather(1, idx)))


def _positive_in_tile(pos: torch.Tensor, c0: int, c1: int):
    """``(index [R, 1], in_tile [R, 1])``: each row's positive as a column of the tile
    ``[c0, c1)`` (clamped into it) and whether it lies there; no host sync (a GPU keeps going)."""
    in_tile = (pos >= c0) & (pos < c1)
    return (pos - c0).clamp(0, c1 - c0 - 1)[:, None], in_tile[:, None]


def _masked_tile(a, b, spec: SoftmaxSpec, r0, r1, c0, c1, out):
    """``a[r0:r1] @ b[c0:c1].T`` with excluded (and, if decoupled, positive) entries at -inf."""
    return _mask_tile(torch.matmul(a[r0:r1], b[c0:c1].T, out=out), spec, r0, r1, c0, c1)


def _mask_tile(tile, spec: SoftmaxSpec, r0, r1, c0, c1):
    """``tile`` (rows ``[r0, r1)``, columns ``[c0, c1)``) with excluded (and, if decoupled,
    positive) entries set to -inf, in place."""
    if spec.exclude_self:
        _fill_diagonal(tile, r0, c0, NEG_INF)
    if spec.decoupled:
        match = _label_match(spec, r0, r1, c0, c1) if spec.uses_labels else None
        _hide_positives(tile, spec, match, r0, r1, c0, c1)
    return tile


# More than half the most negative finite value of each dtype: added twice to a finite logit it
# overflows to -inf, multiplied by 0 it gives -0.0 (masked_fill_ with a bool mask costs about 3x
# as much on a CPU).
_HALF_MIN = {torch.float32: -2.0e38, torch.float64: -1.0e308}


def _drop_above(tile, thr, spec: SoftmaxSpec, r0, r1, c0, c1, work, target=None) -> None:
    """The false-negative mask, in place: ``target`` (default ``tile``) at -inf wherever ``tile >
    thr`` (``thr`` broadcast: ``[R, 1]`` row or ``[1, C]`` column thresholds), except on each row's
    one-hot positive, which is also each column's positive; with guide embeddings in ``spec``
    the test reads their similarity instead of ``tile``. ``work`` (tile-shaped) holds the mask; a
    NaN logit stays NaN."""
    target = tile if target is None else target
    test = tile
    if spec.guide_rows is not None:  # GIST: the guide model's similarity decides, not the logit
        test = torch.mm(spec.guide_rows[r0:r1], spec.guide_cols[c0:c1].T, out=work)
    mask = torch.gt(test, thr, out=work)  # 1 where masked, as a float
    if spec.positive_index is not None:
        idx, in_tile = _positive_in_tile(spec.positive_index[r0:r1], c0, c1)
        mask.scatter_(1, idx, torch.where(in_tile, 0.0, mask.gather(1, idx)))
    target.add_(mask, alpha=_HALF_MIN[mask.dtype]).add_(mask, alpha=_HALF_MIN[mask.dtype])


# A CPU's vectorised exp takes a slow path, about 10x, for arguments that underflow, -inf
# included. The masked (-inf) entries of a false-negative tile are many, so their exponentials
# are taken at this floor and then multiplied by 0 (exactly 0 again); entries that underflow for
# real contribute exp(floor) (1.6e-38 in fp32) instead of less, below the resolution of any sum
# that holds an entry at the reference.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _masked_exp_(shifted, masked_logits, keep):
    """``exp(shifted)`` in place with every entry where ``masked_logits`` is -inf exactly 0
    (``keep`` is a tile-shaped buffer); the fast path of exp for the rest."""
    torch.ne(masked_logits, NEG_INF, out=keep)
    return shifted.clamp_(min=_EXP_FLOOR[shifted.dtype]).exp_().mul_(keep)


def _merge_masked(ref, acc, tile, dim: int, work, keep) -> None:
    """:func:`_merge_exact` for a tile with many -inf entries (the false-negative mask)."""
    new = torch.maximum(ref, tile.amax(dim=dim))
    safe = finite_or_zero(new)
    shifted = torch.sub(tile, safe.unsqueeze(dim), out=work)
    acc.mul_(torch.exp(ref - safe)).add_(_masked_exp_(shifted, tile, keep).sum(dim=dim))
    ref.copy_(new)


class _LabelClasses:
    """Label positives as classes. A sum over a row's positive columns is the sum over its class
    minus its own column (with ``exclude_self``): one gather of per-class sums, O((N + C) * D),
    instead of a label mask over every tile."""

    def __init__(self, spec: SoftmaxSpec, n: int, c: int):
        _, inverse = torch.unique(torch.cat([spec.row_labels, spec.col_labels]), return_inverse=True)
        # at most n + c classes, and one more for columns without a label (no row has it)
        self.n_classes = n + c + 1
        self.row, col = inverse[:n], inverse[n:]
        if spec.col_has_label is not None:
            col = torch.where(spec.col_has_label, col, self.n_classes - 1)
        self.col = col
        m = min(n, c)
        self.n_self = m
        self.self_pair = (self.row[:m] == col[:m]) if spec.exclude_self else None

    def _sums(self, index, x):
        return torch.zeros((self.n_classes,) + x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, index, x)

    def _drop_self(self, out, x):
        if self.self_pair is not None:
            m = self.n_self
            mask = self.self_pair.to(x.dtype).reshape((m,) + (1,) * (x.dim() - 1))
            out[:m] -= mask * x[:m]
        return out

    def over_row_positives(self, x_cols: torch.Tensor) -> torch.Tensor:
        """``[N, ...]``: for each row, the sum of ``x_cols`` over its positive columns."""
        return self._drop_self(self._sums(self.col, x_cols)[self.row], x_cols)

    def over_col_positives(self, x_rows: torch.Tensor) -> torch.Tensor:
        """``[C, ...]``: for each column, the sum of ``x_rows`` over the rows it is a positive of."""
        return self._drop_self(self._sums(self.row, x_rows)[self.col], x_rows)


# ----------------------------------------------------------------------------------------------
# Online log-sum-exp statistics


def _merge_exact(ref: torch.Tensor, acc: torch.Tensor, tile: torch.Tensor, dim: int, work) -> None:
    """Merge a tile into running ``(ref, acc = sum exp(x - ref))`` along ``dim`` with its own max.

    Fully masked lines keep ref -inf; the subtraction uses 0 there so no -inf - -inf appears.
    """
    new = torch.maximum(ref, tile.amax(dim=dim))
    safe = finite_or_zero(new)
    shifted = torch.sub(tile, safe.unsqueeze(dim), out=work)
    acc.mul_(torch.exp(ref - safe)).add_(shifted.exp_().sum(dim=dim))
    ref.copy_(new)


def _merge_partial(ref, acc, part_log, part_sum) -> None:
    """Merge a partial sum ``part_sum * exp(part_log)`` into running ``(ref, acc)``."""
    new = torch.maximum(ref, part_log)
    safe = finite_or_zero(new)
    acc.mul_(torch.exp(ref - safe)).add_(part_sum * torch.exp(part_log - safe))
    ref.copy_(new)


def _merge_rows_and_cols(tile, row_ref, row_acc, col_ref, col_acc, work, safe_log) -> None:
    """Row and column statistics of one tile from a single ``exp(tile - tile_max)``.

    Row i's share is exact while its max is within ``safe_log`` of the tile max; column j's
    while its sum of shares is at least ``exp(-safe_log)``. Lines outside that (far below the
    rest of the tile, or fully masked) are merged again exactly.
    """
    if tile.device.type != "cpu":  # the shared exp needs the tile max on the host: GPUs go exact
        _merge_exact(row_ref, row_acc, tile, 1, work)
        _merge_exact(col_ref, col_acc, tile, 0, work)
        return
    row_max = tile.amax(dim=1)
    top = float(row_max.max())
    if not math.isfinite(top):  # fully masked, or inf/NaN to propagate: the exact path
        _merge_exact(row_ref, row_acc, tile, 1, work)
        _merge_exact(col_ref, col_acc, tile, 0, work)
        return
    shared = torch.sub(tile, top, out=work).exp_()
    row_sum, col_sum = shared.sum(dim=1), shared.sum(dim=0)
    floor = math.exp(-safe_log)

    row_ok = row_max >= top - safe_log
    # rows: the exact max is known, so reference them to it (sum * exp(top - max) <= cols)
    _merge_partial(row_ref, row_acc, torch.where(row_ok, row_max, NEG_INF),
                   torch.where(row_ok, row_sum * torch.exp(top - row_max.clamp(min=top - safe_log)), 0))
    col_ok = col_sum >= floor
    col_log = torch.where(col_ok, top + torch.log(col_sum.clamp(min=floor)), NEG_INF)
    _merge_partial(col_ref, col_acc, col_log, col_ok.to(tile.dtype))

    for ok, ref, acc, dim in ((row_ok, row_ref, row_acc, 1), (col_ok, col_ref, col_acc, 0)):
        bad = torch.nonzero(~ok).flatten()
        if bad.numel():
            lines = tile.index_select(1 - dim, bad)
            sub_ref, sub_acc = ref[bad], acc[bad]
            _merge_exact(sub_ref, sub_acc, lines, dim, torch.empty_like(lines))
            ref[bad], acc[bad] = sub_ref, sub_acc


# ----------------------------------------------------------------------------------------------
# Softmax family


def softmax_stats(query, key, scale_rows, spec: SoftmaxSpec) -> SoftmaxStats:
    """Row (and, for symmetric specs, column) LSE of the block, and label-positive sums."""
    cd = scale_rows.dtype
    q, k = query.to(cd), key.to(cd)
    n, c, dev = q.shape[0], k.shape[0], q.device
    qs = q * scale_rows[:, None]

    row_ref = torch.full((n,), NEG_INF, dtype=cd, device=dev)
    row_acc = torch.zeros(n, dtype=cd, device=dev)

    def piece(rows):
        """Row statistics of these rows (written in place) and their own column statistics."""
        tile_buf, work_buf = _Buffer(n, c, cd, dev), _Buffer(n, c, cd, dev)
        keep_buf = _Buffer(n, c, cd, dev) if spec.fn_row is not None else None
        if spec.symmetric:
            col_ref = torch.full((c,), NEG_INF, dtype=cd, device=dev)
            col_acc = torch.zeros(c, dtype=cd, device=dev)
        for r0, r1, c0, c1 in _tiles(n, c, rows):
            tile = _masked_tile(qs, k, spec, r0, r1, c0, c1, tile_buf.view(r1 - r0, c1 - c0))
            work = work_buf.view(r1 - r0, c1 - c0)
            if spec.fn_row is not None:  # the rows' and the columns' denominators differ: merge each exactly
                keep = keep_buf.view(r1 - r0, c1 - c0)
                if spec.symmetric:
                    cols_tile = tile.clone()
                    _drop_above(tile, spec.fn_col[None, c0:c1], spec, r0, r1, c0, c1, work, target=cols_tile)
                    _merge_masked(col_ref[c0:c1], col_acc[c0:c1], cols_tile, 0, work, keep)
                _drop_above(tile, spec.fn_row[r0:r1, None], spec, r0, r1, c0, c1, work)
                _merge_masked(row_ref[r0:r1], row_acc[r0:r1], tile, 1, work, keep)
            elif spec.symmetric:
                _merge_rows_and_cols(tile, row_ref[r0:r1], row_acc[r0:r1], col_ref[c0:c1], col_acc[c0:c1],
                                     work, _SAFE_LOG[cd])
            else:
                _merge_exact(row_ref[r0:r1], row_acc[r0:r1], tile, 1, work)
        return (col_ref, col_acc) if spec.symmetric else None

    groups = _row_groups(n, c, 2 * c * q.element_size() if spec.symmetric else 0)
    pieces = list(map_in_order(piece, groups, workers_for(dev)))
    if spec.symmetric:
        col_ref, col_acc = pieces[0]
        for part_ref, part_acc in pieces[1:]:
            _merge_partial(col_ref, col_acc, part_ref, part_acc)

    lse_col = col_ref + torch.log(col_acc) if spec.symmetric else None
    pos_sum = pos_cnt = None
    if spec.uses_labels:
        classes = _LabelClasses(spec, n, c)
        pos_cnt = classes.over_row_positives(torch.ones(c, dtype=cd, device=dev))
        pos_sum = (qs * classes.over_row_positives(k)).sum(dim=1)
    return SoftmaxStats(row_ref + torch.log(row_acc), lse_col, pos_sum, pos_cnt)


def softmax_grad(query, key, scale_rows, spec: SoftmaxSpec, lse_row, w_row, coef, lse_col=None, w_col=None, *,
                 rows: bool = True, cols: bool = True):
    """``(sum_j G_ij k_j, sum_i G_ij s_i q_i)`` of the block from final statistics."""
    cd = scale_rows.dtype
    q, k = query.to(cd), key.to(cd)
    n, c, d, dev = q.shape[0], k.shape[0], q.shape[1], q.device
    n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols

    # [qs | -LSE_i] @ [k | 1]^T = S - LSE_i: the matmul yields the exponent of the row softmax.
    lse_safe = finite_or_zero(lse_row)
    qs_aug = torch.cat([q * scale_rows[:, None], -lse_safe[:, None]], dim=1)
    k_aug = torch.cat([k, torch.ones(c, 1, dtype=cd, device=dev)], dim=1)
    qs, k_view = qs_aug[:, :d], k_aug[:, :d]
    if spec.symmetric:
        is_anchor = w_col != 0
        # +inf on columns that carry no weight keeps exp(S - LSE'_j) at 0 there
        lse_col = torch.where(is_anchor, lse_col, float("inf"))
    safe_log = _SAFE_LOG[cd]

    def tile_grad(g, r0, r1, c0, c1, buf):
        """``g`` = the softmax terms of ``G`` on one tile (the target terms come later)."""
        tile = _masked_tile(qs_aug, k_aug, spec, r0, r1, c0, c1, buf.view(r1 - r0, c1 - c0))
        if spec.fn_row is not None and not spec.symmetric:  # tile = S - LSE_i: shift the thresholds alike
            keep = torch.empty_like(tile)
            thr = spec.fn_row[r0:r1] - (0 if spec.guide_rows is not None else lse_safe[r0:r1])
            _drop_above(tile, thr[:, None], spec, r0, r1, c0, c1, g)
            torch.mul(_masked_exp_(tile, tile, keep), w_row[r0:r1, None], out=g)
        elif spec.fn_row is not None:  # each direction over its own denominator, from S itself
            logits = tile.add_(lse_safe[r0:r1, None])
            work, keep = torch.empty_like(logits), torch.empty_like(logits)
            torch.sub(logits, lse_safe[r0:r1, None], out=g)
            _drop_above(logits, spec.fn_row[r0:r1, None], spec, r0, r1, c0, c1, work, target=g)
            _masked_exp_(g, g, keep).mul_(w_row[r0:r1, None])
            _drop_above(logits, spec.fn_col[None, c0:c1], spec, r0, r1, c0, c1, work)
            shifted = logits.sub_(lse_col[None, c0:c1])  # -inf also off the anchors (LSE' +inf, weight 0)
            g.add_(_masked_exp_(shifted, shifted, keep).mul_(w_col[None, c0:c1]))
        elif spec.symmetric:
            _symmetric_grad(g, tile, w_row[r0:r1], lse_safe[r0:r1], w_col[c0:c1], lse_col[c0:c1],
                            is_anchor[c0:c1], safe_log)
        else:
            torch.mul(tile.exp_(), w_row[r0:r1, None], out=g)  # w_i * exp(S_ij - LSE_i)

    directions = int(rows) + int(cols and n_grad_cols > 0)
    if chunked.choose(dev, query.dtype, n, c, d, directions) == "chunked":
        g_scale = float16_gradient_scale(query.dtype, w_row, coef, w_col)

        def fill(r0, r1, out):
            """``G`` of rows ``[r0, r1)``, target terms included, into ``out``."""
            tile_buf, grad_buf = _Buffer(r1 - r0, c, cd, dev), _Buffer(r1 - r0, c, cd, dev)
            for a0, a1, c0, c1 in _chunk_tiles(r0, r1, c):
                g = grad_buf.view(a1 - a0, c1 - c0)
                tile_grad(g, a0, a1, c0, c1, tile_buf)
                if spec.uses_labels:
                    g.sub_(coef[a0:a1, None] * _label_match(spec, a0, a1, c0, c1))
                elif spec.positive_index is not None:
                    idx, in_tile = _positive_in_tile(spec.positive_index[a0:a1], c0, c1)
                    g.scatter_add_(1, idx, torch.where(in_tile, -coef[a0:a1, None], 0.0))
                if g_scale is not None:
                    g.div_(g_scale)
                out[a0 - r0: a1 - r0, c0:c1].copy_(g)

        acc_q, acc_k, _ = chunked.run(fill, query, key, scale_rows, rows=rows, cols=cols, n_grad_cols=n_grad_cols,
                                      g_scale=g_scale)
        return acc_q, acc_k

    acc_q = torch.zeros_like(q) if rows else None

    def piece(group):
        """``acc_q`` of these rows (in place) and their own share of ``acc_k``."""
        part_k = torch.empty(n_grad_cols, d, dtype=cd, device=dev) if cols else None
        tile_buf, grad_buf = _Buffer(n, c, cd, dev), _Buffer(n, c, cd, dev)
        for r0, r1, c0, c1 in _tiles(n, c, group):
            key_part = cols and c0 < n_grad_cols
            if not (rows or key_part):
                continue
            g = grad_buf.view(r1 - r0, c1 - c0)
            tile_grad(g, r0, r1, c0, c1, tile_buf)
            if rows:
                acc_q[r0:r1].addmm_(g, k_view[c0:c1])
            if key_part:
                hi = min(c1, n_grad_cols)
                _add_product(part_k[c0:hi], g[:, : hi - c0].T, qs[r0:r1], first=r0 == group[0])
        return part_k

    groups = _row_groups(n, c, n_grad_cols * d * q.element_size() if cols else 0)
    acc_k = None
    for part_k in map_in_order(piece, groups, workers_for(dev)):  # combined in a fixed order
        acc_k = part_k if acc_k is None else acc_k.add_(part_k)
    if cols and n_grad_cols < c:  # the detached columns' rows
        acc_k = torch.cat([acc_k, acc_k.new_zeros(c - n_grad_cols, d)])

    # the target terms -coef_i on each positive, outside the tiles
    if spec.uses_labels:
        classes = _LabelClasses(spec, n, c)
        if rows:
            acc_q.sub_(coef[:, None] * classes.over_row_positives(k))
        if cols:
            acc_k[:n_grad_cols] -= classes.over_col_positives(coef[:, None] * qs)[:n_grad_cols]
    elif spec.positive_index is not None:
        pos = spec.positive_index
        if rows:
            acc_q.sub_(coef[:, None] * k[pos])
        if cols:
            acc_k.index_add_(0, pos, (-coef * (pos < n_grad_cols))[:, None] * qs)
    return acc_q, acc_k


def _symmetric_grad(g, tile, w_row, lse_row, w_col, lse_col, is_anchor, safe_log) -> None:
    """``g = w_row_i * p_ij + w_col_j * p'_ij`` for a tile holding ``S_ij - LSE_i``.

    ``p = exp(tile)`` and ``p'_ij = exp(S_ij - LSE'_j) = p_ij * exp(LSE_i - LSE'_j)``, split as
    ``a_i * b_j`` around the tile's largest row LSE so neither factor overflows: one exp per
    entry. When an anchor column's LSE lies more than ``safe_log`` below that, ``p_ij`` could
    underflow where ``p'_ij`` matters, and the column term gets its own exp. Consumes ``tile``.
    """
    on_cpu = tile.device.type == "cpu"  # the shared exp reads LSEs on the host: GPUs take two exps
    top = float(lse_row.max()) if on_cpu else 0.0
    anchors_lse = lse_col[is_anchor] if on_cpu else None
    if on_cpu and math.isfinite(top) and (anchors_lse.numel() == 0 or top - float(anchors_lse.min()) <= safe_log):
        a = torch.exp(lse_row - top)
        b = w_col * torch.exp(top - lse_col)
        torch.outer(a, b, out=g).add_(w_row[:, None]).mul_(tile.exp_())
        return
    torch.exp(tile, out=g).mul_(w_row[:, None])
    tile.add_(lse_row[:, None]).sub_(lse_col[None, :]).exp_().mul_(w_col[None, :])
    g.add_(tile)


# ----------------------------------------------------------------------------------------------
# Matryoshka prefixes: several softmax problems over nested feature prefixes, in one sweep


# On a CPU every elementwise pass over a tile streams it through memory. In the PyTorch form the
# one-sweep prefix passes make about five more per prefix than the same prefixes run apart, which
# in turn repeat the narrower prefixes' matmul features; the compiled epilogues (fastcl._cpu) make
# one pass per tile for all prefixes. Measured, four halving prefixes, fwd+bwd, N=4096, against a
# full-width loss: 2 vCPU Xeon, PyTorch form: one sweep 2.85x against 2.57x apart at D=256, 1.86x
# against 2.31x at D=512, 1.60x against 2.14x at D=768; 2 vCPU EPYC, D=256 / 768: compiled one
# sweep 1.27x / 1.03x, PyTorch-form sweep 1.68x / 1.22x, apart 2.13x / 1.91x. Without the compiled
# epilogues, one sweep is chosen when the features it saves reach this many per prefix.
_SWEEP_SAVED_FEATURES_PER_PREFIX = 96


def prefers_one_sweep(device: torch.device, dims) -> bool:
    """Whether :func:`softmax_stats_prefixes` / :func:`softmax_grad_prefixes` beat the ordinary
    passes run once per prefix (``FASTCL_PREFIXES`` overrides): always off a CPU, where the
    elementwise work stays cheap, and on a CPU with the compiled epilogues; on a CPU without
    them when the matmul features saved pay for the extra passes."""
    plan = _config.prefixes()
    if plan != "auto":
        return plan == "fused"
    if device.type != "cpu" or _cpu_epilogues.module() is not None:
        return True
    return sum(dims) - max(dims) >= _SWEEP_SAVED_FEATURES_PER_PREFIX * len(dims)


def _prefix_bounds(dims):
    """``(lo, hi)`` of the feature segment each prefix adds to the one before it."""
    return list(zip((0,) + tuple(dims[:-1]), dims))


def _positive_rows(row_scales, device) -> bool:
    """The prefix passes' shortcuts divide by the row scales and read a flag on the host: a CPU
    whose row scales are all positive (any other case takes the plain forms)."""
    return device.type == "cpu" and bool((row_scales > 0).all())


def _compiled_epilogues(spec: SoftmaxSpec, dtype: torch.dtype, device: torch.device):
    """``fastcl._cpu`` where the prefix passes' row-scaled forms may hand it a tile: float32 on a
    CPU, no entry masked, one-hot (or no) positives; else ``None`` (the PyTorch form runs)."""
    if device.type != "cpu" or dtype != torch.float32 or spec.exclude_self or spec.decoupled or spec.uses_labels:
        return None
    return _cpu_epilogues.module()


def softmax_stats_prefixes(query, key, row_scales, col_scales, dims, spec: SoftmaxSpec,
                           kernel_dtype=None) -> SoftmaxStats:
    """The statistics of ``P`` prefix problems in one sweep over the tiles (``fastcl.backends``
    states the contract): each tile's product is accumulated feature segment by segment, and at
    each prefix boundary the snapshot, scaled by ``row_scales[p, i] * col_scales[p, j]``, is
    merged into prefix ``p``'s statistics. The fields are stacked ``[P, ...]`` (``pos_cnt``
    ``[N]``: it does not depend on the features). ``kernel_dtype`` is not used: every product
    runs in the compute dtype."""
    cd = row_scales.dtype
    q, k = query.to(cd), key.to(cd)
    n, c, dev, n_pre = q.shape[0], k.shape[0], q.device, len(dims)
    bounds = _prefix_bounds(dims)
    row_ref = torch.full((n_pre, n), NEG_INF, dtype=cd, device=dev)
    row_acc = torch.zeros(n_pre, n, dtype=cd, device=dev)
    shift = bound = None
    if not spec.symmetric and _positive_rows(row_scales, dev):
        # no logit of row i exceeds bound_i = s_i |q_i[:d]| max_j c_j |k_j[:d]| (Cauchy-Schwarz), so
        # exp(S - bound) needs no tile maximum: s_i (c_j P_ij + shift_i) with shift_i = -bound_i / s_i
        q_norms, k_norms = prefix_sums(q.square(), dims).sqrt(), prefix_sums(k.square(), dims).sqrt()
        bound = row_scales * q_norms * (col_scales * k_norms).amax(dim=1, keepdim=True)
        shift = -bound / row_scales
    compiled = _compiled_epilogues(spec, cd, dev) if bound is not None else None
    if compiled is not None:  # it reads each prefix's scales as contiguous vectors
        row_scales, col_scales, shift = row_scales.contiguous(), col_scales.contiguous(), shift.contiguous()
    floor = math.exp(-_SAFE_LOG[cd])

    def piece(rows):
        prod_buf, tile_buf, work_buf = (_Buffer(n, c, cd, dev) for _ in range(3))
        if spec.symmetric:
            col_ref = torch.full((n_pre, c), NEG_INF, dtype=cd, device=dev)
            col_acc = torch.zeros(n_pre, c, dtype=cd, device=dev)
        for r0, r1, c0, c1 in _tiles(n, c, rows):
            prod, tile, work = (b.view(r1 - r0, c1 - c0) for b in (prod_buf, tile_buf, work_buf))
            for p, (lo, hi) in enumerate(bounds):
                _add_product(prod, q[r0:r1, lo:hi], k[c0:c1, lo:hi].T, first=p == 0)
                rs, cs = row_scales[p, r0:r1, None], col_scales[p, None, c0:c1]
                if bound is not None:
                    if compiled is not None:  # one pass over the products
                        part = compiled.exp_row_sums(prod, col_scales[p, c0:c1], shift[p, r0:r1], row_scales[p, r0:r1])
                    else:
                        shifted = torch.addcmul(shift[p, r0:r1, None], prod, cs, out=tile).mul_(rs)
                        part = _mask_tile(shifted, spec, r0, r1, c0, c1).exp_().sum(dim=1)
                    if bool((part >= floor).all()):  # every row's share is exact (else: redo the tile)
                        _merge_partial(row_ref[p, r0:r1], row_acc[p, r0:r1], bound[p, r0:r1], part)
                        continue
                torch.mul(prod, rs, out=tile).mul_(cs)
                _mask_tile(tile, spec, r0, r1, c0, c1)
                if spec.symmetric:
                    _merge_rows_and_cols(tile, row_ref[p, r0:r1], row_acc[p, r0:r1], col_ref[p, c0:c1],
                                         col_acc[p, c0:c1], work, _SAFE_LOG[cd])
                else:
                    _merge_exact(row_ref[p, r0:r1], row_acc[p, r0:r1], tile, 1, work)
        return (col_ref, col_acc) if spec.symmetric else None

    groups = _row_groups(n, c, 2 * n_pre * c * q.element_size() if spec.symmetric else 0)
    pieces = list(map_in_order(piece, groups, workers_for(dev)))
    lse_col = None
    if spec.symmetric:
        col_ref, col_acc = pieces[0]
        for part_ref, part_acc in pieces[1:]:
            _merge_partial(col_ref, col_acc, part_ref, part_acc)
        lse_col = col_ref + torch.log(col_acc)
    pos_sum = pos_cnt = None
    if spec.uses_labels:
        classes = _LabelClasses(spec, n, c)
        pos_cnt = classes.over_row_positives(torch.ones(c, dtype=cd, device=dev))
        pos_sum = torch.stack([
            row_scales[p] * (q[:, :d] * classes.over_row_positives(k[:, :d] * col_scales[p, :, None])).sum(dim=1)
            for p, d in enumerate(dims)])
    return SoftmaxStats(row_ref + torch.log(row_acc), lse_col, pos_sum, pos_cnt)


def softmax_grad_prefixes(query, key, row_scales, col_scales, dims, spec: SoftmaxSpec, lse_row, w_row, coef,
                          lse_col=None, w_col=None, *, rows: bool = True, cols: bool = True, kernel_dtype=None):
    """``(acc_q [N, D], acc_k [C, D], d_row [P, N], d_col [P, C])`` of ``P`` prefix problems in
    one sweep (``fastcl.backends`` states the contract; ``kernel_dtype`` is not used: every
    product runs in the compute dtype). Per tile, the products are snapshotted
    at every prefix boundary; the prefixes are then visited from the widest down, and the
    scaled logit gradients ``G^p * (row_scales[p] x col_scales[p])`` summed so far multiply the
    segment that the next narrower prefix lacks: one matmul per segment, the cost of one
    full-width gradient."""
    cd = row_scales.dtype
    q, k = query.to(cd), key.to(cd)
    n, c, d, dev, n_pre = q.shape[0], k.shape[0], q.shape[1], q.device, len(dims)
    n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols
    bounds = _prefix_bounds(dims)
    lse_row = finite_or_zero(lse_row)
    if spec.symmetric:  # +inf on columns that carry no weight keeps exp(S - LSE'_j) at 0 there
        lse_col = torch.where(w_col != 0, lse_col, float("inf"))
    acc_q = torch.zeros(n, d, dtype=cd, device=dev) if rows else None
    d_row = torch.zeros(n_pre, n, dtype=cd, device=dev)
    # row-scaled form (a CPU, one direction, positive row scales): the tile holds s_i G_ij, whose
    # exponent s_i (c_j P_ij + gamma_i) folds -LSE_i and log(s_i |w_i|) in, and the sums that need
    # G itself are divided by s_i once at the end
    scaled = not spec.symmetric and _positive_rows(row_scales, dev)
    if scaled:
        gamma = (torch.log(row_scales * w_row.abs()) - lse_row) / row_scales
        signs = torch.sign(w_row) if bool((w_row < 0).any()) else None
        coef = coef * row_scales
    compiled = _compiled_epilogues(spec, cd, dev) if scaled else None

    def targets(g, p, r0, r1, c0, c1):
        """``-coef`` on the positives of the tile."""
        if spec.uses_labels:
            g.sub_(coef[p, r0:r1, None] * _label_match(spec, r0, r1, c0, c1))
        elif spec.positive_index is not None:
            idx, in_tile = _positive_in_tile(spec.positive_index[r0:r1], c0, c1)
            g.scatter_add_(1, idx, torch.where(in_tile, -coef[p, r0:r1, None], 0.0))

    def logit_grad(g, s, p, r0, r1, c0, c1):
        """``G^p`` of the tile into ``g``, target terms included, from its logits ``s`` (consumed)."""
        _mask_tile(s, spec, r0, r1, c0, c1)
        torch.sub(s, lse_row[p, r0:r1, None], out=g).exp_().mul_(w_row[p, r0:r1, None])
        if spec.symmetric:
            g.add_(s.sub_(lse_col[p, None, c0:c1]).exp_().mul_(w_col[p, None, c0:c1]))
        targets(g, p, r0, r1, c0, c1)

    def scaled_logit_grad(g, prod, p, r0, r1, c0, c1):
        """``s_i G^p_ij`` of the tile into ``g`` (the row-scaled form), from the raw products."""
        torch.addcmul(gamma[p, r0:r1, None], prod, col_scales[p, None, c0:c1], out=g).mul_(row_scales[p, r0:r1, None])
        _mask_tile(g, spec, r0, r1, c0, c1).exp_()
        if signs is not None:
            g.mul_(signs[p, r0:r1, None])
        targets(g, p, r0, r1, c0, c1)

    def compiled_logit_grads(prods, r0, r1, c0, c1, hi_c, part_col):
        """The row-scaled form's steps for every prefix of the tile in ``fastcl._cpu``: ``d_row``
        and ``part_col`` get their sums, and ``prods[p]`` becomes the summed tile ``H^p``."""
        if spec.positive_index is None:
            pos = torch.full((r1 - r0,), -1, dtype=torch.long)
        else:  # the column inside the tile, -1 where the positive lies outside it
            idx, in_tile = _positive_in_tile(spec.positive_index[r0:r1], c0, c1)
            pos = torch.where(in_tile, idx, -1)[:, 0]
        rows_of = [row_scales[:, r0:r1], gamma[:, r0:r1], coef[:, r0:r1]]
        tile_rows, tile_gamma, tile_coef = (t.contiguous() for t in rows_of)
        tile_signs = None if signs is None else signs[:, r0:r1].contiguous()
        sums_row = torch.zeros(n_pre, r1 - r0, dtype=cd)
        sums_col = torch.zeros(n_pre, c1 - c0, dtype=cd)
        compiled.prefix_logit_grads(prods, col_scales[:, c0:c1].contiguous(), tile_rows, tile_gamma, tile_signs,
                                    tile_coef, pos.contiguous(), sums_row, sums_col)
        d_row[:, r0:r1] += sums_row
        if hi_c > c0:
            part_col[:, c0:hi_c] += sums_col[:, : hi_c - c0]

    def piece(group):
        part_k = torch.zeros(n_grad_cols, d, dtype=cd, device=dev) if cols else None
        part_col = torch.zeros(n_pre, n_grad_cols, dtype=cd, device=dev)
        prod_bufs = [_Buffer(n, c, cd, dev) for _ in range(n_pre)]
        work_bufs = [] if compiled is not None else [_Buffer(n, c, cd, dev) for _ in range(3)]
        for r0, r1, c0, c1 in _tiles(n, c, group):
            shape = (r1 - r0, c1 - c0)
            prods = [b.view(*shape) for b in prod_bufs]
            s, g, h = (b.view(*shape) for b in work_bufs) if work_bufs else (None, None, None)
            for p, (lo, hi) in enumerate(bounds):
                if p == 0:
                    torch.mm(q[r0:r1, lo:hi], k[c0:c1, lo:hi].T, out=prods[0])
                else:
                    torch.addmm(prods[p - 1], q[r0:r1, lo:hi], k[c0:c1, lo:hi].T, out=prods[p])
            hi_c = min(c1, n_grad_cols)
            if compiled is not None:  # every prefix's logit gradients in one pass, H^p over the products
                compiled_logit_grads(prods, r0, r1, c0, c1, hi_c, part_col)
            for p in reversed(range(n_pre)):
                rs, cs = row_scales[p, r0:r1], col_scales[p, c0:c1]
                if compiled is not None:
                    h = prods[p]
                elif scaled:
                    # g = s_i G_ij: d_row gets s_i times its sum, d_col its sum
                    scaled_logit_grad(g, prods[p], p, r0, r1, c0, c1)
                    y = torch.mul(g, prods[p], out=s)
                    d_row[p, r0:r1].addmv_(y, cs)
                    if hi_c > c0:
                        part_col[p, c0:hi_c] += y[:, : hi_c - c0].sum(dim=0)
                    if p == n_pre - 1:
                        torch.mul(g, cs[None, :], out=h)
                    else:
                        h.addcmul_(g, cs[None, :])
                else:
                    logit_grad(g, torch.mul(prods[p], rs[:, None], out=s).mul_(cs[None, :]), p, r0, r1, c0, c1)
                    y = torch.mul(g, prods[p], out=s)  # d S^p / d scale = S^p / scale: the scales' sums
                    d_row[p, r0:r1].addmv_(y, cs)
                    if hi_c > c0:
                        part_col[p, c0:hi_c].addmv_(y[:, : hi_c - c0].T, rs)
                    g.mul_(rs[:, None]).mul_(cs[None, :])
                    if p == n_pre - 1:
                        h.copy_(g)
                    else:
                        h.add_(g)
                lo, hi = bounds[p]
                if rows:
                    acc_q[r0:r1, lo:hi].addmm_(h, k[c0:c1, lo:hi])
                if cols and hi_c > c0:
                    part_k[c0:hi_c, lo:hi].addmm_(h[:, : hi_c - c0].T, q[r0:r1, lo:hi])
        return part_k, part_col

    groups = _row_groups(n, c, n_grad_cols * (d + n_pre) * q.element_size())
    acc_k = d_col = None
    for part_k, part_col in map_in_order(piece, groups, workers_for(dev)):  # combined in a fixed order
        acc_k = part_k if acc_k is None else acc_k.add_(part_k)
        d_col = part_col if d_col is None else d_col.add_(part_col)
    if scaled:
        d_row = d_row / row_scales
    if n_grad_cols < c:  # the detached columns
        d_col = torch.cat([d_col, d_col.new_zeros(n_pre, c - n_grad_cols)], dim=1)
        if cols:
            acc_k = torch.cat([acc_k, acc_k.new_zeros(c - n_grad_cols, d)])
    return acc_q, acc_k, d_row, d_col


# ----------------------------------------------------------------------------------------------
# Distillation: a student and a teacher similarity over the same pairs (fastcl.ops.distill)


def _merge_weighted(ref, acc, num, tile, values, dim: int, work) -> None:
    """:func:`_merge_exact` that also keeps ``num = sum exp(x - ref) * values`` along ``dim``:
    the running numerator of a softmax-weighted mean of ``values`` (``tile``-shaped)."""
    new = torch.maximum(ref, tile.amax(dim=dim))
    safe = finite_or_zero(new)
    rescale = torch.exp(ref - safe)
    e = torch.sub(tile, safe.unsqueeze(dim), out=work).exp_()
    acc.mul_(rescale).add_(e.sum(dim=dim))
    num.mul_(rescale).add_(e.mul_(values).sum(dim=dim))
    ref.copy_(new)


def distill_stats(query, key, scale_rows, t_query, t_key, t_scale_rows, symmetric: bool) -> DistillStats:
    """Student and teacher statistics of one block in one sweep (``fastcl.backends`` states the
    contract): each tile's student logits ``S`` and teacher logits ``T`` (a second matmul) give
    the student row LSE, the teacher row LSE and the teacher-weighted mean of ``S`` per row, by
    one online merge each; the same per column when ``symmetric``."""
    cd = scale_rows.dtype
    q, k = query.to(cd), key.to(cd)
    tq, tk = t_query.to(cd), t_key.to(cd)
    n, c, dev = q.shape[0], k.shape[0], q.device
    qs, tqs = q * scale_rows[:, None], tq * t_scale_rows[:, None]

    def fresh(size):
        return (torch.full((size,), NEG_INF, dtype=cd, device=dev), torch.zeros(size, dtype=cd, device=dev),
                torch.zeros(size, dtype=cd, device=dev))

    s_ref, s_acc, _ = fresh(n)
    t_ref, t_acc, t_num = fresh(n)

    def piece(rows):
        s_buf, t_buf, work_buf = (_Buffer(n, c, cd, dev) for _ in range(3))
        col = [fresh(c), fresh(c)] if symmetric else None
        for r0, r1, c0, c1 in _tiles(n, c, rows):
            s = torch.matmul(qs[r0:r1], k[c0:c1].T, out=s_buf.view(r1 - r0, c1 - c0))
            t = torch.matmul(tqs[r0:r1], tk[c0:c1].T, out=t_buf.view(r1 - r0, c1 - c0))
            work = work_buf.view(r1 - r0, c1 - c0)
            _merge_exact(s_ref[r0:r1], s_acc[r0:r1], s, 1, work)
            _merge_weighted(t_ref[r0:r1], t_acc[r0:r1], t_num[r0:r1], t, s, 1, work)
            if symmetric:
                (cs_ref, cs_acc, _), (ct_ref, ct_acc, ct_num) = col
                _merge_exact(cs_ref[c0:c1], cs_acc[c0:c1], s, 0, work)
                _merge_weighted(ct_ref[c0:c1], ct_acc[c0:c1], ct_num[c0:c1], t, s, 0, work)
        return col

    groups = _row_groups(n, c, 5 * c * q.element_size() if symmetric else 0)
    pieces = list(map_in_order(piece, groups, workers_for(dev)))
    lse_col = t_lse_col = mean_col = None
    if symmetric:
        (cs_ref, cs_acc, _), (ct_ref, ct_acc, ct_num) = pieces[0]
        for (ps_ref, ps_acc, _), (pt_ref, pt_acc, pt_num) in pieces[1:]:
            _merge_partial(cs_ref, cs_acc, ps_ref, ps_acc)
            # the numerator rides on the teacher's reference: rescale both parts alike
            new = torch.maximum(ct_ref, pt_ref)
            safe = finite_or_zero(new)
            a, b = torch.exp(ct_ref - safe), torch.exp(pt_ref - safe)
            ct_acc.mul_(a).add_(pt_acc * b)
            ct_num.mul_(a).add_(pt_num * b)
            ct_ref.copy_(new)
        lse_col, t_lse_col, mean_col = cs_ref + torch.log(cs_acc), ct_ref + torch.log(ct_acc), ct_num / ct_acc
    return DistillStats(s_ref + torch.log(s_acc), lse_col, t_ref + torch.log(t_acc), t_lse_col, t_num / t_acc,
                        mean_col)


def distill_grad(query, key, scale_rows, t_query, t_key, t_scale_rows, positive_index, st: DistillStats, w_row,
                 u_row, coef, w_col=None, u_col=None, *, student: bool = True, teacher: bool = True):
    """``(acc_q, acc_k, t_acc_q, t_acc_k)`` of one block from final statistics (``fastcl.backends``
    states the contract): ``G_ij = w_i p_ij + u_i pt_ij - coef_i [j = pos_i]`` (+ the column
    terms) on the student side and ``Gt_ij = u_i pt_ij (S_ij - mean_i)`` (+ columns) on the
    teacher side, with ``p`` the student and ``pt`` the teacher softmax; the student pair is
    ``None`` unless ``student``, the teacher pair unless ``teacher``."""
    cd = scale_rows.dtype
    q, k = query.to(cd), key.to(cd)
    tq, tk = t_query.to(cd), t_key.to(cd)
    n, c, dev = q.shape[0], k.shape[0], q.device
    qs, tqs = q * scale_rows[:, None], tq * t_scale_rows[:, None]
    symmetric = st.lse_col is not None
    lse, t_lse = finite_or_zero(st.lse_row), finite_or_zero(st.t_lse_row)
    acc_q = torch.zeros_like(q) if student else None
    t_acc_q = torch.zeros_like(tq) if teacher else None

    def piece(group):
        part_k = torch.zeros_like(k) if student else None
        part_tk = torch.zeros_like(tk) if teacher else None
        s_buf, t_buf, g_buf, p_buf = (_Buffer(n, c, cd, dev) for _ in range(4))
        for r0, r1, c0, c1 in _tiles(n, c, group):
            shape = (r1 - r0, c1 - c0)
            s = torch.matmul(qs[r0:r1], k[c0:c1].T, out=s_buf.view(*shape))
            t = torch.matmul(tqs[r0:r1], tk[c0:c1].T, out=t_buf.view(*shape))
            g, pt = g_buf.view(*shape), p_buf.view(*shape)
            torch.sub(t, t_lse[r0:r1, None], out=pt).exp_()  # the teacher's row softmax
            torch.sub(s, lse[r0:r1, None], out=g).exp_().mul_(w_row[r0:r1, None]).addcmul_(pt, u_row[r0:r1, None])
            if symmetric:  # t becomes the teacher's column softmax
                t.sub_(finite_or_zero(st.t_lse_col)[None, c0:c1]).exp_()
                g.add_(torch.sub(s, finite_or_zero(st.lse_col)[None, c0:c1]).exp_().mul_(w_col[None, c0:c1]))
                g.addcmul_(t, u_col[None, c0:c1])
            if positive_index is not None:
                idx, in_tile = _positive_in_tile(positive_index[r0:r1], c0, c1)
                g.scatter_add_(1, idx, torch.where(in_tile, -coef[r0:r1, None], 0.0))
            if student:
                acc_q[r0:r1].addmm_(g, k[c0:c1])
                part_k[c0:c1].addmm_(g.T, qs[r0:r1])
            if teacher:  # Gt = u_i pt_ij (S_ij - mean_i) + u'_j pt'_ij (S_ij - mean'_j), into g
                torch.sub(s, st.mean_row[r0:r1, None], out=g).mul_(pt).mul_(u_row[r0:r1, None])
                if symmetric:
                    g.add_(s.sub_(st.mean_col[None, c0:c1]).mul_(t).mul_(u_col[None, c0:c1]))
                t_acc_q[r0:r1].addmm_(g, tk[c0:c1])
                part_tk[c0:c1].addmm_(g.T, tqs[r0:r1])
        return part_k, part_tk

    groups = _row_groups(n, c, (int(student) * k.numel() + int(teacher) * tk.numel()) * q.element_size())
    acc_k = t_acc_k = None
    for part_k, part_tk in map_in_order(piece, groups, workers_for(dev)):  # combined in a fixed order
        acc_k = part_k if acc_k is None else acc_k.add_(part_k)
        t_acc_k = part_tk if t_acc_k is None else t_acc_k.add_(part_tk)
    return acc_q, acc_k, t_acc_q, t_acc_k


# ----------------------------------------------------------------------------------------------
# Sigmoid family


def sigmoid_pass(query, key, scale_rows, bias, positive_index, *, rows: bool = True, cols: bool = True,
                 gsum: bool = True, labels=None) -> SigmoidSums:
    """Sigmoid loss and gradient sums of the block.

    Every entry is first treated as a negative (``softplus(L_ij)``, ``G = sigmoid(L_ij)``); each
    positive then gets ``softplus(-x) - softplus(x) = -x`` and ``G -= 1``: outside the tiles for
    one-hot positives, inside them (a label comparison per tile) for ``labels``.
    """
    cd = scale_rows.dtype
    q, k = query.to(cd), key.to(cd)
    n, c, d, dev = q.shape[0], k.shape[0], q.shape[1], q.device
    qs = q * scale_rows[:, None]
    zero = torch.zeros((), dtype=cd, device=dev)

    def tile_sums(r0, r1, c0, c1, buf, work, grad: bool):
        """``(sum of softplus(L_ij), sigmoid(L_ij) in work or None)`` over one tile of ``L``,
        every entry taken as a negative."""
        tile = torch.matmul(qs[r0:r1], k[c0:c1].T, out=buf.view(r1 - r0, c1 - c0))
        if bias is not None:
            tile.add_(bias)
        work = work.view(r1 - r0, c1 - c0)
        loss = torch.ops.aten.softplus.out(tile, 1.0, 50.0, out=work).sum()
        g = torch.sigmoid(tile, out=work) if grad else None
        if labels is not None:  # equal labels are positives: softplus(-L) = softplus(L) - L, G -= 1
            match = (labels[0][r0:r1, None] == labels[1][None, c0:c1]).to(cd)
            loss = loss - (tile * match).sum()
            if grad:
                g.sub_(match)
        return loss, g

    directions = int(rows) + int(cols)
    if directions and chunked.choose(dev, query.dtype, n, c, d, directions) == "chunked":

        def fill(r0, r1, out):
            """``G`` of rows ``[r0, r1)`` (positives' ``-1`` included) into ``out``; their loss
            as negatives and their sum of ``G``."""
            total, g_sum = zero.clone(), zero.clone()
            buf, work = _Buffer(r1 - r0, c, cd, dev), _Buffer(r1 - r0, c, cd, dev)
            for a0, a1, c0, c1 in _chunk_tiles(r0, r1, c):
                loss, g = tile_sums(a0, a1, c0, c1, buf, work, True)
                total += loss
                if positive_index is not None:
                    idx, in_tile = _positive_in_tile(positive_index[a0:a1], c0, c1)
                    g.scatter_add_(1, idx, torch.where(in_tile, -1.0, 0.0).to(cd))
                g_sum += g.sum()
                out[a0 - r0: a1 - r0, c0:c1].copy_(g)
            return total, g_sum

        acc_q, acc_k, (total, g_sum) = chunked.run(fill, query, key, scale_rows, rows=rows, cols=cols)
        return SigmoidSums(total - _positive_logit_sum(qs, k, bias, positive_index), g_sum if gsum else None,
                           acc_q, acc_k)

    acc_q = torch.zeros_like(q) if rows else None

    def piece(group):
        """``acc_q`` of these rows (in place) and their own loss, G and ``acc_k`` sums."""
        total = zero.clone()
        g_sum = zero.clone() if gsum else None
        part_k = torch.empty_like(k) if cols else None
        tile_buf, work_buf = _Buffer(n, c, cd, dev), _Buffer(n, c, cd, dev)
        for r0, r1, c0, c1 in _tiles(n, c, group):
            loss, g = tile_sums(r0, r1, c0, c1, tile_buf, work_buf, rows or cols or gsum)
            total += loss
            if rows:
                acc_q[r0:r1].addmm_(g, k[c0:c1])
            if cols:
                _add_product(part_k[c0:c1], g.T, qs[r0:r1], first=r0 == group[0])
            if gsum:
                g_sum += g.sum()
        return total, g_sum, part_k

    groups = _row_groups(n, c, k.numel() * k.element_size() if cols else 0)
    pieces = map_in_order(piece, groups, workers_for(dev))
    total, g_sum, acc_k = next(pieces)  # combined in a fixed order
    for part_total, part_g, part_k in pieces:
        total += part_total
        if gsum:
            g_sum += part_g
        if cols:
            acc_k += part_k

    total -= _positive_logit_sum(qs, k, bias, positive_index)
    if positive_index is not None:  # G -= 1 on each positive (rows with -1 have none): no host sync
        has = (positive_index >= 0).to(cd)[:, None]
        pos = positive_index.clamp(min=0)
        if rows:
            acc_q.sub_(has * k[pos])
        if cols:
            acc_k.index_add_(0, pos, -has * qs)
        if gsum:
            g_sum -= has.sum()
    return SigmoidSums(total, g_sum, acc_q, acc_k)


def _positive_logit_sum(qs, k, bias, positive_index) -> torch.Tensor:
    """``sum_i L_i,pos(i)`` over the rows with a positive here: what turns their softplus(L) into
    softplus(-L)."""
    if positive_index is None:
        return torch.zeros((), dtype=qs.dtype, device=qs.device)
    has = (positive_index >= 0).to(qs.dtype)
    logits = (qs * k[positive_index.clamp(min=0)]).sum(dim=1)
    if bias is not None:
        logits = logits + bias
    return (has * logits).sum()


def available(device: torch.device) -> Optional[str]:
    """``None``: the torch backend runs wherever PyTorch does."""
    return None
