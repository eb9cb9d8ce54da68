"""Lowering of the public options to a spec: validated tensors plus a :class:`SoftmaxSpec` or
:class:`SigmoidSpec` (docs/design.md §2). Every public loss is one call of :func:`info_nce`'s
lowering, or a spec built directly from its own few options."""

import numbers
from typing import NamedTuple, Optional, Union

import torch

from . import _checks
from ._spec import SoftmaxSpec
from .backends.common import compute_dtype

Number = Union[float, torch.Tensor]


class DefaultFloat(float):
    """A float default that can be told apart from the same value passed explicitly."""


DEFAULT_TEMPERATURE = DefaultFloat(0.1)


class Lowered(NamedTuple):
    """One softmax-family call, ready for the autograd layer: the columns are ``[key; negatives]``."""

    query: torch.Tensor
    key: torch.Tensor
    negatives: Optional[torch.Tensor]
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    spec: SoftmaxSpec


def as_scale(value: Number, reciprocal: bool, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or [N] scale tensor from a validated float/tensor scale or temperature."""
    if isinstance(value, torch.Tensor):
        return 1.0 / value if reciprocal else value
    value = 1.0 / value if reciprocal else value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def as_bias(value: Optional[Number], like: torch.Tensor) -> Optional[torch.Tensor]:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def scale_of(temperature, scale, n: int, like: torch.Tensor) -> torch.Tensor:
    """``scale`` if given, else ``1 / temperature``; at most one of them set explicitly."""
    if scale is not None and temperature is not DEFAULT_TEMPERATURE:
        raise ValueError("set either temperature or scale, not both")
    if scale is not None:
        return as_scale(_checks.scalar_or_rows("scale", scale, n, like.device, positive=False), False, like)
    return as_scale(_checks.scalar_or_rows("temperature", temperature, n, like.device, positive=True), True, like)


def _debias(value, labels, decoupled: bool) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"debias must be a float tau_plus in [0, 1) or None; got {type(value).__name__}")
    if not 0 <= float(value) < 1:
        raise ValueError(f"debias (tau_plus, the positive class prior) must lie in [0, 1); got {value}")
    if labels is not None:
        raise ValueError("debias needs one positive per row (positive_index or the default), not labels")
    if decoupled:
        raise ValueError("debias replaces the denominator itself; it cannot be combined with decoupled=True")
    return float(value)


def _label_columns(labels, key_labels, negative_labels, n, m, n_neg, device):
    """``(row_labels, col_labels, col_has_label)`` of a labelled call."""
    row_labels = _checks.integer_vector("labels", labels, n, device)
    if key_labels is None:
        if m != n:
            raise ValueError(f"key_labels is required when key has M={m} rows and query has N={n}")
        key_labels = labels
    col_labels = _checks.integer_vector("key_labels", key_labels, m, device)
    col_has_label = None
    if n_neg and negative_labels is not None:
        col_labels = torch.cat([col_labels, _checks.integer_vector("negative_labels", negative_labels, n_neg, device)])
    elif n_neg:
        col_labels = torch.cat([col_labels, torch.zeros(n_neg, dtype=torch.long, device=device)])
        col_has_label = torch.arange(m + n_neg, device=device) < m
    return row_labels, col_labels, col_has_label


def _one_hot_positives(positive_index, n, m, n_neg, exclude_self, symmetric, device) -> torch.Tensor:
    if positive_index is None:
        if m < n:
            raise ValueError(f"default positives (column i for row i) need M >= N; got N={n} query rows and M={m} "
                             "keys. Pass positive_index or labels.")
        if exclude_self:
            raise ValueError("exclude_self removes column i from row i, which is the default positive; pass "
                             "positive_index or labels")
        pos = torch.arange(n, device=device)
    else:
        pos = _checks.integer_vector("positive_index", positive_index, n, device)
        if bool(((pos < 0) | (pos >= m + n_neg)).any()):
            raise ValueError(f"positive_index values must lie in [0, {m + n_neg}) (M={m} keys + K={n_neg} negatives)")
        if exclude_self and bool((pos == torch.arange(n, device=device)).any()):
            raise ValueError("positive_index points a row at its own column, which exclude_self removes")
    if symmetric and (bool((pos >= m).any()) or torch.unique(pos).numel() != n):
        raise ValueError("symmetric needs one-to-one positives: positive_index must be distinct key columns (< M)")
    return pos


def info_nce(query, key, *, temperature, scale, positive_index, labels, key_labels, negatives, negative_labels,
             exclude_self, decoupled, symmetric, debias, bias=None) -> Lowered:
    """Validate :func:`fastcl.info_nce`'s arguments and lower them to a spec."""
    query = _checks.features("query", query)
    key = _checks.features("key", key)
    _checks.same_width("key", key, "query", query)
    _checks.same_kind("key", key, "query", query)
    n, m, device = query.shape[0], key.shape[0], query.device
    s = scale_of(temperature, scale, n, query)

    n_neg, n_grad_cols = 0, None
    if negatives is not None:
        negatives = _checks.features("negatives", negatives)
        _checks.same_width("negatives", negatives, "query", query)
        _checks.same_kind("negatives", negatives, "query", query)
        n_neg = negatives.shape[0]
        if not negatives.requires_grad:
            n_grad_cols = m
    elif negative_labels is not None:
        raise ValueError("negative_labels was given without negatives")
    if exclude_self and m < n:
        raise ValueError(f"exclude_self needs key to hold the N={n} query samples first; key has M={m} rows")
    tau_plus = _debias(debias, labels, decoupled)

    row_labels = col_labels = col_has_label = pos = None
    if labels is not None:
        if positive_index is not None:
            raise ValueError("give either labels or positive_index, not both")
        if symmetric:
            raise ValueError("symmetric needs one-to-one positives (positive_index or the default), not labels")
        row_labels, col_labels, col_has_label = _label_columns(labels, key_labels, negative_labels, n, m, n_neg,
                                                               device)
    else:
        if key_labels is not None or negative_labels is not None:
            raise ValueError("key_labels / negative_labels need labels")
        pos = _one_hot_positives(positive_index, n, m, n_neg, exclude_self, symmetric, device)

    spec = SoftmaxSpec(positive_index=pos, row_labels=row_labels, col_labels=col_labels, col_has_label=col_has_label,
                       exclude_self=exclude_self, decoupled=decoupled or tau_plus is not None, symmetric=symmetric,
                       n_grad_cols=n_grad_cols, debias=tau_plus)
    return Lowered(query, key, negatives, s, bias, spec)
