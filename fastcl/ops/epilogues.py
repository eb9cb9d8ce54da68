"""Per-anchor losses of the softmax family from final statistics: the one place a variant's math
lives (docs/design.md §2, §4).

An epilogue maps O(N) statistics of each anchor to its loss in plain, differentiable PyTorch. The
forward calls it without gradients; the backward calls it again under autograd and reads off the
derivatives the tile gradient needs (:mod:`fastcl.ops.softmax`):

* ``d loss / d lse`` is the weight ``w`` of the softmax term ``w * exp(S_ij - lse)``;
* ``d loss / d pos`` is the (negated) weight of the target term on the positive entries;
* derivatives with respect to ``scale`` and ``bias`` that do not pass through the logits.

So a new per-anchor variant is one function here plus its lowering; no kernel changes.
"""

from typing import NamedTuple, Optional

import torch

from .._spec import SoftmaxSpec


class Anchors(NamedTuple):
    """Statistics of one direction's anchors (rows, or the columns of a symmetric loss).

    ``lse``: LSE over the denominator the passes used (bias excluded); ``pos``: the positive
    term, the one-hot positive logit or the mean label-positive logit (bias excluded);
    ``n_den``: how many columns that denominator has; ``log_floor`` (debiased losses):
    ``log sum_{j in Neg} exp(-s_ij)``, the smallest the negatives' sum can be for unit vectors,
    a function of the scale (so its scale gradient flows from here); ``n_pos`` (label
    smoothing): how many positives ``pos`` is the mean of; ``logit_sum`` (label smoothing): the
    sum of the anchor's logits over its columns, the excluded self column left out (bias
    excluded), from :func:`fastcl.ops.smoothing.logit_sums`. With hardness ``beta`` (debiased
    losses), ``lse`` is the LSE of ``(1 + beta) L`` over the negatives and ``lse_tilt`` that of
    ``beta L``.
    """

    lse: torch.Tensor
    pos: torch.Tensor
    n_den: torch.Tensor
    log_floor: Optional[torch.Tensor] = None
    n_pos: Optional[torch.Tensor] = None
    logit_sum: Optional[torch.Tensor] = None
    lse_tilt: Optional[torch.Tensor] = None


def valid(spec: SoftmaxSpec, a: Anchors, has_positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Anchors that count: a positive and a non-empty denominator. Decided from the masks (counts),
    never from ``lse == -inf``, so non-finite features give a non-finite loss."""
    if spec.debias is not None:  # the positive is in the denominator: never empty
        ok = torch.ones_like(a.n_den, dtype=torch.bool)
    else:
        ok = a.n_den > 0
    if has_positive is not None:
        ok = ok & has_positive
    return ok


def anchor_loss(spec: SoftmaxSpec, a: Anchors, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss of each anchor (no masking: :mod:`fastcl.ops.softmax` zeroes invalid anchors)."""
    if spec.debias is not None:
        return _debiased(a, spec.debias)
    if spec.label_smoothing:
        return _smoothed(a, spec.label_smoothing, spec.decoupled)
    return _plain(a, spec.pos_weight, bias)


def _plain(a: Anchors, pos_weight, bias) -> torch.Tensor:
    """``-w * (pos + b) + (lse + b)``: InfoNCE, SupCon, DCL(W). A scalar bias cancels unless the
    positive carries a weight ``w != 1`` (DCLW)."""
    if pos_weight is None:
        return a.lse - a.pos
    w = pos_weight.to(a.pos.dtype)
    loss = a.lse - w * a.pos
    if bias is not None:
        loss = loss + bias * (1 - w)
    return loss


def _smoothed(a: Anchors, eps: float, decoupled: bool) -> torch.Tensor:
    """``F.cross_entropy(label_smoothing=eps)`` over the denominator ``D``:
    ``lse - (1 - eps) pos - eps m`` with ``m`` the mean logit over ``D``. ``logit_sum`` covers
    every column but self; a decoupled ``D`` also leaves out the ``n_pos`` positives, whose sum
    is ``n_pos * pos``. The bias cancels (softmax is shift-invariant)."""
    den_sum = a.logit_sum - a.n_pos * a.pos if decoupled else a.logit_sum
    return a.lse - (1 - eps) * a.pos - eps * den_sum / a.n_den.clamp(min=1)


def _debiased(a: Anchors, tau_plus: float) -> torch.Tensor:
    """Chuang et al. (2020): ``-p + log(e^p + Ng)`` with
    ``Ng = max((sum_neg e^L - Q tau+ e^p) / (1 - tau+), sum_neg e^(-s))``, ``Q = n_den`` negatives;
    with hardness, ``sum_neg e^L`` becomes ``Q sum_neg e^{(1+b)L} / sum_neg e^{bL}``.

    Evaluated relative to ``m = max(lse, p, log_floor)`` (no overflow at logit scale 100); ``m``
    is detached because the value does not depend on it. The bias cancels.
    """
    lse = a.lse
    if a.lse_tilt is not None:
        # hardness (Robinson et al. 2021): the negatives' sum is Q sum e^{(1+b)L} / sum e^{bL}
        lse = torch.where(a.n_den > 0, torch.log(a.n_den) + a.lse - a.lse_tilt, a.lse)
    m = torch.maximum(torch.maximum(lse, a.pos), a.log_floor).detach()
    e_pos = torch.exp(a.pos - m)
    neg = torch.exp(lse - m)
    floor = torch.exp(a.log_floor - m)
    ng = torch.maximum((neg - a.n_den * tau_plus * e_pos) / (1 - tau_plus), floor)
    return m - a.pos + torch.log(e_pos + ng)
