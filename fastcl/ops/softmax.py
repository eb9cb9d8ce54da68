"""The softmax family's autograd Function, over any backend's passes (docs/design.md §2-§3).

Forward: the statistics pass gives each anchor's LSE (and label-positive sums); the one-hot
positive logits are one row-wise dot product; :mod:`.epilogues` turns them into per-anchor
losses. Backward: the same epilogue under autograd gives, per anchor, the weight of the softmax
term and of the target term of the tile gradient ``G``; one gradient pass turns those into
``sum_j G_ij k_j`` and ``sum_i G_ij s_i q_i``, and this module forms

    dQ_i = s_i sum_j G_ij k_j      dK_j = sum_i G_ij s_i q_i
    ds_i = <q_i, sum_j G_ij k_j> (+ the epilogue's direct term)      db = the epilogue's term

once, for every backend and for the ring (:class:`SoftmaxLoss`, over :func:`forward` and
:func:`backward`).

A single process takes the other road to the same numbers: :func:`differentiable_losses` runs
the statistics pass as the custom operator of :mod:`fastcl.ops.library`, whose registered
backward is the gradient pass with exactly these weights, and lets ordinary autograd
differentiate the epilogue (what ``torch.compile`` traces).
"""

from dataclasses import replace
from typing import NamedTuple, Optional

import torch

from .._spec import SoftmaxSpec
from ..backends.common import compute_dtype, finite_or_zero
from . import epilogues, smoothing
from .epilogues import Anchors


def refuse_double_backward() -> None:
    """One clear error under ``create_graph=True``: the tile gradients are computed without a
    graph, so a second-order gradient would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastcl losses do not support double backward (create_graph=True, higher-order "
                           "gradients); compute the gradient penalty with a materialised loss")


def first_order_only(backward):
    """Backward of a fused loss, behind :func:`refuse_double_backward`."""

    def wrapped(ctx, *grads):
        refuse_double_backward()
        return backward(ctx, *grads)

    wrapped.__doc__ = backward.__doc__
    return wrapped


def row_scale(scale: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-row scale ``s_i`` as a contiguous ``[n]`` vector (a scalar scale broadcast)."""
    return scale.detach().to(dtype).reshape(-1).expand(n).contiguous()


def sum_to_scale(ds_rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d(scale) from the per-row ``ds_i``: summed for a scalar scale, as is for a per-row one."""
    per_row = scale.dim() == 1 and scale.numel() == ds_rows.numel()
    ds = ds_rows if per_row else ds_rows.sum().reshape(scale.shape)
    return ds.to(scale.dtype)


class LocalColumns:
    """A single-process loss: the columns ``[key; negatives]`` are one block, each pass one call.

    The ring of :mod:`fastcl.distributed` has the same methods over one block per rank.
    ``n_cols``/``n_rows`` are what every row / column sees (for denominator counts).
    """

    def __init__(self, backend, n_rows: int, n_cols: int):
        self.backend, self.n_rows, self.n_cols = backend, n_rows, n_cols

    @property
    def backend_name(self) -> str:
        """The backend as the custom operators take it: a module's short name, or ``""`` (the
        usual choice, made inside the operator: what a compiled graph holds)."""
        if isinstance(self.backend, str):
            return self.backend
        return self.backend.__name__.rsplit(".", 1)[-1]

    @staticmethod
    def _cat(key, negatives):
        return key if negatives is None else torch.cat([key, negatives])

    @staticmethod
    def _block_spec(spec: SoftmaxSpec, negatives) -> SoftmaxSpec:
        return with_negatives(spec, 0 if negatives is None else negatives.shape[0])

    def stats(self, query, key, negatives, s_rows, spec: SoftmaxSpec):
        st = self.backend.softmax_stats(query, self._cat(key, negatives), s_rows, self._block_spec(spec, negatives))
        return st._replace(lse_col=None if st.lse_col is None else st.lse_col[: key.shape[0]])

    def grad(self, query, key, negatives, s_rows, spec: SoftmaxSpec, lse_row, w_row, coef, lse_col, w_col, *,
             rows: bool, keys: bool, negs: bool):
        """``(acc_q, acc_key, acc_negatives)``; column statistics are given for the keys only."""
        m = key.shape[0]
        if lse_col is not None and negatives is not None:
            pad = lse_col.new_zeros(negatives.shape[0])
            lse_col, w_col = torch.cat([lse_col, pad]), torch.cat([w_col, pad])
        acc_q, acc_k = self.backend.softmax_grad(query, self._cat(key, negatives), s_rows,
                                                 self._block_spec(spec, negatives), lse_row, w_row, coef, lse_col,
                                                 w_col, rows=rows, cols=keys or negs)
        if acc_k is None:
            return acc_q, None, None
        return acc_q, acc_k[:m], acc_k[m:]

    @staticmethod
    def reduce(x):
        """Sums of the rows' (and keys') vectors are already global: the identity."""
        return x

    def sigmoid(self, query, key, s_rows, bias, positive_index, *, rows, cols, gsum, labels=None):
        """The sigmoid pass over the one block."""
        return self.backend.sigmoid_pass(query, key, s_rows, bias, positive_index, rows=rows, cols=cols, gsum=gsum,
                                         labels=labels)


def _positive_logits(query, key, negatives, s_rows, positive_index):
    """``s_i <q_i, col_pos(i)>`` over the columns ``[key; negatives]`` (no copy of the columns)."""
    cd = s_rows.dtype
    m = key.shape[0]
    cols = key[positive_index.clamp(max=m - 1)].to(cd)
    if negatives is not None:
        in_negs = positive_index >= m
        cols = torch.where(in_negs[:, None], negatives[(positive_index - m).clamp(min=0)].to(cd), cols)
    return s_rows * (query.to(cd) * cols).sum(dim=1)


def with_negatives(spec: SoftmaxSpec, n_neg: int) -> SoftmaxSpec:
    """``spec`` over ``[key; negatives]`` (``n_neg`` of them): the column thresholds, given for
    the keys, padded with ``+inf`` over the negatives (no anchor there: never masked)."""
    if spec.fn_col is None or not n_neg:
        return spec
    return replace(spec, fn_col=torch.cat([spec.fn_col, spec.fn_col.new_full((n_neg,), float("inf"))]))


def false_negative_thresholds(spec: SoftmaxSpec, pos, s_rows, n_keys: int) -> SoftmaxSpec:
    """``spec`` with the false-negative mask's logit thresholds filled in (unchanged without a
    margin): ``fn_row = p_i + s_i m`` for every row, and for a symmetric loss the same value on
    each row's positive column (``+inf`` elsewhere: no anchor). ``S_ij > p_i + s_i m`` is
    ``<q_i, k_j> > <q_i, k_pos(i)> + m`` for the positive scales the public layer requires."""
    if spec.false_negative_margin is None:
        return spec
    fn_row = (pos + s_rows * spec.false_negative_margin).detach()
    fn_col = None
    if spec.symmetric:
        fn_col = torch.full((n_keys,), float("inf"), dtype=fn_row.dtype, device=fn_row.device)
        fn_col[spec.positive_index] = fn_row
    return replace(spec, fn_row=fn_row, fn_col=fn_col)


def _row_counts(spec: SoftmaxSpec, n_cols: int, pos_cnt) -> torch.Tensor:
    """Columns in each row's pass denominator: all, minus self, minus positives if decoupled."""
    count = torch.full_like(pos_cnt, float(n_cols))
    if spec.exclude_self:
        count -= 1
    if spec.decoupled:
        count -= pos_cnt
    return count


def _column_log_floor(s_rows, spec: SoftmaxSpec, n_den_col, per_row: bool):
    """``log sum_{i in Neg'_j} exp(-s_i)`` for the positive column of every row (debiased,
    symmetric): every row but the column's positive row and, with ``exclude_self``, its own.
    A per-row scale needs every row here: a single-process loss (the public layer checks)."""
    if not per_row:
        return torch.log(n_den_col) - s_rows
    neg = -s_rows
    top = neg.max().detach()
    e = torch.exp(neg - top)
    f = e.sum() - e
    if spec.exclude_self:
        j = spec.positive_index
        n = s_rows.shape[0]
        f = f - torch.where(j < n, e[j.clamp(max=n - 1)], torch.zeros_like(e))
    return top + torch.log(f.clamp(min=0))


class _Terms:
    """Per-anchor statistics of one call, as the epilogue sees them (see :func:`_losses`);
    ``sum_row``/``sum_col``: the label-smoothing logit sums, ``tilt_row``/``tilt_col``: the
    hardness-tilted LSEs (each ``None`` when the spec has no such term)."""

    def __init__(self, lse_row, pos, pos_cnt, lse_col, row_den, col_den, has_pos, per_row, sum_row=None,
                 sum_col=None, tilt_row=None, tilt_col=None):
        self.lse_row, self.pos, self.pos_cnt, self.lse_col = lse_row, pos, pos_cnt, lse_col
        self.row_den, self.col_den, self.has_pos, self.per_row = row_den, col_den, has_pos, per_row
        self.sum_row, self.sum_col = sum_row, sum_col
        self.tilt_row, self.tilt_col = tilt_row, tilt_col


def _losses(spec: SoftmaxSpec, t: _Terms, s_rows, bias):
    """``(row_loss, col_loss, row_valid, col_valid)`` from the terms; differentiable in
    ``t.lse_row``, ``t.pos``, ``t.lse_col``, the logit sums, the tilted LSEs, ``s_rows`` and ``bias``."""
    debias = spec.debias is not None
    rows = Anchors(t.lse_row, t.pos, t.row_den, torch.log(t.row_den) - s_rows if debias else None, t.pos_cnt,
                   t.sum_row, t.tilt_row)
    row_valid = epilogues.valid(spec, rows, t.has_pos)
    row_loss = _masked(epilogues.anchor_loss(spec, _safe(rows, row_valid), bias), row_valid)
    if t.lse_col is None:
        empty = row_loss[:0]
        return row_loss, empty, row_valid, row_valid[:0]
    col_floor = _column_log_floor(s_rows, spec, t.col_den, t.per_row) if debias else None
    cols = Anchors(t.lse_col, t.pos, t.col_den, col_floor, torch.ones_like(t.pos), t.sum_col, t.tilt_col)
    col_valid = epilogues.valid(spec, cols)
    col_loss = _masked(epilogues.anchor_loss(spec, _safe(cols, col_valid), bias), col_valid)
    return row_loss, col_loss, row_valid, col_valid


def _safe(a: Anchors, ok) -> Anchors:
    """Finite stand-ins on invalid anchors, so their (discarded) loss has no NaN gradient."""
    zero = torch.zeros_like(a.lse)

    def keep(x):
        return None if x is None else torch.where(ok, x, zero)

    return Anchors(keep(a.lse), keep(a.pos), a.n_den, keep(a.log_floor), a.n_pos, keep(a.logit_sum),
                   keep(a.lse_tilt))


def _tilted_scales(spec: SoftmaxSpec, s_rows):
    """``(scale of the main statistics, scale of the tilted ones or None)``: with hardness
    ``beta`` the passes run twice, at ``(1 + beta) s`` and at ``beta s`` (docs/design.md §4)."""
    if spec.hardness is None:
        return s_rows, None
    return s_rows * (1 + spec.hardness), s_rows * spec.hardness


def _masked(loss, ok):
    return torch.where(ok, loss, torch.zeros_like(loss))


class Saved(NamedTuple):
    """What a backward needs from its forward besides the inputs: the final statistics (``None``
    where the spec has no such term). ``lse_col_keys``/``tilt_col_keys`` cover every key."""

    lse_row: torch.Tensor
    pos: torch.Tensor
    pos_cnt: torch.Tensor
    lse_col_keys: Optional[torch.Tensor]
    tilt_row: Optional[torch.Tensor]
    tilt_col_keys: Optional[torch.Tensor]


def _terms(columns, spec: SoftmaxSpec, saved: Saved, n: int, per_row: bool, sum_row, sum_col) -> _Terms:
    """The epilogue's view of ``saved`` (``spec`` with its false-negative thresholds, if any)."""
    cd = saved.lse_row.dtype
    has_pos = saved.pos_cnt > 0 if spec.uses_labels else None
    lse_col = col_den = tilt_col = None
    if spec.symmetric:
        lse_col = saved.lse_col_keys[spec.positive_index]
        tilt_col = None if saved.tilt_col_keys is None else saved.tilt_col_keys[spec.positive_index]
        col_den = torch.full_like(saved.pos, float(columns.n_rows) - float(spec.decoupled))
        if spec.exclude_self:
            col_den -= (spec.positive_index < n).to(cd)
    return _Terms(saved.lse_row, saved.pos, saved.pos_cnt, lse_col, _row_counts(spec, columns.n_cols, saved.pos_cnt),
                  col_den, has_pos, per_row, sum_row, sum_col, saved.tilt_row, tilt_col)


def with_thresholds(spec: SoftmaxSpec, query, key, negatives, scale, pos=None) -> SoftmaxSpec:
    """``spec`` as the passes see it: the false-negative thresholds from the positive logits
    (``pos``, computed when not given)."""
    if spec.false_negative_margin is None:
        return spec
    s_rows = row_scale(scale, query.shape[0], compute_dtype(query.dtype))
    if pos is None:
        pos = _positive_logits(query, key, negatives, s_rows, spec.positive_index)
    return false_negative_thresholds(spec, pos, s_rows, key.shape[0])


def _saved(spec: SoftmaxSpec, st, st_tilt, pos, n: int) -> Saved:
    """:class:`Saved` from the statistics pass(es) and the one-hot positive logits ``pos`` (at the
    scale ``s``; labels: ``None``, the mean label-positive logit comes from ``st``)."""
    cd = st.lse_row.dtype
    if spec.uses_labels:
        pos_cnt = st.pos_cnt.detach()
        pos = st.pos_sum / pos_cnt.clamp(min=1)
    else:
        pos_cnt = torch.ones(n, dtype=cd, device=st.lse_row.device)
    return Saved(st.lse_row, pos, pos_cnt, st.lse_col, None if st_tilt is None else st_tilt.lse_row,
                 None if st_tilt is None else st_tilt.lse_col)


def forward(columns, query, key, negatives, scale, bias, spec: SoftmaxSpec, sum_row=None, sum_col=None):
    """``((row_loss, col_loss, row_valid, col_valid), saved)``: the statistics passes and the
    epilogue, no autograd (what :class:`SoftmaxLoss` runs; :func:`differentiable_losses` is
    the same under autograd)."""
    cd = compute_dtype(query.dtype)
    n = query.shape[0]
    s_rows = row_scale(scale, n, cd)
    pos = None
    if not spec.uses_labels:
        pos = _positive_logits(query, key, negatives, s_rows, spec.positive_index)
        spec = with_thresholds(spec, query, key, negatives, scale, pos)
    s_main, s_tilt = _tilted_scales(spec, s_rows)
    st = columns.stats(query, key, negatives, s_main, spec)
    st_tilt = None if s_tilt is None else columns.stats(query, key, negatives, s_tilt, spec)
    saved = _saved(spec, st, st_tilt, pos, n)
    sum_row, sum_col = [None if x is None else x.detach() for x in (sum_row, sum_col)]
    terms = _terms(columns, spec, saved, n, scale.dim() == 1, sum_row, sum_col)
    b = None if bias is None else bias.detach().to(cd).reshape(())
    return _losses(spec, terms, s_rows, b), saved


def differentiable_losses(columns, query, key, negatives, scale, bias, spec: SoftmaxSpec, sum_row=None,
                          sum_col=None):
    """:func:`forward` under ordinary autograd: ``columns.stats_and_positives`` is
    differentiable (the operators of :mod:`fastcl.ops.library`, whose backward is the gradient
    pass), so the epilogue's derivatives reach the features through it, with no hand-written
    backward; what ``torch.compile`` traces."""
    cd = compute_dtype(query.dtype)
    n = query.shape[0]
    s_rows = scale.to(cd).reshape(-1).expand(n).contiguous()
    if not spec.uses_labels:
        spec = with_thresholds(spec, query.detach(), key.detach(), None if negatives is None else negatives.detach(),
                               scale.detach())
    s_main, s_tilt = _tilted_scales(spec, s_rows)
    st, pos = columns.stats_and_positives(query, key, negatives, s_main, spec)
    st_tilt = None if s_tilt is None else columns.stats_and_positives(query, key, negatives, s_tilt, spec)[0]
    if pos is not None and spec.hardness is not None:  # the main pass's logits are (1 + beta) S
        pos = pos / (1 + spec.hardness)
    saved = _saved(spec, st, st_tilt, pos, n)
    terms = _terms(columns, spec, saved, n, scale.dim() == 1, sum_row, sum_col)
    b = None if bias is None else bias.to(cd).reshape(())
    row_loss, col_loss, row_valid, col_valid = _losses(spec, terms, s_rows, b)
    if b is not None:  # a bias every softmax cancels still gets its (zero) gradient, as in eager
        row_loss = row_loss + b * 0
    return row_loss, col_loss, row_valid, col_valid


def backward(columns, spec: SoftmaxSpec, saved: Saved, query, key, negatives, scale, bias, sum_row, sum_col,
             needs, grad_row, grad_col):
    """Gradients ``(query, key, negatives, scale, bias, sum_row, sum_col)`` (``None`` where
    ``needs`` -- seven flags in that order -- is False) of the losses :func:`forward` returned,
    given their upstream gradients. ``spec`` is the one given to :func:`forward`."""
    need_q, need_k, need_neg, need_s, need_b = needs[:5]
    need_sums = needs[5:]
    spec = with_thresholds(spec, query, key, negatives, scale, None if spec.uses_labels else saved.pos)
    n, cd = query.shape[0], saved.lse_row.dtype
    s_rows = row_scale(scale, n, cd)
    t = _terms(columns, spec, saved, n, scale.dim() == 1, sum_row, sum_col)
    lse_col_keys = saved.lse_col_keys

    # the epilogue again, under autograd: per-anchor weights of G and the direct terms
    def leaf(x):
        return None if x is None else x.detach().requires_grad_()

    with torch.enable_grad():
        leaves = [leaf(t.lse_row), leaf(t.pos)]
        lse_col, tilt_row, tilt_col = leaf(t.lse_col), leaf(t.tilt_row), leaf(t.tilt_col)
        s_leaf = s_rows.clone().requires_grad_(need_s and spec.debias is not None)
        b_leaf = None if bias is None else bias.detach().to(cd).reshape(()).requires_grad_(need_b)
        sums = [None if x is None else x.detach().requires_grad_(need)
                for x, need in zip((t.sum_row, t.sum_col), need_sums)]
        terms = _Terms(leaves[0], leaves[1], t.pos_cnt, lse_col, t.row_den, t.col_den, t.has_pos, t.per_row,
                       *sums, tilt_row, tilt_col)
        row_loss, col_loss, _, _ = _losses(spec, terms, s_leaf, b_leaf)
        inputs = leaves + [x for x in (lse_col, tilt_row, tilt_col, s_leaf, b_leaf, *sums)
                           if x is not None and x.requires_grad]
        outs, upstream = [row_loss], [grad_row.to(cd)]
        if spec.symmetric:
            outs.append(col_loss)
            upstream.append(grad_col.to(cd))
        grads = list(torch.autograd.grad(outs, inputs, upstream, allow_unused=True))
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    w_row, g_pos = grads[0], grads[1]
    rest = iter(grads[2:])
    w_col_keys = w_tilt_row = w_tilt_keys = None

    def per_key(w):  # a column anchor's weight on its key
        return torch.zeros_like(lse_col_keys).index_put_((spec.positive_index,), w)

    if spec.symmetric:
        w_col_keys = per_key(next(rest))
    if tilt_row is not None:
        w_tilt_row = next(rest)
        w_tilt_keys = per_key(next(rest)) if spec.symmetric else None
    ds_direct = next(rest) if s_leaf.requires_grad else None
    db = next(rest) if b_leaf is not None and b_leaf.requires_grad else None
    grad_sums = [next(rest) if x is not None and x.requires_grad else None for x in sums]
    # d loss / d pos spreads over the positives: -coef_i on each of them in G
    coef = -g_pos / t.pos_cnt.clamp(min=1) if spec.uses_labels else -g_pos

    def grad_pass(scale_rows, lse_row, w, c, lse_col_all, w_col):
        return columns.grad(query, key, negatives, scale_rows, spec, lse_row, w, c,
                            None if lse_col_all is None else finite_or_zero(lse_col_all), w_col,
                            rows=need_q or need_s, keys=need_k, negs=need_neg)

    s_main, s_tilt = _tilted_scales(spec, s_rows)
    if s_tilt is None:
        acc_q, acc_k, acc_neg = grad_pass(s_rows, t.lse_row, w_row, coef, lse_col_keys, w_col_keys)
    else:
        # d loss / dS from both statistics; a pass at scale c s returns its sums per unit of
        # c s (acc_q) or with c s applied (acc_k), and carries the target terms once
        beta = spec.hardness
        main = grad_pass(s_main, t.lse_row, w_row, coef / (1 + beta), lse_col_keys, w_col_keys)
        tilt = grad_pass(s_tilt, finite_or_zero(t.tilt_row), w_tilt_row, torch.zeros_like(coef),
                         saved.tilt_col_keys, w_tilt_keys)
        acc_q = None if main[0] is None else main[0] * (1 + beta) + tilt[0] * beta
        acc_k, acc_neg = (None if a is None else a + b for a, b in zip(main[1:], tilt[1:]))
    grad_q = (acc_q * s_rows[:, None]).to(query.dtype) if need_q else None
    grad_s = None
    if need_s:
        ds_rows = (acc_q * query.to(cd)).sum(dim=1)
        if ds_direct is not None:
            ds_rows = ds_rows + ds_direct
        grad_s = sum_to_scale(ds_rows, scale)
    grad_k = acc_k.to(key.dtype) if need_k else None
    grad_neg = acc_neg.to(negatives.dtype) if need_neg else None
    grad_b = None
    if need_b:
        grad_b = (torch.zeros((), dtype=cd, device=query.device) if db is None else db).to(bias.dtype)
        grad_b = grad_b.reshape(bias.shape)
    return grad_q, grad_k, grad_neg, grad_s, grad_b, *grad_sums


class SoftmaxLoss(torch.autograd.Function):
    """Per-anchor softmax-family losses ``(row_loss[N], col_loss[N] or empty, row_valid[N],
    col_valid[N] or empty)`` in the compute dtype, over the columns ``[key; negatives]``.

    ``col_loss[i]`` is the loss of column ``positive_index[i]`` as an anchor (symmetric specs).
    Invalid anchors (no positive, or an empty denominator) have loss 0 and no gradient.
    ``columns`` runs the passes: :class:`LocalColumns`, or the ring. ``sum_row``/``sum_col``
    (label smoothing, else ``None``): the anchors' logit sums ``[N]``, differentiable inputs
    computed outside the tiles (:func:`fastcl.ops.smoothing.logit_sums`); the backward returns
    their gradients and autograd takes them on to the features.
    """

    @staticmethod
    def forward(ctx, columns, query, key, negatives, scale, bias, spec: SoftmaxSpec, sum_row, sum_col):
        outs, saved = forward(columns, query, key, negatives, scale, bias, spec, sum_row, sum_col)
        ctx.columns, ctx.spec, ctx.saved = columns, spec, saved
        ctx.save_for_backward(query, key, negatives, scale, bias, sum_row, sum_col)
        ctx.mark_non_differentiable(outs[2], outs[3])
        return outs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_row, grad_col, _grad_row_valid, _grad_col_valid):
        query, key, negatives, scale, bias, sum_row, sum_col = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:6] + ctx.needs_input_grad[7:9]
        grads = backward(ctx.columns, ctx.spec, ctx.saved, query, key, negatives, scale, bias, sum_row, sum_col, needs,
                         grad_row, grad_col)
        return (None, *grads[:5], None, *grads[5:])


def softmax_loss(columns, query, key, negatives, scale, bias: Optional[torch.Tensor], spec: SoftmaxSpec):
    """Per-anchor losses of ``query`` over ``[key; negatives]``; see :class:`SoftmaxLoss`.
    Label smoothing's logit sums are formed here, their column sums summed over whatever
    ``columns`` spans (``columns.reduce``). A single process (:class:`LocalColumns`) goes
    through the custom operator of :mod:`fastcl.ops.library` (what ``torch.compile`` sees);
    the ring through the Function directly."""
    sums = (None, None)
    if spec.label_smoothing:
        sums = smoothing.logit_sums(query, key, negatives, scale, spec, columns.reduce)
    if isinstance(columns, LocalColumns):
        from . import library

        return library.softmax_loss(columns.backend_name, query, key, negatives, scale, bias, spec, *sums)
    return SoftmaxLoss.apply(columns, query, key, negatives, scale, bias, spec, *sums)
