"""What every backend's passes share: their result types and small dtype helpers."""

from typing import NamedTuple, Optional

import torch

NEG_INF = float("-inf")


class SoftmaxStats(NamedTuple):
    """What ``softmax_stats`` returns (``fastcl.backends`` states the contract)."""

    lse_row: torch.Tensor
    lse_col: Optional[torch.Tensor]
    pos_sum: Optional[torch.Tensor]
    pos_cnt: Optional[torch.Tensor]


class DistillStats(NamedTuple):
    """What ``distill_stats`` returns (``fastcl.backends`` states the contract); the column
    fields are ``None`` unless symmetric."""

    lse_row: torch.Tensor
    lse_col: Optional[torch.Tensor]
    t_lse_row: torch.Tensor
    t_lse_col: Optional[torch.Tensor]
    mean_row: torch.Tensor
    mean_col: Optional[torch.Tensor]


class SigmoidSums(NamedTuple):
    """What ``sigmoid_pass`` returns (``fastcl.backends`` states the contract)."""

    loss: torch.Tensor
    g_sum: torch.Tensor
    acc_q: Optional[torch.Tensor]
    acc_k: Optional[torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prefix_sums(x: torch.Tensor, dims) -> torch.Tensor:
    """``[P, len(x)]``: each row of ``x`` summed over its first ``d`` features, for each ``d`` in
    ``dims`` (ascending): one sum per feature segment, then a cumulative sum (Matryoshka prefixes)."""
    bounds = zip((0,) + tuple(dims[:-1]), dims)
    return torch.stack([x[:, lo:hi].sum(dim=1) for lo, hi in bounds]).cumsum(dim=0)


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (an empty line) by 0 so ``exp(S - x)`` stays 0 on its masked entries."""
    return torch.where(x == NEG_INF, torch.zeros_like(x), x)


def no_positives(n: int, device) -> torch.Tensor:
    """A ``positive_index`` that matches no column (-1 in every row), for kernels that need one."""
    return torch.full((n,), -1, dtype=torch.long, device=device)


def float16_gradient_scale(dtype: torch.dtype, *weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For float16 inputs, the largest ``|weight|`` of a softmax ``G`` (a 0-d tensor, 1 if all are
    0), else ``None``. ``G`` is rounded to fp16 for its products; divided by this first, a small
    upstream gradient times a spread-out softmax stays above fp16's subnormal floor (6e-8), and
    the products are multiplied back. Read on the device: no host sync."""
    if dtype != torch.float16:
        return None
    largest = torch.stack([w.detach().abs().max() for w in weights if w is not None and w.numel()]).max()
    return torch.where(largest == 0, torch.ones_like(largest), largest)
