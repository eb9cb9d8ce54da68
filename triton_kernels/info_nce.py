"""Triton kernels for every fastcl loss: one tile loop, two epilogue families.

Shapes: ``Q`` is ``[N, D]`` (rows, anchors), ``K`` is ``[C, D]`` (columns), both contiguous in
the input dtype (fp16 / bf16 / fp32 / fp64). ``S = s_i * Q K^T + b`` is never stored: every
kernel walks tiles of it and keeps them in registers. Statistics and accumulators are in ``ACC``
(fp32, or fp64 for fp64 inputs). The launcher is ``fastcl/backends/triton.py``; the readable
specification of the same algorithm is ``fastcl/backends/torch.py``.

Orientation. A program *owns* a block of one axis (``OWN_ROWS``: rows of Q, else columns of K)
and loops over the other. The owned side is ``A`` and the looped side ``B``; the tile is
``A_tile @ B_tile^T`` (``BLOCK_A x BLOCK_B``). Masks and epilogues are written once in terms of
global ``rows`` / ``cols`` index tensors that are ``[BLOCK_A, 1]`` / ``[1, BLOCK_B]`` or the
transpose, so broadcasting puts every per-row and per-column quantity in place for both
orientations. That is what lets one kernel serve the row and the column direction.

Kernels:

* ``softmax_stats_kernel``: the forward online (max, sum-exp) per anchor in fp32/fp64, masked
  entries at -inf and a zero shift for all-masked lines (no ``-inf - -inf``). With ``OWN_ROWS``
  and labels it also yields each row's label-positive logit sum and count (an in-tile label
  comparison; one-hot positive logits are one row-wise dot product in ``fastcl.ops``). For
  symmetric losses it runs a second time with
  columns as anchors: a second pass costs ``2NMD`` more FLOPs, whereas merging per-row-tile
  column partials needs an ``(N / BLOCK_A) x C`` buffer, which grows like ``N * C``; atomics
  would make the merge order (and the bits) vary run to run.
* ``logit_grad_kernel``: the chunked pass's kernel, one tile of ``G`` per program written to a
  workspace (``S`` over the full D, the same ``G`` as ``grad_kernel``); the products run in cuBLAS.
* ``grad_kernel``: recomputes tiles and forms the gradient tile ``G = d loss / d S`` (softmax:
  ``w_i p_ij + w'_j p'_ij - [j in P_i] coef_i``; sigmoid: ``sigmoid(L_ij) - z_ij``), then
  ``acc += G @ B_tile[:, D-chunk]``. Owning rows gives ``sum_j G_ij k_j``; owning columns (``G``
  scaled by ``s_i``) gives ``sum_i G_ij s_i q_i``: the two accumulators of the backend contract
  (``fastcl/backends/__init__.py``), from which ``fastcl.ops`` forms dQ, d(scale) and dK. Each
  output element is written by exactly one program that sums in a fixed order: no atomics, so
  the backward is bitwise deterministic (FlashAttention-2's dQ / dK split; both kernels
  recompute ``S``, so a backward costs ``8NMD`` FLOPs with the recompute, forward excluded).
  Row sums of ``G`` (for the sigmoid bias gradient) and, for the sigmoid family, the loss per
  row come from the same row-owning pass; the sigmoid family needs no statistics, so its
  gradient kernels run inside the forward.

Large D (docs/design.md §7). With ``BLOCK_R > 0`` (the padded D, when a line takes at most
512 bytes: D <= 256 in bf16/fp16) a statistics or gradient program loads its owned tile once and
keeps it on chip for the whole loop, each looped tile is loaded once at full width, and ``S`` is
one dot. Otherwise (``BLOCK_R = 0``) both sides stream through D in ``BLOCK_D`` chunks. The
gradient accumulator is ``BLOCK_A x BLOCK_X``: the grid's second axis splits D into ``BLOCK_X``
chunks and each program rebuilds ``S`` over the full D. The launcher takes ``BLOCK_X`` = the
padded width while the owned tile is resident (one chunk: the fully fused backward, 8NMD FLOPs
for dQ + dK, and the looped tile serves both ``S`` and ``G @ X``) and 128 when streaming (D = 768:
6 chunks, dQ + dK cost 28NMD), where the chunked pass (``logit_grad_kernel`` + cuBLAS,
``fastcl/backends/chunked.py``) is the cheaper one by the cost model. Block shapes are autotuned
over the configs below, pruned by ``fit_to_width`` to those that compile for sm_90 without
spills (checked ahead of time without a GPU: ``tests/triton_aot.py --report`` prints registers,
stack bytes and wgmma counts). Still to measure on a GPU: TFLOP/s of every kernel against a
dense bf16 matmul at D in {256, 768, 1024}, and the fused/chunked crossover.

Cost in FLOPs (forward + backward): ``10NMD`` for a one-directional softmax loss, ``12NMD`` for a
symmetric one (column statistics pass; both gradient passes recompute S), ``8NMD`` for the
sigmoid family (its two gradient passes run in the forward and also yield the loss). A
single-pass backward with atomic dQ would save ``2NMD`` but is not deterministic; it is not
implemented.

Precision: fp16/bf16 inputs feed ``tl.dot`` and accumulate in fp32 (``G`` is rounded to the
input dtype for ``G @ B``, as FlashAttention rounds P); fp32 inputs use ``PREC`` (``"tf32"``
when ``torch.backends.cuda.matmul.allow_tf32`` is set, else ``"ieee"``); fp64 stays fp64.

Under ``TRITON_INTERPRET=1`` these kernels run on CPU tensors (numpy per op): tests use 16-wide
blocks and tiny shapes, and no autotuning.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _oriented(offs_a, offs_b, OWN_ROWS: tl.constexpr):
    """Global (row, column) index tensors of the tile, broadcastable to [BLOCK_A, BLOCK_B]."""
    if OWN_ROWS:
        rows = offs_a[:, None]
        cols = offs_b[None, :]
    else:
        rows = offs_b[None, :]
        cols = offs_a[:, None]
    return rows, cols


@triton.jit
def _sides(N, C, OWN_ROWS: tl.constexpr):
    """``(owned lines, looped lines)``: rows and columns, or columns and rows."""
    if OWN_ROWS:
        return N, C
    return C, N


@triton.jit
def _online_lse(m, l, t):
    """Merge a tile of (masked, ``-inf``) values ``t`` into running row maxima ``m`` and sums
    ``l = sum exp(t - m)``: ``(m, l)``. An all-masked line keeps max -inf; shifting by 0 there
    keeps exp(-inf - 0) = 0."""
    m_new = tl.maximum(m, tl.max(t, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(t - m_safe[:, None]), axis=1)


@triton.jit
def _final_lse(m, l):
    """``m + log(l)``, -inf for an empty line (the where only keeps the interpreter quiet)."""
    return tl.where(l == 0.0, NEG_INF, m + tl.log(tl.where(l == 0.0, 1.0, l)))


@triton.jit
def _lines(ptr, offs, n_lines, D, BLOCK_R: tl.constexpr):
    """``[len(offs), BLOCK_R]`` features of these lines, zero beyond D and beyond ``n_lines``."""
    offs_d = tl.arange(0, BLOCK_R)
    return tl.load(ptr + offs.to(tl.int64)[:, None] * D + offs_d[None, :],
                   mask=(offs[:, None] < n_lines) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _scale_and_bias(acc, rows, N, scale_ptr, scalars_ptr, HAS_BIAS: tl.constexpr):
    acc = acc * tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(scalars_ptr)
    return acc


@triton.jit
def _scaled_logits(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D, rows, N, scale_ptr, scalars_ptr,
                   HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``s_row * <a, b> (+ bias)`` for one tile, both sides streamed through D in ``BLOCK_D``
    chunks; the D tail and out-of-range lines read as 0."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    b_rows = b_ptr + offs_b.to(tl.int64)[:, None] * D
    a_in = offs_a[:, None] < n_a
    b_in = offs_b[:, None] < n_b
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d[None, :] < D
        a = tl.load(a_rows + offs_d[None, :], mask=a_in & d_in, other=0.0)
        b = tl.load(b_rows + offs_d[None, :], mask=b_in & d_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
    return _scale_and_bias(acc, rows, N, scale_ptr, scalars_ptr, HAS_BIAS)


@triton.jit
def _resident_logits(a_tile, b_tile, rows, N, scale_ptr, scalars_ptr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr):
    """The same from an owned tile kept on chip (``_lines``) and one looped tile: one dot over
    the padded width."""
    acc = tl.dot(a_tile, tl.trans(b_tile), input_precision=PREC, out_dtype=ACC)
    return _scale_and_bias(acc, rows, N, scale_ptr, scalars_ptr, HAS_BIAS)


@triton.jit
def _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                LABELS: tl.constexpr, COL_MASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """``(keep, match)``: entries that exist and are not excluded, and the positives among them.

    One-hot positives are ``col == positive_index[row]`` (``-1`` never matches); label positives
    are equal labels on a labelled column.
    """
    row_in = rows < N
    col_in = cols < C
    keep = row_in & col_in
    if EXCLUDE_SELF:
        keep = keep & (rows != cols)
    if LABELS:
        row_lab = tl.load(row_lab_ptr + rows, mask=row_in, other=0)
        col_lab = tl.load(col_lab_ptr + cols, mask=col_in, other=0)
        match = keep & (row_lab == col_lab)
        if COL_MASK:
            match = match & (tl.load(col_has_ptr + cols, mask=col_in, other=0) != 0)
    else:
        pos = tl.load(pos_ptr + rows, mask=row_in, other=-1).to(tl.int32)  # int32 compares: fewer registers
        match = keep & (cols == pos)
    return keep, match


@triton.jit
def _false_negative_keep(t, keep, match, rows, cols, N, C, fn_row_ptr, fn_col_ptr, BY_ROW: tl.constexpr):
    """``keep`` without the entries the false-negative mask takes out of the rows' (``BY_ROW``)
    or the columns' denominators: logit above the line's threshold, not its one-hot positive.
    ``~(t > thr)`` keeps a NaN logit, so non-finite inputs still give a non-finite loss."""
    if BY_ROW:
        thr = tl.load(fn_row_ptr + rows, mask=rows < N, other=0.0)
    else:
        thr = tl.load(fn_col_ptr + cols, mask=cols < C, other=0.0)
    return keep & (match | ~(t > thr))


@triton.jit
def _guide_tile(g_row_ptr, g_col_ptr, offs_a, offs_b, n_a, n_b, G, OWN_ROWS: tl.constexpr, ACC: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """The guide model's similarity ``<guide_row_i, guide_col_j>`` of the tile, oriented as the
    logits (owned lines first), in full precision: it decides the guide mask by a comparison."""
    if OWN_ROWS:
        ga_ptr = g_row_ptr
        gb_ptr = g_col_ptr
    else:
        ga_ptr = g_col_ptr
        gb_ptr = g_row_ptr
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    a_rows = ga_ptr + offs_a.to(tl.int64)[:, None] * G
    b_rows = gb_ptr + offs_b.to(tl.int64)[:, None] * G
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_in = offs_g[None, :] < G
        a = tl.load(a_rows + offs_g[None, :], mask=(offs_a[:, None] < n_a) & g_in, other=0.0)
        b = tl.load(b_rows + offs_g[None, :], mask=(offs_b[:, None] < n_b) & g_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _mask_test(t, g_row_ptr, g_col_ptr, offs_a, offs_b, n_a, n_b, G, OWN_ROWS: tl.constexpr, GUIDE: tl.constexpr,
               ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """What the false-negative mask compares with the rows' thresholds: the logits, or with
    ``GUIDE`` the guide's similarity."""
    if GUIDE:
        return _guide_tile(g_row_ptr, g_col_ptr, offs_a, offs_b, n_a, n_b, G, OWN_ROWS, ACC, BLOCK_A, BLOCK_B,
                           BLOCK_G)
    return t


@triton.jit
def _log1p(x):
    # log(1 + x) with the rounding of 1 + x corrected (exact enough for tiny x, no libdevice)
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _sigmoid_row_loss(t, keep, match):
    """Per row of the tile: ``sum_j softplus(-z_ij L_ij)``, each entry as a negative
    (``softplus(L)``) and each positive corrected to ``softplus(L) - L``."""
    return tl.sum(tl.where(keep, _softplus(t), 0.0) - tl.where(match, t, 0.0), axis=1)


@triton.jit
def _logit_grad(t, test, keep, match, rows, cols, N, C, lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr, w_col_ptr,
                fn_row_ptr, fn_col_ptr, SIGMOID: tl.constexpr, DECOUPLED: tl.constexpr, FN_MASK: tl.constexpr,
                SYMMETRIC: tl.constexpr, ACC: tl.constexpr):
    """``G = d loss / d S`` on one tile of logits ``t``: sigmoid ``sigmoid(L_ij) - [j in P_i]``;
    softmax ``w_i p_ij (+ w'_j p'_ij) - [j in P_i] coef_i`` from final LSEs. With ``FN_MASK`` the
    row and column terms have their own denominators (each line's false-negative threshold); the
    rows' mask compares ``test`` (the logits, or the guide's similarity) with their thresholds."""
    if SIGMOID:
        g = tl.where(keep, _sigmoid(t) - match.to(ACC), 0.0)
    else:
        logits = t
        keep_row = keep
        if FN_MASK:
            keep_row = _false_negative_keep(test, keep, match, rows, cols, N, C, fn_row_ptr, fn_col_ptr, True)
        if DECOUPLED:
            t = tl.where(keep_row & ~match, logits, NEG_INF)
        else:
            t = tl.where(keep_row, logits, NEG_INF)
        in_row = rows < N
        w_row = tl.load(w_row_ptr + rows, mask=in_row, other=0.0)
        # where(w != 0): an anchor left out of the loss must not turn exp overflow into NaN
        g = tl.where(w_row != 0.0, w_row * tl.exp(t - tl.load(lse_row_ptr + rows, mask=in_row, other=0.0)), 0.0)
        if SYMMETRIC:
            if FN_MASK:
                keep_col = _false_negative_keep(logits, keep, match, rows, cols, N, C, fn_row_ptr, fn_col_ptr, False)
                t = tl.where(keep_col, logits, NEG_INF)
            in_col = cols < C
            w_col = tl.load(w_col_ptr + cols, mask=in_col, other=0.0)
            lse_col = tl.load(lse_col_ptr + cols, mask=in_col, other=0.0)
            g += tl.where(w_col != 0.0, w_col * tl.exp(t - lse_col), 0.0)
        g -= tl.where(match, tl.load(coef_ptr + rows, mask=in_row, other=0.0), 0.0)
    return g


@triton.jit
def softmax_stats_kernel(
    a_ptr, b_ptr, scale_ptr, scalars_ptr, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr, fn_row_ptr, fn_col_ptr,
    g_row_ptr, g_col_ptr,
    lse_ptr, pos_sum_ptr, pos_cnt_ptr,
    N, C, D, G,
    OWN_ROWS: tl.constexpr, LABELS: tl.constexpr, COL_MASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DECOUPLED: tl.constexpr, FN_MASK: tl.constexpr, GUIDE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Per anchor of the owned axis: ``lse = LSE_{j in D} S``; with ``OWN_ROWS`` and ``LABELS``
    also the sum of the label-positive logits and their count (``[N]`` each, ``ACC``).
    ``BLOCK_R > 0`` (the padded D, at most 256): the owned tile stays on chip for the whole loop."""
    n_a, n_b = _sides(N, C, OWN_ROWS)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_in = offs_a < n_a
    m = tl.full((BLOCK_A,), NEG_INF, dtype=ACC)
    l = tl.zeros((BLOCK_A,), dtype=ACC)
    pos_sum = tl.zeros((BLOCK_A,), dtype=ACC)
    pos_cnt = tl.zeros((BLOCK_A,), dtype=ACC)
    if BLOCK_R > 0:
        a_tile = _lines(a_ptr, offs_a, n_a, D, BLOCK_R)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        rows, cols = _oriented(offs_a, offs_b, OWN_ROWS)
        if BLOCK_R > 0:
            t = _resident_logits(a_tile, _lines(b_ptr, offs_b, n_b, D, BLOCK_R), rows, N, scale_ptr, scalars_ptr,
                                 HAS_BIAS, ACC, PREC)
        else:
            t = _scaled_logits(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D, rows, N, scale_ptr, scalars_ptr,
                               HAS_BIAS, ACC, PREC, BLOCK_A, BLOCK_B, BLOCK_D)
        keep, match = _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                                  LABELS, COL_MASK, EXCLUDE_SELF)
        if OWN_ROWS and LABELS:
            pos_sum += tl.sum(tl.where(match, t, 0.0), axis=1)
            pos_cnt += tl.sum(match.to(ACC), axis=1)
        if DECOUPLED:
            keep = keep & ~match
        if FN_MASK:
            test = _mask_test(t, g_row_ptr, g_col_ptr, offs_a, offs_b, n_a, n_b, G, OWN_ROWS, GUIDE, ACC, BLOCK_A,
                              BLOCK_B, BLOCK_G)
            keep = _false_negative_keep(test, keep, match, rows, cols, N, C, fn_row_ptr, fn_col_ptr, OWN_ROWS)
        t = tl.where(keep, t, NEG_INF)
        m, l = _online_lse(m, l, t)
    lse = _final_lse(m, l)
    tl.store(lse_ptr + offs_a, lse, mask=a_in)
    if OWN_ROWS and LABELS:
        tl.store(pos_sum_ptr + offs_a, pos_sum, mask=a_in)
        tl.store(pos_cnt_ptr + offs_a, pos_cnt, mask=a_in)


@triton.jit
def grad_kernel(
    a_ptr, b_ptr, scale_ptr, scalars_ptr, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr, fn_row_ptr, fn_col_ptr,
    g_row_ptr, g_col_ptr,
    lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr, w_col_ptr, gmax_ptr,
    out_ptr, gsum_ptr, loss_ptr,
    N, C, D, G, n_out,
    SIGMOID: tl.constexpr, OWN_ROWS: tl.constexpr, LABELS: tl.constexpr, COL_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, DECOUPLED: tl.constexpr, FN_MASK: tl.constexpr, GUIDE: tl.constexpr,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_OUT: tl.constexpr,
    WRITE_GSUM: tl.constexpr, WRITE_LOSS: tl.constexpr, G_SCALED: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Gradient of the owned block, for features ``[pid_x * BLOCK_X, +BLOCK_X)``.

    ``OWN_ROWS``: ``out = sum_j G_ij k_j`` (``[N, D]``, ``ACC``), ``gsum[i] = sum_j G_ij`` and
    (sigmoid) ``loss[i] = sum_j softplus(-z_ij L_ij)``. Otherwise ``out = sum_i G_ij s_i q_i`` for
    the first ``n_out`` columns. Softmax inputs: per row ``lse_row`` (finite), ``w_row`` (0 on
    anchors without gradient) and ``coef`` (the target weight on each positive entry); per column
    ``lse_col``/``w_col`` for symmetric. ``BLOCK_R > 0``: the owned tile stays on chip, and when
    one accumulator chunk spans the whole width (``BLOCK_X == BLOCK_R``) the looped tile loaded
    for ``S`` is also the ``X`` of ``G @ X``.
    ``G_SCALED`` (fp16): ``G`` is divided by ``*gmax_ptr`` before it is rounded for the product
    and the accumulator multiplied back, so small gradients do not underflow.
    """
    n_a, n_b = _sides(N, C, OWN_ROWS)
    pid_x = tl.program_id(1)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_in = offs_x[None, :] < D
    acc = tl.zeros((BLOCK_A, BLOCK_X), dtype=ACC)
    gsum = tl.zeros((BLOCK_A,), dtype=ACC)
    loss = tl.zeros((BLOCK_A,), dtype=ACC)
    if G_SCALED:
        g_max = tl.load(gmax_ptr)
    if BLOCK_R > 0:
        a_tile = _lines(a_ptr, offs_a, n_a, D, BLOCK_R)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        rows, cols = _oriented(offs_a, offs_b, OWN_ROWS)
        if BLOCK_R > 0:
            b_tile = _lines(b_ptr, offs_b, n_b, D, BLOCK_R)
            t = _resident_logits(a_tile, b_tile, rows, N, scale_ptr, scalars_ptr, HAS_BIAS, ACC, PREC)
        else:
            t = _scaled_logits(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D, rows, N, scale_ptr, scalars_ptr,
                               HAS_BIAS, ACC, PREC, BLOCK_A, BLOCK_B, BLOCK_D)
        keep, match = _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                                  LABELS, COL_MASK, EXCLUDE_SELF)
        if SIGMOID and WRITE_LOSS:
            loss += _sigmoid_row_loss(t, keep, match)
        test = _mask_test(t, g_row_ptr, g_col_ptr, offs_a, offs_b, n_a, n_b, G, OWN_ROWS, GUIDE, ACC, BLOCK_A,
                          BLOCK_B, BLOCK_G)
        g = _logit_grad(t, test, keep, match, rows, cols, N, C, lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr,
                        w_col_ptr, fn_row_ptr, fn_col_ptr, SIGMOID, DECOUPLED, FN_MASK, SYMMETRIC, ACC)
        if WRITE_GSUM:
            gsum += tl.sum(g, axis=1)
        if ACCUMULATE:
            if not OWN_ROWS:
                # dK_j = sum_i G_ij s_i q_i: the row scale rides on G
                g = g * tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
            if G_SCALED:
                g = g / g_max
            if BLOCK_R == BLOCK_X:
                x = b_tile
            else:
                x = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + offs_x[None, :],
                            mask=(offs_b[:, None] < n_b) & x_in, other=0.0)
            acc = tl.dot(g.to(x.dtype), x, acc, input_precision=PREC, out_dtype=ACC)

    a_in = offs_a < n_a
    first_chunk = pid_x == 0
    if WRITE_GSUM:
        tl.store(gsum_ptr + offs_a, gsum, mask=a_in & first_chunk)
    if WRITE_LOSS:
        tl.store(loss_ptr + offs_a, loss, mask=a_in & first_chunk)
    if ACCUMULATE:
        offs_a64 = offs_a.to(tl.int64)
        if G_SCALED:
            acc = acc * g_max
        if STORE_OUT:
            tl.store(out_ptr + offs_a64[:, None] * D + offs_x[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(offs_a < n_out)[:, None] & x_in)


@triton.jit
def logit_grad_kernel(
    a_ptr, b_ptr, scale_ptr, scalars_ptr, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr, fn_row_ptr, fn_col_ptr,
    g_row_ptr, g_col_ptr,
    lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr, w_col_ptr, gmax_ptr,
    g_ptr, loss_ptr, gsum_ptr,
    N, C, D, G, row0, row1, sums_stride,
    SIGMOID: tl.constexpr, LABELS: tl.constexpr, COL_MASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DECOUPLED: tl.constexpr, FN_MASK: tl.constexpr, GUIDE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_SUMS: tl.constexpr,
    G_SCALED: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """The chunked pass's kernel: ``G`` of rows ``[row0, row1)`` into ``g`` (``[row1 - row0, C]``,
    its own dtype), one ``BLOCK_A x BLOCK_B`` tile per program, ``S`` built over the full D.

    With ``WRITE_SUMS`` (sigmoid) each program also stores, per row, its tile's loss and sum of
    ``G`` at ``[row - row0, column block]`` of the ``sums_stride``-wide ``loss``/``gsum``
    buffers (summed by the launcher: no atomics, the same bits every run). ``G_SCALED`` (fp16):
    ``G / *gmax_ptr`` is stored (the products are multiplied back).
    """
    pid_b = tl.program_id(1)
    offs_a = row0 + tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows, cols = _oriented(offs_a, offs_b, True)
    t = _scaled_logits(a_ptr, b_ptr, offs_a, offs_b, row1, C, D, rows, N, scale_ptr, scalars_ptr,
                       HAS_BIAS, ACC, PREC, BLOCK_A, BLOCK_B, BLOCK_D)
    keep, match = _tile_masks(rows, cols, N, C, pos_ptr, row_lab_ptr, col_lab_ptr, col_has_ptr,
                              LABELS, COL_MASK, EXCLUDE_SELF)
    in_chunk = rows < row1
    keep = keep & in_chunk
    match = match & in_chunk
    test = _mask_test(t, g_row_ptr, g_col_ptr, offs_a, offs_b, row1, C, G, True, GUIDE, ACC, BLOCK_A, BLOCK_B,
                      BLOCK_G)
    g = _logit_grad(t, test, keep, match, rows, cols, N, C, lse_row_ptr, w_row_ptr, coef_ptr, lse_col_ptr, w_col_ptr,
                    fn_row_ptr, fn_col_ptr, SIGMOID, DECOUPLED, FN_MASK, SYMMETRIC, ACC)
    local = (offs_a - row0).to(tl.int64)
    if WRITE_SUMS:
        line_in = offs_a < row1
        tl.store(loss_ptr + local * sums_stride + pid_b, _sigmoid_row_loss(t, keep, match), mask=line_in)
        tl.store(gsum_ptr + local * sums_stride + pid_b, tl.sum(g, axis=1), mask=line_in)
    if G_SCALED:
        g = g / tl.load(gmax_ptr)
    tl.store(g_ptr + local[:, None] * C + cols, g.to(g_ptr.dtype.element_ty), mask=in_chunk & (cols < C))


# GPU configs. Untested on hardware in this repository so far: the starting points of a search,
# to be replaced by measured ones (module docstring). The launcher picks BLOCK_X from D (it fixes
# how many ``ds`` partials there are); ``fit_to_width`` clips BLOCK_D to the padded width, so small
# D does not waste lanes, and drops accumulators of more than 64 x 256 fp32 (register spills).
def _config(a, b, d, warps, stages):
    return triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_D": d}, num_warps=warps, num_stages=stages)


STATS_CONFIGS = [
    _config(64, 64, 64, 4, 3),
    _config(128, 64, 64, 8, 3),
    _config(128, 128, 32, 8, 3),
    _config(64, 128, 64, 8, 3),
]

# the chunked pass's kernel: one tile per program. BLOCK_B is the same in every config (and
# halved for fp64 by fit_to_width, like every kernel's), so the per-tile loss sums of the sigmoid
# family fill the same buffer slots whichever config the autotuner picks.
LOGIT_BLOCK_B = 64
LOGIT_CONFIGS = [
    _config(128, LOGIT_BLOCK_B, 32, 8, 4),
    _config(128, LOGIT_BLOCK_B, 64, 8, 3),
    _config(64, LOGIT_BLOCK_B, 64, 8, 3),
    _config(64, LOGIT_BLOCK_B, 32, 4, 3),
]

GRAD_CONFIGS = [
    _config(32, 64, 64, 4, 2),
    _config(64, 64, 64, 8, 3),
    _config(64, 64, 32, 8, 3),
    _config(64, 32, 64, 8, 2),
    _config(128, 64, 32, 8, 2),
]

# autotuning key: the width and the variant; the autotuner adds the tensors' dtypes itself
STATS_KEY = ["D", "OWN_ROWS", "LABELS", "EXCLUDE_SELF", "DECOUPLED", "FN_MASK", "GUIDE", "PREC"]
LOGIT_KEY = ["D", "SIGMOID", "LABELS", "EXCLUDE_SELF", "DECOUPLED", "FN_MASK", "GUIDE", "SYMMETRIC", "WRITE_SUMS",
             "G_SCALED", "PREC"]
GRAD_KEY = ["D", "BLOCK_X", "SIGMOID", "OWN_ROWS", "LABELS", "EXCLUDE_SELF", "DECOUPLED", "FN_MASK", "GUIDE",
            "SYMMETRIC", "ACCUMULATE", "G_SCALED", "PREC"]
_MAX_ACCUMULATOR = 64 * 256


def fp64_cap(element_size: int) -> int:
    """Largest column and depth block for operands of ``element_size`` bytes: fp64 takes twice the
    registers, so its blocks are halved to 32."""
    return 32 if element_size == 8 else 1 << 30


def fit_to_width(configs, named_args, **kwargs):
    """The configs worth timing for this launch: blocks clipped to the padded width (and halved
    for fp64), accumulators of at most 64 x 256 fp32, and none of those the sm_90 ahead-of-time
    compile shows spilling (``tests/triton_aot.py --report``): 4-warp programs when D is streamed
    (``BLOCK_R == 0``) or the gradient accumulator is wider than 128, streamed gradient programs
    with more than 64 x 64 x 32 tile elements beside their accumulator, and with the guide mask
    (``GUIDE``) 4-warp programs, column blocks over 64 and (chunked pass) tiles over 64^3. Never
    empty."""
    width = max(16, triton.next_power_of_2(named_args["D"]))
    block_x = kwargs.get("BLOCK_X", 0)
    streamed = kwargs.get("BLOCK_R", 1) == 0
    cap = fp64_cap(named_args["a_ptr"].element_size())
    seen, fitted, dropped = set(), [], []
    for cfg in sorted(configs, key=lambda c: c.kwargs["BLOCK_A"]):
        kw = dict(cfg.kwargs, BLOCK_B=min(cfg.kwargs["BLOCK_B"], cap), BLOCK_D=min(cfg.kwargs["BLOCK_D"], width, cap))
        sig = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if sig in seen:
            continue
        seen.add(sig)
        config = triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        tile = kw["BLOCK_A"] * kw["BLOCK_B"] * kw["BLOCK_D"]
        spills = (cfg.num_warps < 8 and (streamed or block_x > 128)) or (
            streamed and block_x and tile > 64 * 64 * 32) or (
            # the guide mask's full-precision fp32 dot: 8 warps, at most 64 columns, and in the
            # chunked pass's kernel (named_args has g_ptr) at most 64^3 tile elements
            kwargs.get("GUIDE") and (cfg.num_warps < 8 or kw["BLOCK_B"] > 64 or (
                "g_ptr" in named_args and tile > 64 * 64 * 64)))
        (dropped if spills or kw["BLOCK_A"] * block_x > _MAX_ACCUMULATOR else fitted).append(config)
    return fitted or dropped[:1]


def tuned(kernel, configs, key):
    """``kernel`` behind Triton's autotuner (compiled mode only; the launcher creates it lazily)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": fit_to_width})(kernel)
