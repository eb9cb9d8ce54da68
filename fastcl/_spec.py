"""Validated, backend-neutral description of one contrastive loss call.

Every public loss is lowered to one of two specs (docs/design.md §2):

* :class:`SoftmaxSpec` -- the softmax family (InfoNCE, CLIP, NT-Xent, SupCon, DCL, queues,
  hard negatives). Per row ``i`` over the columns ``j`` of ``key`` (and any extra negatives
  appended after them)::

      L_ij   = s_i * <q_i, k_j> + b
      loss_i = -sum_j t_ij * L_ij + LSE_{j in D_i} L_ij

  Positives are either one column per row (``positive_index``) or label equality
  (``row_labels == col_labels``); ``t_ij`` puts ``pos_weight_i / |P_i|`` on each positive.
* :class:`SigmoidSpec` -- the sigmoid family (SigLIP)::

      loss = (1/N) * sum_ij softplus(-z_ij * L_ij),  z_ij = +1 on positives, -1 elsewhere

A spec holds only non-differentiable configuration; the differentiable tensors (query, key,
scale, bias) travel beside it. Backends trust a spec: the public functions validate inputs.
The backends' passes read the mask fields; ``pos_weight``, ``debias`` and ``label_smoothing``
belong to the per-anchor epilogue (``fastcl/ops/epilogues.py``).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SoftmaxSpec:
    """Configuration of a softmax-family loss over ``N`` rows and ``C`` columns.

    Attributes:
        positive_index: Long[N] column of each row's single positive, or ``None`` when
            positives come from labels (or a block of columns holds no positive).
        row_labels: Long[N] anchor labels (label positives), else ``None``.
        col_labels: Long[C] column labels (label positives), else ``None``.
        col_has_label: Bool[C]; columns where it is False are never positives (extra negatives
            given without labels). ``None`` means every column has a label.
        pos_weight: [N] weight on each row's positive term (DCLW), or ``None`` for 1.
        exclude_self: drop column ``i`` from row ``i`` (and row ``i`` from column ``i``).
        decoupled: drop the positives from the softmax denominator (DCL).
        symmetric: add the column direction; needs one-to-one ``positive_index``.
        n_grad_cols: columns ``>= n_grad_cols`` get no gradient (a detached queue).
        debias: ``tau_plus`` of the debiased loss (Chuang et al. 2020), else ``None``. Lowered
            with ``decoupled=True``, so the passes' LSE runs over the negatives only.
        label_smoothing: ``eps`` of ``F.cross_entropy(label_smoothing=eps)`` over each anchor's
            denominator columns (0: none); an epilogue variant (``fastcl/ops/smoothing.py``).
        hardness: ``beta > 0`` of hard-negative reweighting on the debiased loss (Robinson et
            al. 2021), else ``None``: :mod:`fastcl.ops.softmax` runs the passes at the scales
            ``(1 + beta) s`` and ``beta s`` (the tilted statistic). Set only with ``debias``.
        false_negative_margin: ``m`` of the false-negative mask, else ``None``: a column other
            than row ``i``'s positive leaves its denominator when ``<q_i, k_j> > <q_i, k_pos(i)> + m``.
            :mod:`fastcl.ops.softmax` turns it into the thresholds below before the passes run.
        fn_row: ``[N]`` logit thresholds the passes read: entry ``(i, j)``, ``j`` not row ``i``'s
            positive, leaves row ``i``'s denominator when ``S_ij > fn_row[i]`` (``p_i + s_i m``).
        fn_col: ``[C]`` (symmetric): entry ``(i, j)``, ``i`` not column ``j``'s positive row,
            leaves column ``j``'s denominator when ``S_ij > fn_col[j]`` (``+inf`` on columns that
            are no anchor).
        guide_rows, guide_cols: ``[N, G]`` / ``[C, G]`` unit-norm guide-model embeddings (GIST), in
            the compute dtype, or ``None``: then the false-negative test reads the guide's
            similarity ``<guide_rows_i, guide_cols_j>`` instead of ``S_ij`` (row direction only;
            ``fn_row`` holds the guide thresholds).
    """

    positive_index: Optional[torch.Tensor] = None
    row_labels: Optional[torch.Tensor] = None
    col_labels: Optional[torch.Tensor] = None
    col_has_label: Optional[torch.Tensor] = None
    pos_weight: Optional[torch.Tensor] = None
    exclude_self: bool = False
    decoupled: bool = False
    symmetric: bool = False
    n_grad_cols: Optional[int] = None
    debias: Optional[float] = None
    label_smoothing: float = 0.0
    hardness: Optional[float] = None
    false_negative_margin: Optional[float] = None
    fn_row: Optional[torch.Tensor] = None
    fn_col: Optional[torch.Tensor] = None
    guide_rows: Optional[torch.Tensor] = None
    guide_cols: Optional[torch.Tensor] = None

    @property
    def uses_labels(self) -> bool:
        return self.row_labels is not None


@dataclass(frozen=True)
class DistillSpec:
    """A CLIP distillation call (:mod:`fastcl.ops.distill`): a student and a teacher similarity
    over the same pairs, one-hot positives. ``symmetric``: the text columns' terms too.
    ``passes`` names the backend passes it needs (``fastcl._dispatch`` skips a backend lacking
    one)."""

    symmetric: bool = True
    passes = ("distill_stats", "distill_grad")


@dataclass(frozen=True)
class SigmoidSpec:
    """Configuration of a sigmoid-family loss.

    Attributes:
        positive_index: Long[N] column holding row ``i``'s positive; ``-1`` marks a row with no
            positive in these columns (a negatives-only block). ``None`` with ``labels``.
        n_rows_norm: the ``N`` the summed loss is divided by (the number of anchor rows).
        row_labels: Long[N] group ids of the rows (label positives), or ``None``: every pair
            ``(i, j)`` with ``row_labels[i] == col_labels[j]`` is a positive (``z_ij = +1``).
        col_labels: Long[C] group ids of the columns; with ``row_labels``. A single process
            passes the same vector twice (image and text of a pair share a label); across ranks
            the columns are the gathered (or travelling) keys' labels.
    """

    positive_index: Optional[torch.Tensor]
    n_rows_norm: int
    row_labels: Optional[torch.Tensor] = None
    col_labels: Optional[torch.Tensor] = None

    @property
    def uses_labels(self) -> bool:
        """Positives come from label equality (not ``positive_index``)."""
        return self.row_labels is not None
