"""CUDA backend: autograd Functions over the compiled tile kernels of ``fastcl._C`` (``csrc/``).

Same contract and semantics as ``backends/torch.py``, the readable specification:
``softmax_loss`` returns per-anchor losses and validity, ``sigmoid_loss`` a scalar.

Division of labour. The kernels do the O(N * C * D) tile work and nothing else: row (and, for
symmetric losses, column) log-sum-exp statistics with the masks (excluded self column,
decoupled positives, label positives and their logit sums), and the gradient accumulators
``sum_j G_ij k_j`` (rows) and ``sum_i G_ij s_i q_i`` (columns) with S recomputed. This module
does the O((N + C) * D) bookkeeping in PyTorch as the torch backend does: one-hot positive
logits, the bias and ``pos_weight`` terms, validity, the target weight of each positive, and
``d(scale)_i = <q_i, sum_j G_ij k_j>``. Unlike the torch backend, the target terms of the
gradient (``-t_ij``, and SigLIP's ``-1`` on positives) are applied inside the tiles: G is
rounded to bf16/fp16 for the tensor-core product, and for a confident positive
``w p_ij - t_ij ~ 0`` must be formed before that rounding, not after.

Numerics: statistics and accumulators are fp32 (fp64 for fp64 inputs). fp16/bf16 products run
on tensor cores; fp32 runs exactly on CUDA cores, or on TF32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set; fp64 on CUDA cores. Deterministic: no atomics,
and the partial results of split tiles are summed in a fixed order.

``FASTCL_CUDA_SPLIT=k`` fixes how many pieces the other side's tiles are cut into (default:
chosen from the GPU's multiprocessor count); tests use it to exercise the merge of partials.

Importing this module never touches the GPU or requires the extension; :func:`available` says
why the backend cannot run.
"""

import os
from typing import Optional

import torch

from .._spec import SigmoidSpec, SoftmaxSpec
from .common import anchor_losses, compute_dtype, finite_or_zero, row_scale, scaled_saved_gradients, sum_to_scale



def _ext():
    from .. import _C

    return _C






def _launch_options(dtype: torch.dtype) -> dict:
    split = int(os.environ.get("FASTCL_CUDA_SPLIT", "0") or 0)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"allow_tf32": bool(tf32), "n_split": split}


def _masks(spec: SoftmaxSpec) -> dict:
    """The spec's mask tensors as the kernels take them (int64 / bool, contiguous)."""
    def vec(t, dtype):
        return None if t is None else t.to(dtype).contiguous()

    return {
        "positive_index": vec(spec.positive_index, torch.long),
        "row_labels": vec(spec.row_labels, torch.long),
        "col_labels": vec(spec.col_labels, torch.long) if spec.uses_labels else None,
        "col_has_label": vec(spec.col_has_label, torch.bool) if spec.uses_labels else None,
        "exclude_self": bool(spec.exclude_self),
        "decoupled": bool(spec.decoupled),
    }


# ----------------------------------------------------------------------------------------------
# Softmax family


class SoftmaxLoss(torch.autograd.Function):
    """Per-anchor softmax-family losses; the contract of ``backends.torch.SoftmaxLoss``.

    Returns ``(row_loss[N], col_loss[N] or empty, row_valid[N], col_valid[N] or empty)`` in the
    compute dtype. Forward: one statistics kernel owning rows (plus one owning columns when
    symmetric). Backward: one gradient kernel owning rows (dQ and d(scale)) and one owning the
    first ``n_grad_cols`` columns (dK), each recomputing S. The bias cancels in every softmax and
    enters the loss as ``b * (1 - pos_weight_i)`` only.
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SoftmaxSpec):
        C = _ext()
        cd = compute_dtype(query.dtype)
        q, k = query.contiguous(), key.contiguous()
        n = q.shape[0]
        s_rows = row_scale(scale, n, cd)
        masks, launch = _masks(spec), _launch_options(q.dtype)

        lse_row, pos_sum, pos_cnt = C.softmax_stats(q, k, s_rows, **masks, own_rows=True, **launch)
        if spec.uses_labels:
            pos_term = pos_sum / pos_cnt.clamp(min=1)
        else:
            pos_term = (q.to(cd) * s_rows[:, None] * k[spec.positive_index].to(cd)).sum(dim=1)
        lse_col = None
        if spec.symmetric:
            lse_col_full, _, _ = C.softmax_stats(q, k, s_rows, **masks, own_rows=False, **launch)
            lse_col = lse_col_full[spec.positive_index]
        row_loss, col_loss, row_valid, col_valid = anchor_losses(spec, lse_row, pos_term, pos_cnt, lse_col, bias)
        if lse_col is None:
            lse_col = col_loss

        ctx.spec = spec
        ctx.save_for_backward(query, key, scale, bias if bias is not None else torch.empty(0),
                              lse_row, lse_col, row_valid, col_valid,
                              pos_cnt if spec.uses_labels else torch.empty(0))
        ctx.mark_non_differentiable(row_valid, col_valid)
        return row_loss, col_loss, row_valid, col_valid

    @staticmethod
    def backward(ctx, grad_row, grad_col, _grad_row_valid, _grad_col_valid):
        query, key, scale, bias, lse_row, lse_col, row_valid, col_valid, pos_cnt = ctx.saved_tensors
        spec: SoftmaxSpec = ctx.spec
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        C = _ext()
        cd = lse_row.dtype
        q, k = query.contiguous(), key.contiguous()
        n, c, d, dev = q.shape[0], k.shape[0], q.shape[1], q.device
        s_rows = row_scale(scale, n, cd)
        n_grad_cols = c if spec.n_grad_cols is None else spec.n_grad_cols
        pw = None if spec.pos_weight is None else spec.pos_weight.to(cd)

        # softmax-term weight of each anchor: the incoming gradient, zero on invalid anchors
        w_row = torch.where(row_valid, grad_row.to(cd), torch.zeros_like(lse_row))
        w_col_by_row = w_col = lse_col_full = coef_row = None
        if spec.symmetric:
            w_col_by_row = torch.where(col_valid, grad_col.to(cd), torch.zeros_like(lse_col))
            w_col = torch.zeros(c, dtype=cd, device=dev).index_put_((spec.positive_index,), w_col_by_row)
            lse_col_full = torch.zeros(c, dtype=cd, device=dev).index_put_((spec.positive_index,),
                                                                           finite_or_zero(lse_col))
        # sum_j G_ij = w_row_i * (1 - pos_weight_i) (+ the column anchor's share): d(bias)
        bias_coef = w_row if w_col_by_row is None else w_row + w_col_by_row
        # -t_ij on each positive (t_ij = pos_weight_i / |P_i|; a one-hot positive carries both
        # directions' targets), applied inside the tile before G is rounded to the input type
        coef_row = w_row / pos_cnt.clamp(min=1) if spec.uses_labels else bias_coef
        if pw is not None:
            coef_row = coef_row * pw
        grad_args = dict(_masks(spec), lse_row=finite_or_zero(lse_row), w_row=w_row, coef_row=coef_row,
                         lse_col=lse_col_full, w_col=w_col, **_launch_options(q.dtype))

        dq_acc = dk = None
        if need_q or need_s:  # sum_j G_ij k_j, before the row scale
            dq_acc = C.softmax_grad(q, k, s_rows, own_rows=True, n_own=n, **grad_args)
        if need_k:
            dk = torch.zeros(c, d, dtype=cd, device=dev)
            if n_grad_cols > 0:
                dk[:n_grad_cols] = C.softmax_grad(q, k, s_rows, own_rows=False, n_own=n_grad_cols, **grad_args)

        grad_q = (dq_acc * s_rows[:, None]).to(query.dtype) if need_q else None
        grad_k = dk.to(key.dtype) if need_k else None
        grad_s = sum_to_scale((dq_acc * q.to(cd)).sum(dim=1), scale) if need_s else None
        grad_b = None
        if need_b:
            db = torch.zeros((), dtype=cd, device=dev) if pw is None else (bias_coef * (1 - pw)).sum()
            grad_b = db.to(bias.dtype).reshape(bias.shape)
        return grad_q, grad_k, grad_s, grad_b, None


# ----------------------------------------------------------------------------------------------
# Sigmoid family


class SigmoidLoss(torch.autograd.Function):
    """Sigmoid-family loss (a scalar); the contract of ``backends.torch.SigmoidLoss``.

    The kernels form ``softplus(-z_ij L_ij)`` and ``G_ij = sigmoid(L_ij) - [z_ij = 1]`` per entry
    (row sums of both, and the accumulators). ``G`` needs no statistic, so when autograd will
    need gradients the forward runs the gradient kernels too (the row kernel also yields the
    loss) and the backward only scales them.
    """

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec: SigmoidSpec):
        C = _ext()
        cd = compute_dtype(query.dtype)
        q, k = query.contiguous(), key.contiguous()
        n, c = q.shape[0], k.shape[0]
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        s_rows = row_scale(scale, n, cd)
        b = None if bias is None else bias.detach().to(cd).reshape(())
        launch = _launch_options(q.dtype)
        inv_n = 1.0 / spec.n_rows_norm

        row_acc = need_q or need_s
        pos = spec.positive_index.to(torch.long).contiguous()
        acc_q, loss_rows, gsum_rows = C.sigmoid_pass(q, k, s_rows, positive_index=pos, bias=b, own_rows=True, n_own=n,
                                                     accumulate=row_acc, **launch)
        loss = loss_rows.sum() * inv_n

        grads = (None, None, None, None)
        if need_q or need_k or need_s or need_b:
            grad_q = grad_k = grad_s = grad_b = None
            if row_acc:
                dq_acc = acc_q * inv_n
                if need_q:
                    grad_q = (dq_acc * s_rows[:, None]).to(query.dtype)
                if need_s:
                    grad_s = sum_to_scale((dq_acc * q.to(cd)).sum(dim=1), scale)
            if need_k:
                dk_acc = C.sigmoid_pass(q, k, s_rows, positive_index=pos, bias=b, own_rows=False, n_own=c,
                                        accumulate=True, **launch)[0]
                grad_k = (dk_acc * inv_n).to(key.dtype)
            if need_b:
                grad_b = (gsum_rows.sum() * inv_n).to(bias.dtype).reshape(bias.shape)
            grads = (grad_q, grad_k, grad_s, grad_b)
        ctx.save_for_backward(*grads)
        return loss

    backward = staticmethod(scaled_saved_gradients)


def softmax_loss(query, key, scale, bias, spec: SoftmaxSpec):
    """Softmax-family per-anchor losses; see :class:`SoftmaxLoss`."""
    return SoftmaxLoss.apply(query, key, scale, bias, spec)


def sigmoid_loss(query, key, scale, bias, spec: SigmoidSpec):
    """Sigmoid-family scalar loss; see :class:`SigmoidLoss`."""
    return SigmoidLoss.apply(query, key, scale, bias, spec)


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
