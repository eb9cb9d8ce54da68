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
