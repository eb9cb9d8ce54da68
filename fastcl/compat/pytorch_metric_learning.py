"""pytorch-metric-learning's contrastive losses (2.9.0) on fastcl's fused kernels.

Swap ``from pytorch_metric_learning.losses import NTXentLoss, SupConLoss, SelfSupervisedLoss,
CrossBatchMemory`` for ``from fastcl.compat.pytorch_metric_learning import ...``.

``loss(embeddings [N, D], labels [N], indices_tuple=None, ref_emb=None, ref_labels=None)``: the
rows are anchors, the columns are ``ref_emb`` (default: ``embeddings`` itself, with each row's
own column removed). Positives are the columns with an equal label, negatives the others.

Fused: the default distance (``CosineSimilarity``, or ``DotProductSimilarity`` with
``power=1``), the default reducer (``MeanReducer`` for NTXent, ``AvgNonZeroReducer`` for
SupCon), no embedding regularizer, ``collect_stats=False``. Everything else (other distances,
reducers, regularizers, miners' ``indices_tuple``, miners in ``CrossBatchMemory``, statistics)
is delegated to pytorch-metric-learning when it is installed, and raises
``NotImplementedError`` naming the option when it is not.

Differences from pytorch-metric-learning on the fused path: the loss is float32 for
float16/bfloat16 embeddings; statistics (``collect_stats``) are not recorded; PML's
``+ finfo.tiny`` inside the logarithms is left out (it changes a value only when a probability
underflows, where PML's result is clamped near ``-log(tiny)`` and fastcl's is the true value).
"""

from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn

from .. import functional as F
from . import _import_host, _pair_dots, _softplus

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss", "CrossBatchMemory"]

_PML = "pytorch-metric-learning"


def _host_losses(option: str):
    return _import_host("pytorch_metric_learning.losses", option, _PML)


def _is_pml(obj, *names) -> bool:
    cls = type(obj)
    return cls.__name__ in names and cls.__module__.startswith("pytorch_metric_learning.")


def _distance_normalizes(distance) -> Optional[bool]:
    """Whether a fusable ``distance`` L2-normalises the embeddings; ``None`` if it is not fusable."""
    if distance is None:
        return True
    if _is_pml(distance, "CosineSimilarity", "DotProductSimilarity") and distance.power == 1 \
            and distance.p == 2 and distance.is_inverted and not distance.collect_stats:
        return bool(distance.normalize_embeddings)
    return None


def _label_ids(labels: torch.Tensor, ref_labels: torch.Tensor):
    """Labels of the rows and of the columns as dense int64 ids with the same equalities."""
    n = labels.shape[0]
    _, ids = torch.unique(torch.cat([labels.reshape(-1), ref_labels.reshape(-1).to(labels.dtype)]),
                          return_inverse=True)
    return ids[:n], ids[n:]


def _same_label_counts(ids: torch.Tensor, ref_ids: torch.Tensor):
    """For each row, (columns sorted by label, start of its label's run, its length): no N x M mask."""
    sorted_ids, order = torch.sort(ref_ids, stable=True)
    lo = torch.searchsorted(sorted_ids, ids, right=False)
    hi = torch.searchsorted(sorted_ids, ids, right=True)
    return order, lo, hi - lo


def _positive_pairs(ids, ref_ids, exclude_self: bool):
    """All (row, column) pairs with equal labels, minus (i, i) when ``exclude_self``; O(#pairs)."""
    n = ids.shape[0]
    order, lo, count = _same_label_counts(ids, ref_ids)
    rows = torch.repeat_interleave(torch.arange(n, device=ids.device), count)
    start = torch.cumsum(count, 0) - count
    within = torch.arange(rows.numel(), device=ids.device) - start[rows]
    cols = order[lo[rows] + within]
    if exclude_self:
        keep = cols != rows
        rows, cols = rows[keep], cols[keep]
    return rows, cols, count


class _FusedPairLoss(nn.Module):
    """Shared by NTXentLoss and SupConLoss: option checks, delegation and the PML forward."""

    _default_reducer = ""

    def __init__(self, temperature, **kwargs):
        super().__init__()
        self.temperature = temperature
        self.kwargs = kwargs
        object.__setattr__(self, "_host", None)  # not a submodule: state_dict stays PML-free
        self.unfused_options = self._unfused(kwargs)
        self._normalize = _distance_normalizes(kwargs.get("distance"))

    def _unfused(self, kwargs) -> list:
        out = []
        for key, value in kwargs.items():
            if key == "distance":
                if _distance_normalizes(value) is None:
                    out.append(f"distance={type(value).__name__}")
            elif key == "reducer":
                if value is not None and not self._is_default_reducer(value):
                    out.append(f"reducer={type(value).__name__}")
            elif key == "embedding_regularizer":
                if value is not None:
                    out.append("embedding_regularizer")
            elif key == "embedding_reg_weight":
                continue
            elif key == "collect_stats":
                if value:
                    out.append("collect_stats=True")
            else:
                out.append(key)
        return out

    def _is_default_reducer(self, reducer) -> bool:
        if reducer.collect_stats or not _is_pml(reducer, self._default_reducer):
            return False
        return self._default_reducer != "AvgNonZeroReducer" or (reducer.low == 0 and reducer.high is None)

    def host_loss(self, option: str = "an unfused option"):
        """The pytorch-metric-learning loss with this configuration (built on first use)."""
        if self._host is None:
            cls = getattr(_host_losses(option), type(self).__name__)
            object.__setattr__(self, "_host", cls(temperature=self.temperature, **self.kwargs))
        self._host.temperature = self.temperature
        return self._host

    @property
    def fusable(self) -> bool:
        return not self.unfused_options

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """Loss over ``embeddings [N, D]`` x ``ref_emb [M, D]`` (default ``embeddings``), as PML."""
        unfused = list(self.unfused_options)
        if indices_tuple is not None:
            unfused.append("indices_tuple")
        if not unfused:
            if labels is None:
                raise ValueError("labels are required unless indices_tuple is given")
            if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
                raise ValueError(f"labels must have shape ({embeddings.shape[0]},); got {tuple(labels.shape)}")
            labels = labels.to(embeddings.device)
            if ref_emb is None:
                cols, col_labels = embeddings, labels
            else:
                cols = ref_emb
                col_labels = None if ref_labels is None else ref_labels.to(ref_emb.device)
                if col_labels is not None and (col_labels.ndim != 1 or col_labels.shape[0] != cols.shape[0]):
                    raise ValueError(f"ref_labels must have shape ({cols.shape[0]},); got {tuple(col_labels.shape)}")
            # PML removes the self pairs exactly when the column labels are the row labels object
            # (missing ref_labels counts as labels), whether or not the columns are the rows.
            exclude_self = col_labels is None or col_labels is labels
            if exclude_self:
                col_labels = labels
                if cols.shape[0] != embeddings.shape[0]:
                    unfused.append("ref_emb with a different row count and no ref_labels")
        if unfused:
            return self.host_loss(", ".join(unfused))(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self.fused(embeddings, labels, cols, col_labels, exclude_self)

    def fused(self, embeddings, labels, ref_emb, ref_labels, exclude_self: bool):
        """The loss with columns ``ref_emb``; ``exclude_self`` removes column i from row i."""
        ids, ref_ids = _label_ids(labels, ref_labels)
        if self._normalize:
            q = TF.normalize(embeddings, p=2, dim=1)
            k = q if ref_emb is embeddings else TF.normalize(ref_emb, p=2, dim=1)
        else:
            q, k = embeddings, ref_emb
        return self._loss(embeddings, q, ids, k, ref_ids, exclude_self)

    @staticmethod
    def _zero(embeddings):
        # PML's zero loss: connected to the graph, zero gradient
        return torch.sum(embeddings * 0)

    @staticmethod
    def _pair_counts(n, m, count, exclude_self):
        n_pos = int(count.sum()) - (n if exclude_self else 0)
        n_neg = n * m - int(count.sum())
        return n_pos, n_neg

    @staticmethod
    def _trivial(n_pos, n_neg) -> bool:
        # GenericPairLoss returns zero when every index list has <= 1 entry, and the loss itself
        # when there is no positive or no negative pair
        return n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1)


class NTXentLoss(_FusedPairLoss):
    """``pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs)``.

    Pair-based, as PML: every positive pair (a, p) is one loss term, and the other positives of
    ``a`` are left out of its denominator::

        loss_ap = -log( e^{s_ap/t} / (e^{s_ap/t} + sum_{n in neg(a)} e^{s_an/t}) )
                = softplus(LSE_{n in neg(a)} s_an/t - s_ap/t)

    averaged over all positive pairs (``MeanReducer``). ``s`` is the cosine similarity. This is
    not SupCon: with several positives per anchor the values differ.

    Composition: one fused call gives each anchor's log-sum-exp over its negatives,
    ``info_nce(labels=..., decoupled=True, reduction="none")`` (per row:
    ``LSE_neg(a) - mean_p s_ap/t``; the O(#pairs) positive logits are added back). The positive
    pairs are enumerated from sorted labels, so memory is O(N + M + #pairs), against PML's
    ``[#pos pairs, #neg pairs]`` matrix.

    Quirks kept: the self pair is removed only when ``ref_emb`` is not given or ``ref_labels``
    is ``labels`` itself; a pair whose anchor has no negative contributes 0 but still counts in
    the mean; the loss is 0 (``sum(embeddings * 0)``) when there is no positive pair, no
    negative pair, or at most one of each.
    """

    _default_reducer = "MeanReducer"

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _loss(self, embeddings, q, ids, k, ref_ids, exclude_self):
        n, m, t = q.shape[0], k.shape[0], self.temperature
        rows, cols, count = _positive_pairs(ids, ref_ids, exclude_self)
        n_pos, n_neg = self._pair_counts(n, m, count, exclude_self)
        if self._trivial(n_pos, n_neg):
            return self._zero(embeddings)
        # scale=1/t: the host takes any non-zero temperature, negative ones included
        per_row = F.info_nce(q, k, scale=1.0 / t, labels=ids, key_labels=ref_ids, exclude_self=exclude_self,
                             decoupled=True, reduction="none")
        pair_logit = _pair_dots(q, k, rows, cols) / t
        pos_sum = torch.zeros(n, dtype=pair_logit.dtype, device=q.device).index_add(0, rows, pair_logit)
        pos_cnt = torch.bincount(rows, minlength=n).clamp(min=1).to(pair_logit.dtype)
        lse_neg = per_row + pos_sum / pos_cnt
        has_neg = (m - count) > 0
        losses = _softplus(lse_neg[rows] - pair_logit)
        losses = torch.where(has_neg[rows], losses, torch.zeros_like(losses))
        return losses.mean()


class SupConLoss(_FusedPairLoss):
    """``pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs)``.

    Per anchor ``i`` with positives ``P_i`` (equal label) and denominator all its columns but
    itself: ``loss_i = -mean_{p in P_i} log softmax_i(s/t)_p`` (:func:`fastcl.info_nce` with
    ``labels``). Reduced with ``AvgNonZeroReducer``: the mean over anchors whose loss is > 0
    (anchors without a positive are dropped).

    Quirks kept: the self-pair rule and the zero-loss cases of :class:`NTXentLoss`; equal to
    HobbitLong's SupConLoss with ``temperature == base_temperature``.
    """

    _default_reducer = "AvgNonZeroReducer"

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _loss(self, embeddings, q, ids, k, ref_ids, exclude_self):
        n, m = q.shape[0], k.shape[0]
        _, _, count = _same_label_counts(ids, ref_ids)
        n_pos, n_neg = self._pair_counts(n, m, count, exclude_self)
        if self._trivial(n_pos, n_neg):
            return self._zero(embeddings)
        per_row = F.info_nce(q, k, scale=1.0 / self.temperature, labels=ids, key_labels=ref_ids,
                             exclude_self=exclude_self, reduction="none")
        kept = per_row[per_row > 0]
        return kept.mean() if kept.numel() else self._zero(embeddings)


def _host_version(loss):
    """The PML loss to hand to a delegated wrapper: fastcl's classes map to their PML class."""
    return loss.host_loss("a delegated wrapper") if isinstance(loss, _FusedPairLoss) else loss


class SelfSupervisedLoss(nn.Module):
    """``pytorch_metric_learning.losses.SelfSupervisedLoss(loss, symmetric=True)``.

    ``forward(embeddings [N, D], ref_emb [N, D])``: row i of both is the same sample, labels are
    ``arange(N)``. ``symmetric=True`` concatenates the two views into one ``[2N, D]`` batch
    (mean over 2N anchors, each other row a negative: SimCLR's NT-Xent, lightly's value);
    ``symmetric=False`` uses ``embeddings`` as anchors and ``ref_emb`` as columns (one direction,
    no anchor-anchor negatives). Works with the losses of this module (fused) and with any PML
    loss PML's wrapper supports.
    """

    _SUPPORTED = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                  "IntraPairVarianceLoss", "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss",
                  "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss", "NCALoss",
                  "TupletMarginLoss")

    def __init__(self, loss, symmetric=True, **kwargs):
        super().__init__(**kwargs)
        self.check_loss_support(type(loss).__name__)
        self.loss = loss
        self.symmetric = symmetric

    @staticmethod
    def supported_losses():
        return list(SelfSupervisedLoss._SUPPORTED)

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls._SUPPORTED:
            raise Exception(f"SelfSupervisedLoss not supported for {loss_name}")

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0])
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())


class CrossBatchMemory(nn.Module):
    """``pytorch_metric_learning.losses.CrossBatchMemory(loss, embedding_size, memory_size=1024,
    miner=None)``: a queue of past embeddings used as extra columns.

    ``forward(embeddings [B, D], labels [B], indices_tuple=None, enqueue_mask=None)``. As PML:

    * the queue is a ring buffer ``embedding_memory [memory_size, D]`` / ``label_memory`` (both
      buffers), stored detached; only the current rows get gradients;
    * the current batch is enqueued **before** the loss, and the columns are the filled part
      of the queue, current batch included; each row's own queue slot is removed from its
      positives (it is never a negative);
    * ``enqueue_mask`` (MoCo style): the masked rows are only enqueued (keys), the others are
      the anchors, and no self pair is removed.

    Quirk kept: with a batch of one row (no ``enqueue_mask``), PML's self-pair removal misses
    the row's own slot (``not_self_comparisons`` wraps ``e <= s``), so that slot counts as a
    positive; fastcl does the same.

    Fused when ``loss`` is this module's ``NTXentLoss``/``SupConLoss`` in a fusable
    configuration, ``miner`` is None and no ``indices_tuple`` is passed; otherwise the call is
    delegated to PML's ``CrossBatchMemory`` sharing this module's queue state.
    """

    _SUPPORTED = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                  "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
                  "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss",
                  "TupletMarginLoss")

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, **kwargs):
        super().__init__(**kwargs)
        self.check_loss_support(type(loss).__name__)
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        object.__setattr__(self, "_host", None)
        self.reset_queue()

    @staticmethod
    def supported_losses():
        return list(CrossBatchMemory._SUPPORTED)

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls._SUPPORTED:
            raise Exception(f"CrossBatchMemory not supported for {loss_name}")

    def reset_queue(self):
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size).long())
        self.has_been_filled = False
        self.queue_idx = 0

    def add_to_memory(self, embeddings, labels, batch_size):
        self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx + batch_size,
                                           device=labels.device) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
        self.label_memory[self.curr_batch_idx] = labels.detach()
        prev_queue_idx = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        if (not self.has_been_filled) and (self.queue_idx <= prev_queue_idx):
            self.has_been_filled = True

    def _unfused(self, indices_tuple) -> list:
        out = []
        if not isinstance(self.loss, _FusedPairLoss):
            out.append(f"loss={type(self.loss).__name__}")
        elif not self.loss.fusable:
            out.extend(self.loss.unfused_options)
        if self.miner is not None:
            out.append("miner")
        if indices_tuple is not None:
            out.append("indices_tuple")
        return out

    def _delegate(self, option, embeddings, labels, indices_tuple, enqueue_mask):
        host = self._host
        if host is None:
            cls = _host_losses(option).CrossBatchMemory
            host = cls(_host_version(self.loss), self.embedding_size, memory_size=self.memory_size, miner=self.miner)
            object.__setattr__(self, "_host", host)
        host.embedding_memory, host.label_memory = self.embedding_memory, self.label_memory
        host.queue_idx, host.has_been_filled = self.queue_idx, self.has_been_filled
        loss = host(embeddings, labels, indices_tuple=indices_tuple, enqueue_mask=enqueue_mask)
        self.embedding_memory, self.label_memory = host.embedding_memory, host.label_memory
        self.queue_idx, self.has_been_filled = host.queue_idx, host.has_been_filled
        self.curr_batch_idx = host.curr_batch_idx
        return loss

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            assert len(enqueue_mask) == len(embeddings)
        else:
            assert len(embeddings) <= len(self.embedding_memory)
        unfused = self._unfused(indices_tuple)
        if unfused:
            return self._delegate(", ".join(unfused), embeddings, labels, indices_tuple, enqueue_mask)

        device = embeddings.device
        labels = labels.to(device)
        self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device=device, dtype=labels.dtype)
        if enqueue_mask is not None:
            emb_for_queue, labels_for_queue = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            remove_self = False
        else:
            emb_for_queue, labels_for_queue = embeddings, labels
            remove_self = True
        queue_batch_size = len(emb_for_queue)
        self.add_to_memory(emb_for_queue, labels_for_queue, queue_batch_size)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        keys, key_labels = self.embedding_memory[:filled], self.label_memory[:filled]

        remove_self = remove_self and queue_batch_size > 1  # PML's single-row wrap-around quirk
        if remove_self:
            # put each row's own slot first, so that column i is row i's self pair
            own = self.curr_batch_idx
            others = torch.ones(filled, dtype=torch.bool, device=device)
            others[own] = False
            order = torch.cat([own, torch.arange(filled, device=device)[others]])
            keys, key_labels = keys[order], key_labels[order]
        return self.loss.fused(embeddings, labels, keys, key_labels, exclude_self=remove_self)
