"""Drop-in replacements for the contrastive losses of other libraries.

One module per host library. Each class keeps the host's name, constructor arguments and
defaults, forward signature, return type and reported value, so that changing one import line
switches a training script to fastcl::

    fastcl.compat.open_clip                ClipLoss, SigLipLoss, CoCaLoss, DistillClipLoss
    fastcl.compat.pytorch_metric_learning  NTXentLoss, SupConLoss, SelfSupervisedLoss, CrossBatchMemory
    fastcl.compat.lightly                  NTXentLoss, DCLLoss, DCLWLoss, MemoryBankModule
    fastcl.compat.sentence_transformers    MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss,
                                           MatryoshkaLoss
    fastcl.compat.info_nce                 InfoNCE, info_nce

The loss math is :mod:`fastcl.functional`'s; this layer only maps each host's conventions onto
it. Where a host behaviour is not one fastcl call, it is composed from fastcl calls plus O(N)
or O(#positive pairs) terms (each module says how). Options that fastcl does not fuse are
delegated to the host library when it is installed, and raise ``NotImplementedError`` naming the
option when it is not. Host libraries are imported lazily, only to delegate.

Several processes (``world_size > 1``, ``gather_distributed``, ``gather_across_devices`` under
an initialised process group) go through fastcl's ``group=`` argument on the default process
group, reproducing each host's per-rank loss value and gradients (each module says how).
"""

import importlib
from typing import Optional

import torch

from .. import functional as F

__all__ = []


def _import_host(module: str, option: str, pip_name: str):
    """Import the host module ``module`` to delegate ``option`` to it, or say why we cannot."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotImplementedError(
            f"{option} is not fused by fastcl; it is delegated to {module.split('.')[0]}, which could not be "
            f"imported ({exc}). Install it (pip install {pip_name}) or drop the option."
        ) from exc


def _world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _process_group():
    """The default process group, for fastcl's ``group=``."""
    return torch.distributed.group.WORLD


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, width: int):
    """Row ranges of at most ~2**20 elements of width ``width``."""
    size = max(1, (1 << 20) // max(1, width))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class _PairDots(torch.autograd.Function):
    """``out[t] = <x[a[t]], y[b[t]]>`` for a list of index pairs, in chunks.

    Plain indexing would keep two ``[P, D]`` gathered copies alive for backward; this keeps only
    the inputs and the indices, so memory is O(P) beyond them whatever ``D`` is.
    """

    @staticmethod
    def forward(ctx, x, y, a, b):
        ctx.save_for_backward(x, y, a, b)
        cd = _compute_dtype(x.dtype)
        out = torch.empty(a.numel(), dtype=cd, device=x.device)
        for s, e in _chunk_rows(a.numel(), x.shape[1]):
            out[s:e] = (x[a[s:e]].to(cd) * y[b[s:e]].to(cd)).sum(1)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, a, b = ctx.saved_tensors
        cd = grad.dtype
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros(x.shape, dtype=cd, device=x.device)
        if ctx.needs_input_grad[1]:
            gy = torch.zeros(y.shape, dtype=cd, device=y.device)
        for s, e in _chunk_rows(a.numel(), x.shape[1]):
            g = grad[s:e, None]
            if gx is not None:
                gx.index_add_(0, a[s:e], g * y[b[s:e]].to(cd))
            if gy is not None:
                gy.index_add_(0, b[s:e], g * x[a[s:e]].to(cd))
        return (None if gx is None else gx.to(x.dtype)), (None if gy is None else gy.to(y.dtype)), None, None


def _pair_dots(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _PairDots.apply(x, y, a, b)


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<x_i, y_i>`` per row, in the loss dtype."""
    cd = _compute_dtype(x.dtype)
    return (x.to(cd) * y.to(cd)).sum(1)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` without torch's linear cut-off above x = 20 (an error of ~e^-20 there)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def _own_positive_shared_negatives(query, positive, negatives, temperature, reduction: str = "mean",
                                   backend: Optional[str] = None):
    """CE over ``[<q_i, k_i> | q_i . negatives^T] / temperature`` with target 0 (MoCo's queue loss).

    Each row sees its own positive and the ``K`` shared negatives, not the other rows' positives.
    One fused call gives the log-sum-exp over the negatives: ``info_nce(query, negatives,
    positive_index=0)`` returns ``LSE_neg(i) - L_i0`` per row, and adding back the O(N) logit
    ``L_i0`` leaves ``LSE_neg(i)``. Then ``loss_i = softplus(LSE_neg(i) - L_ii)``. The cancellation
    costs about one rounding of ``|L_i0| <= 1/temperature`` (unit-norm inputs).
    """
    n = query.shape[0]
    l_pos = _row_dots(query, positive) / temperature
    if negatives.shape[0] == 0:
        return _reduce(l_pos * 0, reduction)
    first = torch.zeros(n, dtype=torch.long, device=query.device)
    to_first = F.info_nce(query, negatives, scale=1.0 / temperature, positive_index=first, reduction="none",
                          backend=backend)
    lse_neg = to_first + _row_dots(query, negatives[:1].expand_as(query)) / temperature
    return _reduce(_softplus(lse_neg - l_pos), reduction)
