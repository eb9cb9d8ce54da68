"""Triton backend: launchers and autograd Functions for ``fastcl.triton_kernels.info_nce``.

Same contract and semantics as ``backends/torch.py`` (its readable twin): ``softmax_loss``
returns per-anchor losses and validity, ``sigmoid_loss`` a scalar. The kernels keep every tile
of ``S = s * Q K^T + b`` on chip; the launchers allocate only O(N + C) statistics and the
``[N, D]`` / ``[C, D]`` gradients, never an N x C buffer.

Runs on CUDA tensors when Triton and a GPU are present, and on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests). The interpreter is chosen when the
kernels are first imported, so the variable must be set before the first call.

Numerics: statistics and accumulators are fp32 (fp64 for fp64 inputs); fp16/bf16 inputs use
tensor cores; fp32 inputs use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is
set. The backward is deterministic (no atomics: every output element has one owner program).

Block sizes: autotuned per (D, dtype, variant) on a GPU; 16 x 16 x 16 under the interpreter.
``FASTCL_TRITON_BLOCK="A,B,D,X"`` fixes them (no autotuning): powers of two, at least 16 on a GPU.
"""

import contextlib
import os
import sys
from typing import Optional

import torch

from .._spec import SigmoidSpec, SoftmaxSpec
from .common import anchor_losses, compute_dtype, finite_or_zero, row_scale, scaled_saved_gradients, sum_to_scale

_KERNEL_MODULE = "fastcl.triton_kernels.info_nce"
_INTERPRETER_BLOCKS = (16, 16, 16, 16)
_MAX_BLOCK_X = 256
_tuned_kernels = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from ..triton_kernels import info_nce

    return info_nce


def _kernels_interpreted(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module.grad_kernel, InterpretedFunction)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fixed_blocks():
    override = os.environ.get("FASTCL_TRITON_BLOCK")
    if override:
        return tuple(int(v) for v in override.split(","))
    return _INTERPRETER_BLOCKS if _kernels_interpreted(_kernels()) else None


def _gpu_block_x(d: int) -> int:
    """Width of the gradient accumulator's D-chunk on a GPU: the whole (padded) width up to 256,
    beyond that chunks of 256 with S rebuilt per chunk (module docstring of the kernels)."""
    return min(max(16, 1 << (d - 1).bit_length()), _MAX_BLOCK_X)



def _type_args(dtype: torch.dtype, device: torch.device) -> dict:
    """The accumulator type and the ``tl.dot`` input precision for inputs of ``dtype``."""
    import triton.language as tl

    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return {"ACC": tl.float64 if dtype == torch.float64 else tl.float32, "PREC": "tf32" if tf32 else "ieee"}


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()



def _scalars(bias: Optional[torch.Tensor], grad_scale: float, dtype, device) -> torch.Tensor:
    """``[bias, grad_scale]`` in the compute dtype, read by the kernels without a host sync."""
    b = torch.zeros((), dtype=dtype, device=device) if bias is None else bias.detach().reshape(()).to(dtype)
    return torch.stack([b, torch.full((), grad_scale, dtype=dtype, device=device)])




class _Launcher:
    """The tensors and compile-time flags shared by every kernel launch of one loss call."""

    def __init__(self, q, k, scale_rows, scalars, has_bias, positive_index, row_labels=None, col_labels=None,
                 col_has_label=None, exclude_self=False, decoupled=False, symmetric=False, sigmoid=False):
        self.q, self.k = q, k
        self.n, self.c, self.d = q.shape[0], k.shape[0], q.shape[1]
        self.blocks = _fixed_blocks()
        self.block_x = self.blocks[3] if self.blocks is not None else _gpu_block_x(self.d)
        dummy = scale_rows
        labels = row_labels is not None
        self.pointers = (
            scale_rows, scalars,
            positive_index if positive_index is not None else dummy,
            row_labels if labels else dummy,
            col_labels if labels else dummy,
            col_has_label.to(torch.int32) if col_has_label is not None else dummy,
        )
        self.flags = dict(LABELS=labels, COL_MASK=col_has_label is not None, EXCLUDE_SELF=exclude_self,
                          DECOUPLED=decoupled, HAS_BIAS=has_bias, **_type_args(q.dtype, q.device))
        self.symmetric, self.sigmoid = symmetric, sigmoid

    def _run(self, name, n_programs, split_d, args, flags):
        module = _kernels()
        kernel = getattr(module, name)
        if name == "grad_kernel":
            flags = dict(flags, BLOCK_X=self.block_x)
        d_chunks = _cdiv(self.d, self.block_x) if split_d else 1
        if self.blocks is not None:
            a, b, d, _ = self.blocks
            kernel[(_cdiv(n_programs, a), d_chunks)](*args, **flags, BLOCK_A=a, BLOCK_B=b, BLOCK_D=d)
            return
        if name not in _tuned_kernels:
            stats = name == "softmax_stats_kernel"
            configs, key = (module.STATS_CONFIGS, module.STATS_KEY) if stats else (module.GRAD_CONFIGS, module.GRAD_KEY)
            _tuned_kernels[name] = module.tuned(kernel, configs, key)
        _tuned_kernels[name][lambda meta: (_cdiv(n_programs, meta["BLOCK_A"]), d_chunks)](*args, **flags)

    def stats(self, own_rows: bool, lse, pos_sum=None, pos_cnt=None):
        """Fill ``lse`` (and, owning rows, the positive-logit sums and counts) per anchor."""
        a, b = (self.q, self.k) if own_rows else (self.k, self.q)
        dummy = lse
        args = (a, b, *self.pointers, lse, pos_sum if own_rows else dummy, pos_cnt if own_rows else dummy,
                self.n, self.c, self.d)
        self._run("softmax_stats_kernel", a.shape[0], False, args, dict(self.flags, OWN_ROWS=own_rows))

    def grad(self, own_rows: bool, out=None, ds=None, gsum=None, loss=None, n_out=None, lse_row=None, w_row=None,
             coef=None, lse_col=None, w_col=None):
        """One gradient pass owning rows (dQ, ds, row sums of G, sigmoid loss) or columns (dK).

        Outputs left as ``None`` are not computed. ``ds`` is ``[d_chunks, N]``: one partial per
        D-chunk of the accumulator. ``n_out`` limits the owned lines (the columns that get dK).
        """
        a, b = (self.q, self.k) if own_rows else (self.k, self.q)
        accumulate = out is not None or ds is not None
        dummy = self.pointers[0]
        stats = tuple(dummy if t is None else t for t in (lse_row, w_row, coef, lse_col, w_col))
        outputs = tuple(dummy if t is None else t for t in (out, ds, gsum, loss))
        n_out = a.shape[0] if n_out is None else n_out
        args = (a, b, *self.pointers, *stats, *outputs, self.n, self.c, self.d, n_out)
        flags = dict(self.flags, SIGMOID=self.sigmoid, OWN_ROWS=own_rows, SYMMETRIC=self.symmetric,
                     ACCUMULATE=accumulate, STORE_OUT=out is not None, WRITE_DS=ds is not None,
                     WRITE_GSUM=gsum is not None, WRITE_LOSS=loss is not None)
        self._run("grad_kernel", n_out, accumulate, args, flags)

    @property
    def d_chunks(self) -> int:
        return _cdiv(self.d, self.block_x)


class SoftmaxLoss(torch.autograd.Function):
    """Per-anchor softmax-family losses; the contract of ``backends.torch.SoftmaxLoss``.

    Returns ``(row_loss[N], col_loss[N] or empty, row_valid[N], col_valid[N] or empty)`` in the
    compute dtype. Forward: one statistics pass owning rows (plus one owning columns when
    symmetric). Backward: a pass owning rows (dQ, d scale, d bias) and one owning the first
    ``n_grad_cols`` columns (dK), each recomputing S.
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SoftmaxSpec):
        cd = compute_dtype(query.dtype)
        q, k = query.contiguous(), key.contiguous()
        n, c, dev = q.shape[0], k.shape[0], q.device
        s_rows = row_scale(scale, n, cd)
        scalars = _scalars(bias, 1.0, cd, dev)
        launcher = _launcher(q, k, s_rows, scalars, bias is not None, spec)
        lse_row, pos_sum, pos_cnt = (torch.empty(n, dtype=cd, device=dev) for _ in range(3))
        with _on_device(q):
            launcher.stats(True, lse_row, pos_sum, pos_cnt)
            if spec.symmetric:
                lse_col_full = torch.empty(c, dtype=cd, device=dev)
                launcher.stats(False, lse_col_full)

        # the kernels include the bias in the statistics and count a one-hot positive as 1
        row_loss, col_loss, row_valid, col_valid = anchor_losses(
            spec, lse_row, pos_sum / pos_cnt.clamp(min=1), pos_cnt,
            lse_col_full[spec.positive_index] if spec.symmetric else None)
        if not spec.symmetric:
            lse_col_full = col_loss

        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(query, key, scale, bias if bias is not None else torch.empty(0),
                              lse_row, lse_col_full, row_valid, col_valid, pos_cnt)
        ctx.mark_non_differentiable(row_valid, col_valid)
        return row_loss, col_loss, row_valid, col_valid

    @staticmethod
    def backward(ctx, grad_row, grad_col, _gv1, _gv2):
        query, key, scale, bias, lse_row, lse_col_full, row_valid, col_valid, pos_cnt = ctx.saved_tensors
        spec: SoftmaxSpec = ctx.spec
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        cd = lse_row.dtype
        q, k = query.contiguous(), key.contiguous()
        n, c, dev = q.shape[0], k.shape[0], q.device
        s_rows = row_scale(scale, n, cd)
        scalars = _scalars(bias if ctx.has_bias else None, 1.0, cd, dev)
        n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols

        # weights of the softmax terms (the upstream gradient, 0 on invalid anchors) and the
        # coefficient of the target term on each positive entry, both directions folded in
        w_row = torch.where(row_valid, grad_row.to(cd), torch.zeros_like(lse_row))
        coef = w_row / pos_cnt.clamp(min=1)
        lse_col = w_col = None
        if spec.symmetric:
            w_col_by_row = torch.where(col_valid, grad_col.to(cd), torch.zeros_like(w_row))
            coef = coef + w_col_by_row
            w_col = torch.zeros(c, dtype=cd, device=dev).index_copy_(0, spec.positive_index, w_col_by_row)
            lse_col = finite_or_zero(lse_col_full)
        if spec.pos_weight is not None:
            coef = coef * spec.pos_weight.to(cd)
        stats = dict(lse_row=finite_or_zero(lse_row), w_row=w_row, coef=coef, lse_col=lse_col, w_col=w_col)

        launcher = _launcher(q, k, s_rows, scalars, ctx.has_bias, spec)
        grad_q = grad_k = grad_s = grad_b = None
        with _on_device(q):
            if need_q or need_s or need_b:
                grad_q, ds, gsum = _row_pass(launcher, need_q, need_s, need_b, stats)
                if need_s:
                    grad_s = sum_to_scale(ds.sum(0), scale)
                if need_b:
                    grad_b = gsum.sum().to(bias.dtype).reshape(bias.shape)
            if need_k:
                grad_k = _column_pass(launcher, n_grad_cols, stats)
        return grad_q if need_q else None, grad_k, grad_s, grad_b, None


class SigmoidLoss(torch.autograd.Function):
    """Sigmoid-family loss (a scalar); the contract of ``backends.torch.SigmoidLoss``.

    ``G`` needs no statistic, so when autograd will need gradients the forward runs the two
    gradient passes itself (the row pass also yields the loss) and the backward only scales them.
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SigmoidSpec):
        cd = compute_dtype(query.dtype)
        q, k = query.contiguous(), key.contiguous()
        n, dev = q.shape[0], q.device
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        s_rows = row_scale(scale, n, cd)
        scalars = _scalars(bias, 1.0 / spec.n_rows_norm, cd, dev)
        launcher = _Launcher(q, k, s_rows, scalars, bias is not None, spec.positive_index.contiguous(), sigmoid=True)
        loss_rows = torch.empty(n, dtype=cd, device=dev)
        with _on_device(q):
            grad_q, ds, gsum = _row_pass(launcher, need_q, need_s, need_b, {}, loss=loss_rows)
            grad_k = _column_pass(launcher, k.shape[0], {}) if need_k else None
        loss = loss_rows.sum() / spec.n_rows_norm
        ctx.save_for_backward(
            grad_q if need_q else None,
            grad_k,
            sum_to_scale(ds.sum(0), scale) if need_s else None,
            gsum.sum().to(bias.dtype).reshape(bias.shape) if need_b else None,
        )
        return loss

    backward = staticmethod(scaled_saved_gradients)


def _launcher(q, k, s_rows, scalars, has_bias, spec: SoftmaxSpec) -> _Launcher:
    pos = spec.positive_index.contiguous() if spec.positive_index is not None else None
    labels = (spec.row_labels.contiguous(), spec.col_labels.contiguous()) if spec.uses_labels else (None, None)
    return _Launcher(q, k, s_rows, scalars, has_bias, pos, *labels, col_has_label=spec.col_has_label,
                     exclude_self=spec.exclude_self, decoupled=spec.decoupled, symmetric=spec.symmetric)


def _row_pass(launcher: _Launcher, need_q, need_s, need_b, stats, loss=None):
    """dQ (input dtype), ds partials per D-chunk ``[chunks, N]`` and row sums of G, as needed."""
    q = launcher.q
    n, dev = q.shape[0], q.device
    cd = launcher.pointers[0].dtype
    grad_q = torch.empty_like(q) if need_q else None
    ds = torch.empty(launcher.d_chunks, n, dtype=cd, device=dev) if need_s else None
    gsum = torch.empty(n, dtype=cd, device=dev) if need_b else None
    if grad_q is not None or ds is not None or gsum is not None or loss is not None:
        launcher.grad(True, out=grad_q, ds=ds, gsum=gsum, loss=loss, **stats)
    return grad_q, ds, gsum


def _column_pass(launcher: _Launcher, n_grad_cols: int, stats):
    """dK (input dtype); columns ``>= n_grad_cols`` get zeros."""
    k = launcher.k
    grad_k = torch.empty_like(k)
    grad_k[n_grad_cols:].zero_()
    if n_grad_cols > 0:
        launcher.grad(False, out=grad_k, n_out=n_grad_cols, **stats)
    return grad_k


def softmax_loss(query, key, scale, bias, spec: SoftmaxSpec):
    """Softmax-family per-anchor losses; see :class:`SoftmaxLoss`."""
    return SoftmaxLoss.apply(query, key, scale, bias, spec)


def sigmoid_loss(query, key, scale, bias, spec: SigmoidSpec):
    """Sigmoid-family scalar loss; see :class:`SigmoidLoss`."""
    return SigmoidLoss.apply(query, key, scale, bias, spec)


def available(device: torch.device) -> Optional[str]:
    """``None`` if this backend can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    # what counts is how the kernels were (or will be) loaded: TRITON_INTERPRET is read once,
    # when Triton decorates them at import
    module = sys.modules.get(_KERNEL_MODULE)
    interpreted = _kernels_interpreted(module) if module is not None else _interpreting()
    if device.type == "cpu" and not interpreted:
        if module is not None:
            return "the Triton kernels were loaded compiled (for a GPU); CPU tensors need them loaded under TRITON_INTERPRET=1"
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
    if device.type == "cuda" and not interpreted and not torch.cuda.is_available():
        return "no CUDA device is available"
    if device.type not in ("cpu", "cuda"):
        return f"Triton runs on CUDA devices (or the CPU interpreter), not {device.type}"
    return None
