"""Gathered negatives across ranks on ``torch.distributed`` (NCCL on GPU, gloo on CPU), with the
exact gradient of the loss over the concatenated global batch (DESIGN §3).

Each rank holds ``N_r`` anchor rows and ``M_r`` key rows; shards may differ in size. The loss
is the one a single process would compute over the concatenation of every rank's rows, in rank
order. Two ways to get there:

``gather="all_gather"``
    Gather the keys (and the queries, for symmetric losses) with :func:`all_gather`, whose
    backward reduce-scatters: each rank receives the sum over ranks of the gradient of its rows.
    Then run the ordinary loss of the backend in use on (local rows x global columns), so any
    backend works. Memory O(N_global * D) per rank.
``gather="ring"``
    Key blocks travel around the ring by point-to-point ops (``batch_isend_irecv``); every rank
    merges its rows' partial log-sum-exp statistics block by block (and, for symmetric losses,
    the column statistics travel with their block, so one pass serves both directions). In the
    backward the blocks go round again and each block's ``dK`` accumulator (fp32) travels one
    step behind it, so it reaches its owner with every rank's contribution summed. The transfer
    of the next block is issued before the current one is computed. Extra memory
    O(max_r M_r * D) per rank, independent of the world size. The per-block arithmetic is
    :mod:`fastcl.backends.torch_blocks` whatever backend the call asked for (it runs on any
    device; the Triton and CUDA backends have no block kernels yet).

**Gradient convention.** Every rank returns the global loss (or, with ``local_loss=True``, its
local anchors' share of it scaled by W, so that either way the mean over ranks of the returned
losses is the single-process loss). Gradients are summed over ranks: the sum over ranks of the
gradient each rank holds equals the gradient of the sum over ranks of the losses it returned.
DDP averages over W ranks, which turns that into exactly the single-process gradient, for the
features (each rank's feature gradient is W times the single-process one before averaging) and
for shared scalars such as the logit scale and bias (each rank holds its share; nothing is
all-reduced twice, so there is no W-times-too-large scale gradient).

Positive indices are local (they index this rank's keys); labels are compared across ranks;
extra negatives (a queue) stay local to the rank that passes them; per-row temperatures belong
to their rows. Every rank must make the same call (same options, same feature width and
dtype, same scalar scale and bias): a small all-gather of metadata checks that and raises on
every rank rather than hanging. Every rank must also run the backward. Under DDP, a group of its
own for the loss (``dist.new_group()``) keeps the loss's collectives apart from DDP's gradient
all-reduces.
"""

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._spec import SigmoidSpec, SoftmaxSpec
from .backends import torch_blocks as blocks
from .backends.common import anchor_losses, compute_dtype, row_scale, sum_to_scale

__all__ = ["all_gather", "GATHER_MODES"]

GATHER_MODES = ("all_gather", "ring")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TAG_BLOCK, _TAG_CARRY = 0, 8

_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)



@dataclass(frozen=True)
class Context:
    """One distributed loss call: the group, this rank's place in it, and every rank's shard sizes."""

    group: object
    rank: int
    world: int
    mode: str
    local_loss: bool
    row_sizes: List[int]
    key_sizes: List[int]

    @property
    def total_rows(self) -> int:
        return sum(self.row_sizes)


def _check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first, or pass group=None for a local loss"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD); got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def check_options(gather, local_loss) -> None:
    """Validate ``gather`` and ``local_loss`` (also when ``group`` is None)."""
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {', '.join(map(repr, GATHER_MODES))}; got {gather!r}")
    if not isinstance(local_loss, bool):
        raise TypeError(f"local_loss must be a bool; got {type(local_loss).__name__}")


def unique_labels(group, n: int, device) -> torch.Tensor:
    """``n`` labels for this rank's samples that no other rank's samples share (no communication)."""
    rank, world = _check_group(group)
    return torch.arange(n, device=device) * world + rank


def _scalar_value(x) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, torch.Tensor):
        return float(x.detach()) if x.numel() == 1 else float("nan")
    return float(x)


def prepare(group, gather: str, local_loss: bool, *, op: str, query: torch.Tensor, n_keys: int,
            options: dict, scalars: dict) -> Optional[Context]:
    """Validate the distributed arguments and agree with the other ranks on the call.

    Returns ``None`` for ``group=None``. Otherwise all-gathers one small float64 vector per rank
    (rows, keys, feature width, dtype, ``options`` as numbers, ``scalars`` values) and raises, on
    every rank alike, if the ranks disagree on anything but their shard sizes.
    """
    check_options(gather, local_loss)
    if group is None:
        return None
    rank, world = _check_group(group)
    opts = {"gather": GATHER_MODES.index(gather), "local_loss": local_loss, **options}
    fields = [query.shape[0], n_keys, query.shape[-1], _DTYPES.index(query.dtype)]
    fields += [float(v) for v in opts.values()] + [_scalar_value(v) for v in scalars.values()]
    mine = torch.tensor(fields, dtype=torch.float64, device=query.device)
    table = torch.empty(world * mine.numel(), dtype=torch.float64, device=query.device)
    _all_gather_single(table, mine, group=group)
    table = table.view(world, -1).cpu()

    def per_rank(col, fmt):
        return ", ".join(f"rank {i}: {fmt(v)}" for i, v in enumerate(table[:, col].tolist()))

    if bool((table[:, 2] != table[0, 2]).any()):
        raise ValueError(f"{op}: the feature width D differs across ranks ({per_rank(2, int)}); "
                         "every rank must pass features of the same width")
    if bool((table[:, 3] != table[0, 3]).any()):
        raise TypeError(f"{op}: the feature dtype differs across ranks "
                        f"({per_rank(3, lambda v: _DTYPES[int(v)])}); cast the features to one dtype")
    for j, name in enumerate(opts, start=4):
        if bool((table[:, j] != table[0, j]).any()):
            raise ValueError(f"{op}: ranks disagree on {name} ({per_rank(j, repr)}); every rank must make the same call")
    for j, name in enumerate(scalars, start=4 + len(opts)):
        col = table[:, j]
        if bool(torch.isnan(col).any()):
            continue
        if bool(((col - col[0]).abs() > 1e-6 * col.abs().max().clamp(min=1e-30)).any()):
            raise ValueError(f"{op}: {name} differs across ranks ({per_rank(j, repr)}); "
                             "it must be the same (replicated) value on every rank")
    sizes = table[:, :2].long().tolist()
    return Context(group, rank, world, gather, local_loss, [r for r, _ in sizes], [k for _, k in sizes])


# ----------------------------------------------------------------------------------------------
# Collectives with autograd


def _gather_parts(x: torch.Tensor, group, world: int, sizes: List[int]) -> List[torch.Tensor]:
    """Every rank's ``x`` (first dimensions ``sizes``), in rank order, through one padded gather."""
    mx = max(sizes)
    src = x.contiguous()
    if x.shape[0] < mx:
        src = x.new_zeros((mx,) + tuple(x.shape[1:]))
        src[: x.shape[0]] = x
    out = x.new_empty((world * mx,) + tuple(x.shape[1:]))
    _all_gather_single(out, src, group=group)
    return [out[i * mx: i * mx + sizes[i]] for i in range(world)]


def _order(world: int, rank: int, own_first: bool) -> List[int]:
    return [(rank + i) % world for i in range(world)] if own_first else list(range(world))


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; the backward sums the gradient over ranks (reduce-scatter)
    and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, rank, world, sizes, own_first):
        ctx.group, ctx.rank, ctx.world, ctx.sizes, ctx.own_first = group, rank, world, sizes, own_first
        parts = _gather_parts(x, group, world, sizes)
        return torch.cat([parts[i] for i in _order(world, rank, own_first)])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        sizes, mx = ctx.sizes, max(ctx.sizes)
        padded = grad.new_zeros((ctx.world * mx,) + tuple(grad.shape[1:]))
        start = 0
        for i in _order(ctx.world, ctx.rank, ctx.own_first):
            padded[i * mx: i * mx + sizes[i]] = grad[start: start + sizes[i]]
            start += sizes[i]
        out = grad.new_empty((mx,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, padded, group=ctx.group)
        return out[: sizes[ctx.rank]], None, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's output flows to every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` over the ranks of ``group`` in rank order, differentiably.

    The backward reduce-scatters: each rank gets the sum over all ranks of the gradient with
    respect to its own rows. Shards may differ in their first dimension (the sizes are gathered
    first). ``group=None`` is the default group.
    """
    group = dist.group.WORLD if group is None else group
    rank, world = _check_group(group)
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = torch.empty(world, dtype=torch.long, device=x.device)
    _all_gather_single(sizes, size, group=group)
    return _AllGather.apply(x, group, rank, world, sizes.tolist(), False)


def _gather_own_first(x, c: Context, sizes) -> torch.Tensor:
    """:func:`all_gather` with this rank's rows first, then rank+1, ..., rank-1: a local index
    ``i < N_r`` stays ``i``, so self-exclusion and local positives need no offset."""
    return _AllGather.apply(x, c.group, c.rank, c.world, sizes, True)


def _gather_own_first_nograd(x, c: Context, sizes) -> torch.Tensor:
    parts = _gather_parts(x, c.group, c.world, sizes)
    return torch.cat([parts[i] for i in _order(c.world, c.rank, True)])


def logsumexp(x: torch.Tensor, c: Context) -> torch.Tensor:
    """``log sum exp`` of a 1-D tensor over every rank's entries (no gradient)."""
    x = x.detach()
    top = x.max().reshape(1)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=c.group)
    total = torch.exp(x - top).sum().reshape(1)
    dist.all_reduce(total, group=c.group)
    return (top + torch.log(total))[0]


# ----------------------------------------------------------------------------------------------
# Ring


class _Ring:
    """Point-to-point shifts around the ring: send to rank + 1, receive from rank - 1."""

    def __init__(self, c: Context):
        self.c = c
        self.next = dist.get_global_rank(c.group, (c.rank + 1) % c.world)
        self.prev = dist.get_global_rank(c.group, (c.rank - 1) % c.world)

    def shift(self, send, recv, tag):
        ops = [dist.P2POp(dist.isend, t, self.next, self.c.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.c.group, tag + i) for i, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works or ():
        w.wait()


def _circulate(c: Context, payload, step, carry=None):
    """Visit every rank's key block; return this rank's block's final carry (or None).

    ``payload``: this rank's block, a list of tensors whose first dimension is its key count
    (``c.key_sizes``). At step ``t`` this rank holds rank ``(rank - t) % W``'s block; the next
    block's transfer is issued first, then ``step(t, block)`` runs on the current one.

    ``carry = (tail_shape, dtype, merge)``: a per-block accumulator ``[M_b, *tail]`` that travels
    one step behind its block. ``step`` returns this rank's contribution to the current block's
    accumulator; ``merge(acc, contribution)`` folds it in place into the accumulator received
    from rank - 1, which then moves on to rank + 1. After W steps each accumulator is back with
    its owner, holding every rank's contribution.
    """
    world, rank, sizes = c.world, c.rank, c.key_sizes
    ring = _Ring(c) if world > 1 else None
    mx = max(sizes)
    payload = [p.contiguous() for p in payload]
    block_bufs = [None, None]
    carry_bufs = [None, None]
    cur, carry_works = payload, None
    for t in range(world):
        owner, next_owner = (rank - t) % world, (rank - t - 1) % world
        block_works = nxt = None
        if t < world - 1:
            if block_bufs[t % 2] is None:
                block_bufs[t % 2] = [p.new_empty((mx,) + tuple(p.shape[1:])) for p in payload]
            nxt = [b[: sizes[next_owner]] for b in block_bufs[t % 2]]
            block_works = ring.shift(cur, nxt, _TAG_BLOCK)
        contribution = step(t, cur)
        if carry is not None:
            tail, dtype, merge = carry
            for i in ((t % 2, (t + 1) % 2) if world > 1 else (0,)):
                if carry_bufs[i] is None:
                    carry_bufs[i] = torch.empty((mx,) + tuple(tail), dtype=dtype, device=payload[0].device)
            acc = carry_bufs[t % 2][: sizes[owner]]
            if t == 0:
                acc.copy_(contribution)
            else:
                _wait(carry_works)
                merge(acc, contribution)
            if world > 1:
                carry_works = ring.shift([acc], [carry_bufs[(t + 1) % 2][: sizes[next_owner]]], _TAG_CARRY)
        _wait(block_works)
        if nxt is not None:
            cur = nxt
    if carry is None:
        return None
    _wait(carry_works)
    return carry_bufs[world % 2 if world > 1 else 0][: sizes[rank]]


def _merge_stats(acc, part) -> None:
    m, l = blocks.merge_lse(acc[:, 0], acc[:, 1], part[:, 0], part[:, 1])
    acc[:, 0] = m
    acc[:, 1] = l


def _add(acc, part) -> None:
    acc.add_(part)


def _remote_softmax_spec(spec: SoftmaxSpec, labels) -> SoftmaxSpec:
    """Another rank's block: no one-hot positive, no self column, no queue; labels compare."""
    if spec.uses_labels:
        return SoftmaxSpec(row_labels=spec.row_labels, col_labels=labels, decoupled=spec.decoupled)
    return SoftmaxSpec(symmetric=spec.symmetric)


class _RingSoftmax(torch.autograd.Function):
    """Softmax-family per-anchor losses of this rank's rows over every rank's keys (plus local
    negatives), by ring. Same outputs as :class:`fastcl.backends.torch.SoftmaxLoss`."""

    @staticmethod
    def forward(ctx, c: Context, query, key, negatives, scale, bias, spec: SoftmaxSpec):
        cd = compute_dtype(query.dtype)
        n, m = query.shape[0], key.shape[0]
        local_cols = key if negatives is None else torch.cat([key, negatives])
        state = {"m": torch.full((n,), float("-inf"), dtype=cd, device=query.device),
                 "l": torch.zeros(n, dtype=cd, device=query.device)}
        if spec.uses_labels:
            state["pos_sum"] = torch.zeros(n, dtype=cd, device=query.device)
            state["pos_cnt"] = torch.zeros(n, dtype=cd, device=query.device)
        payload = [key] + ([spec.col_labels[:m]] if spec.uses_labels else [])

        def step(t, block):
            if t == 0:
                part = blocks.softmax_block_forward(query, local_cols, scale, bias, spec)
            else:
                part = blocks.softmax_block_forward(query, block[0], scale, bias,
                                                    _remote_softmax_spec(spec, block[-1]))
            state["m"], state["l"] = blocks.merge_lse(state["m"], state["l"], part.row_max, part.row_sum)
            if spec.uses_labels:
                state["pos_sum"] += part.pos_sum
                state["pos_cnt"] += part.pos_cnt
            if spec.symmetric:
                rows = block[0].shape[0]
                return torch.stack([part.col_max[:rows], part.col_sum[:rows]], dim=1)
            return None

        carry = ((2,), cd, _merge_stats) if spec.symmetric else None
        own_cols = _circulate(c, payload, step, carry)

        lse_row = state["m"] + torch.log(state["l"])
        pos_cnt = state.get("pos_cnt")
        if spec.uses_labels:
            pos_term = state["pos_sum"] / pos_cnt.clamp(min=1)
        else:
            pos_term = blocks.positive_logit(query, local_cols, scale, bias, spec.positive_index)
        lse_col = None
        if spec.symmetric:
            lse_col = (own_cols[:, 0] + torch.log(own_cols[:, 1]))[spec.positive_index]
        row_loss, col_loss, row_valid, col_valid = anchor_losses(spec, lse_row, pos_term, pos_cnt, lse_col)

        ctx.c, ctx.spec = c, spec
        empty = torch.empty(0, dtype=cd, device=query.device)
        ctx.save_for_backward(query, key, negatives if negatives is not None else empty, scale,
                              bias if bias is not None else empty, lse_row,
                              lse_col if lse_col is not None else empty, row_valid, col_valid,
                              pos_cnt if pos_cnt is not None else empty)
        ctx.has_negatives, ctx.has_bias = negatives is not None, bias is not None
        ctx.mark_non_differentiable(row_valid, col_valid)
        return row_loss, col_loss, row_valid, col_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row, grad_col, _grad_row_valid, _grad_col_valid):
        query, key, negatives, scale, bias, lse_row, lse_col, row_valid, col_valid, pos_cnt = ctx.saved_tensors
        c, spec = ctx.c, ctx.spec
        negatives = negatives if ctx.has_negatives else None
        bias = bias if ctx.has_bias else None
        need_q, need_k, need_neg, need_s, need_b = ctx.needs_input_grad[1:6]
        cd = lse_row.dtype
        n, m, dev = query.shape[0], key.shape[0], query.device
        n_neg = 0 if negatives is None else negatives.shape[0]
        local_cols = key if negatives is None else torch.cat([key, negatives])
        pw = None if spec.pos_weight is None else spec.pos_weight.to(cd)

        w_row = torch.where(row_valid, grad_row.to(cd), torch.zeros_like(lse_row))
        w_col_by_row = None
        payload = [key] + ([spec.col_labels[:m]] if spec.uses_labels else [])
        if spec.symmetric:
            # each column's (LSE', weight) travels with its block: the column losses belong to the owner
            w_col_by_row = torch.where(col_valid, grad_col.to(cd), torch.zeros_like(lse_col))
            info = torch.zeros(m, 2, dtype=cd, device=dev)
            info[spec.positive_index, 0] = torch.where(col_valid, lse_col, torch.zeros_like(lse_col))
            info[spec.positive_index, 1] = w_col_by_row
            payload.append(info)
        label_coef = None
        if spec.uses_labels:
            label_coef = w_row / pos_cnt.clamp(min=1)
            if pw is not None:
                label_coef = label_coef * pw

        dq_acc = torch.zeros(query.shape, dtype=cd, device=dev)
        state = {"db": torch.zeros((), dtype=cd, device=dev), "dneg": None}

        def step(t, block):
            if t == 0:
                cols, block_spec = local_cols, spec
                lse_col_b = w_col_b = None
                if spec.symmetric:
                    pad = torch.zeros(n_neg, dtype=cd, device=dev)
                    lse_col_b, w_col_b = torch.cat([block[-1][:, 0], pad]), torch.cat([block[-1][:, 1], pad])
                need_key = need_k or need_neg
            else:
                cols = block[0]
                block_spec = _remote_softmax_spec(spec, block[1] if spec.uses_labels else None)
                lse_col_b, w_col_b = (block[-1][:, 0], block[-1][:, 1]) if spec.symmetric else (None, None)
                need_key = need_k
            dk, db = blocks.softmax_block_backward(query, cols, scale, bias, block_spec, lse_row, w_row, dq_acc,
                                                   label_coef=label_coef, lse_col=lse_col_b, w_col=w_col_b,
                                                   need_key=need_key)
            state["db"] += db
            if t == 0 and need_neg:
                state["dneg"] = dk[m:]
            return dk[: block[0].shape[0]] if need_k else None

        carry = ((key.shape[1],), cd, _add) if need_k else None
        dk_own = _circulate(c, payload, step, carry)

        if not spec.uses_labels:
            coef = w_row if w_col_by_row is None else w_row + w_col_by_row
            coef = -coef if pw is None else -coef * pw
            d_cols = None
            if need_k or need_neg:
                d_cols = torch.zeros(local_cols.shape, dtype=cd, device=dev)
                if need_k:
                    d_cols[:m] = dk_own
                if need_neg:
                    d_cols[m:] = state["dneg"]
            state["db"] += blocks.softmax_positive_backward(query, local_cols, scale, spec.positive_index, coef,
                                                            dq_acc, d_cols, spec.n_grad_cols)
            dk_own = d_cols[:m] if need_k else None
            if need_neg:
                state["dneg"] = d_cols[m:]

        s_rows = row_scale(scale, n, cd)
        grad_q = (dq_acc * s_rows[:, None]).to(query.dtype) if need_q else None
        grad_k = dk_own.to(key.dtype) if need_k else None
        grad_neg = state["dneg"].to(negatives.dtype) if need_neg else None
        grad_s = sum_to_scale((dq_acc * query.to(cd)).sum(dim=1), scale) if need_s else None
        grad_b = state["db"].to(bias.dtype).reshape(bias.shape) if need_b else None
        return None, grad_q, grad_k, grad_neg, grad_s, grad_b, None


class _RingSigmoid(torch.autograd.Function):
    """This rank's rows' share of the sigmoid loss over every rank's keys, by ring. Positives
    only in the local block; other ranks' blocks are negatives only, so every pair counts once."""

    @staticmethod
    def forward(ctx, c: Context, query, key, scale, bias, spec: SigmoidSpec):
        cd = compute_dtype(query.dtype)
        remote = SigmoidSpec(positive_index=torch.full_like(spec.positive_index, -1), n_rows_norm=spec.n_rows_norm)
        total = [torch.zeros((), dtype=cd, device=query.device)]

        def step(t, block):
            total[0] = total[0] + blocks.sigmoid_block_forward(query, block[0], scale, bias, spec if t == 0 else remote)

        _circulate(c, [key], step)
        ctx.c, ctx.spec, ctx.remote, ctx.has_bias = c, spec, remote, bias is not None
        ctx.save_for_backward(query, key, scale, bias if bias is not None else torch.empty(0, device=query.device))
        return total[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, scale, bias = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[1:5]
        cd = compute_dtype(query.dtype)
        dq_acc = torch.zeros(query.shape, dtype=cd, device=query.device)
        db = [torch.zeros((), dtype=cd, device=query.device)]
        weight = grad.to(cd)

        def step(t, block):
            dk, db_t = blocks.sigmoid_block_backward(query, block[0], scale, bias, ctx.spec if t == 0 else ctx.remote,
                                                     weight, dq_acc, need_key=need_k)
            db[0] = db[0] + db_t
            return dk

        carry = ((key.shape[1],), cd, _add) if need_k else None
        dk_own = _circulate(ctx.c, [key], step, carry)
        s_rows = row_scale(scale, query.shape[0], cd)
        grad_q = (dq_acc * s_rows[:, None]).to(query.dtype) if need_q else None
        grad_k = dk_own.to(key.dtype) if need_k else None
        grad_s = sum_to_scale((dq_acc * query.to(cd)).sum(dim=1), scale) if need_s else None
        grad_b = db[0].to(bias.dtype).reshape(bias.shape) if need_b else None
        return None, grad_q, grad_k, grad_s, grad_b, None


# ----------------------------------------------------------------------------------------------
# Entry points for fastcl.functional


def softmax_loss(c: Context, module, query, key, negatives, scale, bias, spec: SoftmaxSpec):
    """Per-anchor losses ``(row_loss, col_loss, row_valid, col_valid)`` of this rank's rows over
    every rank's keys followed by this rank's ``negatives``.

    ``spec`` is written as for a local call over ``[key; negatives]`` (local indices);
    ``module`` is the backend used in all_gather mode.
    """
    if c.mode == "ring":
        return _RingSoftmax.apply(c, query, key, negatives, scale, bias, spec)
    m, m_all = key.shape[0], sum(c.key_sizes)
    keys = _gather_own_first(key, c, c.key_sizes)
    cols = keys if negatives is None else torch.cat([keys, negatives])
    pos = spec.positive_index
    if pos is not None:
        pos = torch.where(pos < m, pos, pos - m + m_all)
    col_labels, col_has_label = spec.col_labels, spec.col_has_label
    if spec.uses_labels:
        col_labels = torch.cat([_gather_own_first_nograd(col_labels[:m], c, c.key_sizes), col_labels[m:]])
        if col_has_label is not None:
            col_has_label = torch.cat([torch.ones(m_all, dtype=torch.bool, device=key.device), col_has_label[m:]])
    row_spec = replace(spec, positive_index=pos, col_labels=col_labels, col_has_label=col_has_label,
                       n_grad_cols=None if spec.n_grad_cols is None else m_all, symmetric=False)
    outs = module.softmax_loss(query, cols, scale, bias, row_spec)
    if not spec.symmetric:
        return outs
    col_loss, col_valid = _column_losses(c, module, query, key, scale, bias, spec)
    return outs[0], col_loss, outs[2], col_valid


def _column_losses(c: Context, module, query, key, scale, bias, spec: SoftmaxSpec):
    """Symmetric losses, all_gather mode: each local positive column as an anchor over every
    rank's rows, computed as a row-direction loss of the transposed problem."""
    n = query.shape[0]
    queries = _gather_own_first(query, c, c.row_sizes)
    col_scale = scale
    if scale.dim() == 1:
        # a per-row scale belongs to the columns of the transposed problem: fold it into them
        cd = compute_dtype(query.dtype)
        scales = _gather_own_first(scale[:, None], c, c.row_sizes)[:, 0]
        queries = queries.to(cd) * scales.to(cd)[:, None]
        key = key.to(cd)
        col_scale = torch.ones((), dtype=cd, device=query.device)
    pos, pw = spec.positive_index, spec.pos_weight
    if spec.exclude_self:
        # transposed row j must be the sample of query j: rows are keys 0..N-1, each a positive
        if not bool((torch.sort(pos).values == torch.arange(n, device=pos.device)).all()):
            raise ValueError("symmetric with exclude_self across ranks (gather='all_gather') needs positive_index to "
                             "be a permutation of range(N) on every rank; use gather='ring' for other layouts")
        inverse = torch.empty_like(pos)
        inverse[pos] = torch.arange(n, device=pos.device)
        anchors, t_pos = key[:n], inverse
        pw = None if pw is None else pw[inverse]
    else:
        anchors, t_pos = key[pos], torch.arange(n, device=pos.device)
    t_spec = SoftmaxSpec(positive_index=t_pos, pos_weight=pw, exclude_self=spec.exclude_self, decoupled=spec.decoupled)
    loss, _, valid, _ = module.softmax_loss(anchors, queries, col_scale, bias, t_spec)
    if spec.exclude_self:
        loss, valid = loss[pos], valid[pos]
    return loss, valid


def sigmoid_loss(c: Context, module, query, key, scale, bias, spec: SigmoidSpec):
    """This rank's rows' share of the sigmoid loss over every rank's keys, normalised by the
    global row count (so the shares sum to the single-process loss)."""
    spec = SigmoidSpec(positive_index=spec.positive_index, n_rows_norm=c.total_rows)
    if c.mode == "ring":
        return _RingSigmoid.apply(c, query, key, scale, bias, spec)
    return module.sigmoid_loss(query, _gather_own_first(key, c, c.key_sizes), scale, bias, spec)


def finish(c: Context, share: torch.Tensor) -> torch.Tensor:
    """Turn this rank's share of the global loss into what it returns: the global loss (an
    all-reduce whose backward all-reduces), or ``W * share`` with ``local_loss``."""
    if c.local_loss:
        return share * c.world
    return _AllReduceSum.apply(share, c.group)


def reduce(c: Context, row_loss, col_loss, row_valid, col_valid, symmetric: bool, reduction: str):
    """The distributed counterpart of the local reduction: means are over every rank's valid
    anchors; ``"none"`` returns this rank's per-anchor losses as they are."""
    if reduction == "none":
        return (row_loss, col_loss) if symmetric else row_loss
    if reduction == "sum":
        share = row_loss.sum()
        if symmetric:
            share = (share + col_loss.sum()) / 2
        return finish(c, share)
    counts = torch.stack([row_valid.sum(), col_valid.sum()]).to(row_loss.dtype)
    dist.all_reduce(counts, group=c.group)
    share = row_loss.sum() / counts[0].clamp(min=1)
    if symmetric:
        share = (share + col_loss.sum() / counts[1].clamp(min=1)) / 2
    return finish(c, share)
