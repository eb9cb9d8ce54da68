"""CLIP distillation: a student's contrastive loss and its cross-entropy to a teacher's softmax,
fused (docs/design.md §4).

With student logits ``S = s * image @ text.T`` and teacher logits ``T = t * image' @ text'.T``
(open_clip's ``DistillClipLoss``), per image row ``i``

    H_i = -sum_j softmax(T)_ij log softmax(S)_ij = LSE_j S_ij - m_i,    m_i = sum_j softmax(T)_ij S_ij

(the teacher probabilities sum to 1), and the same per text column over ``S.T`` and ``T.T``. So
besides the student's LSEs (what CLIP needs anyway) the distillation needs one more statistic per
anchor, the teacher-weighted mean ``m`` of the student's logits, which an online merge keeps
beside the teacher's own LSE (one sweep over the tiles, two matmuls per tile). Their gradient
(``fastcl::distill_grad``) is

    dL/dS_ij = w_i p_ij + u_i pt_ij - coef_i [j = pos_i]        dL/dT_ij = u_i pt_ij (S_ij - m_i)

(plus the column terms), ``p``/``pt`` the student/teacher softmax, ``w = dL/dLSE``, ``u = dL/dm``;
every feature and both scales get their exact gradient, teacher ones included when they require
one. The statistics operator ``fastcl::distill_stats`` is differentiable (its registered
backward is that pass) and the epilogue is plain PyTorch, as for the softmax family.
"""

from typing import Tuple

import torch
from torch import Tensor

from .._spec import DistillSpec
from ..backends.common import DistillStats, compute_dtype
from . import library
from . import softmax as _softmax
from .library import _empty, _or_none


def _module(backend: str, device, symmetric: bool):
    from .._dispatch import resolve

    return resolve(backend or None, device, DistillSpec(symmetric=symmetric))


def _distill_stats(
    query: Tensor, key: Tensor, scale_rows: Tensor, t_query: Tensor, t_key: Tensor, t_scale_rows: Tensor,
    positive_index: Tensor, symmetric: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(lse_row, lse_col, mean_row, mean_col, pos, t_lse_row, t_lse_col)`` of one block (column
    fields empty unless ``symmetric``): the backend's ``distill_stats`` and the student's positive
    logits ``s_i <q_i, k_pos(i)>``. Differentiable in the six tensors through the first five; the
    teacher LSEs are what the backward needs."""
    st = _module(backend, query.device, symmetric).distill_stats(query, key, scale_rows, t_query, t_key,
                                                                   t_scale_rows, symmetric)
    cd = st.lse_row.dtype
    pos = scale_rows * (query.to(cd) * key[positive_index].to(cd)).sum(dim=1)

    def col(x):
        return _empty(st.lse_row) if x is None else x

    return (st.lse_row, col(st.lse_col), st.mean_row, col(st.mean_col), pos, st.t_lse_row, col(st.t_lse_col))


distill_stats_op = torch.library.custom_op("fastcl::distill_stats", mutates_args=())(_distill_stats)


@distill_stats_op.register_fake
def _(query, key, scale_rows, t_query, t_key, t_scale_rows, positive_index, symmetric, backend):
    n, c = query.shape[0], key.shape[0]

    def vec(size):
        return scale_rows.new_empty(size)

    cols = c if symmetric else 0
    return vec(n), vec(cols), vec(n), vec(cols), vec(n), vec(n), vec(cols)


def _distill_grad(
    query: Tensor, key: Tensor, scale_rows: Tensor, t_query: Tensor, t_key: Tensor, t_scale_rows: Tensor,
    positive_index: Tensor, lse_row: Tensor, lse_col: Tensor, t_lse_row: Tensor, t_lse_col: Tensor,
    mean_row: Tensor, mean_col: Tensor, w_row: Tensor, w_col: Tensor, u_row: Tensor, u_col: Tensor, coef: Tensor,
    backend: str, student: bool, teacher: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum_j G_ij k_j, sum_i G_ij s_i q_i, sum_j Gt_ij k'_j, sum_i Gt_ij t_i q'_i)`` (empty where
    not asked; see the module doc for ``G`` and ``Gt``)."""
    symmetric = lse_col.numel() > 0
    st = DistillStats(lse_row, _or_none(lse_col), t_lse_row, _or_none(t_lse_col), mean_row, _or_none(mean_col))
    out = _module(backend, query.device, symmetric).distill_grad(
        query, key, scale_rows, t_query, t_key, t_scale_rows, positive_index, st, w_row, u_row, coef,
        _or_none(w_col), _or_none(u_col), student=student, teacher=teacher)
    return tuple(_empty(lse_row) if x is None else x for x in out)


distill_grad_op = torch.library.custom_op("fastcl::distill_grad", mutates_args=())(_distill_grad)


@distill_grad_op.register_fake
def _(query, key, scale_rows, t_query, t_key, t_scale_rows, positive_index, lse_row, lse_col, t_lse_row, t_lse_col,
      mean_row, mean_col, w_row, w_col, u_row, u_col, coef, backend, student, teacher):
    cd = lse_row.dtype

    def like(x, want):
        return x.new_empty(x.shape, dtype=cd) if want else _empty(lse_row)

    return like(query, student), like(key, student), like(t_query, teacher), like(t_key, teacher)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], output[0], output[1], output[5], output[6], output[2], output[3])
    ctx.backend = inputs[8]
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (see _backward)


def _backward(ctx, g_lse_row, g_lse_col, g_mean_row, g_mean_col, g_pos, _g_t_row, _g_t_col):
    _softmax.refuse_double_backward()
    query, key, s_rows, t_query, t_key, t_rows, pos_index, lse_row, lse_col, t_lse_row, t_lse_col, mean_row, \
        mean_col = ctx.saved_tensors
    need = ctx.needs_input_grad
    # the teacher's logits reach the losses through the weighted means only: without their
    # gradient (the contrastive loss alone) the teacher gets none, as under dense autograd
    student = any(need[:3])
    teacher = any(need[3:6]) and (g_mean_row is not None or g_mean_col is not None)
    symmetric = lse_col.numel() > 0
    zeros = torch.zeros_like(lse_row)

    def weight(g, like):
        return torch.zeros_like(like) if g is None else g

    w_row, u_row = weight(g_lse_row, lse_row), weight(g_mean_row, lse_row)
    coef = zeros if g_pos is None else -g_pos
    w_col = weight(g_lse_col, lse_col) if symmetric else _empty(lse_row)
    u_col = weight(g_mean_col, lse_col) if symmetric else _empty(lse_row)
    acc_q, acc_k, t_acc_q, t_acc_k = distill_grad_op(
        query, key, s_rows, t_query, t_key, t_rows, pos_index, lse_row, lse_col, t_lse_row, t_lse_col, mean_row,
        mean_col, w_row, w_col, u_row, u_col, coef, ctx.backend, student, teacher)
    grads = [None] * 6
    if student:
        grads[0] = (acc_q * s_rows[:, None]).to(query.dtype) if need[0] else None
        grads[1] = acc_k.to(key.dtype) if need[1] else None
        grads[2] = (acc_q * query.to(acc_q.dtype)).sum(dim=1).to(s_rows.dtype) if need[2] else None
    if teacher:
        grads[3] = (t_acc_q * t_rows[:, None]).to(t_query.dtype) if need[3] else None
        grads[4] = t_acc_k.to(t_key.dtype) if need[4] else None
        grads[5] = (t_acc_q * t_query.to(t_acc_q.dtype)).sum(dim=1).to(t_rows.dtype) if need[5] else None
    return (*grads, None, None, None)


distill_stats_op.register_autograd(_backward, setup_context=_setup)


def row_scales(scale: Tensor, n: int, dtype) -> Tensor:
    """A scalar scale as the ``[N]`` per-row scales the passes take (differentiable)."""
    return scale.to(dtype).reshape(-1).expand(n).contiguous()


def anchor_terms(backend: str, query, key, scale, t_query, t_key, t_scale, positive_index, symmetric: bool):
    """``(contrastive [N] (+ [C] columns), distill [N] (+ [C]))`` per anchor: ``LSE - pos`` and
    ``LSE - m`` for every row (and, if ``symmetric``, for the column ``positive_index[i]``, in
    the rows' order), differentiable in every tensor."""
    cd = compute_dtype(query.dtype)
    n = query.shape[0]
    lse_row, lse_col, mean_row, mean_col, pos, _, _ = distill_stats_op(
        query, key, row_scales(scale, n, cd), t_query, t_key, row_scales(t_scale, n, cd), positive_index, symmetric,
        backend)
    rows = (lse_row - pos, lse_row - mean_row)
    if not symmetric:
        return rows, None
    cols = (lse_col[positive_index] - pos, lse_col[positive_index] - mean_col[positive_index])
    return rows, cols


def registered_ops():
    """The operators, for ``torch.library.opcheck``."""
    return (distill_stats_op, distill_grad_op)


IMPLEMENTATIONS = {"fastcl::distill_stats": _distill_stats, "fastcl::distill_grad": _distill_grad}
library.IMPLEMENTATIONS.update(IMPLEMENTATIONS)  # one table for every fastcl operator
