"""Backends: kernels and their launchers behind one contract of *passes* (docs/design.md §3).

A backend module (``torch``, ``triton``, ``cuda``) holds no autograd code. It implements three
passes over one block of columns -- the whole key set of a single-process loss, or one rank's
block in the ring -- and :func:`available`. ``fastcl.ops`` owns the autograd Functions, the
per-anchor losses (epilogues) and the assembly of every gradient from what the passes return.

Inputs common to every pass: ``query [N, D]`` and ``key [C, D]`` in the input dtype (fp16, bf16,
fp32, fp64; both contiguous or not, the backend copies if it must); ``scale_rows [N]``, the
per-row scale ``s_i`` in the compute dtype (fp32, fp64 for fp64 inputs), which is also the dtype
of every statistic and accumulator the pass returns. The logits of the block are
``S_ij = s_i <q_i, k_j>``: **the softmax passes never see the bias**, a scalar that every
softmax cancels (the epilogues add it where a loss keeps it). A :class:`fastcl._spec.SoftmaxSpec`
describes the block's masks: ``positive_index`` (``None``: the block holds no one-hot positive),
labels, ``exclude_self`` (column ``i`` leaves row ``i``), ``decoupled`` (positives leave the
denominator), ``symmetric`` (column statistics wanted), ``n_grad_cols`` and the false-negative
thresholds ``fn_row [N]`` / ``fn_col [C]`` (``None``: no mask): entry ``(i, j)``, unless it is
the line's one-hot positive, leaves row ``i``'s denominator when ``S_ij > fn_row[i]`` and column
``j``'s when ``S_ij > fn_col[j]``, so a symmetric block's two denominators may differ. A
backend whose kernels lack a mask defines ``unsupported(spec)`` (``fastcl._dispatch``).

``softmax_stats(query, key, scale_rows, spec) -> SoftmaxStats``
    ``lse_row [N]``: ``LSE_{j in D_i} S_ij`` over the block (``-inf`` if the block holds none of
    row i's denominator); ``lse_col [C]`` (``spec.symmetric``, else ``None``): the same per
    column over the rows; ``pos_sum, pos_cnt [N]`` (label positives, else ``None``): the sum of
    the label-positive logits of each row and their count.

``softmax_grad(query, key, scale_rows, spec, lse_row, w_row, coef, lse_col, w_col, *, rows, cols)``
    With the logit gradient
    ``G_ij = w_row_i [j in D_i] exp(S_ij - lse_row_i) + w_col_j [i in D'_j] exp(S_ij - lse_col_j)
    - coef_i [j in P_i]``, returns ``(acc_q, acc_k)``: ``acc_q [N, D] = sum_j G_ij k_j``
    (``rows``) and ``acc_k [C, D] = sum_i G_ij s_i q_i``, zero from ``spec.n_grad_cols`` on
    (``cols``); ``None`` where not asked. ``lse_row``/``lse_col`` are final LSEs (at least every
    entry of their line); an entry whose weight is 0 contributes exactly 0 whatever its LSE.
    ``lse_col``/``w_col`` are ``None`` unless ``spec.symmetric``.

``sigmoid_pass(query, key, scale_rows, bias, positive_index, *, rows, cols, gsum, labels=None) -> SigmoidSums``
    Over ``L_ij = S_ij + b`` with ``z_ij = +1`` at ``j = positive_index[i]`` (``None``, or -1
    in a row: no positive in this block) or, with ``labels = (row_labels [N], col_labels [C])``
    (Long; ``positive_index`` then ``None``), wherever ``row_labels[i] == col_labels[j]``,
    ``-1`` elsewhere, and ``G_ij = sigmoid(L_ij) - [z_ij = 1]``: ``loss`` (a 0-d sum of
    ``softplus(-z_ij L_ij)``), ``g_sum`` (0-d sum of G, for the bias; ``None`` unless ``gsum``),
    ``acc_q`` and ``acc_k`` as above (``None`` unless ``rows``/``cols``). ``bias`` is a 0-d
    tensor in the compute dtype, or ``None``.

Optional passes (a backend without them: ``fastcl.ops.matryoshka`` composes its ordinary passes
for prefixes, and ``fastcl._dispatch`` skips it for distillation, whose spec names its passes):

``softmax_stats_prefixes(query, key, row_scales, col_scales, dims, spec, *, kernel_dtype)`` /
``softmax_grad_prefixes(...)``
    ``P`` prefix problems ``S^p_ij = row_scales[p, i] col_scales[p, j] <q_i, k_j>_{dims[p]}``
    (``dims`` ascending) in one sweep (the features come in the compute dtype; ``kernel_dtype``
    is the dtype the products may run in): stacked statistics, and ``(acc_q, acc_k, d_row, d_col)``,
    the raw features' gradients with the scales held plus the scales' gradients, given
    ``dL/dS^p`` as in ``softmax_grad``. A backend with them also defines
    ``prefers_one_sweep(device, dims)``: whether to use them (``FASTCL_PREFIXES`` overrides).

``distill_stats(query, key, scale_rows, t_query, t_key, t_scale_rows, symmetric) -> DistillStats``
    / ``distill_grad(...)``: a student and a teacher similarity over the same pairs; see
    :mod:`fastcl.ops.distill`.

No pass allocates an N x C buffer. Each backend's module docstring says how it meets the
contract; ``torch`` is the readable specification.
"""
