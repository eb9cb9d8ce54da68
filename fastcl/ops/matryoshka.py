"""Matryoshka prefixes of the softmax family in one pass (docs/design.md §4).

A Matryoshka loss is ``sum_p w_p * loss(normalize(q[:, :d_p]), normalize(k[:, :d_p]), ...)``.
Normalising a prefix only rescales its rows, so prefix ``p``'s logits are

    S^p_ij = s_i a^p_i b^p_j <q_i, k_j>_{d_p},   a^p_i = 1 / |q_i[:d_p]|,  b^p_j = 1 / |k_j[:d_p]|

with ``<., .>_d`` the dot product of the first ``d`` features: the raw features plus a row scale
``[P, N]`` and a column scale ``[P, C]`` per prefix. The prefix passes (the operators
``fastcl::prefix_stats`` / ``fastcl::prefix_grad`` of :mod:`fastcl.ops.library`) take exactly
that, and return every prefix's statistics (and, backward, the raw features' and the scales'
gradients); the scales are O(N) vectors formed here in plain PyTorch, so autograd carries the
normalisation's derivative, and each prefix's epilogue is the ordinary one of
:mod:`fastcl.ops.softmax`.

A backend may fuse the prefixes (``softmax_stats_prefixes`` / ``softmax_grad_prefixes``: one
sweep over the tiles with the products snapshotted at each prefix boundary, in the torch
backend and in Triton's ``triton_kernels/prefix.py``), and say where that pays
(``prefers_one_sweep``: the torch backend on a CPU only for wide enough prefixes, Triton always). Otherwise
a backend runs its ordinary passes once per prefix on ``(q[:, :d_p], b^p k[:, :d_p])`` at the
row scale ``s a^p`` (:func:`prefix_stats`, :func:`prefix_grad`): the same contract, P passes.
``FASTCL_PREFIXES`` (``auto``, ``fused``, ``per_prefix``) overrides the choice.
"""

from typing import List, Optional, Sequence

import torch

from .._spec import SoftmaxSpec
from ..backends.common import SoftmaxStats, compute_dtype, prefix_sums
from . import smoothing
from . import softmax as _softmax

# F.normalize's floor on a norm: a zero prefix gives zero logits, as in sentence-transformers
NORM_EPS = 1e-12


def inverse_norms(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``[P, len(x)]``: ``1 / max(|x_i[:d]|, eps)`` for each ``d`` in ``dims`` (ascending),
    differentiable, in the compute dtype."""
    norms = prefix_sums(x.to(compute_dtype(x.dtype)).square(), dims).sqrt()
    return norms.clamp(min=NORM_EPS).reciprocal()


def normalized_prefix(x: Optional[torch.Tensor], d: int, dtype=None) -> Optional[torch.Tensor]:
    """``F.normalize(x[:, :d])``, normed in the compute dtype and returned in ``dtype`` (default
    the compute dtype); ``None`` stays ``None``."""
    if x is None:
        return None
    cd = compute_dtype(x.dtype)
    return torch.nn.functional.normalize(x[:, :d].to(cd), dim=1, eps=NORM_EPS).to(dtype or cd)


def _prefix_keys(cols, col_scales, p: int, d: int, dtype):
    """``b^p k[:, :d]``, the normalised key prefix, in ``dtype`` (the kernels' input dtype)."""
    return (cols[:, :d].to(col_scales.dtype) * col_scales[p, :, None]).to(dtype)


def _one_sweep(module, name: str, device, dims):
    """The backend's fused prefix pass ``name`` where its ``prefers_one_sweep`` (which reads
    ``FASTCL_PREFIXES``) says it pays, else ``None``. A backend with fused passes defines both."""
    fused = getattr(module, name, None)
    return fused if fused is not None and module.prefers_one_sweep(device, dims) else None


def prefix_stats(module, query, cols, row_scales, col_scales, dims, spec: SoftmaxSpec, kernel_dtype) -> SoftmaxStats:
    """The prefixes' statistics, stacked ``[P, ...]`` (``pos_cnt`` ``[N]``): the backend's fused
    pass if it has one, else its ordinary pass once per prefix."""
    fused = _one_sweep(module, "softmax_stats_prefixes", query.device, dims)
    if fused is not None:
        return fused(query, cols, row_scales, col_scales, tuple(dims), spec, kernel_dtype=kernel_dtype)
    per = [module.softmax_stats(query[:, :d].to(kernel_dtype), _prefix_keys(cols, col_scales, p, d, kernel_dtype),
                                row_scales[p], spec) for p, d in enumerate(dims)]

    def stack(field):
        values = [getattr(st, field) for st in per]
        return None if values[0] is None else torch.stack(values)

    return SoftmaxStats(stack("lse_row"), stack("lse_col"), stack("pos_sum"), per[0].pos_cnt)


def prefix_grad(module, query, cols, row_scales, col_scales, dims, kernel_dtype, spec: SoftmaxSpec, lse_row, w_row,
                coef, lse_col=None, w_col=None, *, rows: bool, columns: bool):
    """``(acc_q [N, D], acc_k [C, D], d_row [P, N], d_col [P, C])``: the gradients of the prefix
    problems with respect to the raw features (scales held) and to the two scales, given
    ``dL/dS^p = G^p`` as in ``softmax_grad``. The backend's fused pass if it has one, else its
    ordinary pass once per prefix: ``sum_j G^p_ij b^p_j k_j`` and ``sum_i G^p_ij a^p_i s_i q_i``
    give every term."""
    fused = _one_sweep(module, "softmax_grad_prefixes", query.device, dims)
    if fused is not None:
        return fused(query, cols, row_scales, col_scales, tuple(dims), spec, lse_row, w_row, coef, lse_col, w_col,
                     rows=rows, cols=columns, kernel_dtype=kernel_dtype)
    cd = row_scales.dtype
    q, k = query.to(cd), cols.to(cd)
    acc_q = torch.zeros_like(q) if rows else None
    acc_k = torch.zeros_like(k) if columns else None
    d_row, d_col = torch.zeros_like(row_scales), torch.zeros_like(col_scales)
    for p, d in enumerate(dims):
        sym = spec.symmetric
        keys = _prefix_keys(cols, col_scales, p, d, kernel_dtype)
        g_q, g_k = module.softmax_grad(query[:, :d].to(kernel_dtype), keys, row_scales[p], spec, lse_row[p], w_row[p],
                                       coef[p], lse_col[p] if sym else None, w_col[p] if sym else None, rows=True,
                                       cols=True)
        d_row[p] = (q[:, :d] * g_q).sum(dim=1)
        d_col[p] = (k[:, :d] * g_k).sum(dim=1)
        if rows:
            acc_q[:, :d] += row_scales[p, :, None] * g_q
        if columns:
            acc_k[:, :d] += col_scales[p, :, None] * g_k
    return acc_q, acc_k, d_row, d_col


def check_dims(dims, weights, width: int, op: str):
    """``(dims ascending, weights in the same order)`` as tuples, or a ValueError/TypeError that
    says what is wrong; ``weights=None`` is 1 for every prefix."""
    if isinstance(dims, int) or not isinstance(dims, (list, tuple)) or not dims:
        raise TypeError(f"{op}: matryoshka_dims must be a non-empty list of ints; got {dims!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(f"{op}: matryoshka_dims must hold ints; got {dims!r}")
    if any(d <= 0 or d > width for d in dims):
        raise ValueError(f"{op}: every matryoshka_dims entry must be in [1, D={width}]; got {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{op}: matryoshka_dims must be distinct; got {list(dims)}")
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or len(weights) != len(dims):
        raise ValueError(f"{op}: matryoshka_weights must be a list of {len(dims)} numbers (one per dimension); "
                         f"got {weights!r}")
    weights = [float(w) for w in weights]
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise ValueError(f"{op}: matryoshka_weights must be finite; got {weights}")
    pairs = sorted(zip(dims, weights))
    return tuple(d for d, _ in pairs), tuple(w for _, w in pairs)


def losses(backend: str, query, key, negatives, scale, bias, spec: SoftmaxSpec, dims: Sequence[int]) -> List[tuple]:
    """Per prefix (``dims`` ascending), ``(row_loss, col_loss, row_valid, col_valid)`` of the
    single-process loss on the normalised prefixes, all prefixes from one statistics operator
    call (two with hardness); differentiable by ordinary autograd."""
    from .library import OpColumns, _pass_args, prefix_stats_op

    kernel_dtype = query.dtype
    cd = compute_dtype(kernel_dtype)
    n, m = query.shape[0], key.shape[0]
    cols = (key if negatives is None else torch.cat([key, negatives])).to(cd)
    query = query.to(cd)  # the gradient meets the normalisation's in this dtype (see the operator)
    columns = OpColumns(backend, n, cols.shape[0])
    s_rows = scale.to(cd).reshape(-1).expand(n).contiguous()
    inv_q, inv_c = inverse_norms(query, dims), inverse_norms(cols, dims)
    block = columns._block_spec(spec, negatives)
    s_main, s_tilt = _softmax._tilted_scales(spec, s_rows)

    def stats(s):
        return prefix_stats_op(query, cols, s[None, :] * inv_q, inv_c, list(dims), kernel_dtype, *_pass_args(block),
                               columns.backend_name)

    main = stats(s_main)
    tilt = None if s_tilt is None else stats(s_tilt)
    labels = spec.uses_labels
    out = []
    for p, d in enumerate(dims):

        def prefix(outs):
            lse_row, lse_col, pos_sum, pos_cnt, _ = outs
            return SoftmaxStats(lse_row[p], lse_col[p, :m] if spec.symmetric else None,
                                pos_sum[p] if labels else None, pos_cnt if labels else None)

        pos = None if labels else main[4][p]
        if pos is not None and spec.hardness is not None:  # the main pass's logits are (1 + beta) S
            pos = pos / (1 + spec.hardness)
        saved = _softmax._saved(spec, prefix(main), None if tilt is None else prefix(tilt), pos, n)
        sums = (None, None)
        if spec.label_smoothing:
            sums = smoothing.logit_sums(normalized_prefix(query, d), normalized_prefix(key, d),
                                        normalized_prefix(negatives, d), scale,
                                        spec, columns.reduce)
        terms = _softmax._terms(columns, spec, saved, n, scale.dim() == 1, *sums)
        b = None if bias is None else bias.to(cd).reshape(())
        row_loss, col_loss, row_valid, col_valid = _softmax._losses(spec, terms, s_rows, b)
        if b is not None:  # a bias every softmax cancels still gets its (zero) gradient
            row_loss = row_loss + b * 0
        out.append((row_loss, col_loss, row_valid, col_valid))
    return out

