"""The benchmarked losses as other implementations compute them, on the same inputs.

* ``naive``: the textbook materialised PyTorch (the N x M logits in the input dtype), one logits
  matmul per loss; what a user writes by hand. Written apart from fastcl; the tests check it
  gives fastcl's value.
* ``open_clip``: ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` / ``DistillClipLoss`` (single
  process; the distillation row sums its two losses). ``ClipLoss`` computes the logits twice
  (image->text and text->image matmuls).
* ``inf_cl``: Inf-CL's ``cal_inf_loss`` (PyPI ``inf-cl``; CUDA only, one-directional InfoNCE
  with one positive per row). CLIP's symmetric loss is its two directions averaged, as Inf-CL's
  own trainer does. It computes in fp32/TF32, so it is given fp32 copies of the inputs.
  The scale is applied as ``scale * q`` outside the call (what ``cal_inf_loss`` does inside),
  because its ``GradientGather`` all-reduces the scale gradient and fails without a process group.
* ``siglip_kernel``: ``siglip_kernel.fused_siglip_loss(img, txt, log_temp, bias)`` (PyPI
  ``siglip-kernel`` 0.1.2; CUDA only; sum over pairs / N, as fastcl's ``siglip_loss``), called as
  its README shows with its own dtype routing; ``log_temp = log(scale)`` keeps the scale's
  gradient.
* ``memeff``: ``memeff.MemoryEfficientCLIPLoss`` (PyPI ``memeff`` 0.3.1; CUDA only) for
  clip_loss, with ``temperature = 1 / scale`` as a float (it has no learnable scale, so it
  computes no scale gradient), ``normalized_inputs=True`` (the inputs are unit rows) and
  ``stable=False`` (its default rescales the gradients by sqrt(N / t) instead of 1 / t).
"""

import importlib
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .cases import (
    DEBIAS,
    FALSE_NEGATIVE_MARGIN,
    GIST_TEMPERATURE,
    HARDNESS,
    LABEL_SMOOTHING,
    MNRL_SCALE,
    NT_XENT_TEMPERATURE,
    TEMPERATURE,
    Inputs,
    matryoshka_dims,
)

PEERS = ("naive", "open_clip", "inf_cl", "siglip_kernel", "memeff")


# --- naive materialised PyTorch ------------------------------------------------------------

def naive_clip_loss(x, y, scale, bias=None, label_smoothing=0.0):
    logits = scale * x @ y.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def naive_clip_false_negative(x, y, scale, margin):
    """CLIP with the pairs more similar than the row's (column's) positive by ``margin`` at -inf."""
    sim = x @ y.T
    diag = sim.diagonal()
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    labels = torch.arange(x.shape[0], device=x.device)
    rows = (scale * sim).masked_fill((sim > diag[:, None] + margin) & off, float("-inf"))
    cols = (scale * sim.T).masked_fill((sim.T > diag[:, None] + margin) & off, float("-inf"))
    return (F.cross_entropy(rows, labels) + F.cross_entropy(cols, labels)) / 2


def naive_guided(q, k, gq, gk, temperature):
    """GISTEmbed's mask as sentence-transformers applies it: the guide's similarity matrix
    materialised, every column above the positive's guide similarity set to -inf, then CE."""
    guide = F.normalize(gq, dim=-1) @ F.normalize(gk, dim=-1).T
    mask = guide > guide.diagonal()[:, None]
    mask.fill_diagonal_(False)
    logits = (q @ k.T / temperature).masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def naive_distill_clip(x, y, scale, tx, ty, t_scale):
    """open_clip ``DistillClipLoss``: student and teacher logits materialised (each direction's
    matrix computed as open_clip does), contrastive + distill."""
    labels = torch.arange(x.shape[0], device=x.device)
    student, student_t = scale * x @ y.T, scale * y @ x.T
    teacher, teacher_t = t_scale * tx @ ty.T, t_scale * ty @ tx.T

    def soft_ce(t, s):
        return -(t.softmax(dim=1) * s.log_softmax(dim=1)).sum(dim=1).mean()

    contrastive = (F.cross_entropy(student, labels) + F.cross_entropy(student_t, labels)) / 2
    return contrastive + (soft_ce(teacher, student) + soft_ce(teacher_t, student_t)) / 2


def naive_matryoshka_mnrl(q, k, scale, dims):
    """sentence-transformers' ``MatryoshkaLoss(MultipleNegativesRankingLoss)``: per width, the
    embeddings cut and normalised (its ``shrink``), cosine logits materialised, a cross-entropy."""
    labels = torch.arange(q.shape[0], device=q.device)
    return sum(F.cross_entropy(scale * F.normalize(q[:, :d], dim=-1) @ F.normalize(k[:, :d], dim=-1).T, labels)
               for d in dims)


def naive_info_nce_hardness(q, k, tau_plus, beta):
    """Robinson et al.'s hard-negative loss on the debiased denominator, materialised."""
    logits = q @ k.T / TEMPERATURE
    n = q.shape[0]
    pos = logits.diagonal()
    neg = ~torch.eye(n, dtype=torch.bool, device=q.device)
    reweighted = (n - 1) * (torch.where(neg, ((1 + beta) * logits).exp(), 0).sum(1)
                            / torch.where(neg, (beta * logits).exp(), 0).sum(1))
    floor = (n - 1) * torch.exp(torch.tensor(-1 / TEMPERATURE, device=q.device))
    ng = torch.maximum((reweighted - (n - 1) * tau_plus * pos.exp()) / (1 - tau_plus), floor)
    return (-pos + torch.log(pos.exp() + ng)).mean()


def naive_siglip_loss(x, y, scale, bias, labels=None):
    logits = scale * x @ y.T + bias
    if labels is None:
        z = 2 * torch.eye(x.shape[0], device=x.device, dtype=logits.dtype) - 1
    else:
        z = 2 * (labels[:, None] == labels[None, :]).to(logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _mean_over_positives(log_prob, positive):
    """SupCon row loss ``-mean_{p in P_i} log p_ip``, averaged over rows with a positive."""
    count = positive.sum(1)
    row = -log_prob.masked_fill(~positive, 0).sum(1) / count.clamp(min=1)
    return row[count > 0].mean()


def naive_info_nce_labels(q, k, labels):
    log_prob = F.log_softmax(q @ k.T / TEMPERATURE, dim=1)
    return _mean_over_positives(log_prob, labels[:, None] == labels[None, :])


def naive_info_nce_queue(q, k, queue):
    logits = q @ torch.cat([k, queue]).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def naive_info_nce_hardneg(q, k, pos):
    return F.cross_entropy(q @ k.T / TEMPERATURE, pos)


def _two_view_logits(z1, z2, temperature):
    x = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    pos = torch.cat([torch.arange(n, 2 * n, device=x.device), torch.arange(n, device=x.device)])
    return x @ x.T / temperature, pos


def naive_nt_xent(z1, z2):
    logits, pos = _two_view_logits(z1, z2, NT_XENT_TEMPERATURE)
    self_mask = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), pos)


def naive_supcon(features, labels):
    b, v, d = features.shape
    contrast = features.transpose(0, 1).reshape(b * v, d)
    lab = labels.repeat(v)
    self_mask = torch.eye(b * v, dtype=torch.bool, device=features.device)
    logits = (contrast @ contrast.T / TEMPERATURE).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return _mean_over_positives(log_prob, (lab[:, None] == lab[None, :]) & ~self_mask)


def naive_dcl(z1, z2):
    logits, pos = _two_view_logits(z1, z2, TEMPERATURE)
    rows = torch.arange(logits.shape[0], device=logits.device)
    hidden = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    hidden[rows, pos] = True
    negatives = logits.masked_fill(hidden, float("-inf"))
    return (torch.logsumexp(negatives, dim=1) - logits[rows, pos]).mean()


NAIVE: Dict[str, Callable[[Inputs], torch.Tensor]] = {
    "clip_loss": lambda i: naive_clip_loss(i["x"], i["y"], i["scale"]),
    "siglip_loss": lambda i: naive_siglip_loss(i["x"], i["y"], i["scale"], i["bias"]),
    "clip_loss_smoothed": lambda i: naive_clip_loss(i["x"], i["y"], i["scale"], label_smoothing=LABEL_SMOOTHING),
    "siglip_labels": lambda i: naive_siglip_loss(i["x"], i["y"], i["scale"], i["bias"], i["labels"]),
    "clip_loss_false_negative": lambda i: naive_clip_false_negative(i["x"], i["y"], i["scale"], FALSE_NEGATIVE_MARGIN),
    "info_nce_hardness": lambda i: naive_info_nce_hardness(i["q"], i["k"], DEBIAS, HARDNESS),
    "info_nce_guided": lambda i: naive_guided(i["q"], i["k"], i["gq"], i["gk"], GIST_TEMPERATURE),
    "distill_clip_loss": lambda i: naive_distill_clip(i["x"], i["y"], i["scale"], i["tx"], i["ty"], i["t_scale"]),
    "info_nce_mnrl": lambda i: naive_matryoshka_mnrl(i["q"], i["k"], MNRL_SCALE, (i["q"].shape[1],)),
    "info_nce_matryoshka": lambda i: naive_matryoshka_mnrl(i["q"], i["k"], MNRL_SCALE,
                                                           matryoshka_dims(i["q"].shape[1])),
    "info_nce_labels": lambda i: naive_info_nce_labels(i["q"], i["k"], i["labels"]),
    "info_nce_queue": lambda i: naive_info_nce_queue(i["q"], i["k"], i["queue"]),
    "info_nce_hardneg": lambda i: naive_info_nce_hardneg(i["q"], i["k"], i["pos"]),
    "nt_xent": lambda i: naive_nt_xent(i["z1"], i["z2"]),
    "supcon": lambda i: naive_supcon(i["features"], i["labels"]),
    "dcl": lambda i: naive_dcl(i["z1"], i["z2"]),
}


# --- open_clip -----------------------------------------------------------------------------

_OPEN_CLIP_CASES = ("clip_loss", "siglip_loss", "distill_clip_loss")


def _open_clip_loss_module():
    return importlib.import_module("open_clip.loss")


def _open_clip(case: str):
    loss = _open_clip_loss_module()
    if case == "clip_loss":
        fn = loss.ClipLoss()
        return lambda i: fn(i["x"], i["y"], i["scale"])
    if case == "distill_clip_loss":
        fn = loss.DistillClipLoss()
        return lambda i: sum(fn(i["x"], i["y"], i["scale"], i["tx"], i["ty"], i["t_scale"]))
    fn = loss.SigLipLoss()
    return lambda i: fn(i["x"], i["y"], i["scale"], i["bias"])


# --- Inf-CL --------------------------------------------------------------------------------

_INF_CL_CASES = ("clip_loss", "info_nce_queue", "info_nce_hardneg")


def inf_cl_head_dim(d: int) -> Optional[int]:
    """Inf-CL splits D into power-of-two chunks of at most 256; the largest one dividing D."""
    for hd in (256, 128, 64, 32, 16):
        if d % hd == 0:
            return hd
    return None


def _inf_cl(case: str, d: int):
    cal_inf_loss = importlib.import_module("inf_cl").cal_inf_loss
    hd = inf_cl_head_dim(d)
    if case == "clip_loss":
        def clip(i):
            x, y, s = i["x"], i["y"], i["scale"]
            return (cal_inf_loss(s * x, y, head_dim=hd) + cal_inf_loss(s * y, x, head_dim=hd)) / 2
        return clip
    if case == "info_nce_queue":
        return lambda i: cal_inf_loss(i["q"] / TEMPERATURE, torch.cat([i["k"], i["queue"]]), head_dim=hd)
    return lambda i: cal_inf_loss(i["q"] / TEMPERATURE, i["k"], labels=i["pos"], head_dim=hd)


def inf_cl_inputs(inputs: Inputs, leaves):
    """fp32 leaf copies of the floating inputs (Inf-CL computes in fp32 and wants fp32 inputs)."""
    if not any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32
               for v in inputs.values()):
        return inputs, leaves
    ids = {id(t) for t in leaves}
    out, new_leaves = {}, []
    for key, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            w = v.detach().float()
            if id(v) in ids:
                new_leaves.append(w.requires_grad_())
            v = w
        out[key] = v
    return out, new_leaves


# --- availability --------------------------------------------------------------------------

# --- the fused Triton packages ------------------------------------------------------------

def _siglip_kernel():
    fused_siglip_loss = importlib.import_module("siglip_kernel").fused_siglip_loss
    return lambda i: fused_siglip_loss(i["x"], i["y"], torch.log(i["scale"]), i["bias"])


def _memeff():
    loss_cls = importlib.import_module("memeff").MemoryEfficientCLIPLoss

    def call(i):
        fn = loss_cls(temperature=1.0 / float(i["scale"]), normalized_inputs=True, stable=False)
        return fn(i["x"], i["y"])

    return call


# the one loss each fused package computes, and its import name
_FUSED = {"siglip_kernel": ("siglip_loss", "siglip-kernel"), "memeff": ("clip_loss", "memeff")}


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as unavailable as a missing one
        return f"`import {module}` failed ({type(exc).__name__}: {exc})"
    return None


def unavailable(peer: str, case: str, device: torch.device, d: int) -> Optional[str]:
    """``None`` if ``peer`` can compute ``case`` on ``device`` at width ``d``, else why not."""
    if peer == "naive":
        return None
    if peer == "open_clip":
        if case not in _OPEN_CLIP_CASES:
            return f"open_clip has no {case}"
        err = _import_error("open_clip.loss")
        return err and f"{err}; pip install open_clip_torch"
    if peer == "inf_cl":
        if case not in _INF_CL_CASES:
            return f"Inf-CL computes one-positive InfoNCE only (no {case})"
        if device.type != "cuda":
            return "Inf-CL runs on CUDA only"
        if inf_cl_head_dim(d) is None:
            return f"Inf-CL needs D divisible by 16; D={d}"
        err = _import_error("inf_cl")
        return err and f"{err}; pip install inf-cl"
    if peer in _FUSED:
        loss, dist = _FUSED[peer]
        if case != loss:
            return f"{peer} computes {loss} only (no {case})"
        if device.type != "cuda":
            return f"{peer} runs on CUDA only (Triton kernels)"
        err = _import_error(peer)
        return err and f"{err}; pip install {dist}"
    raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")


def make(peer: str, case: str, d: int) -> Callable[[Inputs], torch.Tensor]:
    """The peer's loss for ``case`` as a function of the case's inputs."""
    if peer == "naive":
        return NAIVE[case]
    if peer == "open_clip":
        return _open_clip(case)
    if peer == "inf_cl":
        return _inf_cl(case, d)
    if peer == "siglip_kernel":
        return _siglip_kernel()
    if peer == "memeff":
        return _memeff()
    raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")
