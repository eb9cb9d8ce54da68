"""Triton backend: the passes of ``fastcl.backends`` as launches of ``fastcl.triton_kernels.info_nce``.

``backends/torch.py`` is the readable twin. The kernels keep every tile of ``S = s * Q K^T``
on chip; the launchers allocate only O(N + C) statistics and the ``[N, D]`` / ``[C, D]``
accumulators, never an N x C buffer. The statistics pass is one kernel launch owning rows (and
one owning columns for symmetric specs); the gradient pass one launch owning rows
(``sum_j G_ij k_j``) and one owning the first ``n_grad_cols`` columns (``sum_i G_ij s_i q_i``);
``sigmoid_pass`` the same two gradient launches, the row one also summing the loss.

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

from .. import _config
from .._spec import SoftmaxSpec
from . import chunked
from .common import DistillStats, SigmoidSums, SoftmaxStats, finite_or_zero, float16_gradient_scale, no_positives

_KERNEL_MODULE = "fastcl.triton_kernels.info_nce"
_INTERPRETER_BLOCKS = (16, 16, 16, 16)
STREAMED_BLOCK_X = 128
RESIDENT_ROW_BYTES = 512  # 256 bf16/fp16 features, 128 fp32, 64 fp64
_tuned_kernels = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from ..triton_kernels import info_nce

    return info_nce


def _kernels_interpreted(module) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # the interpreter needs numpy: without it nothing was loaded interpreted
        return False

    return isinstance(module.grad_kernel, InterpretedFunction)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fixed_blocks():
    override = _config.triton_block()
    if override:
        return override
    return _INTERPRETER_BLOCKS if _kernels_interpreted(_kernels()) else None


def _gpu_block_x(d: int, element_size: int) -> int:
    """Width of the gradient accumulator's D-chunk on a GPU: the whole padded width while the
    owned tile stays on chip (:func:`resident_width`), else chunks of ``STREAMED_BLOCK_X`` with
    S rebuilt per chunk (wider accumulators spill when D is streamed: tests/triton_aot.py)."""
    return resident_width(d, element_size) or STREAMED_BLOCK_X


def resident_width(d: int, element_size: int) -> int:
    """``BLOCK_R``: the padded width at which a statistics or gradient program keeps its owned
    tile on chip across the loop (at most ``RESIDENT_ROW_BYTES`` per line), else 0 (streamed
    through D in ``BLOCK_D`` chunks with the looped tile)."""
    width = max(16, 1 << (d - 1).bit_length())
    return width if width * element_size <= RESIDENT_ROW_BYTES else 0


def _type_args(dtype: torch.dtype, device: torch.device) -> dict:
    """The accumulator type and the ``tl.dot`` input precision for inputs of ``dtype``."""
    import triton.language as tl

    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return {"ACC": tl.float64 if dtype == torch.float64 else tl.float32, "PREC": "tf32" if tf32 else "ieee"}


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()



def _scalars(bias: Optional[torch.Tensor], dtype, device) -> torch.Tensor:
    """``[bias]`` in the compute dtype, read by the kernels without a host sync."""
    if bias is None:
        return torch.zeros(1, dtype=dtype, device=device)
    return bias.detach().reshape(1).to(dtype)


class _Launcher:
    """The tensors and compile-time flags shared by every kernel launch of one loss call."""

    def __init__(self, q, k, scale_rows, scalars, has_bias, positive_index, row_labels=None, col_labels=None,
                 col_has_label=None, exclude_self=False, decoupled=False, symmetric=False, sigmoid=False,
                 fn_row=None, fn_col=None, guide_rows=None, guide_cols=None):
        self.q, self.k = q, k
        self.n, self.c, self.d = q.shape[0], k.shape[0], q.shape[1]
        guided = guide_rows is not None
        self.g = guide_rows.shape[1] if guided else 0
        self.blocks = _fixed_blocks()
        self.block_x = self.blocks[3] if self.blocks is not None else _gpu_block_x(self.d, q.element_size())
        dummy = scale_rows
        labels = row_labels is not None
        self.pointers = (
            scale_rows, scalars,
            positive_index if positive_index is not None else dummy,
            row_labels if labels else dummy,
            col_labels if labels else dummy,
            col_has_label.to(torch.int32) if col_has_label is not None else dummy,
            fn_row.contiguous() if fn_row is not None else dummy,
            fn_col.contiguous() if fn_col is not None else dummy,
            guide_rows.contiguous() if guided else dummy,
            guide_cols.contiguous() if guided else dummy,
        )
        # the guide's width is looped in chunks of tl.dot's smallest width: an fp32 dot at full
        # precision holds its operands in registers (wider chunks spill: tests/triton_aot.py)
        block_g = 16
        self.flags = dict(LABELS=labels, COL_MASK=col_has_label is not None, EXCLUDE_SELF=exclude_self,
                          DECOUPLED=decoupled, FN_MASK=fn_row is not None, GUIDE=guided, BLOCK_G=block_g,
                          HAS_BIAS=has_bias, **_type_args(q.dtype, q.device))
        self.symmetric, self.sigmoid = symmetric, sigmoid

    def _run(self, name, n_programs, split_d, args, flags):
        """Launch over ``n_programs`` owned lines (and D chunks when ``split_d``)."""
        flags = dict(flags, BLOCK_R=resident_width(self.d, self.q.element_size()))
        if name == "grad_kernel":
            flags = dict(flags, BLOCK_X=self.block_x)
        d_chunks = _cdiv(self.d, self.block_x) if split_d else 1
        self._launch(name, lambda meta: (_cdiv(n_programs, meta["BLOCK_A"]), d_chunks), args, flags)

    def _launch(self, name, grid, args, flags):
        """``grid(meta)`` gives the launch grid from the block sizes (fixed, or the autotuner's)."""
        module = _kernels()
        kernel = getattr(module, name)
        if self.blocks is not None:
            a, b, d, _ = self.blocks
            meta = dict(BLOCK_A=a, BLOCK_B=b, BLOCK_D=d)
            kernel[grid(meta)](*args, **flags, **meta)
            return
        if name not in _tuned_kernels:
            configs, key = {"softmax_stats_kernel": (module.STATS_CONFIGS, module.STATS_KEY),
                            "grad_kernel": (module.GRAD_CONFIGS, module.GRAD_KEY),
                            "logit_grad_kernel": (module.LOGIT_CONFIGS, module.LOGIT_KEY)}[name]
            _tuned_kernels[name] = module.tuned(kernel, configs, key)
        _tuned_kernels[name][grid](*args, **flags)

    def logit_block_b(self) -> int:
        """Column block of ``logit_grad_kernel``: fixed per call, whichever config runs."""
        if self.blocks is not None:
            return self.blocks[1]
        module = _kernels()
        return min(module.LOGIT_BLOCK_B, module.fp64_cap(self.q.element_size()))

    def logit_grad(self, r0: int, r1: int, g, loss=None, gsum=None, lse_row=None, w_row=None, coef=None,
                   lse_col=None, w_col=None, gmax=None):
        """``G`` of rows ``[r0, r1)`` into ``g`` (divided by ``gmax`` when given); with
        ``loss``/``gsum`` (sigmoid, ``[r1 - r0, cdiv(C, logit_block_b())]``) the per-tile row sums
        of the loss and of ``G``."""
        dummy = self.pointers[0]
        stats = tuple(dummy if t is None else t for t in (lse_row, w_row, coef, lse_col, w_col, gmax))
        buffers, stride = ((dummy, dummy), 0) if loss is None else ((loss, gsum), loss.shape[1])
        args = (self.q, self.k, *self.pointers, *stats, g, *buffers, self.n, self.c, self.d, self.g, r0, r1, stride)
        flags = dict(self.flags, SIGMOID=self.sigmoid, SYMMETRIC=self.symmetric, WRITE_SUMS=loss is not None,
                     G_SCALED=gmax is not None)
        grid = lambda meta: (_cdiv(r1 - r0, meta["BLOCK_A"]), _cdiv(self.c, meta["BLOCK_B"]))  # noqa: E731
        self._launch("logit_grad_kernel", grid, args, flags)

    def stats(self, own_rows: bool, lse, pos_sum=None, pos_cnt=None):
        """Fill ``lse`` (and, owning rows, the positive-logit sums and counts) per anchor."""
        a, b = (self.q, self.k) if own_rows else (self.k, self.q)
        dummy = lse
        args = (a, b, *self.pointers, lse, dummy if pos_sum is None else pos_sum,
                dummy if pos_cnt is None else pos_cnt, self.n, self.c, self.d, self.g)
        self._run("softmax_stats_kernel", a.shape[0], False, args, dict(self.flags, OWN_ROWS=own_rows))

    def grad(self, own_rows: bool, out=None, gsum=None, loss=None, n_out=None, lse_row=None, w_row=None,
             coef=None, lse_col=None, w_col=None, gmax=None):
        """One gradient launch owning rows (``sum_j G_ij k_j``, row sums of G, sigmoid loss) or
        columns (``sum_i G_ij s_i q_i``). Outputs left as ``None`` are not computed; ``n_out``
        limits the owned lines (the columns that get a gradient)."""
        a, b = (self.q, self.k) if own_rows else (self.k, self.q)
        dummy = self.pointers[0]
        stats = tuple(dummy if t is None else t for t in (lse_row, w_row, coef, lse_col, w_col, gmax))
        outputs = tuple(dummy if t is None else t for t in (out, gsum, loss))
        n_out = a.shape[0] if n_out is None else n_out
        args = (a, b, *self.pointers, *stats, *outputs, self.n, self.c, self.d, self.g, n_out)
        flags = dict(self.flags, SIGMOID=self.sigmoid, OWN_ROWS=own_rows, SYMMETRIC=self.symmetric,
                     ACCUMULATE=out is not None, STORE_OUT=out is not None,
                     WRITE_GSUM=gsum is not None, WRITE_LOSS=loss is not None, G_SCALED=gmax is not None)
        self._run("grad_kernel", n_out, out is not None, args, flags)


def _launcher(query, key, scale_rows, spec: SoftmaxSpec) -> _Launcher:
    q, k = query.contiguous(), key.contiguous()
    pos = spec.positive_index.contiguous() if spec.positive_index is not None else None
    if pos is None and not spec.uses_labels:
        pos = no_positives(q.shape[0], q.device)
    labels = (spec.row_labels.contiguous(), spec.col_labels.contiguous()) if spec.uses_labels else (None, None)
    return _Launcher(q, k, scale_rows, _scalars(None, scale_rows.dtype, q.device), False, pos, *labels,
                     col_has_label=spec.col_has_label, exclude_self=spec.exclude_self, decoupled=spec.decoupled,
                     symmetric=spec.symmetric, fn_row=spec.fn_row, fn_col=spec.fn_col, guide_rows=spec.guide_rows,
                     guide_cols=spec.guide_cols)


def softmax_stats(query, key, scale_rows, spec: SoftmaxSpec) -> SoftmaxStats:
    """Row (and, for symmetric specs, column) LSE of the block, and label-positive sums."""
    launcher = _launcher(query, key, scale_rows, spec)
    n, c, cd, dev = launcher.n, launcher.c, scale_rows.dtype, scale_rows.device
    lse_row = torch.empty(n, dtype=cd, device=dev)
    pos_sum = pos_cnt = lse_col = None
    if spec.uses_labels:
        pos_sum, pos_cnt = torch.empty(n, dtype=cd, device=dev), torch.empty(n, dtype=cd, device=dev)
    with _on_device(launcher.q):
        launcher.stats(True, lse_row, pos_sum, pos_cnt)
        if spec.symmetric:
            lse_col = torch.empty(c, dtype=cd, device=dev)
            launcher.stats(False, lse_col)
    return SoftmaxStats(lse_row, lse_col, pos_sum, pos_cnt)


def softmax_grad(query, key, scale_rows, spec: SoftmaxSpec, lse_row, w_row, coef, lse_col=None, w_col=None, *,
                 rows: bool = True, cols: bool = True):
    """``(sum_j G_ij k_j, sum_i G_ij s_i q_i)`` of the block from final statistics."""
    launcher = _launcher(query, key, scale_rows, spec)
    cd = scale_rows.dtype
    weights = dict(lse_row=finite_or_zero(lse_row).contiguous(), w_row=w_row.contiguous(), coef=coef.contiguous(),
                   lse_col=None if lse_col is None else lse_col.contiguous(),
                   w_col=None if w_col is None else w_col.contiguous())
    weights["gmax"] = float16_gradient_scale(query.dtype, w_row, coef, w_col)
    n_grad_cols = launcher.c if spec.n_grad_cols is None else spec.n_grad_cols
    directions = int(rows) + int(cols and n_grad_cols > 0)
    q = launcher.q
    if chunked.choose(q.device, q.dtype, launcher.n, launcher.c, launcher.d, directions) == "chunked":
        with _on_device(launcher.q):
            acc_q, acc_k, _ = chunked.run(lambda r0, r1, g: launcher.logit_grad(r0, r1, g, **weights), launcher.q,
                                          launcher.k, scale_rows, rows=rows, cols=cols, n_grad_cols=n_grad_cols,
                                          g_scale=weights["gmax"])
        return acc_q, acc_k
    acc_q = acc_k = None
    with _on_device(launcher.q):
        if rows:
            acc_q = torch.empty(launcher.n, launcher.d, dtype=cd, device=scale_rows.device)
            launcher.grad(True, out=acc_q, **weights)
        if cols:
            acc_k = _column_launch(launcher, cd, n_grad_cols, **weights)
    return acc_q, acc_k


def sigmoid_pass(query, key, scale_rows, bias, positive_index, *, rows: bool = True, cols: bool = True,
                 gsum: bool = True, labels=None) -> SigmoidSums:
    """Sigmoid loss and gradient sums of the block (the row launch also sums the loss); label
    positives are the kernels' in-tile label comparison."""
    q, k = query.contiguous(), key.contiguous()
    n, cd, dev = q.shape[0], scale_rows.dtype, q.device
    pos = no_positives(n, dev) if positive_index is None else positive_index.contiguous()
    row_labels, col_labels = (None, None) if labels is None else (labels[0].contiguous(), labels[1].contiguous())
    launcher = _Launcher(q, k, scale_rows, _scalars(bias, cd, dev), bias is not None, pos, row_labels, col_labels,
                         sigmoid=True)
    n_sums = _cdiv(launcher.c, launcher.logit_block_b())
    directions = int(rows) + int(cols)
    if directions and chunked.choose(dev, q.dtype, n, launcher.c, launcher.d, directions,
                                     extra_row_bytes=2 * n_sums * scale_rows.element_size()) == "chunked":

        def fill(r0, r1, g):
            loss = torch.empty(r1 - r0, n_sums, dtype=cd, device=dev)
            g_sum = torch.empty_like(loss)
            launcher.logit_grad(r0, r1, g, loss=loss, gsum=g_sum)
            return loss.sum(), g_sum.sum()

        with _on_device(q):
            acc_q, acc_k, (total, g_total) = chunked.run(fill, q, k, scale_rows, rows=rows, cols=cols,
                                                         extra_row_bytes=2 * n_sums * scale_rows.element_size())
        return SigmoidSums(total, g_total if gsum else None, acc_q, acc_k)
    loss_rows = torch.empty(n, dtype=cd, device=dev)
    g_rows = torch.empty(n, dtype=cd, device=dev) if gsum else None
    acc_q = torch.empty(n, launcher.d, dtype=cd, device=dev) if rows else None
    with _on_device(q):
        launcher.grad(True, out=acc_q, gsum=g_rows, loss=loss_rows)
        acc_k = _column_launch(launcher, cd, launcher.c) if cols else None
    return SigmoidSums(loss_rows.sum(), None if g_rows is None else g_rows.sum(), acc_q, acc_k)


def _column_launch(launcher: _Launcher, cd, n_grad_cols: int, **weights):
    """``sum_i G_ij s_i q_i`` for the first ``n_grad_cols`` columns, zeros beyond."""
    acc_k = torch.empty(launcher.c, launcher.d, dtype=cd, device=launcher.q.device)
    acc_k[n_grad_cols:].zero_()
    if n_grad_cols > 0:
        launcher.grad(False, out=acc_k, n_out=n_grad_cols, **weights)
    return acc_k


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
            return ("the Triton kernels were loaded compiled (for a GPU); CPU tensors need them loaded under "
                    "TRITON_INTERPRET=1")
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
    if device.type == "cuda" and not interpreted and not torch.cuda.is_available():
        return "no CUDA device is available"
    if device.type not in ("cpu", "cuda"):
        return f"Triton runs on CUDA devices (or the CPU interpreter), not {device.type}"
    return None


# ----------------------------------------------------------------------------------------------
# Matryoshka prefixes (fastcl.ops.matryoshka): triton_kernels/prefix.py


def _prefix_kernels():
    from ..triton_kernels import prefix

    return prefix


def prefers_one_sweep(device: torch.device, dims) -> bool:
    """Whether the one-sweep prefix passes run instead of the ordinary passes once per prefix
    (``FASTCL_PREFIXES`` overrides): always here. On chip a tile's epilogue is cheap beside its
    product, and one sweep does the products of the widest prefix only (a model: not measured
    on a GPU yet)."""
    return _config.prefixes() != "per_prefix"


class _PrefixLauncher:
    """The tensors and flags of one prefix pass: features in ``kernel_dtype``, the scales and the
    prefix widths, the masks of ``spec``."""

    def __init__(self, query, key, row_scales, col_scales, dims, spec: SoftmaxSpec, kernel_dtype):
        self.q, self.k = query.to(kernel_dtype).contiguous(), key.to(kernel_dtype).contiguous()
        self.rs, self.cs = row_scales.contiguous(), col_scales.contiguous()
        self.n, self.c, self.d, self.n_pre = self.q.shape[0], self.k.shape[0], self.q.shape[1], len(dims)
        self.width = max(dims)
        self.dims = torch.tensor(dims, dtype=torch.int32, device=self.q.device)
        dummy = self.rs
        pos = spec.positive_index
        if pos is None and not spec.uses_labels:
            pos = no_positives(self.n, self.q.device)
        labels = spec.uses_labels
        self.masks = (dummy if pos is None else pos.contiguous(),
                      spec.row_labels.contiguous() if labels else dummy,
                      spec.col_labels.contiguous() if labels else dummy,
                      spec.col_has_label.to(torch.int32) if spec.col_has_label is not None else dummy)
        self.flags = dict(LABELS=labels, COL_MASK=spec.col_has_label is not None, EXCLUDE_SELF=spec.exclude_self,
                          DECOUPLED=spec.decoupled, BLOCK_P=max(2, 1 << (self.n_pre - 1).bit_length()),
                          **_type_args(self.q.dtype, self.q.device))

    def sides(self, own_rows: bool):
        return (self.q, self.k) if own_rows else (self.k, self.q)

    def stats(self, own_rows: bool, lse, pos_sum, pos_cnt):
        a, b = self.sides(own_rows)
        module = _prefix_kernels()
        _fixed_launch(module, module.prefix_stats_kernel, lambda meta: (_cdiv(a.shape[0], meta["BLOCK_A"]),),
                      (a, b, self.rs, self.cs, self.dims, *self.masks, lse, pos_sum, pos_cnt, self.n, self.c, self.d,
                       self.n_pre), dict(self.flags, OWN_ROWS=own_rows))

    def grad(self, own_rows: bool, stats, out, dscale, n_out: int, symmetric: bool):
        """``out`` (``None``: only the scale gradients) and ``dscale`` of the first ``n_out``
        owned lines; the feature chunks span the widest prefix (``out`` is zero beyond it)."""
        a, b = self.sides(own_rows)
        module = _prefix_kernels()

        def grid(meta):
            return _cdiv(n_out, meta["BLOCK_A"]), _cdiv(self.width, meta["BLOCK_X"]) if out is not None else 1

        _fixed_launch(module, module.prefix_grad_kernel, grid,
                      (a, b, self.rs, self.cs, self.dims, *self.masks, *stats, self.rs if out is None else out, dscale,
                       self.n, self.c, self.d, self.n_pre, n_out),
                      dict(self.flags, OWN_ROWS=own_rows, SYMMETRIC=symmetric, ACCUMULATE=out is not None,
                           F32_PRODUCT=self.q.dtype == torch.float16))


def softmax_stats_prefixes(query, key, row_scales, col_scales, dims, spec: SoftmaxSpec,
                           kernel_dtype=None) -> SoftmaxStats:
    """The statistics of ``P`` prefix problems in one sweep (``fastcl.backends`` states the
    contract): one launch owning the rows, and one owning the columns when symmetric."""
    launcher = _PrefixLauncher(query, key, row_scales, col_scales, dims, spec, kernel_dtype or query.dtype)
    n, c, n_pre, cd, dev = launcher.n, launcher.c, launcher.n_pre, row_scales.dtype, row_scales.device
    lse_row = torch.empty(n_pre, n, dtype=cd, device=dev)
    pos_sum = pos_cnt = lse_col = None
    if spec.uses_labels:
        pos_sum, pos_cnt = torch.empty(n_pre, n, dtype=cd, device=dev), torch.empty(n, dtype=cd, device=dev)
    with _on_device(launcher.q):
        launcher.stats(True, lse_row, lse_row if pos_sum is None else pos_sum, lse_row if pos_cnt is None else pos_cnt)
        if spec.symmetric:
            lse_col = torch.empty(n_pre, c, dtype=cd, device=dev)
            launcher.stats(False, lse_col, lse_col, lse_col)
    return SoftmaxStats(lse_row, lse_col, pos_sum, pos_cnt)


def softmax_grad_prefixes(query, key, row_scales, col_scales, dims, spec: SoftmaxSpec, lse_row, w_row, coef,
                          lse_col=None, w_col=None, *, rows: bool = True, cols: bool = True, kernel_dtype=None):
    """``(acc_q [N, D], acc_k [C, D], d_row [P, N], d_col [P, C])`` of ``P`` prefix problems in
    one sweep (``fastcl.backends`` states the contract): one launch owning the rows and one owning
    the first ``n_grad_cols`` columns, each also yielding its side's scale gradients."""
    launcher = _PrefixLauncher(query, key, row_scales, col_scales, dims, spec, kernel_dtype or query.dtype)
    n, c, d, cd, dev = launcher.n, launcher.c, launcher.d, row_scales.dtype, row_scales.device
    n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols
    symmetric = spec.symmetric
    dummy = row_scales
    stats = [finite_or_zero(lse_row).contiguous(), w_row.contiguous(), coef.contiguous(),
             finite_or_zero(lse_col).contiguous() if symmetric else dummy, w_col.contiguous() if symmetric else dummy]
    narrower = launcher.width < d  # features beyond the widest prefix get no gradient

    def out(size, want):
        if not want:
            return None
        return (torch.zeros if narrower else torch.empty)(size, d, dtype=cd, device=dev)

    acc_q, acc_k = out(n, rows), out(c, cols)
    d_row = torch.empty(len(dims), n, dtype=cd, device=dev)
    d_col = torch.zeros(len(dims), c, dtype=cd, device=dev)
    with _on_device(launcher.q):
        launcher.grad(True, stats, acc_q, d_row, n, symmetric)
        if acc_k is not None:
            acc_k[n_grad_cols:].zero_()
        if n_grad_cols > 0:
            launcher.grad(False, stats, acc_k, d_col, n_grad_cols, symmetric)
    return acc_q, acc_k, d_row, d_col


# ----------------------------------------------------------------------------------------------
# Distillation (fastcl.ops.distill): triton_kernels/distill.py


def _distill_kernels():
    from ..triton_kernels import distill

    return distill


def _fixed_launch(module, kernel, grid, args, flags):
    """Launch with fixed blocks: the interpreter's (or ``FASTCL_TRITON_BLOCK``), else ``module``'s
    GPU ones (the distillation and prefix kernels are not autotuned yet)."""
    blocks = _fixed_blocks()
    if blocks is not None:
        meta = dict(BLOCK_A=blocks[0], BLOCK_B=blocks[1], BLOCK_D=blocks[2], BLOCK_X=blocks[3])
        extra = {}
    else:
        meta, extra = dict(module.GPU_BLOCKS), {"num_warps": module.GPU_WARPS}
    if "BLOCK_X" not in kernel.arg_names:
        meta.pop("BLOCK_X")
    kernel[grid(meta)](*args, **flags, **meta, **extra)


def _distill_launch(kernel, grid, args, flags):
    _fixed_launch(_distill_kernels(), kernel, grid, args, flags)


def _distill_inputs(query, key, t_query, t_key, scale_rows, t_scale_rows):
    q, k, tq, tk = (x.contiguous() for x in (query, key, t_query, t_key))
    return q, k, tq, tk, scale_rows.contiguous(), t_scale_rows.contiguous(), _scalars(None, scale_rows.dtype, q.device)


def distill_stats(query, key, scale_rows, t_query, t_key, t_scale_rows, symmetric: bool) -> DistillStats:
    """Student and teacher statistics of one block (``fastcl.backends`` states the contract): one
    launch owning the rows, and one owning the columns when ``symmetric``."""
    q, k, tq, tk, s, ts, scalars = _distill_inputs(query, key, t_query, t_key, scale_rows, t_scale_rows)
    n, c, d, dt = q.shape[0], k.shape[0], q.shape[1], tq.shape[1]
    cd, dev = scale_rows.dtype, q.device
    kernel = _distill_kernels().distill_stats_kernel
    out = {}
    with _on_device(q):
        for own_rows in (True, False) if symmetric else (True,):
            a, b, ta, tb, size = (q, k, tq, tk, n) if own_rows else (k, q, tk, tq, c)
            lse, t_lse, mean = (torch.empty(size, dtype=cd, device=dev) for _ in range(3))
            _distill_launch(kernel, lambda meta, size=size: (_cdiv(size, meta["BLOCK_A"]),),
                            (a, b, ta, tb, s, ts, scalars, lse, t_lse, mean, n, c, d, dt),
                            dict(OWN_ROWS=own_rows, **_type_args(q.dtype, dev)))
            out[own_rows] = (lse, t_lse, mean)
    rows, cols = out[True], out.get(False, (None, None, None))
    return DistillStats(rows[0], cols[0], rows[1], cols[1], rows[2], cols[2])


def distill_grad(query, key, scale_rows, t_query, t_key, t_scale_rows, positive_index, st: DistillStats, w_row,
                 u_row, coef, w_col=None, u_col=None, *, student: bool = True, teacher: bool = True):
    """``(acc_q, acc_k, t_acc_q, t_acc_k)`` of one block (``fastcl.backends`` states the contract):
    one launch owning the rows and one owning the columns, each over chunks of the features."""
    q, k, tq, tk, s, ts, scalars = _distill_inputs(query, key, t_query, t_key, scale_rows, t_scale_rows)
    n, c, d, dt = q.shape[0], k.shape[0], q.shape[1], tq.shape[1]
    cd, dev = scale_rows.dtype, q.device
    symmetric = st.lse_col is not None
    dummy = s

    def vec(x):
        return dummy if x is None else x.contiguous()

    row_stats = [finite_or_zero(st.lse_row), finite_or_zero(st.t_lse_row), st.mean_row, w_row, u_row, coef]
    col_stats = [None if x is None else finite_or_zero(x) for x in (st.lse_col, st.t_lse_col)] + [st.mean_col, w_col,
                                                                                                 u_col]
    pointers = [vec(x) for x in row_stats + col_stats]
    kernel = _distill_kernels().distill_grad_kernel
    results = {}
    with _on_device(q):
        for own_rows in (True, False):
            a, b, ta, tb, size = (q, k, tq, tk, n) if own_rows else (k, q, tk, tq, c)
            out = torch.empty(size, d, dtype=cd, device=dev) if student else dummy
            t_out = torch.empty(size, dt, dtype=cd, device=dev) if teacher else dummy
            flags = dict(OWN_ROWS=own_rows, SYMMETRIC=symmetric, STUDENT=student, TEACHER=teacher,
                         F32_PRODUCT=q.dtype == torch.float16, **_type_args(q.dtype, dev))
            grid = lambda meta, size=size: (_cdiv(size, meta["BLOCK_A"]), _cdiv(max(d, dt), meta["BLOCK_X"]))  # noqa: E731
            _distill_launch(kernel, grid, (a, b, ta, tb, s, ts, scalars, positive_index.contiguous(), *pointers, out,
                                           t_out, n, c, d, dt), flags)
            results[own_rows] = (out if student else None, t_out if teacher else None)
    (acc_q, t_acc_q), (acc_k, t_acc_k) = results[True], results[False]
    return acc_q, acc_k, t_acc_q, t_acc_k
