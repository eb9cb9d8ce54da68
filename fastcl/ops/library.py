"""fastcl's passes as PyTorch custom operators (``torch.library``), so that ``torch.compile``
traces a training step through every loss without a graph break (docs/design.md §4).

* ``fastcl::softmax_stats``: a backend's statistics pass over one block of columns, and the
  one-hot positive logits. Its autograd formula, registered once (``register_autograd``), is
  the operator ``fastcl::softmax_grad``: the backend's gradient pass with the epilogue's
  derivatives as its weights. The epilogue itself (:func:`fastcl.ops.softmax.differentiable_losses`)
  is plain PyTorch under ordinary autograd.
* ``fastcl::sigmoid_loss``: the sigmoid family's loss and, as in the eager Function, its
  gradients from the same pass (scaled by the incoming gradient in the backward).

Each has a fake (meta) implementation that gives output shapes without data. A spec travels as
flat arguments (tensors, bools, an int, the backend name). The backend is resolved inside the
operator at run time (``FASTCL_BACKEND``, the device), so the compiler sees one opaque call per
pass: the tiles stay out of the graph, and no N x M tensor enters it. Absent optional outputs
are empty tensors (a schema has no optional returns).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._spec import SigmoidSpec, SoftmaxSpec
from ..backends.common import SoftmaxStats, compute_dtype, finite_or_zero, prefix_sums
from . import sigmoid as _sigmoid
from . import softmax as _softmax


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _backend(name: str, device: torch.device, spec):
    from .._dispatch import resolve

    return resolve(name or None, device, spec)


# ----------------------------------------------------------------------------------------------
# Softmax family: the two passes, the gradient pass as the statistics pass's backward


def _pass_spec(positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols,
               exclude_self, decoupled, symmetric, n_grad_cols) -> SoftmaxSpec:
    """The mask fields of a block (what the passes read)."""
    return SoftmaxSpec(positive_index=positive_index, row_labels=row_labels, col_labels=col_labels,
                       col_has_label=col_has_label, exclude_self=exclude_self, decoupled=decoupled,
                       symmetric=symmetric, n_grad_cols=None if n_grad_cols < 0 else n_grad_cols,
                       fn_row=fn_row, fn_col=fn_col, guide_rows=guide_rows, guide_cols=guide_cols)


def _pass_args(spec: SoftmaxSpec) -> list:
    """``spec``'s mask fields as the operators' trailing arguments (the order of :func:`_pass_spec`)."""
    return [spec.positive_index, spec.row_labels, spec.col_labels, spec.col_has_label, spec.fn_row, spec.fn_col,
            spec.guide_rows, spec.guide_cols, spec.exclude_self, spec.decoupled, spec.symmetric,
            -1 if spec.n_grad_cols is None else spec.n_grad_cols]


def _softmax_stats(
    query: Tensor, cols: Tensor, scale_rows: Tensor, positive_index: Optional[Tensor], row_labels: Optional[Tensor],
    col_labels: Optional[Tensor], col_has_label: Optional[Tensor], fn_row: Optional[Tensor], fn_col: Optional[Tensor],
    guide_rows: Optional[Tensor], guide_cols: Optional[Tensor], exclude_self: bool, decoupled: bool, symmetric: bool,
    n_grad_cols: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(lse_row [N], lse_col [C] or empty, pos_sum [N], pos_cnt [N], pos [N])``: the backend's
    statistics pass (``fastcl.backends``) over one block, plus the one-hot positive logits
    ``s_i <q_i, col_pos(i)>`` (labels: ``pos`` empty; no labels: ``pos_sum``/``pos_cnt`` empty).
    Differentiable in ``query``, ``cols`` and ``scale_rows`` through every output but the count."""
    spec = _pass_spec(positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols,
                      exclude_self, decoupled, symmetric, n_grad_cols)
    st = _backend(backend, query.device, spec).softmax_stats(query, cols, scale_rows, spec)
    like = st.lse_row
    pos = _empty(like)
    if positive_index is not None and not spec.uses_labels:
        pos = scale_rows * (query.to(like.dtype) * cols[positive_index.clamp(min=0)].to(like.dtype)).sum(dim=1)
    return (st.lse_row, _or_empty(st.lse_col, like).clone(), _or_empty(st.pos_sum, like),
            _or_empty(st.pos_cnt, like), pos)


softmax_stats_op = torch.library.custom_op("fastcl::softmax_stats", mutates_args=())(_softmax_stats)


@softmax_stats_op.register_fake
def _(query, cols, scale_rows, positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows,
      guide_cols, exclude_self,
      decoupled, symmetric, n_grad_cols, backend):
    n, c = query.shape[0], cols.shape[0]
    labels = row_labels is not None

    def vec(size):
        return scale_rows.new_empty(size)

    return (vec(n), vec(c if symmetric else 0), vec(n if labels else 0), vec(n if labels else 0),
            vec(0 if labels or positive_index is None else n))


def _softmax_grad(
    query: Tensor, cols: Tensor, scale_rows: Tensor, lse_row: Tensor, w_row: Tensor, coef: Tensor, lse_col: Tensor,
    w_col: Tensor, positive_index: Optional[Tensor], row_labels: Optional[Tensor], col_labels: Optional[Tensor],
    col_has_label: Optional[Tensor], fn_row: Optional[Tensor], fn_col: Optional[Tensor], guide_rows: Optional[Tensor],
    guide_cols: Optional[Tensor], exclude_self: bool,
    decoupled: bool, symmetric: bool, n_grad_cols: int, backend: str, rows: bool, columns: bool,
) -> Tuple[Tensor, Tensor]:
    """``(sum_j G_ij k_j [N, D], sum_i G_ij s_i q_i [C, D])`` (empty where not asked): the
    backend's gradient pass with the softmax weights ``w_row``/``w_col`` and the positives'
    target weight ``coef`` (``lse_col``/``w_col`` empty unless symmetric)."""
    spec = _pass_spec(positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols,
                      exclude_self, decoupled, symmetric, n_grad_cols)
    acc_q, acc_k = _backend(backend, query.device, spec).softmax_grad(
        query, cols, scale_rows, spec, lse_row, w_row, coef, _or_none(lse_col) if symmetric else None,
        _or_none(w_col) if symmetric else None, rows=rows, cols=columns)
    return _or_empty(acc_q, lse_row), _or_empty(acc_k, lse_row)


softmax_grad_op = torch.library.custom_op("fastcl::softmax_grad", mutates_args=())(_softmax_grad)


@softmax_grad_op.register_fake
def _(query, cols, scale_rows, lse_row, w_row, coef, lse_col, w_col, positive_index, row_labels, col_labels,
      col_has_label, fn_row, fn_col, guide_rows, guide_cols, exclude_self, decoupled, symmetric, n_grad_cols, backend,
      rows, columns):
    acc_q = query.new_empty(query.shape, dtype=lse_row.dtype) if rows else _empty(lse_row)
    acc_k = cols.new_empty(cols.shape, dtype=lse_row.dtype) if columns else _empty(lse_row)
    return acc_q, acc_k


def _stats_setup(ctx, inputs, output):
    query, cols, scale_rows = inputs[:3]
    ctx.save_for_backward(query, cols, scale_rows, output[0], output[1], *inputs[3:11])
    ctx.options = inputs[11:]


def _stats_backward(ctx, g_lse_row, g_lse_col, g_pos_sum, _g_pos_cnt, g_pos):
    """The gradient pass: ``d lse_row_i / dS_ij`` is row ``i``'s softmax, ``d lse_col_j`` column
    ``j``'s, ``d pos_sum_i`` and ``d pos_i`` the indicator of the positives (``coef = -g``)."""
    _softmax.refuse_double_backward()
    query, cols, scale_rows, lse_row, lse_col = ctx.saved_tensors[:5]
    masks = ctx.saved_tensors[5:]
    exclude_self, decoupled, symmetric, n_grad_cols, backend = ctx.options
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    zeros = torch.zeros_like(lse_row)
    w_row = zeros if g_lse_row is None else g_lse_row
    g_target = g_pos_sum if masks[1] is not None else g_pos
    coef = zeros if g_target is None or g_target.numel() == 0 else -g_target
    w_col = _empty(lse_row) if not symmetric else (torch.zeros_like(lse_col) if g_lse_col is None else g_lse_col)
    acc_q, acc_k = softmax_grad_op(query, cols, scale_rows, finite_or_zero(lse_row), w_row, coef,
                                   finite_or_zero(lse_col) if symmetric else _empty(lse_row), w_col, *masks,
                                   exclude_self, decoupled, symmetric, n_grad_cols, backend, need_q or need_s, need_k)
    grad_q = (acc_q * scale_rows[:, None]).to(query.dtype) if need_q else None
    grad_k = acc_k.to(cols.dtype) if need_k else None
    grad_s = (acc_q * query.to(acc_q.dtype)).sum(dim=1).to(scale_rows.dtype) if need_s else None
    return (grad_q, grad_k, grad_s) + (None,) * (len(ctx.needs_input_grad) - 3)


softmax_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


class OpColumns(_softmax.LocalColumns):
    """:class:`~fastcl.ops.softmax.LocalColumns` whose statistics pass is the differentiable
    operator: the epilogue then runs under ordinary autograd (:func:`softmax_loss`)."""

    def stats_and_positives(self, query, key, negatives, s_rows, spec: SoftmaxSpec):
        """``(SoftmaxStats, one-hot positive logits or None)``, differentiable."""
        lse_row, lse_col, pos_sum, pos_cnt, pos = softmax_stats_op(
            query, self._cat(key, negatives), s_rows, *_pass_args(self._block_spec(spec, negatives)),
            self.backend_name)
        labels = spec.uses_labels
        stats = SoftmaxStats(lse_row, lse_col[: key.shape[0]] if spec.symmetric else None,
                             pos_sum if labels else None, pos_cnt if labels else None)
        return stats, None if labels else pos


def block_lse(backend: str, query, cols, scale_rows, spec: SoftmaxSpec):
    """``(lse_row [N], pos [N] or None)`` of one block of columns under ``spec``'s masks,
    differentiable: for losses whose denominator joins several blocks with different rows (the
    GISTEmbed drop-in), combined by the caller."""
    lse_row, _, _, _, pos = softmax_stats_op(query, cols, scale_rows, *_pass_args(spec), backend)
    return lse_row, (pos if spec.positive_index is not None and not spec.uses_labels else None)


def softmax_loss(backend: str, query, key, negatives, scale, bias, spec: SoftmaxSpec, sum_row=None, sum_col=None):
    """``(row_loss, col_loss, row_valid, col_valid)`` of a single-process softmax-family loss:
    the statistics operator(s) and the epilogue, differentiated by autograd (the operator's
    backward is the gradient pass). ``backend`` is a name (``""``: chosen at run time)."""
    n_cols = key.shape[0] + (0 if negatives is None else negatives.shape[0])
    columns = OpColumns(backend, query.shape[0], n_cols)
    return _softmax.differentiable_losses(columns, query, key, negatives, scale, bias, spec, sum_row, sum_col)


# ----------------------------------------------------------------------------------------------
# Matryoshka prefixes: the same two passes over P nested feature prefixes (fastcl.ops.matryoshka)


def _prefix_stats(
    query: Tensor, cols: Tensor, row_scales: Tensor, col_scales: Tensor, dims: List[int], kernel_dtype: torch.dtype,
    positive_index: Optional[Tensor], row_labels: Optional[Tensor], col_labels: Optional[Tensor],
    col_has_label: Optional[Tensor], fn_row: Optional[Tensor], fn_col: Optional[Tensor], guide_rows: Optional[Tensor],
    guide_cols: Optional[Tensor], exclude_self: bool,
    decoupled: bool, symmetric: bool, n_grad_cols: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(lse_row [P, N], lse_col [P, C] or empty, pos_sum [P, N], pos_cnt [N], pos [P, N])``:
    :func:`_softmax_stats` for each prefix problem ``S^p_ij = row_scales[p, i] col_scales[p, j]
    <q_i, k_j>`` over the first ``dims[p]`` features (``dims`` ascending). Differentiable in
    ``query``, ``cols`` and both scales. The features come in the compute dtype (their gradient
    then meets the normalisation's, which nearly cancels it, before any rounding);
    ``kernel_dtype`` is the input dtype a backend without fused prefixes runs its kernels in."""
    from . import matryoshka

    spec = _pass_spec(positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols,
                      exclude_self, decoupled, symmetric, n_grad_cols)
    module = _backend(backend, query.device, spec)
    st = matryoshka.prefix_stats(module, query, cols, row_scales, col_scales, dims, spec, kernel_dtype)
    like = st.lse_row
    pos = _empty(like)
    if positive_index is not None and not spec.uses_labels:
        cd = like.dtype
        dots = prefix_sums(query.to(cd) * cols[positive_index.clamp(min=0)].to(cd), dims)
        pos = row_scales * col_scales[:, positive_index.clamp(min=0)] * dots
    return (st.lse_row, _or_empty(st.lse_col, like).clone(), _or_empty(st.pos_sum, like),
            _or_empty(st.pos_cnt, like), pos)


prefix_stats_op = torch.library.custom_op("fastcl::prefix_stats", mutates_args=())(_prefix_stats)


@prefix_stats_op.register_fake
def _(query, cols, row_scales, col_scales, dims, kernel_dtype, positive_index, row_labels, col_labels, col_has_label,
      fn_row, fn_col, guide_rows, guide_cols, exclude_self, decoupled, symmetric, n_grad_cols, backend):
    n, c, n_pre = query.shape[0], cols.shape[0], len(dims)
    labels = row_labels is not None

    def mat(*size):
        return row_scales.new_empty(size)

    return (mat(n_pre, n), mat(n_pre, c) if symmetric else mat(0), mat(n_pre, n) if labels else mat(0),
            mat(n) if labels else mat(0), mat(0) if labels or positive_index is None else mat(n_pre, n))


def _prefix_grad(
    query: Tensor, cols: Tensor, row_scales: Tensor, col_scales: Tensor, dims: List[int], kernel_dtype: torch.dtype,
    lse_row: Tensor, w_row: Tensor, coef: Tensor, lse_col: Tensor, w_col: Tensor, positive_index: Optional[Tensor],
    row_labels: Optional[Tensor], col_labels: Optional[Tensor], col_has_label: Optional[Tensor],
    fn_row: Optional[Tensor], fn_col: Optional[Tensor], guide_rows: Optional[Tensor],
    guide_cols: Optional[Tensor], exclude_self: bool, decoupled: bool, symmetric: bool,
    n_grad_cols: int, backend: str, rows: bool, columns: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d query [N, D], d cols [C, D], d row_scales [P, N], d col_scales [P, C])`` of the prefix
    problems given ``w_row``, ``coef`` (and ``lse_col``/``w_col`` if symmetric), each ``[P, ...]``
    (empty feature gradients where not asked)."""
    from . import matryoshka

    spec = _pass_spec(positive_index, row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols,
                      exclude_self, decoupled, symmetric, n_grad_cols)
    module = _backend(backend, query.device, spec)
    acc_q, acc_k, d_row, d_col = matryoshka.prefix_grad(
        module, query, cols, row_scales, col_scales, dims, kernel_dtype, spec, lse_row, w_row, coef,
        lse_col if symmetric else None, w_col if symmetric else None, rows=rows, columns=columns)
    return _or_empty(acc_q, lse_row), _or_empty(acc_k, lse_row), d_row, d_col


prefix_grad_op = torch.library.custom_op("fastcl::prefix_grad", mutates_args=())(_prefix_grad)


@prefix_grad_op.register_fake
def _(query, cols, row_scales, col_scales, dims, kernel_dtype, lse_row, w_row, coef, lse_col, w_col, positive_index,
      row_labels, col_labels, col_has_label, fn_row, fn_col, guide_rows, guide_cols, exclude_self, decoupled, symmetric,
      n_grad_cols, backend,
      rows, columns):
    acc_q = query.new_empty(query.shape, dtype=lse_row.dtype) if rows else _empty(lse_row)
    acc_k = cols.new_empty(cols.shape, dtype=lse_row.dtype) if columns else _empty(lse_row)
    return acc_q, acc_k, torch.empty_like(row_scales), torch.empty_like(col_scales)


def _prefix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], output[0], output[1], *inputs[6:14])
    ctx.dims, ctx.kernel_dtype = inputs[4], inputs[5]
    ctx.options = inputs[14:]


def _prefix_backward(ctx, g_lse_row, g_lse_col, g_pos_sum, _g_pos_cnt, g_pos):
    """As :func:`_stats_backward`, per prefix; the scales' gradients come from the pass too."""
    _softmax.refuse_double_backward()
    query, cols, row_scales, col_scales, lse_row, lse_col = ctx.saved_tensors[:6]
    masks = ctx.saved_tensors[6:]
    exclude_self, decoupled, symmetric, n_grad_cols, backend = ctx.options
    need_q, need_k = ctx.needs_input_grad[:2]
    zeros = torch.zeros_like(lse_row)
    w_row = zeros if g_lse_row is None else g_lse_row
    g_target = g_pos_sum if masks[1] is not None else g_pos
    coef = zeros if g_target is None or g_target.numel() == 0 else -g_target
    w_col = _empty(lse_row) if not symmetric else (torch.zeros_like(lse_col) if g_lse_col is None else g_lse_col)
    acc_q, acc_k, d_row, d_col = prefix_grad_op(
        query, cols, row_scales, col_scales, ctx.dims, ctx.kernel_dtype, finite_or_zero(lse_row), w_row, coef,
        finite_or_zero(lse_col) if symmetric else _empty(lse_row), w_col, *masks, exclude_self, decoupled, symmetric,
        n_grad_cols, backend, need_q, need_k)
    grad_q = acc_q.to(query.dtype) if need_q else None
    grad_k = acc_k.to(cols.dtype) if need_k else None
    return (grad_q, grad_k, d_row.to(row_scales.dtype), d_col.to(col_scales.dtype)) + \
        (None,) * (len(ctx.needs_input_grad) - 4)


prefix_stats_op.register_autograd(_prefix_backward, setup_context=_prefix_setup)


# ----------------------------------------------------------------------------------------------
# Sigmoid family


def _sigmoid_loss(
    query: Tensor, key: Tensor, scale: Tensor, bias: Optional[Tensor], positive_index: Optional[Tensor],
    row_labels: Optional[Tensor], col_labels: Optional[Tensor], n_rows_norm: int, needs: List[bool], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, d query, d key, d scale, d bias)``: the loss and its gradients, formed in the same
    pass (empty where ``needs`` -- four flags -- is False)."""
    spec = SigmoidSpec(positive_index=positive_index, n_rows_norm=n_rows_norm, row_labels=row_labels,
                       col_labels=col_labels)
    module = _backend(backend, query.device, spec)
    loss, grads = _sigmoid.forward(_softmax.LocalColumns(module, query.shape[0], key.shape[0]), query, key, scale,
                                   bias, spec, needs)
    return (loss, *(_or_empty(g, query) for g in grads))


sigmoid_loss_op = torch.library.custom_op("fastcl::sigmoid_loss", mutates_args=())(_sigmoid_loss)


@sigmoid_loss_op.register_fake
def _(query, key, scale, bias, positive_index, row_labels, col_labels, n_rows_norm, needs, backend):
    out = [query.new_empty((), dtype=compute_dtype(query.dtype))]
    for like, need in zip((query, key, scale, bias), needs):
        out.append(torch.empty_like(like) if need and like is not None else _empty(query))
    return tuple(out)


def _sigmoid_setup(ctx, inputs, output):
    ctx.needs = inputs[8]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.save_for_backward(*output[1:])


def _sigmoid_backward(ctx, grad, *_unused):
    _softmax.refuse_double_backward()
    grads = _sigmoid.scale_gradients(ctx.saved_tensors, ctx.needs, ctx.dtypes, grad)
    return (*grads, None, None, None, None, None, None)


sigmoid_loss_op.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)


def sigmoid_loss(backend: str, query, key, scale, bias, spec: SigmoidSpec):
    """The single-process sigmoid loss through the operator (see :func:`softmax_loss`)."""
    needs = [bool(t is not None and t.requires_grad) for t in (query, key, scale, bias)]
    return sigmoid_loss_op(query, key, scale, bias, spec.positive_index, spec.row_labels, spec.col_labels,
                           spec.n_rows_norm, needs, backend)[0]


def registered_ops() -> Sequence:
    """The operators, for ``torch.library.opcheck``."""
    from . import distill

    return (softmax_stats_op, softmax_grad_op, prefix_stats_op, prefix_grad_op, sigmoid_loss_op,
            *distill.registered_ops())


# each operator's Python implementation by its name: a dispatch mode that must see the tensors an
# operator creates inside (the tests' memory checks) runs it through these (fastcl.ops.distill
# adds its own)
IMPLEMENTATIONS = {"fastcl::softmax_stats": _softmax_stats, "fastcl::softmax_grad": _softmax_grad,
                   "fastcl::prefix_stats": _prefix_stats, "fastcl::prefix_grad": _prefix_grad,
                   "fastcl::sigmoid_loss": _sigmoid_loss}
