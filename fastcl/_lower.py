"""Lowering of the public options to a spec: validated tensors plus a :class:`SoftmaxSpec` or
:class:`SigmoidSpec` (docs/design.md §2). Every public loss is one call of :func:`info_nce`'s
lowering, or a spec built directly from its own few options."""

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch

from . import _checks
from ._spec import SigmoidSpec, SoftmaxSpec
from .backends.common import compute_dtype

Number = Union[float, torch.Tensor]


class DefaultFloat(float):
    """A float default that can be told apart from the same value passed explicitly."""


DEFAULT_TEMPERATURE = DefaultFloat(0.1)
NT_XENT_TEMPERATURE = DefaultFloat(0.5)


class Lowered(NamedTuple):
    """One softmax-family call, ready for the autograd layer: the columns are ``[key; negatives]``."""

    query: torch.Tensor
    key: torch.Tensor
    negatives: Optional[torch.Tensor]
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    spec: SoftmaxSpec


def as_scale(value: Number, reciprocal: bool, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or [N] scale tensor from a validated float/tensor scale or temperature. A
    temperature is inverted in float32 at least (a half-precision 1/t is off by 1e-3)."""
    if isinstance(value, torch.Tensor):
        if not reciprocal:
            return value
        return 1.0 / value.to(torch.promote_types(value.dtype, torch.float32))
    value = 1.0 / value if reciprocal else value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def as_bias(value: Optional[Number], like: torch.Tensor) -> Optional[torch.Tensor]:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=compute_dtype(like.dtype), device=like.device)


def scale_of(temperature, scale, like: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """``scale`` (any sign) if given, else ``1 / temperature`` (> 0); at most one of them set
    explicitly (a default temperature is a :class:`DefaultFloat`). ``n``: per-row values of
    ``n`` rows allowed; ``None``: a scalar only."""
    if scale is not None and not isinstance(temperature, DefaultFloat):
        raise ValueError("set either temperature or scale, not both")
    name, value = ("scale", scale) if scale is not None else ("temperature", temperature)
    positive = scale is None
    if n is None:
        checked = _checks.scalar(name, value, like.device, positive=positive)
    else:
        checked = _checks.scalar_or_rows(name, value, n, like.device, positive=positive)
    return as_scale(checked, positive, like)


def scalar_temperature(temperature, device):
    return _checks.scalar("temperature", temperature, device, positive=True)


def pair_positions(n: int, device: torch.device) -> torch.Tensor:
    """Positive of row i in ``cat([view1, view2])``: i + n for the first view, i - n for the second."""
    first = torch.arange(n, 2 * n, device=device)
    return torch.cat([first, first - n])


def two_towers(names, a, b):
    a = _checks.features(names[0], a)
    b = _checks.features(names[1], b)
    _checks.same_width(names[1], b, names[0], a)
    _checks.same_kind(names[1], b, names[0], a)
    _checks.same_rows(names[1], b, names[0], a)
    return a, b


def towers(image_features, text_features, logit_scale, logit_bias, *, sigmoid: bool, labels=None,
           label_smoothing=0.0, false_negative_margin=None) -> Lowered:
    """CLIP (symmetric softmax, diagonal positives, optionally label-smoothed or with a
    false-negative margin) or SigLIP (sigmoid, diagonal positives, or every equal-label pair
    with ``labels``)."""
    eps = 0.0 if sigmoid else _label_smoothing(label_smoothing, None)
    margin = None if sigmoid else false_negative_margin_value(false_negative_margin, label_smoothing=eps)
    image, text = two_towers(("image_features", "text_features"), image_features, text_features)
    n, device = image.shape[0], image.device
    if sigmoid and logit_bias is None:
        raise ValueError("siglip_loss needs logit_bias (a float or a scalar tensor); SigLIP initialises it to -10")
    s = as_scale(_checks.scalar("logit_scale", logit_scale, device, positive=False), False, image)
    bias = as_bias(_checks.optional_bias("logit_bias", logit_bias, device), image)
    pos = torch.arange(n, device=device)
    if sigmoid and labels is not None:
        labels = _checks.integer_vector("labels", labels, n, device)
        spec = SigmoidSpec(positive_index=None, n_rows_norm=n, row_labels=labels, col_labels=labels)
    elif sigmoid:
        spec = SigmoidSpec(positive_index=pos, n_rows_norm=n)
    else:
        if margin is not None:
            positive_scale(s, "logit_scale")
        spec = SoftmaxSpec(positive_index=pos, symmetric=True, label_smoothing=eps, false_negative_margin=margin)
    return Lowered(image, text, None, s, bias, spec)


def views(z1, z2, temperature, normalize, *, scale=None, decoupled: bool = False, weighted: bool = False) -> Lowered:
    """NT-Xent / DCL: the 2N views ``[z1; z2]`` against themselves, self excluded, positive the
    other view. ``weighted`` marks DCLW's positive weights, filled in once the call's context
    (single process or every rank) is known."""
    z1, z2 = two_towers(("z1", "z2"), z1, z2)
    _checks.flag("normalize", normalize)
    x = torch.cat([z1, z2])
    if normalize:
        # norms in fp32 at least; the kernels then get features in the input dtype again
        x = torch.nn.functional.normalize(x.to(compute_dtype(x.dtype)), dim=1).to(x.dtype)
    s = scale_of(temperature, scale, x)
    spec = SoftmaxSpec(positive_index=pair_positions(x.shape[0] // 2, x.device), exclude_self=True,
                       decoupled=decoupled, pos_weight=x.new_empty(0) if weighted else None)
    return Lowered(x, x, None, s, None, spec)


def supcon(features, labels, temperature, base_temperature, contrast_mode, rank_world=None):
    """``(Lowered, t, base_t)`` of Khosla et al.'s loss; ``labels=None`` makes every sample its own
    class, unique across ranks when ``rank_world = (rank, world)`` is given."""
    features = _checks.features("features", features, rank=3)
    _checks.choice("contrast_mode", contrast_mode, ("all", "one"))
    b, v, _ = features.shape
    device = features.device
    if labels is None:
        labels = torch.arange(b, device=device)
        if rank_world is not None:
            labels = labels * rank_world[1] + rank_world[0]
    labels = _checks.integer_vector("labels", labels, b, device)
    t = scalar_temperature(temperature, device)
    base_t = t if base_temperature is None else _checks.scalar("base_temperature", base_temperature, device, True)
    contrast = features.transpose(0, 1).reshape(b * v, -1)
    contrast_labels = labels.repeat(v)
    anchors, anchor_labels = (contrast, contrast_labels) if contrast_mode == "all" else (features[:, 0], labels)
    spec = SoftmaxSpec(row_labels=anchor_labels, col_labels=contrast_labels, exclude_self=True)
    return Lowered(anchors, contrast, None, as_scale(t, True, features), None, spec), t, base_t


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


def hardness(value, debias, labels=None, decoupled=False):
    """``(debias, hardness)`` validated: ``hardness`` a finite float ``>= 0`` (0 or ``None``:
    none); given without ``debias``, ``debias`` is 0."""
    if value is None:
        return debias, None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"hardness must be a finite float >= 0 or None; got {value!r}")
    if value < 0:
        raise ValueError(f"hardness (beta) must be >= 0; got {value}")
    for name, given in (("labels", labels is not None), ("decoupled", bool(decoupled))):
        if given:
            raise ValueError(f"hardness (a debiased loss) cannot be combined with {name}: it needs one positive per "
                             "row inside its own denominator")
    return (0.0 if debias is None else debias), (float(value) or None)


def _label_smoothing(value, debias) -> float:
    """``label_smoothing`` validated: a float in ``[0, 1)`` (0: none), not with ``debias``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1); got {type(value).__name__}")
    if not 0 <= float(value) < 1:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {value}")
    if value and debias is not None:
        raise ValueError("label_smoothing and debias cannot be combined (the debiased loss has its own denominator)")
    return float(value)


def false_negative_margin_value(value, *, labels=None, decoupled=False, debias=None, label_smoothing=0.0):
    """``false_negative_margin`` validated: ``None``, or a finite float ``m`` (any sign)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"false_negative_margin must be a finite float or None; got {value!r}")
    for name, given in (("labels", labels is not None), ("decoupled", bool(decoupled)),
                        ("debias", debias is not None), ("label_smoothing", bool(label_smoothing))):
        if given:
            why = ("its positives are a set, the margin is measured from one positive" if name == "labels" else
                   "its denominator count would depend on the mask")
            raise ValueError(f"false_negative_margin cannot be combined with {name} ({why})")
    return float(value)


def guide_mask(guide_query, guide_key, guide_negatives, guide_margin, *, query, key, negatives, pos, conflicts):
    """``(guide_rows, guide_cols, fn_row)`` of a GIST call (unit-norm guide embeddings of the rows
    and of ``[key; negatives]`` in the compute dtype, and each row's threshold
    ``cos(gq_i, gk_pos(i)) - margin``), or ``(None, None, None)`` without guides. ``conflicts``:
    ``{option name: given}`` of the options the mask cannot join."""
    if guide_query is None and guide_key is None and guide_negatives is None:
        return None, None, None
    if guide_query is None or guide_key is None:
        raise ValueError("guide_query and guide_key go together (the guide model's embeddings of the rows and keys)")
    if (negatives is None) != (guide_negatives is None):
        raise ValueError("guide_negatives must be given exactly when negatives are (the guide's view of them)")
    for name, given in conflicts.items():
        if given:
            raise ValueError(f"guide_query/guide_key cannot be combined with {name}")
    if isinstance(guide_margin, bool) or not isinstance(guide_margin, numbers.Real) or not math.isfinite(guide_margin):
        raise TypeError(f"guide_margin must be a finite float; got {guide_margin!r}")
    guides = [("guide_query", guide_query, query), ("guide_key", guide_key, key)]
    if negatives is not None:
        guides.append(("guide_negatives", guide_negatives, negatives))
    for name, g, ref in guides:
        _checks.features(name, g)
        _checks.same_rows(name, g, name.replace("guide_", ""), ref)
        _checks.same_width(name, g, "guide_query", guide_query)
        if g.device != query.device:
            raise ValueError(f"{name} is on {g.device} but query is on {query.device}; put them on one device")
    cd = compute_dtype(query.dtype)
    rows = torch.nn.functional.normalize(guide_query.detach().to(cd), dim=1)
    cols = torch.cat([g.detach().to(cd) for _, g, _ in guides[1:]])
    cols = torch.nn.functional.normalize(cols, dim=1)
    return rows, cols, (rows * cols[pos]).sum(dim=1) - float(guide_margin)


def positive_scale(scale: torch.Tensor, name: str) -> None:
    """The false-negative mask compares logits ``s_i <q_i, k_j>``: it needs ``s_i > 0``."""
    if _checks.values_readable(scale.device) and bool((scale.detach() <= 0).any()):
        raise ValueError(f"false_negative_margin needs a positive {name} (it compares scaled similarities)")


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
        if not _checks.values_readable(device):
            return pos
        if bool(((pos < 0) | (pos >= m + n_neg)).any()):
            raise ValueError(f"positive_index values must lie in [0, {m + n_neg}) (M={m} keys + K={n_neg} negatives)")
        if exclude_self and bool((pos == torch.arange(n, device=device)).any()):
            raise ValueError("positive_index points a row at its own column, which exclude_self removes")
    if symmetric and _checks.values_readable(device) and (bool((pos >= m).any()) or torch.unique(pos).numel() != n):
        raise ValueError("symmetric needs one-to-one positives: positive_index must be distinct key columns (< M)")
    return pos


def info_nce(query, key, *, temperature, scale, positive_index, labels, key_labels, negatives, negative_labels,
             exclude_self, decoupled, symmetric, debias, label_smoothing=0.0, false_negative_margin=None,
             hardness=None, guide_query=None, guide_key=None, guide_negatives=None, guide_margin=0.0) -> Lowered:
    """Validate :func:`fastcl.info_nce`'s arguments and lower them to a spec."""
    query = _checks.features("query", query)
    key = _checks.features("key", key)
    _checks.same_width("key", key, "query", query)
    _checks.same_kind("key", key, "query", query)
    for name, value in (("exclude_self", exclude_self), ("decoupled", decoupled), ("symmetric", symmetric)):
        _checks.flag(name, value)
    n, m, device = query.shape[0], key.shape[0], query.device
    s = scale_of(temperature, scale, query, n)

    n_neg, n_grad_cols = 0, None
    if isinstance(negatives, torch.Tensor) and negatives.dim() == 2 and negatives.shape[0] == 0:
        # an empty queue (MoCo's warm-up) is no queue
        _checks.same_width("negatives", negatives, "query", query)
        if negative_labels is not None and negative_labels.numel() != 0:
            raise ValueError(f"negative_labels has {negative_labels.numel()} entries for an empty negatives")
        negatives = negative_labels = None
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
    eps = _label_smoothing(label_smoothing, debias)
    margin = false_negative_margin_value(false_negative_margin, labels=labels, decoupled=decoupled, debias=tau_plus,
                                         label_smoothing=eps)

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

    if margin is not None:
        positive_scale(s, "scale" if scale is not None else "temperature")
        if symmetric and s.dim() == 1:
            raise ValueError("false_negative_margin with symmetric=True needs a scalar temperature/scale (a "
                             "column's rows would compare similarities at different scales)")
    guide_rows, guide_cols, fn_row = guide_mask(
        guide_query, guide_key, guide_negatives, guide_margin, query=query, key=key, negatives=negatives, pos=pos,
        conflicts={"labels": labels is not None, "decoupled": bool(decoupled), "debias": tau_plus is not None,
                   "label_smoothing": bool(eps), "symmetric": bool(symmetric),
                   "false_negative_margin": margin is not None})
    spec = SoftmaxSpec(positive_index=pos, row_labels=row_labels, col_labels=col_labels, col_has_label=col_has_label,
                       exclude_self=exclude_self, decoupled=decoupled or tau_plus is not None, symmetric=symmetric,
                       n_grad_cols=n_grad_cols, debias=tau_plus, label_smoothing=eps, hardness=hardness,
                       false_negative_margin=margin, fn_row=fn_row, guide_rows=guide_rows, guide_cols=guide_cols)
    return Lowered(query, key, negatives, s, None, spec)
