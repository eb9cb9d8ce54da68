"""The sigmoid family's autograd Function (SigLIP), over any backend's ``sigmoid_pass``.

``G_ij = sigmoid(L_ij) - [z_ij = 1]`` needs no global statistic, so when autograd will need
gradients the forward's one pass forms them too (6NMD FLOPs for loss and gradients) and the
backward only scales them by the incoming gradient.
"""

import torch

from .._spec import SigmoidSpec
from ..backends.common import compute_dtype
from .softmax import first_order_only, row_scale, sum_to_scale


class SigmoidLoss(torch.autograd.Function):
    """``(1 / spec.n_rows_norm) * sum_ij softplus(-z_ij L_ij)`` (a 0-dim tensor, compute dtype)
    over ``L = s_i <q_i, k_j> + b``; ``columns`` runs the pass (local, or the ring)."""

    @staticmethod
    def forward(ctx, columns, query, key, scale, bias, spec: SigmoidSpec):
        cd = compute_dtype(query.dtype)
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[1:5]
        s_rows = row_scale(scale, query.shape[0], cd)
        b = None if bias is None else bias.detach().to(cd).reshape(())
        labels = (spec.row_labels, spec.col_labels) if spec.uses_labels else None
        sums = columns.sigmoid(query, key, s_rows, b, spec.positive_index, rows=need_q or need_s, cols=need_k,
                               gsum=need_b, labels=labels)
        inv_n = 1.0 / spec.n_rows_norm
        # gradients of the loss itself, kept for the backward to scale
        dq = sums.acc_q * (s_rows[:, None] * inv_n) if need_q else None
        ds = sum_to_scale((sums.acc_q * query.to(cd)).sum(dim=1) * inv_n, scale) if need_s else None
        dk = sums.acc_k * inv_n if need_k else None
        db = (sums.g_sum * inv_n).to(bias.dtype).reshape(bias.shape) if need_b else None
        ctx.dtypes = (query.dtype, key.dtype)
        ctx.save_for_backward(dq, dk, ds, db)
        return sums.loss * inv_n

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes + (None, None)):
            if g is None:
                grads.append(None)
                continue
            g = g * grad.to(g.dtype)
            grads.append(g if dtype is None else g.to(dtype))
        return (None, *grads, None)


def sigmoid_loss(columns, query, key, scale, bias, spec: SigmoidSpec):
    """Sigmoid-family scalar loss; see :class:`SigmoidLoss`."""
    return SigmoidLoss.apply(columns, query, key, scale, bias, spec)
