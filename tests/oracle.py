"""Naive float64 reference losses, written from the textbook formulas and independent of fastcl.

Everything here materialises the full logit matrix and builds explicit boolean masks, then lets
autograd differentiate it. It is slow and memory-hungry on purpose: it is only the oracle.
"""

import functools

import torch
import torch.nn.functional as F


def _on_input_device(fn):
    """Run ``fn`` with the first tensor argument's device as the default for new tensors, so the
    oracle's masks and targets land beside the inputs (CPU, or CUDA in a GPU run)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        with torch.device(tensors[0].device):
            return fn(*args, **kwargs)

    return wrapper


def _f64(x):
    return x.double() if isinstance(x, torch.Tensor) else float(x)


@_on_input_device
def info_nce(query, key, *, temperature=0.1, scale=None, positive_index=None, labels=None, key_labels=None,
             negatives=None, negative_labels=None, exclude_self=False, decoupled=False, symmetric=False,
             reduction="mean", pos_weight=None, bias=None, debias=None, label_smoothing=0.0,
             false_negative_margin=None, hardness=None, guide_query=None, guide_key=None, guide_negatives=None,
             guide_margin=0.0):
    q, k = _f64(query), _f64(key)
    cols = k if negatives is None else torch.cat([k, _f64(negatives)])
    n, c = q.shape[0], cols.shape[0]
    s = _f64(scale) if scale is not None else 1.0 / _f64(temperature)
    if isinstance(s, torch.Tensor) and s.dim() == 1 and s.numel() == n and n > 1:
        s = s[:, None]
    elif isinstance(s, torch.Tensor):
        s = s.reshape(())
    logits = s * (q @ cols.T)
    if bias is not None:
        logits = logits + _f64(bias)

    excluded = torch.zeros(n, c, dtype=torch.bool)
    if exclude_self:
        excluded[torch.arange(n), torch.arange(n)] = True

    if labels is not None:
        kl = key_labels if key_labels is not None else labels
        if negatives is not None:
            if negative_labels is not None:
                kl = torch.cat([kl, negative_labels])
                positive = labels[:, None] == kl[None, :]
            else:
                positive = torch.cat([labels[:, None] == kl[None, :],
                                      torch.zeros(n, negatives.shape[0], dtype=torch.bool)], dim=1)
        else:
            positive = labels[:, None] == kl[None, :]
        positive = positive & ~excluded
    else:
        idx = torch.arange(n) if positive_index is None else positive_index
        positive = torch.zeros(n, c, dtype=torch.bool)
        positive[torch.arange(n), idx] = True

    in_denominator = ~excluded
    if decoupled:
        in_denominator = in_denominator & ~positive
    col_denominator = in_denominator
    if false_negative_margin is not None:
        # straight from the definition, on the raw similarities: a non-positive column whose
        # similarity beats the positive's by more than m leaves the row (and, for the column
        # direction, a row beating the column's positive row leaves the column)
        raw = q @ cols.T
        pos_raw = (raw * positive).sum(1)
        in_denominator = in_denominator & ~((raw > pos_raw[:, None] + false_negative_margin) & ~positive)
        col_pos_raw = (raw * positive).sum(0)
        col_denominator = col_denominator & ~((raw > col_pos_raw[None, :] + false_negative_margin) & ~positive)
    if guide_query is not None:
        # GISTEmbed from its definition: a guide model's cosine similarities decide; a column more
        # similar to the row than the row's positive is, less the margin, leaves the row
        g_cols = _f64(guide_key) if guide_negatives is None else torch.cat([_f64(guide_key), _f64(guide_negatives)])
        guide = F.normalize(_f64(guide_query), dim=1) @ F.normalize(g_cols, dim=1).T
        guide_pos = (guide * positive).sum(1)
        in_denominator = in_denominator & ~((guide > guide_pos[:, None] - guide_margin) & ~positive)
    weight = torch.ones(n, dtype=torch.float64) if pos_weight is None else _f64(pos_weight)
    # the scale of every logit (for the debiased loss's floor)
    s_full = (s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.float64)) * torch.ones(n, c,
                                                                                                        dtype=torch.float64)

    def direction(lg, pos, den, w, s_mat):
        if debias is not None:  # Chuang et al. 2020, straight from the formula, in float64
            neg = den & ~pos
            p = (lg * pos).sum(1)
            q_count = neg.sum(1).double()
            neg_sum = torch.where(neg, lg.exp(), 0).sum(1)
            if hardness is not None:  # Robinson et al. 2021: importance weights e^{beta L}
                neg_sum = q_count * (torch.where(neg, ((1 + hardness) * lg).exp(), 0).sum(1)
                                     / torch.where(neg, (hardness * lg).exp(), 0).sum(1))
            floor = torch.where(neg, (-s_mat + (0.0 if bias is None else _f64(bias))).exp(), 0).sum(1)
            ng = torch.maximum((neg_sum - q_count * debias * p.exp()) / (1 - debias), floor)
            return -p + torch.log(p.exp() + ng), torch.ones(lg.shape[0], dtype=torch.bool)
        count = pos.sum(1)
        lse = torch.logsumexp(lg.masked_fill(~den, float("-inf")), dim=1)
        pos_mean = (lg * pos).sum(1) / count.clamp(min=1)
        valid = (count > 0) & den.any(1)
        loss = lse - w * pos_mean
        if label_smoothing:  # (1 - eps) of the target on the positives, eps spread over the denominator
            den_mean = torch.where(den, lg, 0).sum(1) / den.sum(1).clamp(min=1)
            loss = lse - (1 - label_smoothing) * w * pos_mean - label_smoothing * den_mean
        return torch.where(valid, loss, torch.zeros_like(lse)), valid

    row_loss, row_valid = direction(logits, positive, in_denominator, weight, s_full)
    if not symmetric:
        if reduction == "none":
            return row_loss
        if reduction == "sum":
            return row_loss.sum()
        return row_loss.sum() / row_valid.sum().clamp(min=1)
    idx = torch.arange(n) if positive_index is None else positive_index
    col_all, col_valid_all = direction(logits.T, positive.T, col_denominator.T,
                                       torch.zeros(c, dtype=torch.float64).index_put((idx,), weight), s_full.T)
    col_loss, col_valid = col_all[idx], col_valid_all[idx]
    if reduction == "none":
        return row_loss, col_loss
    if reduction == "sum":
        return (row_loss.sum() + col_loss.sum()) / 2
    return (row_loss.sum() / row_valid.sum().clamp(min=1) + col_loss.sum() / col_valid.sum().clamp(min=1)) / 2


@_on_input_device
def clip_loss(image_features, text_features, logit_scale, logit_bias=None, label_smoothing=0.0,
              false_negative_margin=None):
    """open_clip ClipLoss: two cross-entropies over materialised logits (PyTorch's label
    smoothing when asked); a false-negative margin sets the masked logits to -inf (image i
    against text j when ``<i, t_j> > <i, t_i> + m``; text j against image i when
    ``<i, t_j> > <j, t_j> + m``)."""
    image, text = _f64(image_features), _f64(text_features)
    raw = image @ text.T
    li = _f64(logit_scale) * raw
    if logit_bias is not None:
        li = li + _f64(logit_bias)
    target = torch.arange(li.shape[0])
    lt = li.T
    if false_negative_margin is not None:
        diag = raw.diagonal()
        off = ~torch.eye(raw.shape[0], dtype=torch.bool)
        li = li.masked_fill((raw > diag[:, None] + false_negative_margin) & off, float("-inf"))
        lt = lt.masked_fill((raw.T > diag[:, None] + false_negative_margin) & off, float("-inf"))
    return (F.cross_entropy(li, target, label_smoothing=label_smoothing)
            + F.cross_entropy(lt, target, label_smoothing=label_smoothing)) / 2


@_on_input_device
def siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=None):
    """SigLIP; with ``labels`` every equal-label pair is a positive (z = +1)."""
    image, text = image_features, text_features
    logits = _f64(logit_scale) * _f64(image) @ _f64(text).T + _f64(logit_bias)
    n = logits.shape[0]
    positive = torch.eye(n, dtype=torch.bool) if labels is None else labels[:, None] == labels[None, :]
    z = positive.double() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / n


@_on_input_device
def nt_xent(z1, z2, temperature=0.5, normalize=True):
    """SimCLR, as lightly computes it: 2N anchors, the self entry dropped from the logits."""
    a, b = _f64(z1), _f64(z2)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    t = _f64(temperature)
    keep = ~torch.eye(n, dtype=torch.bool)
    losses = []
    for x, y in ((a, b), (b, a)):
        cross = x @ y.T / t
        own = (x @ x.T / t)[keep].view(n, n - 1)
        losses.append(F.cross_entropy(torch.cat([cross, own], dim=1), torch.arange(n), reduction="none"))
    return torch.cat(losses).mean()


@_on_input_device
def supcon(features, labels=None, temperature=0.1, base_temperature=None, contrast_mode="all"):
    """Khosla et al.'s formula with a dense mask; anchors without positives left out of the mean."""
    f = _f64(features)
    bsz, views, _ = f.shape
    t = _f64(temperature)
    base = t if base_temperature is None else _f64(base_temperature)
    lab = torch.arange(bsz) if labels is None else labels
    mask = (lab[:, None] == lab[None, :]).double()
    contrast = torch.cat(torch.unbind(f, dim=1), dim=0)
    anchor = f[:, 0] if contrast_mode == "one" else contrast
    anchor_count = 1 if contrast_mode == "one" else views
    logits = anchor @ contrast.T / t
    mask = mask.repeat(anchor_count, views)
    self_mask = torch.ones_like(mask)
    self_mask[torch.arange(bsz * anchor_count), torch.arange(bsz * anchor_count)] = 0
    mask = mask * self_mask
    log_den = torch.logsumexp(logits.masked_fill(self_mask == 0, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_den
    count = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / count.clamp(min=1)
    loss = -(t / base) * mean_log_prob_pos
    valid = count > 0
    return loss[valid].sum() / valid.sum().clamp(min=1)


@_on_input_device
def dcl(z1, z2, temperature=0.1, weight_sigma=None, normalize=True):
    """lightly's DCL/DCLW: both directions, positive removed from the log-sum-exp."""
    a, b = _f64(z1), _f64(z2)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    t = _f64(temperature)
    w = 1.0
    if weight_sigma is not None:
        sim = (a.detach() * b.detach()).sum(1) / weight_sigma
        w = 2 - n * torch.softmax(sim, dim=0)
    off = ~torch.eye(n, dtype=torch.bool)

    def one(x, y):
        s_xx, s_xy = x @ x.T / t, x @ y.T / t
        positive = -torch.diagonal(s_xy) * w
        neg = torch.cat([s_xy[off].view(n, n - 1), s_xx[off].view(n, n - 1)], dim=1)
        return (positive + torch.logsumexp(neg, dim=1)).mean()

    return (one(a, b) + one(b, a)) / 2


def matryoshka(loss, dims, weights=None, features=("query", "key", "negatives", "image_features", "text_features"),
               **inputs):
    """``sum_d w_d * loss(**inputs)`` with every feature tensor cut to its first ``d`` columns and
    L2-normalised in float64 (Kusupati et al. 2022; sentence-transformers' ``MatryoshkaLoss``
    over its inner loss). Tuples (``reduction="none"`` with ``symmetric``) are summed entrywise."""
    weights = [1.0] * len(dims) if weights is None else weights
    total = None
    for d, w in zip(dims, weights):
        cut = {k: F.normalize(_f64(v)[:, :d], dim=1) if k in features and v is not None else v
               for k, v in inputs.items()}
        out = loss(**cut)
        term = tuple(w * o for o in out) if isinstance(out, tuple) else w * out
        if total is None:
            total = term
        elif isinstance(term, tuple):
            total = tuple(a + b for a, b in zip(total, term))
        else:
            total = total + term
    return total


@_on_input_device
def distill_clip_loss(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                      dist_logit_scale):
    """``(contrastive, distill)`` from the definition: both logit matrices materialised in float64,
    the cross-entropy of each direction's student log-softmax under its teacher softmax."""
    student = _f64(logit_scale) * _f64(image_features) @ _f64(text_features).T
    teacher = _f64(dist_logit_scale) * _f64(dist_image_features) @ _f64(dist_text_features).T
    target = torch.arange(student.shape[0])

    def soft_ce(t, s):
        return -(torch.softmax(t, dim=1) * torch.log_softmax(s, dim=1)).sum(dim=1).mean()

    contrastive = (F.cross_entropy(student, target) + F.cross_entropy(student.T, target)) / 2
    return contrastive, (soft_ce(teacher, student) + soft_ce(teacher.T, student.T)) / 2
