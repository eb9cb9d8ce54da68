"""lightly's contrastive losses (``lightly.loss``, lightly 1.6.0) on fastcl's fused kernels.

Swap ``from lightly.loss import NTXentLoss, DCLLoss, DCLWLoss`` for
``from fastcl.compat.lightly import NTXentLoss, DCLLoss, DCLWLoss``.

All three take ``forward(out0 [B, D], out1 [B, D])`` (two views of B samples) and L2-normalise
both inside the loss.

=================================  ======================================================
lightly                            fastcl
=================================  ======================================================
NTXentLoss, no memory bank         fused: :func:`fastcl.nt_xent`
NTXentLoss, ``memory_bank_size``   fused: one direction against the bank (see the class)
DCLLoss / DCLWLoss                 fused: :func:`fastcl.dcl` (``weight_sigma`` for DCLW)
DCLLoss(weight_fn=callable)        fused DCL plus an O(B) correction for the weights
``gather_distributed=True``        fastcl ``group=`` (default group), local anchors
=================================  ======================================================

With ``gather_distributed=True`` and several processes, each rank's anchors are contrasted with
every rank's views (lightly's ``GatherLayer``, exact gradient) and each rank reports the mean
over its own anchors: fastcl's ``group=..., local_loss=True``. In MoCo mode the loss stays local
and the keys of every rank are enqueued (gathered without gradient), as lightly. DCLW's weights
are computed over the local batch, as lightly (``fastcl.dcl(weight_sigma=...)`` would take them
over the global batch), so they enter as an O(B) correction to the gathered unweighted loss.

Differences from lightly: the loss is float32 for float16/bfloat16 inputs, and normalisation
is computed in float32 for them; the memory bank is read in the queries' dtype (lightly's
einsum needs the bank and the features in one dtype, so it fails on float64 features unless
the module was converted with ``.double()``).
"""

from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from . import _own_positive_shared_negatives, _process_group, _row_dots, _world_size

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "MemoryBankModule", "negative_mises_fisher_weights"]


def _check_gather(gather_distributed: bool):
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. "
            "Please set gather_distributed=False or install a torch version with distributed support."
        )


def _gathered(option: str, gather_distributed: bool) -> dict:
    """fastcl's distributed keyword arguments for lightly's ``gather_distributed`` (none in one process)."""
    if gather_distributed and _world_size() > 1:
        return {"group": _process_group(), "local_loss": True}
    return {}


@torch.no_grad()
def _concat_all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order, without gradient (lightly's ``concat_all_gather``)."""
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class MemoryBankModule(nn.Module):
    """lightly's ``MemoryBankModule``: a ring buffer of past keys used as negatives.

    ``size`` is ``0`` (no bank) or a ``(num_features, dim)`` tuple; a bare int > 0 raises
    ``ValueError`` as in lightly 1.6. The bank starts as random unit vectors (``torch.randn``,
    then normalised) in non-persistent float32 buffers ``bank [K, D]`` and ``bank_ptr [1]``.

    ``forward(output, labels=None, update=False)`` returns ``(output, bank)``: a detached copy of
    the bank read **before** ``output`` is enqueued (``[D, K]`` when ``feature_dim_first``, else
    ``[K, D]``), or ``(output, None)`` without a bank. Quirk kept: an enqueue that reaches the
    end of the bank writes only the rows that fit and resets the pointer to 0; the rest of that
    batch is dropped.
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank."
            )
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(
                f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' to disable "
                "the memory bank."
            )
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size=size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            self._init_memory_bank(size_tuple)

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        self.bank = nn.functional.normalize(torch.randn(size).type_as(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and _world_size() > 1:
            batch = _concat_all_gather(batch)
        batch_size = batch.shape[0]
        ptr = int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size

    def forward(self, output: Tensor, labels: Optional[Tensor] = None, update: bool = False):
        if self.size[0] == 0:
            return output, None
        bank = self.bank.clone().detach()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank


class NTXentLoss(nn.Module):
    """``lightly.loss.NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``.

    Without a bank (SimCLR): the 2B rows of ``[out0; out1]`` (normalised) are the anchors, each
    against the other 2B - 1 rows, its positive being its other view; cross-entropy averaged over
    the 2B anchors (:func:`fastcl.nt_xent`).

    With ``memory_bank_size=(K, D)`` (MoCo): **one direction**, ``out0`` the queries and ``out1``
    the keys: ``CE([<q_i, k_i> | q_i . bank^T] / t, 0)`` averaged over the B queries; the other
    keys of the batch are not negatives. Kept from lightly: the bank is read before ``out1``
    (normalised, detached) is enqueued, and ``out1`` is enqueued only when ``out0`` requires a
    gradient (so evaluation leaves the bank unchanged). fastcl computes the bank term with one
    fused call (see ``fastcl.compat._own_positive_shared_negatives``): no ``[B, K]`` logits.

    Raises ``ValueError`` for ``abs(temperature) < 1e-8``, as lightly.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = MemoryBankModule(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        _check_gather(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank.size[0] == 0:
            # scale=1/t: lightly takes any temperature with |t| >= 1e-8, negative ones included
            return F.nt_xent(out0, out1, scale=1.0 / self.temperature,
                             **_gathered("NTXentLoss", self.gather_distributed))
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        out1, bank = self.memory_bank(out1, update=out0.requires_grad)
        negatives = bank.transpose(0, -1) if self.memory_bank.feature_dim_first else bank
        negatives = negatives.to(device=out0.device, dtype=out0.dtype)
        return _own_positive_shared_negatives(out0, out1, negatives, self.temperature)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights ``2 - B * softmax(<out0_i, out1_i> / sigma)`` on detached inputs (lightly's)."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * nn.functional.softmax(similarity, dim=0)


def _vmf_sigma(weight_fn) -> Optional[float]:
    """sigma if ``weight_fn`` is DCLW's von Mises-Fisher weighting (fastcl's or lightly's)."""
    if isinstance(weight_fn, partial) and not weight_fn.args and set(weight_fn.keywords) <= {"sigma"}:
        func = weight_fn.func
        if func is negative_mises_fisher_weights or (
                getattr(func, "__name__", "") == "negative_mises_fisher_weights"
                and getattr(func, "__module__", "").startswith("lightly.")):
            return weight_fn.keywords.get("sigma", 0.5)
    return None


class DCLLoss(nn.Module):
    """``lightly.loss.DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``.

    Decoupled contrastive loss: for the anchors of ``out0`` (then ``out1``), the positive is the
    other view and it is left out of the denominator::

        loss0_i = -w_i <z0_i, z1_i>/t + log sum_{j != i} (e^{<z0_i, z0_j>/t} + e^{<z0_i, z1_j>/t})

    averaged over i, and the result is ``(mean loss0 + mean loss1) / 2``. ``weight_fn(out0,
    out1) -> [B]`` gets the normalised views (``weight_fn(out1, out0)`` for the second
    direction); gradients flow through its output, as in lightly.

    Fused: :func:`fastcl.dcl`. A callable ``weight_fn`` other than DCLW's adds the O(B) term
    ``mean_i (1 - w_i) <z0_i, z1_i> / t`` per direction to the unweighted fused loss.
    """

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_gather(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        gathered = _gathered(type(self).__name__, self.gather_distributed)
        if not self.weight_fn:
            return F.dcl(out0, out1, scale=1.0 / self.temperature, **gathered)
        sigma = _vmf_sigma(self.weight_fn)
        if sigma is not None and not gathered:
            return F.dcl(out0, out1, scale=1.0 / self.temperature, weight_sigma=sigma)
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        loss = F.dcl(out0, out1, scale=1.0 / self.temperature, normalize=False, **gathered)
        positive = _row_dots(out0, out1) / self.temperature
        w0 = self.weight_fn(out0, out1)
        w1 = self.weight_fn(out1, out0)
        return loss + 0.5 * ((1 - w0) * positive).mean() + 0.5 * ((1 - w1) * positive).mean()


class DCLWLoss(DCLLoss):
    """``lightly.loss.DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``: DCL with the
    von Mises-Fisher weights ``w = 2 - B * softmax(<z0_i, z1_i> / sigma)`` (no gradient through
    them). As lightly, the class stores ``weight_fn = partial(negative_mises_fisher_weights,
    sigma=sigma)`` and no ``sigma`` attribute. Fused: ``fastcl.dcl(..., weight_sigma=sigma)``.
    """

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature=temperature, weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed=gather_distributed)
