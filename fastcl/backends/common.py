"""Small pieces every backend (and the distributed layer) shares: dtypes, scale bookkeeping, and
the autograd shell of a loss whose gradients are formed in its forward."""

import torch

NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_scale(scale: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-row scale ``s_i`` as a contiguous ``[n]`` vector (a scalar scale broadcast)."""
    return scale.detach().to(dtype).reshape(-1).expand(n).contiguous()


def sum_to_scale(ds_rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d(scale) from the per-row ``ds_i``: summed for a scalar scale, as is for a per-row one."""
    per_row = scale.dim() == 1 and scale.numel() == ds_rows.numel()
    ds = ds_rows if per_row else ds_rows.sum().reshape(scale.shape)
    return ds.to(scale.dtype)


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (an empty denominator) by 0 so ``exp(S - x)`` stays 0 on masked entries."""
    return torch.where(x == NEG_INF, torch.zeros_like(x), x)


def scaled_saved_gradients(ctx, grad_loss):
    """Backward of a scalar loss whose forward saved its input gradients: scale them by the
    incoming gradient (``None`` where an input needs none; ``None`` for the spec)."""
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors) + (None,)


def anchor_losses(spec, lse_row, pos_term, pos_cnt=None, lse_col=None, bias=None):
    """Per-anchor losses from final statistics: ``(row_loss, col_loss, row_valid, col_valid)``, what
    every backend's softmax loss returns.

    ``lse_row [N]``; ``pos_term [N]``: the positive logit (one-hot) or the mean label-positive
    logit; ``pos_cnt [N]``: label-positive counts; ``lse_col [N]``: the column LSE of each row's
    positive column (symmetric losses, else ``None``); ``bias``: the scalar bias when the
    statistics were computed without it -- a softmax ignores it, so it survives only as
    ``b * (1 - pos_weight_i)``. ``spec.pos_weight`` multiplies the positive term. An anchor with
    no positive or an empty denominator has loss 0 and is invalid.
    """
    row_valid = lse_row != NEG_INF
    if spec.uses_labels:
        row_valid &= pos_cnt > 0
    bias_term = 0.0
    if spec.pos_weight is not None:
        pw = spec.pos_weight.to(pos_term.dtype)
        pos_term = pos_term * pw
        if bias is not None:
            bias_term = bias.detach().to(pos_term.dtype) * (1 - pw)
    zeros = torch.zeros_like(lse_row)
    row_loss = torch.where(row_valid, lse_row - pos_term + bias_term, zeros)
    if lse_col is None:
        return row_loss, zeros[:0], row_valid, row_valid[:0]
    col_valid = lse_col != NEG_INF
    return row_loss, torch.where(col_valid, lse_col - pos_term + bias_term, zeros), row_valid, col_valid
