"""info-nce-pytorch (``info_nce``, 0.1.4) on fastcl's fused kernels.

Swap ``from info_nce import InfoNCE, info_nce`` for
``from fastcl.compat.info_nce import InfoNCE, info_nce``.

``info_nce(query [N, D], positive_key [N, D], negative_keys=None, temperature=0.1,
reduction='mean', negative_mode='unpaired')``; all inputs are L2-normalised inside.

=============================================  =============================================
call                                           fastcl
=============================================  =============================================
``negative_keys=None``                         fused: one direction, ``CE(q k^T / t, arange)``
``negative_keys [M, D]``, ``'unpaired'``       fused: ``CE([<q_i,k_i> | q_i negatives^T] / t, 0)``
``negative_keys [N, M, D]``, ``'paired'``      delegated to info-nce-pytorch (see below)
=============================================  =============================================

With explicit negatives the other rows' positive keys are **not** negatives (as in
info-nce-pytorch). The paired mode gives every query its own negatives: the ``[N, M]`` logits
are smaller than the ``[N, M, D]`` input, and no shared-column kernel applies, so it is
delegated to info-nce-pytorch when installed and raises ``NotImplementedError`` otherwise.
``reduction`` is ``'mean'``, ``'sum'`` or ``'none'`` (per-query losses ``[N]``).

Difference: the loss is float32 for float16/bfloat16 inputs.
"""

import torch.nn.functional as TF
from torch import nn

from .. import functional as F
from . import _import_host, _own_positive_shared_negatives

__all__ = ["InfoNCE", "info_nce"]


class InfoNCE(nn.Module):
    """``info_nce.InfoNCE(temperature=0.1, reduction='mean', negative_mode='unpaired')``;
    ``forward(query, positive_key, negative_keys=None)`` calls :func:`info_nce`."""

    def __init__(self, temperature=0.1, reduction="mean", negative_mode="unpaired"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        reduction=self.reduction, negative_mode=self.negative_mode)


def _check(query, positive_key, negative_keys, negative_mode):
    # info-nce-pytorch's checks and messages
    if query.dim() != 2:
        raise ValueError("<query> must have 2 dimensions.")
    if positive_key.dim() != 2:
        raise ValueError("<positive_key> must have 2 dimensions.")
    if negative_keys is not None:
        if negative_mode == "unpaired" and negative_keys.dim() != 2:
            raise ValueError("<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired'.")
        if negative_mode == "paired" and negative_keys.dim() != 3:
            raise ValueError("<negative_keys> must have 3 dimensions if <negative_mode> == 'paired'.")
        if negative_mode not in ("paired", "unpaired"):
            raise ValueError(f"negative_mode must be 'paired' or 'unpaired'; got {negative_mode!r}")
    if len(query) != len(positive_key):
        raise ValueError("<query> and <positive_key> must must have the same number of samples.")
    if negative_keys is not None and negative_mode == "paired" and len(query) != len(negative_keys):
        raise ValueError(
            "If negative_mode == 'paired', then <negative_keys> must have the same number of samples as <query>.")
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError("Vectors of <query> and <positive_key> should have the same number of components.")
    if negative_keys is not None and query.shape[-1] != negative_keys.shape[-1]:
        raise ValueError("Vectors of <query> and <negative_keys> should have the same number of components.")


def info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean", negative_mode="unpaired"):
    """InfoNCE of ``query`` against ``positive_key`` (and ``negative_keys``); see the module doc."""
    _check(query, positive_key, negative_keys, negative_mode)
    if negative_keys is not None and negative_mode == "paired":
        host = _import_host("info_nce", "info_nce(negative_mode='paired')", "info-nce-pytorch")
        return host.info_nce(query, positive_key, negative_keys, temperature=temperature, reduction=reduction,
                             negative_mode=negative_mode)
    query = TF.normalize(query, dim=-1)
    positive_key = TF.normalize(positive_key, dim=-1)
    if negative_keys is None:
        return F.info_nce(query, positive_key, scale=1.0 / temperature, reduction=reduction)
    negative_keys = TF.normalize(negative_keys, dim=-1)
    return _own_positive_shared_negatives(query, positive_key, negative_keys, temperature, reduction)
