"""The chunked gradient pass: the logit gradient of R rows in a bounded workspace, matmuls for the
rest (docs/design.md §7).

The fused gradient pass rebuilds each tile of ``S`` and accumulates ``G @ K_tile`` on chip; its
accumulator is ``BLOCK_A x D``, so beyond D = 256 (bf16) it splits D into 128-wide chunks and
rebuilds ``S`` once per chunk.
This pass instead lets a backend write ``G`` for rows ``[r0, r1)`` and every column into a
workspace (``fill``: ``S`` over the full D, the same ``G`` formula as the fused pass, fp32 math),
then takes the two products from the matmul library (cuBLAS on a GPU):

    acc_q[r0:r1] = G_R @ K                  acc_k[:n_grad_cols] += G_R[:, :n_grad_cols]^T @ (s q)_R

with fp32 accumulation and fp32 outputs (fp64 for fp64 inputs). ``G_R`` is stored in the input
dtype for fp16/bf16 (what the fused kernels feed their ``G @ X`` too) and in the compute dtype
otherwise. ``R`` is the most rows whose workspace fits the memory budget
(``FASTCL_MEMORY_BUDGET_MB``, default 512 MiB): the workspace is ``R x C`` and never more, so it
reaches N x C only when N x C fits inside the budget. Cost: ``2NCD`` FLOPs for ``S`` plus
``2NCD`` per product, whatever D is, and ``3 * bytes(G)`` of memory traffic per logit (written
once, read by each product).

:func:`choose` picks ``fused`` or ``chunked`` for a call: ``FASTCL_BACKWARD`` when it names one,
else a cost model (:func:`modelled_seconds`) whose constants are guesses until a GPU visit
measures them. Off a GPU ``auto`` is ``fused`` (the CPU tile loop already is a chunked pass
through the cache).
"""

import math
from typing import Callable, Optional

import torch

from .. import _config

# The cost model: a model, not a measurement (no GPU has run these passes yet). Dense rates of an
# H200 per input dtype (tensor cores for fp16/bf16/TF32, FMA for fp32/fp64), its HBM bandwidth,
# and the fraction of the dense rate each kind of work is assumed to reach.
_PEAK_FLOPS = {torch.float16: 790e12, torch.bfloat16: 790e12, "tf32": 395e12, torch.float32: 60e12,
               torch.float64: 60e12}
_HBM_BYTES_PER_S = 4.8e12
_FUSED_EFFICIENCY = 0.55  # the fused Triton kernels: S recompute, G, G @ X_tile with an epilogue between
_CUDA_FUSED_EFFICIENCY = 0.30  # the CUDA kernels: WMMA fragments, no cp.async pipeline, global accumulator
_LOGIT_EFFICIENCY = 0.55  # the kernel writing G: S over the full D and an elementwise epilogue
_MATMUL_EFFICIENCY = 0.80  # cuBLAS products [R, C] x [C, D] with R >= _MIN_ROWS
_LAUNCH_S = 5e-6  # per kernel launch
_MIN_ROWS = 128  # auto takes the chunked pass only when a chunk holds this many rows (or every row)


def logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored ``G``: the input's for fp16/bf16, the compute dtype otherwise."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else (torch.float64 if dtype == torch.float64
                                                                   else torch.float32)


def _row_bytes(c: int, dtype: torch.dtype, extra_row_bytes: int, device: Optional[torch.device]) -> int:
    """Workspace bytes per row: ``c`` logits, plus their widened copy where the products cannot
    take half operands with fp32 accumulation (off CUDA: :func:`_product`)."""
    g = logit_dtype(dtype).itemsize
    widened = 4 if g == 2 and (device is None or device.type != "cuda") else 0
    return c * (g + widened) + extra_row_bytes


def chunk_rows(n: int, c: int, dtype: torch.dtype, extra_row_bytes: int = 0,
               budget: Optional[int] = None, device: Optional[torch.device] = None) -> int:
    """Rows per chunk: the most whose workspace (``c`` logits of ``dtype``, their fp32 copy off
    CUDA for half inputs, and ``extra_row_bytes`` per row) fits the budget, at most ``n``; 0 if
    not even one row fits."""
    budget = _config.memory_budget_bytes() if budget is None else budget
    return min(n, budget // max(1, _row_bytes(c, dtype, extra_row_bytes, device)))


def modelled_seconds(kind: str, dtype: torch.dtype, n: int, c: int, d: int, directions: int,
                     chunks: int = 1, tf32: bool = False, fused_kernel: str = "triton") -> float:
    """The model's time for one gradient pass (forward statistics excluded).

    ``fused``: each of the ``directions`` launches (rows, columns) builds ``S`` (``2NCD``) and
    accumulates ``G @ X`` (``2NCD``). Triton's kernels rebuild ``S`` once per accumulator chunk
    of D (one chunk while the owned tile stays on chip, D <= 256 in bf16, else chunks of 128);
    the CUDA kernels build it once and keep the accumulator in global memory, at a lower assumed
    efficiency (WMMA without a pipeline: ``_CUDA_FUSED_EFFICIENCY``).
    ``chunked``: ``S`` once (``2NCD``), one ``2NCD`` product per direction, ``G`` written once and
    read once per direction, three launches per chunk.
    """
    peak = _PEAK_FLOPS["tf32" if tf32 and dtype == torch.float32 else dtype]
    ncd = float(n) * c * d
    if kind == "fused" and fused_kernel == "cuda":
        return directions * 4 * ncd / (peak * _CUDA_FUSED_EFFICIENCY) + directions * _LAUNCH_S
    if kind == "fused":
        from .triton import STREAMED_BLOCK_X, resident_width

        splits = 1 if resident_width(d, dtype.itemsize) else math.ceil(d / STREAMED_BLOCK_X)
        return directions * (2 * ncd * splits + 2 * ncd) / (peak * _FUSED_EFFICIENCY) + directions * _LAUNCH_S
    g_bytes = logit_dtype(dtype).itemsize * (1 + directions) * float(n) * c
    return (2 * ncd / (peak * _LOGIT_EFFICIENCY) + directions * 2 * ncd / (peak * _MATMUL_EFFICIENCY)
            + g_bytes / _HBM_BYTES_PER_S + chunks * (1 + directions) * _LAUNCH_S)


def choose(device: torch.device, dtype: torch.dtype, n: int, c: int, d: int, directions: int,
           extra_row_bytes: int = 0, fused_kernel: str = "triton") -> str:
    """``"fused"`` or ``"chunked"`` for one gradient pass (see the module docstring).

    ``FASTCL_BACKWARD=chunked`` raises when the budget cannot hold one row of ``G``: a silent
    fallback would hide that the budget is too small for what was asked.
    """
    asked = _config.backward()
    rows = chunk_rows(n, c, dtype, extra_row_bytes, device=device)
    if asked == "chunked":
        if rows < 1:
            need = _row_bytes(c, dtype, extra_row_bytes, device)
            raise ValueError(f"FASTCL_BACKWARD=chunked: one row of the logit gradient takes {need} bytes, more "
                             f"than FASTCL_MEMORY_BUDGET_MB allows ({_config.memory_budget_bytes()} bytes); raise "
                             "the budget or use FASTCL_BACKWARD=fused")
        return "chunked"
    if asked == "fused" or device.type != "cuda" or directions == 0 or rows < min(n, _MIN_ROWS):
        return "fused"
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    chunks = math.ceil(n / rows)
    fused = modelled_seconds("fused", dtype, n, c, d, directions, tf32=tf32, fused_kernel=fused_kernel)
    chunked = modelled_seconds("chunked", dtype, n, c, d, directions, chunks, tf32=tf32)
    return "chunked" if chunked < fused else "fused"


def _product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with ``out``'s precision in the accumulation and the result."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda:  # cuBLAS: half inputs, fp32 accumulation and output
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # CPU half matmuls round their output: widen the operands instead
        _product(out, a.to(out.dtype), b.to(out.dtype), accumulate)


def run(fill: Callable, query: torch.Tensor, key: torch.Tensor, scale_rows: torch.Tensor, *, rows: bool,
        cols: bool, n_grad_cols: Optional[int] = None, extra_row_bytes: int = 0,
        g_scale: Optional[torch.Tensor] = None):
    """``(acc_q, acc_k, sums)`` of the contract's gradient pass over chunks of rows.

    ``fill(r0, r1, g)`` writes ``G`` of rows ``[r0, r1)`` into ``g`` (``[r1 - r0, C]``,
    :func:`logit_dtype`), divided by ``g_scale`` when given (fp16:
    ``common.float16_gradient_scale``; the products are multiplied back), and returns a tuple of
    0-d sums for those rows (or ``None``); ``sums`` is their total over the chunks, in order.
    Columns from ``n_grad_cols`` on get zeros.
    """
    n, c, d = query.shape[0], key.shape[0], query.shape[1]
    cd, dev = scale_rows.dtype, query.device
    gd = logit_dtype(query.dtype)
    n_grad_cols = c if n_grad_cols is None else n_grad_cols
    r = max(1, chunk_rows(n, c, query.dtype, extra_row_bytes, device=dev))
    work = torch.empty(r * c, dtype=gd, device=dev)
    acc_q = torch.empty(n, d, dtype=cd, device=dev) if rows else None
    acc_k = torch.zeros(c, d, dtype=cd, device=dev) if cols else None
    key_g = key.to(gd)
    sums = None
    for r0 in range(0, n, r):
        r1 = min(n, r0 + r)
        g = work[: (r1 - r0) * c].view(r1 - r0, c)
        part = fill(r0, r1, g)
        if part is not None:
            sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
        if rows:
            _product(acc_q[r0:r1], g, key_g, accumulate=False)
        if cols and n_grad_cols > 0:
            qs = (query[r0:r1].to(cd) * scale_rows[r0:r1, None]).to(gd)
            _product(acc_k[:n_grad_cols], g[:, :n_grad_cols].T, qs, accumulate=True)
    if g_scale is not None:
        for acc in (acc_q, acc_k):
            if acc is not None:
                acc.mul_(g_scale)
    return acc_q, acc_k, sums
