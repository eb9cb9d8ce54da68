"""open_clip's losses (``open_clip.loss``, open-clip-torch 3.3.0) on fastcl's fused kernels.

Swap ``from open_clip.loss import ClipLoss, SigLipLoss`` for
``from fastcl.compat.open_clip import ClipLoss, SigLipLoss``.

=================  ==========================================================================
class              fastcl
=================  ==========================================================================
ClipLoss           fused (:func:`fastcl.clip_loss`), one process
SigLipLoss         fused (:func:`fastcl.siglip_loss`), one process
CoCaLoss           contrastive part fused; the caption cross-entropy is plain torch, as in open_clip
DistillClipLoss    fused (:func:`fastcl.distill_clip_loss`), one process
=================  ==========================================================================

Several processes (``world_size > 1``, default process group, ``rank``/``world_size`` as open_clip
takes them) go through fastcl's ``group=``, reproducing open_clip's per-rank loss and gradients
in each mode:

==================================  ==============================  ===========================
ClipLoss mode                       per-rank loss                   gradients (after DDP mean)
==================================  ==============================  ===========================
gather_with_grad=True (+local_loss)  global loss (local share)       exact -- recommended
gather_with_grad=False (default)    global loss                     features 1/W of exact
gather_with_grad=False, local_loss  local rows vs detached columns  query side only (inexact)
SigLipLoss, every dist_impl         local images vs all texts / B   exact
DistillClipLoss                     as ClipLoss; gather_with_grad=False with local_loss goes to open_clip
==================================  ==============================  ===========================

The inexact open_clip modes are reproduced, not fixed: pass ``gather_with_grad=True`` (or call
:func:`fastcl.clip_loss` with ``group=``) for the exact gradient.

Differences from open_clip: the loss comes back in float32 for float16/bfloat16 features
(open_clip returns the features' dtype outside autocast); ``cache_labels`` and ``use_horovod``
are accepted and have nothing to do (no label tensor is built; torch.distributed is used in
place of horovod); ``dist_impl`` only names open_clip's exchange pattern (fastcl's gather gives
the same values).
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as F
from . import _import_host, _process_group, _scale_grad

__all__ = ["ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss"]

_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _group(cls_name: str, rank: int, world_size: int):
    """The default process group, checked against open_clip's ``rank`` / ``world_size``."""
    group = _process_group()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{cls_name}(world_size={world_size}) needs torch.distributed to be initialised")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"{cls_name}: rank={rank}, world_size={world_size} but the default process group has "
                         f"rank {dist.get_rank()} of {dist.get_world_size()}")
    return group


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE, ``open_clip.loss.ClipLoss``.

    ``forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias=None,
    output_dict=False)`` returns ``(CE(L, arange) + CE(L.T, arange)) / 2`` with
    ``L = logit_scale * image @ text.T (+ logit_bias)``, or ``{"contrastive_loss": loss}``.

    open_clip conventions kept:

    * ``logit_scale`` is the already-exponentiated scale (the model returns
      ``self.logit_scale.exp()``); a 0-dim or ``[1]`` tensor, or a float. Its gradient and
      ``logit_bias``'s come back in their own shapes.
    * Features are used as given: the model normalises them, the loss does not.
    * ``logit_bias`` (added to both logit matrices, for fine-tuning SigLIP checkpoints with the
      CLIP loss) is optional.

    Args:
        local_loss, gather_with_grad, rank, world_size: open_clip's distributed settings, with
            open_clip's per-rank values and gradients (module doc); with ``world_size=1`` the
            first two have no effect, as in open_clip.
        cache_labels, use_horovod: accepted for compatibility; nothing to cache; horovod is not
            used (torch.distributed's default group is).
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _contrastive(self, image_features, text_features, logit_scale, logit_bias=None):
        if self.world_size <= 1:
            return F.clip_loss(image_features, text_features, logit_scale, logit_bias)
        group = _group(type(self).__name__, self.rank, self.world_size)
        if self.gather_with_grad:
            # torch.distributed.nn.all_gather: the exact global loss (or this rank's share of it)
            return F.clip_loss(image_features, text_features, logit_scale, logit_bias, group=group,
                               local_loss=self.local_loss)
        if not self.local_loss:
            # no-grad gather with the local slot put back: every rank computes the global loss but
            # only its own rows carry gradient, 1/W of what fastcl's exact gather gives them
            w = 1.0 / self.world_size
            return F.clip_loss(_scale_grad(image_features, w), _scale_grad(text_features, w), logit_scale,
                               logit_bias, group=group)
        # no-grad gather and local_loss: the gathered columns carry no gradient at all, so only the
        # local rows (queries) of each direction do; a logit bias cancels in both softmaxes
        i2t = F.info_nce(image_features, text_features.detach(), scale=logit_scale, group=group, local_loss=True)
        t2i = F.info_nce(text_features, image_features.detach(), scale=logit_scale, group=group, local_loss=True)
        loss = (i2t + t2i) / 2
        if isinstance(logit_bias, torch.Tensor):
            loss = loss + 0 * logit_bias.sum()
        return loss

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        total_loss = self._contrastive(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": total_loss} if output_dict else total_loss


class CoCaLoss(ClipLoss):
    """``open_clip.loss.CoCaLoss``: weighted CLIP loss plus a captioning cross-entropy.

    ``forward(image_features, text_features, logits [B, T, V], labels [B, T], logit_scale,
    output_dict=False)`` returns ``(clip_loss, caption_loss)`` or
    ``{"contrastive_loss", "caption_loss"}``.

    The contrastive term is :class:`ClipLoss` (fused, no ``logit_bias``, as in open_clip) times
    ``clip_loss_weight``. The caption term is ``CrossEntropyLoss(ignore_index=pad_id)`` over
    ``logits.permute(0, 2, 1)`` times ``caption_loss_weight``, in plain torch as in open_clip.

    Quirk kept: with ``clip_loss_weight`` 0 (or None) the contrastive term is
    ``torch.tensor(0)``, an int64 tensor on ``logits.device``.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False, gather_with_grad=False,
                 cache_labels=False, rank=0, world_size=1, use_horovod=False):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * self._contrastive(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss, ``open_clip.loss.SigLipLoss``.

    ``forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias,
    output_dict=False)`` returns ``-sum_ij log sigmoid(z_ij * L_ij) / B`` with
    ``L = logit_scale * image @ text.T + logit_bias``, ``z = +1`` on the diagonal and ``-1``
    elsewhere, or ``{"contrastive_loss": loss}``.

    open_clip conventions kept: the sum over columns is averaged over the rows (not the mean
    over pairs); ``logit_scale`` is already exponentiated; ``logit_bias`` is a required
    positional argument that may be ``None`` (then no bias is added); features are used as
    given.

    Args:
        cache_labels: accepted; no label matrix is built.
        rank, world_size, dist_impl: open_clip's distributed settings. ``dist_impl`` is checked
            against open_clip's choices ('bidir', 'shift', 'reduce', 'gather'; default 'bidir');
            all give the same per-rank values and gradients, which fastcl reproduces.
        chunk_size: open_clip ``main``'s row chunking (PR #1145); accepted and ignored, since
            fastcl never builds the ``[B, B]`` logits.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, chunk_size: int = 0):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_DIST_IMPLS} (or None for 'bidir'); got {dist_impl!r}")
        self.chunk_size = chunk_size

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        bias = 0.0 if logit_bias is None else logit_bias
        if self.world_size <= 1:
            loss = F.siglip_loss(image_features, text_features, logit_scale, bias)
        else:
            # open_clip's exchanges all give each rank its images against every rank's texts,
            # divided by the local batch: fastcl's local share of the global loss
            group = _group(type(self).__name__, self.rank, self.world_size)
            loss = F.siglip_loss(image_features, text_features, logit_scale, bias, group=group, local_loss=True)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """``open_clip.loss.DistillClipLoss``: CLIP's loss and the student's cross-entropy to a
    teacher's softmax, fused (:func:`fastcl.distill_clip_loss`).

    ``forward(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
    dist_logit_scale, output_dict=False)`` returns ``(contrastive_loss, distill_loss)`` or
    ``{"contrastive_loss", "distill_loss"}``, with open_clip's values and gradients (the
    teacher's included when its tensors require them).

    Several processes: ``gather_with_grad=True`` (with or without ``local_loss``) is fastcl's exact
    all_gather; ``gather_with_grad=False`` without ``local_loss`` reproduces open_clip's gradient
    (each rank's own rows carry 1/W of the exact one, the teacher's too). ``gather_with_grad=False``
    with ``local_loss`` is handed to open_clip (raises ``NotImplementedError`` if it is not
    installed).
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict=False):
        features = (image_features, text_features, dist_image_features, dist_text_features)
        if self.world_size <= 1:
            contrastive, distill = F.distill_clip_loss(*features[:2], logit_scale, *features[2:], dist_logit_scale)
        else:
            group = _group(type(self).__name__, self.rank, self.world_size)
            if self.gather_with_grad:
                contrastive, distill = F.distill_clip_loss(*features[:2], logit_scale, *features[2:],
                                                           dist_logit_scale, group=group, local_loss=self.local_loss)
            elif not self.local_loss:
                w = 1.0 / self.world_size
                image, text, t_image, t_text = (_scale_grad(x, w) for x in features)
                contrastive, distill = F.distill_clip_loss(image, text, logit_scale, t_image, t_text,
                                                           dist_logit_scale, group=group)
            else:
                host = _import_host("open_clip.loss", "DistillClipLoss(gather_with_grad=False, local_loss=True)",
                                    "open_clip_torch")
                return host.DistillClipLoss(local_loss=True, gather_with_grad=False, rank=self.rank,
                                            world_size=self.world_size)(
                    *features[:2], logit_scale, *features[2:], dist_logit_scale, output_dict=output_dict)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
