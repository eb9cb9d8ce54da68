"""Triton kernels of CLIP distillation (``fastcl.ops.distill``): a student and a teacher
similarity over the same pairs, two dots per tile.

``distill_stats_kernel`` owns a block of lines (rows, or columns with ``OWN_ROWS`` false) and
loops over the other side: per owned line the student's LSE and, by one online merge, the
teacher's LSE and the teacher-weighted mean of the student's logits,
``m = sum exp(T - LSE_T) S``.

``distill_grad_kernel`` owns a block of lines and a chunk ``[pid_x * BLOCK_X, +BLOCK_X)`` of the
feature axis (the same chunk index of the student's ``D`` and the teacher's ``DT``), rebuilds
``S`` and ``T`` per tile from the final statistics, and accumulates

    G  = w p + u pt - coef [pos]  (+ w' p' + u' pt')              on the student's features
    Gt = u pt (S - m)             (+ u' pt' (S - m'))              on the teacher's

(``p``/``pt``: the student's/teacher's softmax, rows' terms and, ``SYMMETRIC``, the columns').
Owning columns, ``G`` and ``Gt`` carry the rows' scales (``sum_i G_ij s_i q_i``). Every output
element has one writer (no atomics).

Precision: the dots accumulate in fp32 (fp64 for fp64 inputs); ``G`` is rounded to the input
dtype for the products in bf16, while fp16 products run in fp32 (``G`` would underflow fp16's
range). Fixed block sizes (no autotuning yet; nothing here has run on a GPU).
"""

import triton
import triton.language as tl

from .info_nce import NEG_INF, _final_lse, _online_lse, _oriented, _scaled_logits, _sides


@triton.jit
def _pair_tile(a_ptr, b_ptr, ta_ptr, tb_ptr, scale_ptr, t_scale_ptr, scalars_ptr, offs_a, offs_b, N, C, D, DT,
               OWN_ROWS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_A: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(rows, cols, keep, S, T)`` of one tile: its global indices, the entries that exist, and
    the student's and the teacher's scaled logits (two dots)."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    rows, cols = _oriented(offs_a, offs_b, OWN_ROWS)
    keep = (rows < N) & (cols < C)
    s = _scaled_logits(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D, rows, N, scale_ptr, scalars_ptr,
                       False, ACC, PREC, BLOCK_A, BLOCK_B, BLOCK_D)
    t = _scaled_logits(ta_ptr, tb_ptr, offs_a, offs_b, n_a, n_b, DT, rows, N, t_scale_ptr, scalars_ptr,
                       False, ACC, PREC, BLOCK_A, BLOCK_B, BLOCK_D)
    return rows, cols, keep, s, t


@triton.jit
def _stat(ptr, idx, n):
    return tl.load(ptr + idx, mask=idx < n, other=0.0)


@triton.jit
def distill_stats_kernel(
    a_ptr, b_ptr, ta_ptr, tb_ptr, scale_ptr, t_scale_ptr, scalars_ptr,
    lse_ptr, t_lse_ptr, mean_ptr,
    N, C, D, DT,
    OWN_ROWS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per owned line: ``lse`` (student), ``t_lse`` (teacher) and ``mean``, ``[n_a]`` each."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    m = tl.full((BLOCK_A,), NEG_INF, dtype=ACC)
    l = tl.zeros((BLOCK_A,), dtype=ACC)
    tm = tl.full((BLOCK_A,), NEG_INF, dtype=ACC)
    tl_sum = tl.zeros((BLOCK_A,), dtype=ACC)
    t_num = tl.zeros((BLOCK_A,), dtype=ACC)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        rows, cols, keep, s, t = _pair_tile(a_ptr, b_ptr, ta_ptr, tb_ptr, scale_ptr, t_scale_ptr, scalars_ptr,
                                            offs_a, offs_b, N, C, D, DT, OWN_ROWS, ACC, PREC, BLOCK_A, BLOCK_B,
                                            BLOCK_D)
        s = tl.where(keep, s, NEG_INF)
        t = tl.where(keep, t, NEG_INF)
        m, l = _online_lse(m, l, s)
        tm_new = tl.maximum(tm, tl.max(t, axis=1))
        tm_safe = tl.where(tm_new == NEG_INF, 0.0, tm_new)
        rescale = tl.exp(tm - tm_safe)
        e = tl.exp(t - tm_safe[:, None])
        tl_sum = tl_sum * rescale + tl.sum(e, axis=1)
        t_num = t_num * rescale + tl.sum(e * tl.where(keep, s, 0.0), axis=1)
        tm = tm_new
    a_in = offs_a < n_a
    tl.store(lse_ptr + offs_a, _final_lse(m, l), mask=a_in)
    tl.store(t_lse_ptr + offs_a, _final_lse(tm, tl_sum), mask=a_in)
    tl.store(mean_ptr + offs_a, t_num / tl.where(tl_sum == 0.0, 1.0, tl_sum), mask=a_in)


@triton.jit
def distill_grad_kernel(
    a_ptr, b_ptr, ta_ptr, tb_ptr, scale_ptr, t_scale_ptr, scalars_ptr, pos_ptr,
    lse_row_ptr, t_lse_row_ptr, mean_row_ptr, w_row_ptr, u_row_ptr, coef_ptr,
    lse_col_ptr, t_lse_col_ptr, mean_col_ptr, w_col_ptr, u_col_ptr,
    out_ptr, t_out_ptr,
    N, C, D, DT,
    OWN_ROWS: tl.constexpr, SYMMETRIC: tl.constexpr, STUDENT: tl.constexpr, TEACHER: tl.constexpr,
    F32_PRODUCT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """``out`` (``[n_a, D]``, student) and ``t_out`` (``[n_a, DT]``, teacher) of the owned lines,
    for features ``[pid_x * BLOCK_X, +BLOCK_X)``; see the module doc."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    acc = tl.zeros((BLOCK_A, BLOCK_X), dtype=ACC)
    t_acc = tl.zeros((BLOCK_A, BLOCK_X), dtype=ACC)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        rows, cols, keep, s, t = _pair_tile(a_ptr, b_ptr, ta_ptr, tb_ptr, scale_ptr, t_scale_ptr, scalars_ptr,
                                            offs_a, offs_b, N, C, D, DT, OWN_ROWS, ACC, PREC, BLOCK_A, BLOCK_B,
                                            BLOCK_D)
        u_row = _stat(u_row_ptr, rows, N)
        pt = tl.where(keep, tl.exp(t - _stat(t_lse_row_ptr, rows, N)), 0.0)
        if SYMMETRIC:
            u_col = _stat(u_col_ptr, cols, C)
            pt_col = tl.where(keep, tl.exp(t - _stat(t_lse_col_ptr, cols, C)), 0.0)
        if STUDENT:
            w_row = _stat(w_row_ptr, rows, N)
            # where(w != 0): an anchor left out of the loss must not turn exp overflow into NaN
            g = tl.where(keep & (w_row != 0.0), w_row * tl.exp(s - _stat(lse_row_ptr, rows, N)), 0.0) + u_row * pt
            pos = tl.load(pos_ptr + rows, mask=rows < N, other=-1).to(tl.int32)
            g -= tl.where(keep & (cols == pos), _stat(coef_ptr, rows, N), 0.0)
            if SYMMETRIC:
                w_col = _stat(w_col_ptr, cols, C)
                g += tl.where(keep & (w_col != 0.0), w_col * tl.exp(s - _stat(lse_col_ptr, cols, C)), 0.0)
                g += u_col * pt_col
            if not OWN_ROWS:
                g = g * _stat(scale_ptr, rows, N)
            x = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + offs_x[None, :],
                        mask=(offs_b[:, None] < n_b) & (offs_x[None, :] < D), other=0.0)
            if F32_PRODUCT:
                acc = tl.dot(g.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee", out_dtype=ACC)
            else:
                acc = tl.dot(g.to(x.dtype), x, acc, input_precision=PREC, out_dtype=ACC)
        if TEACHER:
            s_in = tl.where(keep, s, 0.0)
            gt = u_row * pt * (s_in - _stat(mean_row_ptr, rows, N))
            if SYMMETRIC:
                gt += u_col * pt_col * (s_in - _stat(mean_col_ptr, cols, C))
            if not OWN_ROWS:
                gt = gt * _stat(t_scale_ptr, rows, N)
            tx = tl.load(tb_ptr + offs_b.to(tl.int64)[:, None] * DT + offs_x[None, :],
                         mask=(offs_b[:, None] < n_b) & (offs_x[None, :] < DT), other=0.0)
            if F32_PRODUCT:
                t_acc = tl.dot(gt.to(tl.float32), tx.to(tl.float32), t_acc, input_precision="ieee", out_dtype=ACC)
            else:
                t_acc = tl.dot(gt.to(tx.dtype), tx, t_acc, input_precision=PREC, out_dtype=ACC)
    offs_a64 = offs_a.to(tl.int64)
    a_in = (offs_a < n_a)[:, None]
    if STUDENT:
        tl.store(out_ptr + offs_a64[:, None] * D + offs_x[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=a_in & (offs_x[None, :] < D))
    if TEACHER:
        tl.store(t_out_ptr + offs_a64[:, None] * DT + offs_x[None, :], t_acc.to(t_out_ptr.dtype.element_ty),
                 mask=a_in & (offs_x[None, :] < DT))


# GPU blocks (a starting point, not tuned on hardware): 64-line programs, 32-wide column blocks,
# D streamed in 64-wide chunks, 64-wide accumulator chunks. The gradient program holds two
# accumulators (student and teacher): at 64 x 128, or with 64-wide column blocks, it spills on
# sm_90 (tests/triton_aot.py --report: 360-1376 B of stack); these compile with none, on wgmma.
# Each accumulator chunk rebuilds S and T, so a wide D costs D / 64 rebuilds: the first thing to
# tune on a GPU.
GPU_BLOCKS = {"BLOCK_A": 64, "BLOCK_B": 32, "BLOCK_D": 64, "BLOCK_X": 64}
GPU_WARPS = 8
