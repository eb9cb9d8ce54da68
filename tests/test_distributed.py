"""Cross-rank losses (fastcl.distributed) against the single-process loss over the concatenated
batch, on W = 1, 2, 3, 4 gloo processes on CPU.

One launch per world size runs every check (the process start-up dominates the cost) and writes
a JSON report that the tests below read. Each rank builds the same global float64 batch, runs
the single-process loss over it, then the distributed loss over its own (unequal) shard, and
compares: the mean over ranks of the returned losses with the reference loss, each rank's
feature gradient / W with its slice of the reference gradient (DDP averages over W ranks), and
the sum over ranks of a shared scalar's gradient / W (logit scale, bias, a replicated queue) with
the reference. Ring mode's per-rank peak of live tensor bytes is measured at a fixed shard size.

Run one world size by hand: ``python tests/test_distributed.py RANK WORLD PORT OUTDIR`` per rank.
"""

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import weakref
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from helpers import InsideOperators
from spawn import leave, run_ranks

if __name__ != "__main__":
    from conftest import emulated_extension

WORLD_SIZES = (1, 2, 3, 4)
MULTI = tuple(w for w in WORLD_SIZES if w > 1)
MODES = ("all_gather", "ring")
RTOL = 1e-10
BACKEND_RTOL = 1e-9  # float64 through kernels that sum in other orders
LAUNCH_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------
# Cases: each returns (function, tensors, local_extra(rank), global_extra).
# tensors: name -> (global float64 tensor, row sizes per rank or None for a replicated tensor,
# requires_grad). Integer tensors (labels) are sliced by their sizes too.


def _shards(world, base, spread=3, shift=0):
    """Unequal shard sizes, different for every world size."""
    return [base + (2 * r + world + shift) % spread for r in range(world)]


def _offsets(sizes):
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _unit(g, n, d):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def case_clip(world, g, bias=True, label_smoothing=0.0):
    sizes = _shards(world, 3)
    n, d = sum(sizes), 7
    tensors = {"image_features": (_unit(g, n, d), sizes, True), "text_features": (_unit(g, n, d), sizes, True),
               "logit_scale": (torch.tensor(7.5, dtype=torch.float64), None, True)}
    if bias:
        tensors["logit_bias"] = (torch.tensor(-0.7, dtype=torch.float64), None, True)
    import fastcl
    extra = {"label_smoothing": label_smoothing} if label_smoothing else {}
    return fastcl.clip_loss, tensors, lambda r: extra, extra


def case_distill(world, g, teacher_grad=True):
    """distill_clip_loss: both of its losses in one scalar (contrastive + 0.7 distill), so every
    gradient checks both; a teacher of another width, with or without gradients."""
    sizes = _shards(world, 3)
    n = sum(sizes)
    tensors = {"image_features": (_unit(g, n, 6), sizes, True), "text_features": (_unit(g, n, 6), sizes, True),
               "logit_scale": (torch.tensor(8.0, dtype=torch.float64), None, True),
               "dist_image_features": (_unit(g, n, 4), sizes, teacher_grad),
               "dist_text_features": (_unit(g, n, 4), sizes, teacher_grad),
               "dist_logit_scale": (torch.tensor(12.0, dtype=torch.float64), None, teacher_grad)}
    import fastcl

    def fn(**kw):
        contrastive, distill = fastcl.distill_clip_loss(**kw)
        return contrastive + 0.7 * distill
    return fn, tensors, lambda r: {}, {}


def case_siglip(world, g, classes=0):
    """SigLIP; ``classes``: multi-positive labels drawn from that many classes (0: none)."""
    sizes = _shards(world, 3)
    n, d = sum(sizes), 6
    tensors = {"image_features": (_unit(g, n, d), sizes, True), "text_features": (_unit(g, n, d), sizes, True),
               "logit_scale": (torch.tensor(6.0, dtype=torch.float64), None, True),
               "logit_bias": (torch.tensor(-2.5, dtype=torch.float64), None, True)}
    if classes:
        tensors["labels"] = (torch.randint(0, classes, (n,), generator=g), sizes, False)
    import fastcl
    return fastcl.siglip_loss, tensors, lambda r: {}, {}


def _info_nce_case(world, g, *, key_extra=0, n_neg=0, neg_grad=False, labels=0, neg_labels=False,
                   positives="diag", per_row_t=False, symmetric=False, exclude_self=False, decoupled=False,
                   reduction="mean", d=5, debias=None, first_rows=None, label_smoothing=0.0):
    import fastcl
    rows = _shards(world, 3)
    if first_rows is not None:  # a small shard on rank 0 (one row: a (1,) per-row temperature)
        rows[0] = first_rows
    keys = [r + key_extra for r in rows]
    n, m = sum(rows), sum(keys)
    koff = _offsets(keys)
    tensors = {"query": (torch.randn(n, d, generator=g, dtype=torch.float64) / 2, rows, True),
               "key": (torch.randn(m, d, generator=g, dtype=torch.float64) / 2, keys, True)}
    if n_neg:
        tensors["negatives"] = (torch.randn(n_neg, d, generator=g, dtype=torch.float64) / 2, None, neg_grad)
    if per_row_t:
        tensors["temperature"] = (0.2 + torch.rand(n, generator=g, dtype=torch.float64) * 0.3, rows, True)
    local, glob = [dict() for _ in range(world)], {"reduction": reduction, "symmetric": symmetric,
                                                     "exclude_self": exclude_self, "decoupled": decoupled}
    if debias is not None:
        glob["debias"] = debias
    if label_smoothing:
        glob["label_smoothing"] = label_smoothing
    if not per_row_t:
        glob["temperature"] = 0.3
    if labels:
        tensors["labels"] = (torch.randint(0, labels, (n,), generator=g), rows, False)
        if key_extra:
            tensors["key_labels"] = (torch.randint(0, labels, (m,), generator=g), keys, False)
        if neg_labels:
            tensors["negative_labels"] = (torch.randint(0, labels, (n_neg,), generator=g), None, False)
    elif positives != "diag":
        glob_pos = []
        for r in range(world):
            if positives == "random":  # anywhere among the local keys and the queue
                p = torch.randint(0, keys[r] + n_neg, (rows[r],), generator=g)
            elif positives == "shifted":  # a permutation of range(N_r), never the row itself
                p = (torch.arange(rows[r]) + 1) % rows[r]
            else:  # "perm": distinct local keys, for symmetric losses
                p = torch.randperm(keys[r], generator=g)[: rows[r]]
            local[r]["positive_index"] = p
            glob_pos.append(torch.where(p < keys[r], p + koff[r], p - keys[r] + m))
        glob["positive_index"] = torch.cat(glob_pos)
    for r in range(world):
        local[r].update({k: v for k, v in glob.items() if k != "positive_index"})
    return fastcl.info_nce, tensors, lambda r: local[r], glob


def case_nt_xent(world, g):
    import fastcl
    sizes = _shards(world, 2)
    n = sum(sizes)
    tensors = {"z1": (torch.randn(n, 6, generator=g, dtype=torch.float64), sizes, True),
               "z2": (torch.randn(n, 6, generator=g, dtype=torch.float64), sizes, True)}
    return fastcl.nt_xent, tensors, lambda r: {"temperature": 0.4}, {"temperature": 0.4}


def case_supcon(world, g, contrast_mode="all", labels=True):
    import fastcl
    sizes = _shards(world, 3)
    b = sum(sizes)
    tensors = {"features": (F.normalize(torch.randn(b, 2, 5, generator=g, dtype=torch.float64), dim=-1), sizes, True)}
    if labels:
        tensors["labels"] = (torch.randint(0, 4, (b,), generator=g), sizes, False)
    opts = {"temperature": 0.2, "base_temperature": 0.3, "contrast_mode": contrast_mode}
    return fastcl.supcon, tensors, lambda r: opts, opts


def case_dcl(world, g, weight_sigma=0.5):
    import fastcl
    sizes = _shards(world, 2)
    n = sum(sizes)
    tensors = {"z1": (torch.randn(n, 6, generator=g, dtype=torch.float64), sizes, True),
               "z2": (torch.randn(n, 6, generator=g, dtype=torch.float64), sizes, True)}
    opts = {"temperature": 0.3, "weight_sigma": weight_sigma}
    return fastcl.dcl, tensors, lambda r: opts, opts


def case_nn_module(world, g, module):
    """The fastcl.nn modules hold the cross-rank options and pass them through."""
    import fastcl

    fn, tensors, local_extra, glob_extra = (case_clip if module == "ClipLoss" else case_supcon)(world, g)

    def call(group=None, gather="all_gather", local_loss=False, **kw):
        opts = {k: kw.pop(k) for k in ("temperature", "base_temperature", "contrast_mode") if k in kw}
        return getattr(fastcl.nn, module)(**opts, group=group, gather=gather, local_loss=local_loss)(**kw)

    return call, tensors, local_extra, glob_extra


CASES = {
    "clip_loss": case_clip,
    "clip_loss_no_bias": lambda w, g: case_clip(w, g, bias=False),
    "siglip_loss": case_siglip,
    # few classes: most positives cross ranks; many: mostly the diagonal and a few duplicates
    "siglip_loss_labels_3_classes": lambda w, g: case_siglip(w, g, classes=3),
    "siglip_loss_labels_many_classes": lambda w, g: case_siglip(w, g, classes=40),
    "info_nce": lambda w, g: _info_nce_case(w, g),
    "info_nce_positive_index_m_gt_n": lambda w, g: _info_nce_case(w, g, key_extra=2, positives="random"),
    "info_nce_per_row_temperature": lambda w, g: _info_nce_case(w, g, key_extra=1, positives="random", per_row_t=True),
    "info_nce_labels": lambda w, g: _info_nce_case(w, g, labels=3),
    "info_nce_labels_key_labels": lambda w, g: _info_nce_case(w, g, labels=3, key_extra=2),
    "info_nce_labels_exclude_self_decoupled": lambda w, g: _info_nce_case(w, g, labels=3, exclude_self=True, decoupled=True),
    "info_nce_queue": lambda w, g: _info_nce_case(w, g, n_neg=5),
    "info_nce_queue_with_grad_positive_in_queue": lambda w, g: _info_nce_case(w, g, n_neg=5, neg_grad=True, positives="random"),
    "info_nce_labels_labelled_queue": lambda w, g: _info_nce_case(w, g, labels=3, n_neg=4, neg_labels=True),
    "info_nce_labels_unlabelled_queue": lambda w, g: _info_nce_case(w, g, labels=3, n_neg=4),
    "info_nce_symmetric_per_row_temperature": lambda w, g: _info_nce_case(w, g, key_extra=2, positives="perm",
                                                                          per_row_t=True, symmetric=True),
    "info_nce_symmetric_exclude_self_decoupled": lambda w, g: _info_nce_case(w, g, positives="shifted", symmetric=True,
                                                                             exclude_self=True, decoupled=True),
    "info_nce_symmetric_queue_sum": lambda w, g: _info_nce_case(w, g, n_neg=3, symmetric=True, reduction="sum"),
    "info_nce_per_row_temperature_one_row_shard": lambda w, g: _info_nce_case(w, g, key_extra=1, positives="random",
                                                                              per_row_t=True, first_rows=1),
    "info_nce_debias_queue": lambda w, g: _info_nce_case(w, g, n_neg=4, neg_grad=True, debias=0.2),
    "info_nce_debias_per_row_temperature": lambda w, g: _info_nce_case(w, g, key_extra=1, positives="random",
                                                                       per_row_t=True, debias=0.1),
    "info_nce_debias_symmetric_exclude_self": lambda w, g: _info_nce_case(w, g, positives="shifted", symmetric=True,
                                                                          exclude_self=True, debias=0.3),
    "clip_loss_label_smoothing": lambda w, g: case_clip(w, g, label_smoothing=0.1),
    "info_nce_label_smoothing_labels_exclude_self_queue": lambda w, g: _info_nce_case(
        w, g, labels=3, exclude_self=True, n_neg=4, neg_grad=True, label_smoothing=0.2),
    "info_nce_label_smoothing_symmetric_per_row_temperature": lambda w, g: _info_nce_case(
        w, g, key_extra=2, positives="perm", per_row_t=True, symmetric=True, label_smoothing=0.15),
    "info_nce_label_smoothing_symmetric_exclude_self_decoupled": lambda w, g: _info_nce_case(
        w, g, positives="shifted", symmetric=True, exclude_self=True, decoupled=True, label_smoothing=0.1),
    "info_nce_label_smoothing_labels_decoupled_key_labels_labelled_queue": lambda w, g: _info_nce_case(
        w, g, labels=3, key_extra=2, decoupled=True, n_neg=4, neg_labels=True, label_smoothing=0.25),
    "info_nce_label_smoothing_queue_positive_in_queue_decoupled_sum": lambda w, g: _info_nce_case(
        w, g, n_neg=5, neg_grad=True, positives="random", decoupled=True, reduction="sum", label_smoothing=0.3),
    "nt_xent": case_nt_xent,
    "supcon": case_supcon,
    "supcon_one_no_labels": lambda w, g: case_supcon(w, g, contrast_mode="one", labels=False),
    "dcl": lambda w, g: case_dcl(w, g, weight_sigma=None),
    "dclw": case_dcl,
    "distill_clip_loss": case_distill,
    "distill_clip_loss_frozen_teacher": lambda w, g: case_distill(w, g, teacher_grad=False),
    "nn.ClipLoss": lambda w, g: case_nn_module(w, g, "ClipLoss"),
    "nn.SupConLoss": lambda w, g: case_nn_module(w, g, "SupConLoss"),
}


def _guided(case, g, margin):
    """``case`` with guide embeddings of its rows (sharded like them), keys (likewise) and
    replicated negatives, width 3."""
    fn, tensors, local_extra, glob_extra = case
    for name, guide in (("query", "guide_query"), ("key", "guide_key"), ("negatives", "guide_negatives")):
        if name in tensors:
            value, sizes, _ = tensors[name]
            tensors[guide] = (torch.randn(value.shape[0], 3, generator=g, dtype=torch.float64), sizes, False)
    return fn, tensors, lambda r: {**local_extra(r), "guide_margin": margin}, {**glob_extra, "guide_margin": margin}


def _with(case, **options):
    """``case`` with more options, on every rank and in the single-process reference."""
    def build(world, g):
        fn, tensors, local_extra, glob_extra = case(world, g)
        return fn, tensors, lambda r: {**local_extra(r), **options}, {**glob_extra, **options}
    return build


# the false-negative mask: each rank's thresholds come from its own rows' positives; in the ring
# a symmetric loss's column thresholds travel with their key block
CASES.update({
    "clip_loss_false_negative_margin": _with(case_clip, false_negative_margin=0.05),
    "info_nce_false_negative_margin_queue": _with(
        lambda w, g: _info_nce_case(w, g, n_neg=4, neg_grad=True, positives="random"), false_negative_margin=0.1),
    "info_nce_false_negative_margin_per_row_temperature": _with(
        lambda w, g: _info_nce_case(w, g, key_extra=1, positives="random", per_row_t=True), false_negative_margin=0.0),
    "info_nce_false_negative_margin_symmetric_exclude_self": _with(
        lambda w, g: _info_nce_case(w, g, positives="shifted", symmetric=True, exclude_self=True),
        false_negative_margin=-0.05),
    # hard-negative reweighting: two statistics passes and two gradient passes per call
    "info_nce_hardness_queue": _with(lambda w, g: _info_nce_case(w, g, n_neg=4, neg_grad=True, debias=0.2),
                                     hardness=0.5),
    "info_nce_hardness_symmetric_exclude_self": _with(
        lambda w, g: _info_nce_case(w, g, positives="shifted", symmetric=True, exclude_self=True, debias=0.1),
        hardness=1.5),
    # the guide-model mask (GISTEmbed): every rank's guide keys gathered beside the keys, or
    # travelling with their key block
    "info_nce_guide_queue": lambda w, g: _guided(_info_nce_case(w, g, n_neg=4, neg_grad=True, positives="random"),
                                                 g, margin=0.05),
    "info_nce_guide_per_row_temperature": lambda w, g: _guided(
        _info_nce_case(w, g, key_extra=1, positives="random", per_row_t=True), g, margin=-0.1),
    # Matryoshka prefixes: one distributed loss per width, against the single process's one pass
    "clip_loss_matryoshka": _with(case_clip, matryoshka_dims=[7, 2, 4], matryoshka_weights=[1.0, 0.5, 2.0]),
    "info_nce_matryoshka_labels_queue": _with(
        lambda w, g: _info_nce_case(w, g, labels=3, n_neg=4, neg_grad=True), matryoshka_dims=[3, 5]),
    "info_nce_matryoshka_symmetric_per_row_temperature": _with(
        lambda w, g: _info_nce_case(w, g, key_extra=2, positives="perm", per_row_t=True, symmetric=True),
        matryoshka_dims=[1, 4], matryoshka_weights=[0.3, 1.0]),
})


# ----------------------------------------------------------------------------------------------
# Worker side


def _rel_err(got, want, floor):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(want.abs().max()), floor) if want.numel() else 1.0
    return float((got - want).abs().max()) / scale if want.numel() else 0.0


# the ring and all_gather through the kernels of the other backends (Triton's interpreter, the
# CUDA kernels emulated on CPU threads): a subset that covers every pass and carry
BACKEND_CASES = ("clip_loss", "siglip_loss", "siglip_loss_labels_3_classes", "info_nce_labels_exclude_self_decoupled",
                 "info_nce_queue_with_grad_positive_in_queue", "info_nce_symmetric_per_row_temperature",
                 "info_nce_debias_symmetric_exclude_self", "info_nce_guide_queue", "distill_clip_loss")
KERNEL_BACKENDS = ("triton", "cuda")
# what the CUDA kernels do not cover (the guide mask, distillation): Triton's only
NO_CUDA_CASES = ("info_nce_guide_queue", "distill_clip_loss")


def _backend_cases(backend):
    return [name for name in BACKEND_CASES if backend != "cuda" or name not in NO_CUDA_CASES]


def _run_case(name, mode, local_loss, world, rank, upstream=False, backend=None):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1000 + 17 * world + sum(map(ord, name)))
    fn, tensors, local_extra, glob_extra = CASES[name](world, g)

    ref_in = {k: (v.clone().requires_grad_(grad) if v.dtype.is_floating_point else v)
              for k, (v, _, grad) in tensors.items()}
    ref_loss = fn(**ref_in, **glob_extra)

    local_in = {}
    for k, (v, sizes, grad) in tensors.items():
        if sizes is not None:
            start = sum(sizes[:rank])
            v = v[start: start + sizes[rank]]
        v = v.clone()
        local_in[k] = v.requires_grad_(grad) if v.dtype.is_floating_point else v
    extra = {} if backend is None else {"backend": backend}
    loss = fn(**local_in, **local_extra(rank), **extra, group=dist.group.WORLD, gather=mode, local_loss=local_loss)

    # ranks may weight their losses differently; the sum of their gradients is then the
    # gradient of the weighted sum: sum_r c_r * L in global mode
    weight = float(rank + 1) if upstream else 1.0
    (loss * weight).backward()
    total_weight = sum(range(1, world + 1)) if upstream else world
    ref_loss.backward()

    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, loss.detach().double().reshape(()))
    # global mode: every rank returns the global loss; local_loss: the mean over ranks is it
    got_loss = torch.stack(losses).mean() if local_loss else loss.detach()
    errs = {"loss": _rel_err(got_loss, ref_loss.detach(), 1.0)}
    for k, (v, sizes, grad) in tensors.items():
        if not grad:
            continue
        got = local_in[k].grad
        if got is None:
            errs[f"d{k}"] = float("inf")
            continue
        want = ref_in[k].grad
        if sizes is None:  # replicated: DDP averages the ranks' gradients
            got = got.clone()
            dist.all_reduce(got)
            errs[f"d{k}"] = _rel_err(got / total_weight, want, 1.0)
        else:  # this rank's rows: W times (or sum c_r times) its slice of the reference
            start = sum(sizes[:rank])
            errs[f"d{k}"] = _rel_err(got / total_weight, want[start: start + sizes[rank]], 1e-3)
    return errs


def _check_all_gather_helper(world, rank):
    """fastcl.distributed.all_gather: rank-order concatenation of unequal shards; the gradient of
    each rank's rows is the sum over ranks of the gradient each rank's output received."""
    from fastcl.distributed import all_gather

    g = torch.Generator().manual_seed(5)
    sizes = _shards(world, 2)
    x = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64)
    weights = torch.randn(world, sum(sizes), 3, generator=g, dtype=torch.float64)
    start = sum(sizes[:rank])
    mine = x[start: start + sizes[rank]].clone().requires_grad_()
    out = all_gather(mine)
    (out * weights[rank]).sum().backward()
    return {"value": _rel_err(out, x, 1.0),
            "grad": _rel_err(mine.grad, weights.sum(0)[start: start + sizes[rank]], 1.0)}


class _LiveBytes(InsideOperators):
    """Peak bytes of tensor storages created inside the mode (inside fastcl's custom operators
    too) and still alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.storages.discard(key)

    def seen(self, func, out):
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key in self.storages:
                    continue
                self.storages.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())


MEMORY_ROWS, MEMORY_DIM = 256, 64
# each op, and how many [rows, dim] fp32 tensors one travelling block holds
MEMORY_OPS = {"clip_loss": 1, "siglip_loss": 1, "info_nce_labels": 1, "distill_clip_loss": 2}


def _peak_bytes(op, mode, world, rank):
    """Peak live bytes, beyond the inputs, of one forward + backward at a fixed shard size.

    Measured on rank 0 only (every rank holds the same shard size): entering a dispatch mode
    imports torch._dynamo, seconds of CPU per process."""
    import torch.distributed as dist

    import fastcl

    os.environ.pop("FASTCL_TORCH_BLOCK", None)  # the default tile shape, as in use
    g = torch.Generator().manual_seed(rank)
    a = F.normalize(torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=g), dim=1).requires_grad_()
    b = F.normalize(torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    dist.barrier()
    meter = _LiveBytes() if rank == 0 else contextlib.nullcontext()
    with meter:
        if op == "clip_loss":
            loss = fastcl.clip_loss(a, b, scale, group=dist.group.WORLD, gather=mode)
        elif op == "distill_clip_loss":  # a frozen teacher of the student's width
            teacher = [F.normalize(torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=g), dim=1) for _ in range(2)]
            contrastive, distill = fastcl.distill_clip_loss(a, b, scale, *teacher, 20.0, group=dist.group.WORLD,
                                                            gather=mode)
            loss = contrastive + distill
        elif op == "siglip_loss":
            loss = fastcl.siglip_loss(a, b, scale, bias, group=dist.group.WORLD, gather=mode)
        else:
            labels = torch.randint(0, 16, (MEMORY_ROWS,), generator=g)
            loss = fastcl.info_nce(a, b, labels=labels, group=dist.group.WORLD, gather=mode)
        loss.backward()
        del loss
    return meter.peak if rank == 0 else 0


def _bad_setups(world, rank):
    """Mismatched calls must raise the same error on every rank, not hang."""
    import torch.distributed as dist

    import fastcl

    group = dist.group.WORLD
    x = torch.randn(4, 6, dtype=torch.float64)
    calls = {
        "width": lambda: fastcl.info_nce(x[:, : 5 if rank == 0 else 6], x[:, : 5 if rank == 0 else 6], group=group),
        "dtype": lambda: fastcl.info_nce(x.float() if rank == 0 else x, x.float() if rank == 0 else x, group=group),
        "scale": lambda: fastcl.clip_loss(x, x, 10.0 + (rank == 0), group=group),
        "gather": lambda: fastcl.info_nce(x, x, group=group, gather="ring" if rank == 0 else "all_gather"),
        "labels": lambda: fastcl.info_nce(x, x, labels=torch.zeros(4, dtype=torch.long) if rank else None, group=group),
        "siglip_labels": lambda: fastcl.siglip_loss(x, x, 10.0, -5.0, labels=torch.zeros(4, dtype=torch.long) if rank
                                                    else None, group=group, gather="ring"),
        # one rank's own inputs are bad: every rank must raise, not wait in the next collective
        "empty_shard": lambda: fastcl.info_nce(x[:0] if rank == 0 else x, x, group=group),
        "temperature": lambda: fastcl.info_nce(x, x, temperature=-1.0 if rank == 0 else 0.1, group=group),
        "backend": lambda: fastcl.clip_loss(x, x, 10.0, backend="numpy" if rank == 0 else "torch", group=group),
        "string_flag": lambda: fastcl.nt_xent(x, x, normalize="False" if rank == 0 else False, group=group),
        "label_smoothing": lambda: fastcl.clip_loss(x, x, 10.0, label_smoothing=0.1 * (rank == 0), group=group),
        # the teacher's shape and gradients must agree too (the ring carries its blocks)
        "teacher_width": lambda: fastcl.distill_clip_loss(x, x, 10.0, x[:, : 5 if rank == 0 else 6],
                                                          x[:, : 5 if rank == 0 else 6], 10.0, group=group,
                                                          gather="ring"),
        "teacher_grad": lambda: fastcl.distill_clip_loss(x, x, 10.0, x.clone().requires_grad_(rank == 0), x, 10.0,
                                                         group=group, gather="ring"),
        # every rank alike: all_gather's transposed pass needs this layout (ring does not)
        "layout": lambda: fastcl.info_nce(x, torch.randn(6, 6, dtype=torch.float64), symmetric=True, exclude_self=True,
                                          positive_index=torch.tensor([1, 2, 3, 5]), group=group),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except (ValueError, TypeError, RuntimeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    return out


def _kernel_backends():
    """The kernel backends this rank can run on CPU tensors; the CUDA one through the emulated
    extension that the pytest process built (its path in FASTCL_TEST_CUDA_EMULATED)."""
    from fastcl._dispatch import unavailable_reason

    names = [b for b in KERNEL_BACKENDS if b in os.environ.get("FASTCL_TEST_RANK_BACKENDS", "").split(",")]
    if "triton" in names and unavailable_reason("triton", torch.device("cpu")) is not None:
        names.remove("triton")
    if "cuda" in names:
        import importlib.util

        import fastcl.backends.cuda as cuda_backend

        spec = importlib.util.spec_from_file_location("fastcl_emulated_C", os.environ["FASTCL_TEST_CUDA_EMULATED"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cuda_backend._ext = lambda: module
        cuda_backend.available = lambda device: None
    return names


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=timedelta(seconds=90))
    report = {"checks": {}, "memory": {}, "bad_setups": {}, "seconds": {}}
    t0 = time.perf_counter()
    for name in CASES:
        for mode in MODES:
            for local_loss in (False, True):
                key = f"{name}|{mode}|{'local' if local_loss else 'global'}"
                report["checks"][key] = _run_case(name, mode, local_loss, world, rank)
    report["checks"]["all_gather_helper"] = _check_all_gather_helper(world, rank)
    for backend in _kernel_backends():
        for name in _backend_cases(backend):
            for mode in MODES:
                report["checks"][f"{name}|{mode}|{backend}"] = _run_case(name, mode, False, world, rank,
                                                                         backend=backend)
    for mode in MODES:
        report["checks"][f"clip_loss|{mode}|global_weighted_ranks"] = _run_case("clip_loss", mode, False, world, rank,
                                                                              upstream=True)
    report["seconds"]["checks"] = time.perf_counter() - t0
    if world > 1:
        t0 = time.perf_counter()
        for op in MEMORY_OPS:
            for mode in MODES:
                peak = torch.tensor([float(_peak_bytes(op, mode, world, rank))])
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                report["memory"][f"{op}|{mode}"] = int(peak)
        report["seconds"]["memory"] = time.perf_counter() - t0
        report["bad_setups"] = _bad_setups(world, rank)

    # every rank's errors -> the max over ranks; bad-setup messages from every rank
    flat = [(k, e) for k, errs in sorted(report["checks"].items()) for e in sorted(errs)]
    values = torch.tensor([report["checks"][k][e] for k, e in flat], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (k, e), v in zip(flat, values.tolist()):
        report["checks"][k][e] = v
    messages = [None] * world
    dist.all_gather_object(messages, report["bad_setups"])
    report["bad_setups"] = messages
    if rank == 0:
        with open(os.path.join(outdir, f"report_{world}.json"), "w") as f:
            json.dump(report, f, indent=1)
    leave()


# ----------------------------------------------------------------------------------------------
# pytest side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, outdir: str) -> dict:
    path = os.path.join(outdir, f"report_{world}.json")
    # tiny tiles: every tile boundary inside the blocks is exercised
    env = {"FASTCL_TORCH_BLOCK": "3,4", "TRITON_INTERPRET": "1", "FASTCL_TEST_RANK_BACKENDS": ",".join(RANK_BACKENDS)}
    if "cuda" in RANK_BACKENDS:
        env["FASTCL_TEST_CUDA_EMULATED"] = emulated_extension().__file__
    run_ranks(__file__, world, [_free_port(), outdir], env, LAUNCH_TIMEOUT_S, [path])
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reports():
    with tempfile.TemporaryDirectory() as outdir:
        return {world: _launch(world, outdir) for world in WORLD_SIZES}


def _rank_backends():
    """Kernel backends the ranks run too, on CPU tensors (skipped, with the reason, where not)."""
    from conftest import backend_skip_reason

    return [b for b in KERNEL_BACKENDS if backend_skip_reason(b) is None]


RANK_BACKENDS = _rank_backends() if __name__ != "__main__" else []
CHECK_IDS = [f"{name}|{mode}|{scope}" for name in CASES for mode in MODES for scope in ("global", "local")]
CHECK_IDS += [f"clip_loss|{mode}|global_weighted_ranks" for mode in MODES] + ["all_gather_helper"]
BACKEND_CHECK_IDS = [f"{name}|{mode}|{b}" for b in KERNEL_BACKENDS for name in _backend_cases(b) for mode in MODES]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("check", CHECK_IDS)
def test_matches_single_process(reports, world, check):
    errs = reports[world]["checks"][check]
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"W={world} {check}: relative errors {bad}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("check", BACKEND_CHECK_IDS)
def test_kernel_backends_match_single_process(reports, world, check):
    backend = check.rsplit("|", 1)[1]
    if backend not in RANK_BACKENDS:
        from conftest import backend_skip_reason

        pytest.skip(f"backend {backend}: {backend_skip_reason(backend)}")
    errs = reports[world]["checks"][check]
    bad = {k: v for k, v in errs.items() if not v <= BACKEND_RTOL}
    assert not bad, f"W={world} {check}: relative errors {bad}"


@pytest.mark.parametrize("op", list(MEMORY_OPS))
def test_ring_memory_does_not_grow_with_world_size(reports, op):
    ring = {w: reports[w]["memory"][f"{op}|ring"] for w in MULTI}
    gathered = {w: reports[w]["memory"][f"{op}|all_gather"] for w in MULTI}
    print(f"{op}: peak live bytes per rank, {MEMORY_ROWS} rows x {MEMORY_DIM} fp32 per rank: "
          f"ring {ring}, all_gather {gathered}")
    # the same shard on every rank: the ring holds at most two incoming blocks (one at W = 2,
    # where only one transfer happens) beside its own, whatever W
    block = MEMORY_OPS[op] * MEMORY_ROWS * MEMORY_DIM * 4
    assert max(ring.values()) - min(ring.values()) <= block + 4096
    assert abs(ring[4] - ring[3]) <= 4096
    assert ring[4] < gathered[4]


@pytest.mark.parametrize("world", MULTI)
@pytest.mark.parametrize("setup,expected", [("width", "ValueError: info_nce: the feature width D differs"),
                                            ("dtype", "TypeError: info_nce: the feature dtype differs"),
                                            ("scale", "ValueError: clip_loss: logit_scale differs across ranks"),
                                            ("gather", "ValueError: info_nce: ranks disagree on gather"),
                                            ("labels", "ValueError: info_nce: ranks disagree on labels"),
                                            ("siglip_labels", "ValueError: siglip_loss: ranks disagree on labels"),
                                            ("layout", "ValueError: symmetric with exclude_self across ranks"),
                                            ("teacher_width", "ValueError: distill_clip_loss: teacher feature width "
                                                              "differs across ranks"),
                                            ("teacher_grad", "ValueError: distill_clip_loss: "
                                                             "dist_image_features.requires_grad differs across ranks"),
                                            ("label_smoothing",
                                             "ValueError: clip_loss: ranks disagree on label_smoothing")])
def test_bad_setups_raise_on_every_rank(reports, world, setup, expected):
    for rank, messages in enumerate(reports[world]["bad_setups"]):
        assert messages[setup].startswith(expected), f"rank {rank}: {messages[setup]}"


@pytest.mark.parametrize("world", MULTI)
@pytest.mark.parametrize("setup,core", [("empty_shard", "query must not be empty"),
                                        ("temperature", "temperature must be > 0"),
                                        ("backend", "backend must be one of"),
                                        ("string_flag", "normalize must be True or False")])
def test_one_rank_bad_input_raises_on_every_rank(reports, world, setup, core):
    """Rank 0 alone fails its local checks: it raises its own error, and every other rank raises
    one naming rank 0 and the reason, at once (the ranks use a 90 s timeout: a hang fails the launch)."""
    messages = [m[setup] for m in reports[world]["bad_setups"]]
    assert core in messages[0] and "rejected" not in messages[0], messages[0]
    for rank, message in enumerate(messages[1:], start=1):
        assert message.startswith("ValueError: ") and "rank 0 rejected its inputs" in message and core in message, \
            f"rank {rank}: {message}"


def test_group_without_init_process_group_raises():
    import torch.distributed as dist

    import fastcl

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        fastcl.info_nce(x, x, group=object())
    with pytest.raises(ValueError, match="gather must be one of"):
        fastcl.clip_loss(x, x, 10.0, gather="rings")
    with pytest.raises(TypeError, match="local_loss must be a bool"):
        fastcl.siglip_loss(x, x, 10.0, -10.0, local_loss=1)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
