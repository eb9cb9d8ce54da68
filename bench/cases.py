"""The losses the suite benchmarks: their inputs, their FLOP count and the fastcl call.

``N`` is the batch size as the caller passes it. The similarity matrix it implies has
``rows x cols`` entries (:class:`Shape`): ``N x N`` for CLIP/SigLIP, ``2N x 2N`` for the
two-view losses (nt_xent, supcon, dcl), ``N x 2N`` with a queue or one hard negative per row.

Inputs are unit-norm random features (never zeros), drawn from a seeded generator so that every
implementation in a comparison gets the same values.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fastcl
from fastcl._spec import DistillSpec, SoftmaxSpec

CLIP_SCALE = 1 / 0.07  # open_clip's initial exp(logit_scale)
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation
TEMPERATURE = 0.1
NT_XENT_TEMPERATURE = 0.5
LABEL_SMOOTHING = 0.1
FALSE_NEGATIVE_MARGIN = 0.0  # mask every pair more similar than the positive (random features: about half)
DEBIAS, HARDNESS = 0.1, 1.0
MNRL_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default
GIST_TEMPERATURE = 0.05


def matryoshka_dims(d: int) -> Tuple[int, ...]:
    """Four halving prefixes up to ``d`` (sentence-transformers' usual [d, d/2, d/4, d/8])."""
    return tuple(sorted({max(1, d // 8), max(1, d // 4), max(1, d // 2), d}))


@dataclass(frozen=True)
class Shape:
    """Similarity matrix of a case: ``rows x cols``, of which ``grad_cols`` get a gradient."""

    rows: int
    cols: int
    grad_cols: int

    def flops(self, d: int, backward: bool) -> int:
        """docs/design.md §9: forward ``2·R·C·D``; forward+backward adds the recomputed tile, dQ and dK.

        For one row and column pass over a square matrix that is ``8·N·M·D``. The same count is
        used for every implementation, so TFLOP/s ratios are time ratios; implementations that
        compute more (open_clip's second logits matmul, Inf-CL's two directions) are charged
        nothing extra.
        """
        fwd = 2 * self.rows * self.cols * d
        if not backward:
            return fwd
        return 3 * fwd + 2 * self.rows * self.grad_cols * d


Inputs = Dict[str, object]


@dataclass(frozen=True)
class Case:
    """One benchmarked loss.

    ``make(n, d, dtype, device, grad, gen)`` returns ``(inputs, leaves)``: the keyword arguments
    of the loss and the tensors that receive gradients. ``fastcl(inputs, backend)`` computes
    the loss through fastcl. ``needs`` (a spec, or ``None``) names what the call needs from a
    backend; a backend whose kernels lack it is skipped, with the reason
    (``fastcl._dispatch.unsupported_reason``).
    """

    name: str
    doc: str
    shape: Callable[[int], Shape]
    make: Callable[..., Tuple[Inputs, List[torch.Tensor]]]
    fastcl: Callable[[Inputs, str], torch.Tensor]
    needs: Optional[object] = None  # a spec of what the call needs: backends lacking it are skipped


def _unit(n, d, dtype, device, gen):
    x = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32)
    return F.normalize(x, dim=1).to(dtype)


def _param(value, dtype, device):
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def _leaves(tensors, grad):
    return [t.requires_grad_() for t in tensors] if grad else []


def _make_clip(n, d, dtype, device, grad, gen):
    x, y = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    scale = _param(CLIP_SCALE, dtype, device)
    return dict(x=x, y=y, scale=scale), _leaves([x, y, scale], grad)


def _make_distill(n, d, dtype, device, grad, gen):
    # a frozen teacher (no gradient) of the same width, at open_clip's initial scale
    inputs, leaves = _make_clip(n, d, dtype, device, grad, gen)
    teacher = dict(tx=_unit(n, d, dtype, device, gen), ty=_unit(n, d, dtype, device, gen),
                   t_scale=_param(CLIP_SCALE, dtype, device))
    return dict(inputs, **teacher), leaves


def _make_guided(n, d, dtype, device, grad, gen):
    # a guide model's embeddings (no gradient) of a quarter of the width: GISTEmbed's mask
    inputs, leaves = _make_pairs(n, d, dtype, device, grad, gen)
    g = max(1, d // 4)
    return dict(inputs, gq=_unit(n, g, dtype, device, gen), gk=_unit(n, g, dtype, device, gen)), leaves


def _make_siglip(n, d, dtype, device, grad, gen):
    x, y = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    scale, bias = _param(SIGLIP_SCALE, dtype, device), _param(SIGLIP_BIAS, dtype, device)
    return dict(x=x, y=y, scale=scale, bias=bias), _leaves([x, y, scale, bias], grad)


def _make_siglip_labels(n, d, dtype, device, grad, gen):
    inputs, leaves = _make_siglip(n, d, dtype, device, grad, gen)
    return dict(inputs, labels=_classes(n, device, gen)), leaves


def _classes(n, device, gen):
    # about four samples per class: every anchor has a few positives
    return torch.randint(0, max(1, n // 4), (n,), generator=gen, device=device)


def _make_labels(n, d, dtype, device, grad, gen):
    q, k = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    return dict(q=q, k=k, labels=_classes(n, device, gen)), _leaves([q, k], grad)


def _make_pairs(n, d, dtype, device, grad, gen):
    q, k = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    return dict(q=q, k=k), _leaves([q, k], grad)


def _make_queue(n, d, dtype, device, grad, gen):
    q, k = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    queue = _unit(n, d, dtype, device, gen)  # a MoCo queue: no gradient
    return dict(q=q, k=k, queue=queue), _leaves([q, k], grad)


def _make_hardneg(n, d, dtype, device, grad, gen):
    q, k = _unit(n, d, dtype, device, gen), _unit(2 * n, d, dtype, device, gen)
    pos = 2 * torch.arange(n, device=device)  # grouped layout [p_0, n_0, p_1, n_1, ...]
    return dict(q=q, k=k, pos=pos), _leaves([q, k], grad)


def _make_views(n, d, dtype, device, grad, gen):
    # raw (unnormalised) views: nt_xent and dcl normalise inside the op
    z1 = torch.randn(n, d, generator=gen, device=device).to(dtype)
    z2 = torch.randn(n, d, generator=gen, device=device).to(dtype)
    return dict(z1=z1, z2=z2), _leaves([z1, z2], grad)


def _make_supcon(n, d, dtype, device, grad, gen):
    views = F.normalize(torch.randn(n, 2, d, generator=gen, device=device), dim=2).to(dtype)
    return dict(features=views, labels=_classes(n, device, gen)), _leaves([views], grad)


def _square(n):
    return Shape(n, n, n)


def _two_views(n):
    return Shape(2 * n, 2 * n, 2 * n)


CASES: Dict[str, Case] = {
    c.name: c
    for c in [
        Case("clip_loss", "CLIP symmetric InfoNCE, logit_scale 1/0.07 (learnable)", _square, _make_clip,
             lambda i, b: fastcl.clip_loss(i["x"], i["y"], i["scale"], backend=b)),
        Case("distill_clip_loss", "CLIP + distillation from a frozen teacher (contrastive + distill)", _square,
             _make_distill, lambda i, b: sum(fastcl.distill_clip_loss(i["x"], i["y"], i["scale"], i["tx"], i["ty"],
                                                                      i["t_scale"], backend=b)), DistillSpec()),
        Case("siglip_loss", "SigLIP pairwise sigmoid, scale 10 and bias -10 (learnable)", _square, _make_siglip,
             lambda i, b: fastcl.siglip_loss(i["x"], i["y"], i["scale"], i["bias"], backend=b)),
        Case("clip_loss_smoothed", "CLIP with label smoothing 0.1", _square, _make_clip,
             lambda i, b: fastcl.clip_loss(i["x"], i["y"], i["scale"], label_smoothing=LABEL_SMOOTHING, backend=b)),
        Case("siglip_labels", "SigLIP, every equal-label pair positive, ~4 pairs per label", _square,
             _make_siglip_labels,
             lambda i, b: fastcl.siglip_loss(i["x"], i["y"], i["scale"], i["bias"], labels=i["labels"], backend=b)),
        Case("clip_loss_false_negative", "CLIP, pairs more similar than the positive masked (margin 0)", _square,
             _make_clip, lambda i, b: fastcl.clip_loss(i["x"], i["y"], i["scale"],
                                                       false_negative_margin=FALSE_NEGATIVE_MARGIN, backend=b),
             SoftmaxSpec(false_negative_margin=FALSE_NEGATIVE_MARGIN)),
        Case("info_nce_hardness", "Debiased InfoNCE (tau+ 0.1) with hard-negative reweighting (beta 1)", _square,
             _make_pairs, lambda i, b: fastcl.info_nce(i["q"], i["k"], debias=DEBIAS, hardness=HARDNESS,
                                                       temperature=TEMPERATURE, backend=b)),
        Case("info_nce_mnrl", "InfoNCE (MNRL, scale 20) at the full width: info_nce_matryoshka's one-loss baseline",
             _square, _make_pairs, lambda i, b: fastcl.info_nce(F.normalize(i["q"], dim=1), F.normalize(i["k"], dim=1),
                                                               scale=MNRL_SCALE, backend=b)),
        Case("info_nce_matryoshka", "InfoNCE (MNRL, scale 20) summed over 4 normalised prefixes D/8..D", _square,
             _make_pairs, lambda i, b: fastcl.info_nce(i["q"], i["k"], scale=MNRL_SCALE,
                                                       matryoshka_dims=matryoshka_dims(i["q"].shape[1]), backend=b)),
        Case("info_nce_guided", "InfoNCE (temperature 0.05) with GISTEmbed's guide-model mask (guide width D/4)",
             _square, _make_guided,
             lambda i, b: fastcl.info_nce(i["q"], i["k"], temperature=GIST_TEMPERATURE, guide_query=i["gq"],
                                          guide_key=i["gk"], backend=b),
             SoftmaxSpec(guide_rows=torch.empty(0), guide_cols=torch.empty(0))),
        Case("info_nce_labels", "InfoNCE, label positives (SupCon row loss), ~4 per class", _square, _make_labels,
             lambda i, b: fastcl.info_nce(i["q"], i["k"], labels=i["labels"], temperature=TEMPERATURE, backend=b)),
        Case("info_nce_queue", "InfoNCE with a MoCo queue of K=N detached negatives",
             lambda n: Shape(n, 2 * n, n), _make_queue,
             lambda i, b: fastcl.info_nce(i["q"], i["k"], negatives=i["queue"], temperature=TEMPERATURE, backend=b)),
        Case("info_nce_hardneg", "InfoNCE, one hard negative per row, grouped [p, n] keys",
             lambda n: Shape(n, 2 * n, 2 * n), _make_hardneg,
             lambda i, b: fastcl.info_nce(i["q"], i["k"], positive_index=i["pos"], temperature=TEMPERATURE, backend=b)),
        Case("nt_xent", "SimCLR NT-Xent over 2N views, temperature 0.5", _two_views, _make_views,
             lambda i, b: fastcl.nt_xent(i["z1"], i["z2"], temperature=NT_XENT_TEMPERATURE, backend=b)),
        Case("supcon", "SupCon, N samples x 2 views, ~4 samples per class", _two_views, _make_supcon,
             lambda i, b: fastcl.supcon(i["features"], i["labels"], temperature=TEMPERATURE, backend=b)),
        Case("dcl", "Decoupled contrastive loss over 2N views", _two_views, _make_views,
             lambda i, b: fastcl.dcl(i["z1"], i["z2"], temperature=TEMPERATURE, backend=b)),
    ]
}


def matmul_inputs(n: int, d: int, dtype: torch.dtype, device, gen):
    """Operands of the roofline reference ``[n, d] @ [d, n]`` (the shape a loss tile loop does)."""
    a = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return a, b
