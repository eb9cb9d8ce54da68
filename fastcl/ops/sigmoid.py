"""The sigmoid family's autograd Function (SigLIP), over any backend's ``sigmoid_pass``.

``G_ij = sigmoid(L_ij) - [z_ij = 1]`` needs no global statistic, so when autograd will need
gradients the forward's one pass forms them too (6NMD FLOPs for loss and gradients) and the
backward only scales them by the incoming gradient.
"""

import torch

from .._spec import SigmoidSpec
from ..backends.common import compute_dtype
from .softmax import first_order_only, row_scale, sum_to_scale


def forward(columns, query, key, scale, bias, spec: SigmoidSpec, needs):
    """``(loss, (dq, dk, d scale, d bias))``: the loss and, where ``needs`` (four flags) asks,
    the gradients of the loss itself from the same pass (``None`` elsewhere); no autograd."""
    cd = compute_dtype(query.dtype)
    need_q, need_k, need_s, need_b = needs
    s_rows = row_scale(scale, query.shape[0], cd)
    b = None if bias is None else bias.detach().to(cd).reshape(())
    labels = (spec.row_labels, spec.col_labels) if spec.uses_labels else None
    sums = columns.sigmoid(query, key, s_rows, b, spec.positive_index, rows=need_q or need_s, cols=need_k,
                           gsum=need_b, labels=labels)
    inv_n = 1.0 / spec.n_rows_norm
    dq = sums.acc_q * (s_rows[:, None] * inv_n) if need_q else None
    ds = sum_to_scale((sums.acc_q * query.to(cd)).sum(dim=1) * inv_n, scale) if need_s else None
    dk = sums.acc_k * inv_n if need_k else None
    db = (sums.g_sum * inv_n).to(bias.dtype).reshape(bias.shape) if need_b else None
    return sums.loss * inv_n, (dq, dk, ds, db)


def scale_gradients(saved, needs, dtypes, grad):
    """The backward: the forward's gradients times the incoming one, in their tensors' dtypes
    (``dtypes``: the query's and the key's)."""
    out = []
    for g, need, dtype in zip(saved, needs, tuple(dtypes) + (None, None)):
        if not need:
            out.append(None)
            continue
        g = g * grad.to(g.dtype)
        out.append(g if dtype is None else g.to(dtype))
    return out


class SigmoidLoss(torch.autograd.Function):
    """``(1 / spec.n_rows_norm) * sum_ij softplus(-z_ij L_ij)`` (a 0-dim tensor, compute dtype)
    over ``L = s_i <q_i, k_j> + b``; ``columns`` runs the pass (local, or the ring)."""

    @staticmethod
    def forward(ctx, columns, query, key, scale, bias, spec: SigmoidSpec):
        needs = ctx.needs_input_grad[1:5]
        loss, grads = forward(columns, query, key, scale, bias, spec, needs)
        ctx.needs, ctx.dtypes = needs, (query.dtype, key.dtype)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        return (None, *scale_gradients(ctx.saved_tensors, ctx.needs, ctx.dtypes, grad), None)


def sigmoid_loss(columns, query, key, scale, bias, spec: SigmoidSpec):
    """Sigmoid-family scalar loss; see :class:`SigmoidLoss`. A single process goes through the
    custom operator of :mod:`fastcl.ops.library`, the ring through the Function."""
    from .softmax import LocalColumns

    if isinstance(columns, LocalColumns):
        from . import library

        return library.sigmoid_loss(columns.backend_name, query, key, scale, bias, spec)
    return SigmoidLoss.apply(columns, query, key, scale, bias, spec)
