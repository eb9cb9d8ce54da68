"""CUDA backend: the passes of ``fastcl.backends`` on the compiled tile kernels of ``fastcl._C``
(``csrc/``), whose host API (``csrc/ops.h``) has the same shape: ``softmax_stats``,
``softmax_grad`` and ``sigmoid_pass``, each owning rows or columns.

The kernels do the O(N * C * D) tile work and nothing else: row (and, for symmetric specs,
column) log-sum-exp statistics with the masks, label-positive logit sums, and the accumulators
``sum_j G_ij k_j`` (rows) and ``sum_i G_ij s_i q_i`` (columns) with S recomputed. Unlike the
torch backend, the target terms of the gradient (``-coef_i``, and SigLIP's ``-1`` on positives)
are applied inside the tiles: G is rounded to bf16/fp16 for the tensor-core product, and for a
confident positive ``w p_ij - coef_i ~ 0`` must be formed before that rounding, not after.

Numerics: statistics and accumulators are fp32 (fp64 for fp64 inputs). fp16/bf16 products run
on tensor cores; fp32 runs exactly on CUDA cores, or on TF32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set; fp64 on CUDA cores. Deterministic: no atomics,
and the partial results of split tiles are summed in a fixed order.

``FASTCL_CUDA_SPLIT=k`` fixes how many pieces the other side's tiles are cut into (default:
chosen from the GPU's multiprocessor count); tests use it to exercise the merge of partials.

Gradient passes (docs/design.md §7): fused (the accumulating kernel modes), or chunked: the same
kernel modes write their staged ``G`` tiles for a chunk of rows (``logit_grad``) and
:mod:`.chunked` runs the products (``at::matmul``'s cuBLAS on a GPU).

Importing this module never touches the GPU or requires the extension; :func:`available` says
why the backend cannot run.
"""

from typing import Optional

import torch

from .. import _config
from .._spec import SoftmaxSpec
from . import chunked
from .common import SigmoidSums, SoftmaxStats, finite_or_zero, float16_gradient_scale


def _ext():
    from .. import _C

    return _C


_faked = set()


def _kernels():
    """The extension's kernel operators (see :func:`kernel_operators`)."""
    return kernel_operators(_ext())


def kernel_operators(extension):
    """``torch.ops.fastcl_cuda`` (``torch.ops.fastcl_emulated`` for the CPU emulation build):
    the operators ``extension`` registers in C++ with ``TORCH_LIBRARY``, their fake
    implementations registered here on first use."""
    name = extension.ops_namespace()
    if name not in _faked:
        _register_fakes(name)
        _faked.add(name)
    return getattr(torch.ops, name)


def _register_fakes(namespace: str) -> None:
    """Shapes without data for the kernel operators of ``namespace`` (``csrc/ops.h`` states
    them): what ``torch.library.opcheck``, FakeTensor and ``torch.compile`` use."""

    def acc_dtype(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def vec(like, size):
        return like.new_empty(size, dtype=acc_dtype(like))

    @torch.library.register_fake(f"{namespace}::softmax_stats")
    def _(query, key, scale_rows, positive_index, row_labels, col_labels, col_has_label, own_rows, exclude_self,
          decoupled, allow_tf32, n_split):
        n_own = query.shape[0] if own_rows else key.shape[0]
        sums = n_own if row_labels is not None and own_rows else 0
        return [vec(query, n_own), vec(query, sums), vec(query, sums)]

    @torch.library.register_fake(f"{namespace}::softmax_grad")
    def _(query, key, scale_rows, positive_index, row_labels, col_labels, col_has_label, lse_row, w_row, coef_row,
          lse_col, w_col, own_rows, n_own, exclude_self, decoupled, g_scale, allow_tf32, n_split):
        return query.new_empty((n_own, query.shape[1]), dtype=acc_dtype(query))

    @torch.library.register_fake(f"{namespace}::logit_grad")
    def _(query, key, scale_rows, positive_index, row_labels, col_labels, col_has_label, lse_row, w_row, coef_row,
          lse_col, w_col, bias, g_scale, g, row0, sigmoid, exclude_self, decoupled, allow_tf32, n_split):
        return [vec(query, g.shape[0]), vec(query, g.shape[0])] if sigmoid else []

    @torch.library.register_fake(f"{namespace}::sigmoid_pass")
    def _(query, key, scale_rows, positive_index, bias, own_rows, n_own, accumulate, row_labels, col_labels,
          allow_tf32, n_split):
        acc = query.new_empty((n_own, query.shape[1]), dtype=acc_dtype(query)) if accumulate else vec(query, 0)
        rows = query.shape[0] if own_rows else 0
        return [acc, vec(query, rows), vec(query, rows)]


def _launch_options(dtype: torch.dtype) -> dict:
    split = _config.cuda_split()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"allow_tf32": bool(tf32), "n_split": split}


def _masks(spec: SoftmaxSpec) -> dict:
    """The spec's mask tensors as the kernels take them (int64 / bool, contiguous)."""
    def vec(t, dtype):
        return None if t is None else t.to(dtype).contiguous()

    reason = unsupported(spec)
    if reason is not None:  # the public layer raises first; a direct pass call must not ignore it
        raise ValueError(reason)

    return {
        "positive_index": vec(spec.positive_index, torch.long),
        "row_labels": vec(spec.row_labels, torch.long),
        "col_labels": vec(spec.col_labels, torch.long) if spec.uses_labels else None,
        "col_has_label": vec(spec.col_has_label, torch.bool) if spec.uses_labels else None,
        "exclude_self": bool(spec.exclude_self),
        "decoupled": bool(spec.decoupled),
    }


# ----------------------------------------------------------------------------------------------
# Passes


def softmax_stats(query, key, scale_rows, spec: SoftmaxSpec) -> SoftmaxStats:
    """Row (and, for symmetric specs, column) LSE of the block, and label-positive sums."""
    C = _kernels()
    q, k = query.contiguous(), key.contiguous()
    masks, launch = _masks(spec), _launch_options(q.dtype)
    lse_row, pos_sum, pos_cnt = C.softmax_stats(q, k, scale_rows, **masks, own_rows=True, **launch)
    lse_col = None
    if spec.symmetric:
        lse_col = C.softmax_stats(q, k, scale_rows, **masks, own_rows=False, **launch)[0]
    if not spec.uses_labels:
        pos_sum = pos_cnt = None
    return SoftmaxStats(lse_row, lse_col, pos_sum, pos_cnt)


def softmax_grad(query, key, scale_rows, spec: SoftmaxSpec, lse_row, w_row, coef, lse_col=None, w_col=None, *,
                 rows: bool = True, cols: bool = True):
    """``(sum_j G_ij k_j, sum_i G_ij s_i q_i)`` of the block from final statistics."""
    C = _kernels()
    q, k = query.contiguous(), key.contiguous()
    n, c, d = q.shape[0], k.shape[0], q.shape[1]
    args = dict(_masks(spec), lse_row=finite_or_zero(lse_row).contiguous(), w_row=w_row.contiguous(),
                coef_row=coef.contiguous(), lse_col=None if lse_col is None else lse_col.contiguous(),
                w_col=None if w_col is None else w_col.contiguous(), **_launch_options(q.dtype))
    n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols
    directions = int(rows) + int(cols and n_grad_cols > 0)
    g_scale = float16_gradient_scale(q.dtype, w_row, coef, w_col)
    if chunked.choose(q.device, q.dtype, n, c, d, directions, fused_kernel="cuda") == "chunked":

        def fill(r0, r1, g):
            C.logit_grad(q, k, scale_rows, bias=None, g_scale=g_scale, g=g, row0=r0, sigmoid=False, **args)

        acc_q, acc_k, _ = chunked.run(fill, q, k, scale_rows, rows=rows, cols=cols, n_grad_cols=n_grad_cols,
                                      g_scale=g_scale)
        return acc_q, acc_k
    acc_q = C.softmax_grad(q, k, scale_rows, own_rows=True, n_own=n, g_scale=g_scale, **args) if rows else None
    acc_k = None
    if cols:
        acc_k = torch.zeros(c, d, dtype=scale_rows.dtype, device=q.device)
        if n_grad_cols > 0:
            acc_k[:n_grad_cols] = C.softmax_grad(q, k, scale_rows, own_rows=False, n_own=n_grad_cols,
                                                 g_scale=g_scale, **args)
    return acc_q, acc_k


def sigmoid_pass(query, key, scale_rows, bias, positive_index, *, rows: bool = True, cols: bool = True,
                 gsum: bool = True, labels=None) -> SigmoidSums:
    """Sigmoid loss and gradient sums of the block (the row kernel also sums the loss); label
    positives are compared inside the tiles."""
    C = _kernels()
    q, k = query.contiguous(), key.contiguous()
    launch = _launch_options(q.dtype)
    pos = None if positive_index is None else positive_index.to(torch.long).contiguous()
    labelled = dict(row_labels=None, col_labels=None) if labels is None else dict(
        row_labels=labels[0].to(torch.long).contiguous(), col_labels=labels[1].to(torch.long).contiguous())
    directions = int(rows) + int(cols)
    if directions and chunked.choose(q.device, q.dtype, q.shape[0], k.shape[0], q.shape[1], directions,
                                     fused_kernel="cuda") == "chunked":

        def fill(r0, r1, g):
            loss, g_sum = C.logit_grad(q, k, scale_rows, positive_index=pos, col_has_label=None, lse_row=None,
                                       w_row=None, coef_row=None, lse_col=None, w_col=None, bias=bias, g_scale=None,
                                       g=g, row0=r0, sigmoid=True, exclude_self=False, decoupled=False, **labelled,
                                       **launch)
            return loss.sum(), g_sum.sum()

        acc_q, acc_k, (total, g_total) = chunked.run(fill, q, k, scale_rows, rows=rows, cols=cols)
        return SigmoidSums(total, g_total if gsum else None, acc_q, acc_k)
    acc_q, loss_rows, g_rows = C.sigmoid_pass(q, k, scale_rows, positive_index=pos, bias=bias, own_rows=True,
                                              n_own=q.shape[0], accumulate=rows, **labelled, **launch)
    acc_k = None
    if cols:
        acc_k = C.sigmoid_pass(q, k, scale_rows, positive_index=pos, bias=bias, own_rows=False, n_own=k.shape[0],
                               accumulate=True, **labelled, **launch)[0]
    return SigmoidSums(loss_rows.sum(), g_rows.sum() if gsum else None, acc_q if rows else None, acc_k)


def unsupported(spec) -> Optional[str]:
    """What the compiled kernels do not cover, or ``None``: the false-negative and guide-model
    masks (their thresholds are not in their mask contract yet)."""
    if isinstance(spec, SoftmaxSpec) and spec.guide_rows is not None:
        return "the CUDA kernels have no guide-model mask (guide_query/guide_key)"
    # a pass's spec carries the thresholds only (the operators rebuild it without the margin)
    if isinstance(spec, SoftmaxSpec) and (spec.false_negative_margin is not None or spec.fn_row is not None):
        return "the CUDA kernels have no false-negative mask (false_negative_margin)"
    return None


def _arch_number(arch: str) -> int:
    return int(arch.rstrip("a"))


def available(device: torch.device) -> Optional[str]:
    """``None`` if this backend can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    try:
        C = _ext()
    except ImportError as exc:
        return (f"the compiled extension fastcl._C is not built ({exc}); build it with "
                "`pip install --no-build-isolation -e .` where nvcc and a CUDA build of torch are present")
    if not C.built_with_cuda():
        return "fastcl._C was built without CUDA kernels"
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors, not {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0 or newer; {device} has {major}.{minor}"
    archs = [_arch_number(a) for a in C.cuda_archs()]
    cc = 10 * major + minor
    # a cubin runs on its major version at an equal or higher minor; the PTX of the newest arch
    # is JIT-compiled for anything newer
    if archs and not any(a // 10 == major and a <= cc for a in archs) and max(archs) > cc:
        return (f"fastcl._C was built for sm_{', sm_'.join(map(str, archs))}, which cannot run on {device} "
                f"(sm_{cc}); rebuild with FASTCL_CUDA_ARCH including {cc}")
    return None
