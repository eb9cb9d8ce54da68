"""Triton kernels of Matryoshka prefixes (``fastcl.ops.matryoshka``): ``P`` softmax problems over
nested feature prefixes in one sweep over the tiles.

Prefix ``p`` of a tile is ``S^p_ij = rs[p, i] cs[p, j] <a_i, b_j>_{d_p}`` (``<., .>_d``: the first
``d`` features, ``dims`` ascending). Each tile's product is accumulated feature segment by
segment, ``[d_{p-1}, d_p)``, and at each boundary the running product *is* prefix ``p``'s: its
epilogue runs there and the accumulation goes on. So a tile costs the matmul of one full-width
tile plus ``P`` epilogues, and no snapshot outlives its boundary.

``prefix_stats_kernel`` owns a block of lines and keeps every prefix's online (max, sum-exp) (and,
owning rows with labels, the label-positive logit sums) as ``[BLOCK_A, BLOCK_P]`` register tensors,
one column per prefix (``BLOCK_P``: ``P`` padded to a power of two), read and written by a
one-hot column select.

``prefix_grad_kernel`` owns a block of lines and a chunk ``[x0, x0 + BLOCK_X)`` of the features.
Per tile it forms each prefix's ``G^p`` at its boundary (``_logit_grad``, the ordinary epilogue)
and

* adds ``sum_j G^p_ij S^p_ij / rs_i`` (owning rows; ``/ cs_j`` owning columns) to the prefix's
  scale gradient (``[BLOCK_A, BLOCK_P]``, stored by the first chunk's program);
* sums the scaled ``G^p * rs * cs`` of the prefixes that cover the whole chunk into one tile
  ``H``, and multiplies a prefix that ends inside the chunk by its own masked features at once;
  after the last prefix ``acc += H @ X[:, chunk]``: one ``G @ X`` product per tile, as in the
  ordinary gradient, however many prefixes cover the chunk.

Owning rows the accumulator is ``sum_p rs_p,i sum_j G^p_ij cs_p,j k_j[:d_p]`` and owning columns
``sum_p cs_p,j sum_i G^p_ij rs_p,i q_i[:d_p]``: the raw features' gradients with the scales held
(``fastcl.backends`` states the contract). Every output element has one writer (no atomics).

Precision: the products accumulate in fp32 (fp64 for fp64 inputs). ``G`` is rounded to the
input dtype for ``G @ X`` in bf16; fp16 runs that product in fp32 (the scaled ``G`` could
underflow fp16). Segment boundaries need not align with ``BLOCK_D``: a chunk that crosses one
is masked. Fixed GPU blocks below (not tuned on hardware; nothing here has run on a GPU).
"""

import triton
import triton.language as tl

from .info_nce import NEG_INF, _final_lse, _logit_grad, _online_lse, _oriented, _sides, _tile_masks


@triton.jit
def _segment(acc, a_rows, b_rows, a_in, b_in, lo, hi, ACC: tl.constexpr, PREC: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """``acc + <a, b>`` over the features ``[lo, hi)``, in ``BLOCK_D`` chunks (the last masked)."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d[None, :] < hi
        a = tl.load(a_rows + offs_d[None, :], mask=a_in & d_in, other=0.0)
        b = tl.load(b_rows + offs_d[None, :], mask=b_in & d_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _prefix_scales(rs_ptr, cs_ptr, p, rows, cols, N, C):
    """Prefix ``p``'s row and column scales, broadcast over the tile."""
    rs = tl.load(rs_ptr + p * N + rows, mask=rows < N, other=0.0)
    cs = tl.load(cs_ptr + p * C + cols, mask=cols < C, other=0.0)
    return rs, cs


@triton.jit
def _put(table, sel, value):
    """``table`` with its selected column (``sel``: one-hot over the prefixes) set to ``value``."""
    return tl.where(sel, value[:, None], table)


@triton.jit
def prefix_stats_kernel(
    a_ptr, b_ptr, rs_ptr, cs_ptr, dims_ptr, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
    lse_ptr, pos_sum_ptr, pos_cnt_ptr,
    N, C, D, P,
    OWN_ROWS: tl.constexpr, LABELS: tl.constexpr, COL_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, DECOUPLED: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per owned line and prefix: ``lse [P, n_a]``; owning rows with ``LABELS`` also the
    label-positive logit sums ``[P, N]`` and counts ``[N]``."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    a_in = offs_a[:, None] < n_a
    prefixes = tl.arange(0, BLOCK_P)[None, :]
    m_all = tl.full((BLOCK_A, BLOCK_P), NEG_INF, dtype=ACC)
    l_all = tl.zeros((BLOCK_A, BLOCK_P), dtype=ACC)
    pos_sum = tl.zeros((BLOCK_A, BLOCK_P), dtype=ACC)
    pos_cnt = tl.zeros((BLOCK_A,), dtype=ACC)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_rows = b_ptr + offs_b.to(tl.int64)[:, None] * D
        b_in = offs_b[:, None] < n_b
        rows, cols = _oriented(offs_a, offs_b, OWN_ROWS)
        keep, match = _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                                  LABELS, COL_MASK, EXCLUDE_SELF)
        if OWN_ROWS and LABELS:
            pos_cnt += tl.sum(match.to(ACC), axis=1)
        if DECOUPLED:
            keep = keep & ~match
        prod = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        lo = 0
        for p in range(P):
            hi = tl.load(dims_ptr + p)
            prod = _segment(prod, a_rows, b_rows, a_in, b_in, lo, hi, ACC, PREC, BLOCK_D)
            lo = hi
            rs, cs = _prefix_scales(rs_ptr, cs_ptr, p, rows, cols, N, C)
            t = prod * rs * cs
            sel = prefixes == p
            if OWN_ROWS and LABELS:
                pos_sum = _put(pos_sum, sel, tl.sum(tl.where(sel, pos_sum, 0.0), axis=1)
                               + tl.sum(tl.where(match, t, 0.0), axis=1))
            m, l = _online_lse(tl.max(tl.where(sel, m_all, NEG_INF), axis=1), tl.sum(tl.where(sel, l_all, 0.0), axis=1),
                               tl.where(keep, t, NEG_INF))
            m_all = _put(m_all, sel, m)
            l_all = _put(l_all, sel, l)
    line = offs_a[:, None]
    out = a_in & (prefixes < P)
    tl.store(lse_ptr + prefixes * n_a + line, _final_lse(m_all, l_all), mask=out)
    if OWN_ROWS and LABELS:
        tl.store(pos_sum_ptr + prefixes * N + line, pos_sum, mask=out)
        tl.store(pos_cnt_ptr + offs_a, pos_cnt, mask=offs_a < n_a)


@triton.jit
def prefix_grad_kernel(
    a_ptr, b_ptr, rs_ptr, cs_ptr, dims_ptr, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
    lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr, w_col_ptr,
    out_ptr, dscale_ptr,
    N, C, D, P, n_out,
    OWN_ROWS: tl.constexpr, LABELS: tl.constexpr, COL_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, DECOUPLED: tl.constexpr, SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr,
    F32_PRODUCT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Gradient of the first ``n_out`` owned lines for features ``[pid_x * BLOCK_X, +BLOCK_X)``
    (``out``, ``[n_a, D]``, with ``ACCUMULATE``) and, from the first chunk's programs, the scale
    gradients ``dscale [P, n_a]`` (see the module doc). Statistics are ``[P, N]`` / ``[P, C]``:
    final LSEs (finite), weights (0 on lines without gradient) and the positives' ``coef``."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    x0 = tl.program_id(1) * BLOCK_X
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_x = x0 + tl.arange(0, BLOCK_X)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    a_in = offs_a[:, None] < n_a
    prefixes = tl.arange(0, BLOCK_P)[None, :]
    acc = tl.zeros((BLOCK_A, BLOCK_X), dtype=ACC)
    dscale = tl.zeros((BLOCK_A, BLOCK_P), dtype=ACC)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_rows = b_ptr + offs_b.to(tl.int64)[:, None] * D
        b_in = offs_b[:, None] < n_b
        rows, cols = _oriented(offs_a, offs_b, OWN_ROWS)
        keep, match = _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                                  LABELS, COL_MASK, EXCLUDE_SELF)
        x = tl.load(b_rows + offs_x[None, :], mask=b_in & (offs_x[None, :] < D), other=0.0)
        if F32_PRODUCT:
            x = x.to(tl.float32)
        prod = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        h = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        lo = 0
        for p in range(P):
            hi = tl.load(dims_ptr + p)
            prod = _segment(prod, a_rows, b_rows, a_in, b_in, lo, hi, ACC, PREC, BLOCK_D)
            lo = hi
            rs, cs = _prefix_scales(rs_ptr, cs_ptr, p, rows, cols, N, C)
            t = prod * rs * cs
            g = _logit_grad(t, t, keep, match, rows, cols, N, C, lse_row_ptr + p * N, w_row_ptr + p * N,
                            coef_ptr + p * N, lse_col_ptr + p * C, w_col_ptr + p * C, lse_row_ptr, lse_row_ptr,
                            False, DECOUPLED, False, SYMMETRIC, ACC)
            # d S^p / d rs_i = S^p / rs_i = cs_j <a_i, b_j>_{d_p} (and the same for cs_j)
            if OWN_ROWS:
                other = cs
            else:
                other = rs
            sel = prefixes == p
            dscale = _put(dscale, sel, tl.sum(tl.where(sel, dscale, 0.0), axis=1) + tl.sum(g * prod * other, axis=1))
            if ACCUMULATE:
                g = g * rs * cs
                if hi >= x0 + BLOCK_X:
                    h += g
                elif hi > x0:  # this prefix ends inside the chunk: its own masked features
                    x_p = tl.where(offs_x[None, :] < hi, x, 0.0)
                    acc = tl.dot(g.to(x_p.dtype), x_p, acc, input_precision=PREC, out_dtype=ACC)
        if ACCUMULATE:
            acc = tl.dot(h.to(x.dtype), x, acc, input_precision=PREC, out_dtype=ACC)
    line = offs_a[:, None]
    tl.store(dscale_ptr + prefixes * n_a + line, dscale, mask=(line < n_out) & (prefixes < P) & (x0 == 0))
    if ACCUMULATE:
        tl.store(out_ptr + offs_a.to(tl.int64)[:, None] * D + offs_x[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_a[:, None] < n_out) & (offs_x[None, :] < D))


# GPU blocks (a starting point, not tuned on hardware): 64-line programs over 64-wide column
# blocks, D streamed in 32-wide chunks (prefix boundaries are multiples of 32 in the usual
# halving ladders), 64-wide accumulator chunks.
GPU_BLOCKS = {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_D": 32, "BLOCK_X": 64}
GPU_WARPS = 8
