"""fastcl.compat.open_clip against open_clip itself: loss values and gradients (features, logit
scale, logit bias), float64 and float32."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch is not installed")

from fastcl.compat import open_clip as compat  # noqa: E402

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def _unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def _run(fn, inputs, names):
    leaves = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    return fn(**leaves), leaves


def compare(host, mine, inputs, dtype, names, pick=lambda out: out):
    """Same inputs through both; equal loss, and equal gradients for ``names``."""
    want, ref = _run(host, inputs, names)
    got, new = _run(mine, inputs, names)
    want, got = pick(want), pick(got)
    assert got.dtype == want.dtype
    assert_close("loss", got, want, TOL[dtype], floor=1.0)
    upstream = torch.rand((), dtype=torch.float64).item() + 0.5
    (want * upstream).backward()
    (got * upstream).backward()
    for k in names:
        assert new[k].grad is not None, f"no gradient for {k}"
        assert new[k].grad.shape == ref[k].grad.shape
        assert_close(f"d{k}", new[k].grad, ref[k].grad, TOL[dtype], floor=1.0 if ref[k].dim() < 2 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_shape", [(), (1,)])
@pytest.mark.parametrize("bias", [None, "tensor"])
def test_clip_loss(dtype, scale_shape, bias):
    b, d = 11, 13
    inputs = {
        "image_features": _unit(b, d, dtype),
        "text_features": _unit(b, d, dtype),
        "logit_scale": torch.full(scale_shape, 1 / 0.07, dtype=dtype).log().exp(),
    }
    names = list(inputs)
    if bias:
        inputs["logit_bias"] = torch.tensor(-2.5, dtype=dtype)
        names.append("logit_bias")
    compare(open_clip_loss.ClipLoss(), compat.ClipLoss(), inputs, dtype, names)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss_output_dict_and_large_scale(dtype):
    inputs = {"image_features": _unit(9, 8, dtype), "text_features": _unit(9, 8, dtype),
              "logit_scale": torch.tensor(100.0, dtype=dtype), "output_dict": True}
    compare(open_clip_loss.ClipLoss(cache_labels=True), compat.ClipLoss(cache_labels=True), inputs, dtype,
            ["image_features", "text_features", "logit_scale"], pick=lambda out: out["contrastive_loss"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["tensor", None])
@pytest.mark.parametrize("dist_impl", [None, "gather"])
def test_siglip_loss(dtype, bias, dist_impl):
    b, d = 10, 7
    inputs = {"image_features": _unit(b, d, dtype), "text_features": _unit(b, d, dtype),
              "logit_scale": torch.tensor(math.log(10), dtype=dtype).exp(),
              "logit_bias": torch.tensor(-10.0, dtype=dtype) if bias else None}
    names = ["image_features", "text_features", "logit_scale"] + (["logit_bias"] if bias else [])
    compare(open_clip_loss.SigLipLoss(dist_impl=dist_impl), compat.SigLipLoss(dist_impl=dist_impl), inputs, dtype,
            names)


def test_siglip_output_dict_and_dist_impl_check():
    inputs = {"image_features": _unit(6, 5, torch.float64), "text_features": _unit(6, 5, torch.float64),
              "logit_scale": torch.tensor(10.0, dtype=torch.float64),
              "logit_bias": torch.tensor(-10.0, dtype=torch.float64), "output_dict": True}
    compare(open_clip_loss.SigLipLoss(), compat.SigLipLoss(), inputs, torch.float64,
            ["image_features", "text_features", "logit_scale", "logit_bias"],
            pick=lambda out: out["contrastive_loss"])
    assert compat.SigLipLoss().dist_impl == "bidir"
    with pytest.raises(ValueError, match="dist_impl"):
        compat.SigLipLoss(dist_impl="ring")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_dict", [False, True])
def test_coca_loss(dtype, output_dict):
    b, d, t, v = 7, 6, 5, 11
    labels = torch.randint(0, v, (b, t))
    labels[0, -2:] = 0  # padding, ignored
    inputs = {"image_features": _unit(b, d, dtype), "text_features": _unit(b, d, dtype),
              "logits": torch.randn(b, t, v, dtype=dtype), "labels": labels,
              "logit_scale": torch.tensor(14.0, dtype=dtype), "output_dict": output_dict}
    names = ["image_features", "text_features", "logit_scale"]
    for part in (0, 1):
        key = ("contrastive_loss", "caption_loss")[part]
        compare(open_clip_loss.CoCaLoss(2.0, 1.5, pad_id=0), compat.CoCaLoss(2.0, 1.5, pad_id=0), inputs, dtype,
                names if part == 0 else ["logits"], pick=lambda out, p=part, k=key: out[k] if output_dict else out[p])


def test_coca_zero_clip_weight_quirk():
    logits, labels = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    feats = _unit(3, 4, torch.float32)
    want = open_clip_loss.CoCaLoss(1.0, 0.0)(feats, feats, logits, labels, 1.0)
    got = compat.CoCaLoss(1.0, 0.0)(feats, feats, logits, labels, 1.0)
    assert got[0].dtype == want[0].dtype == torch.int64 and int(got[0]) == 0
    assert_close("caption", got[1], want[1], 1e-6, floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("part", [0, 1])
def test_distill_clip_loss_fused(dtype, output_dict, part):
    """Both losses and every gradient (the teacher's too) against open_clip's DistillClipLoss, a
    teacher of another width and scale."""
    b = 11
    inputs = {"image_features": _unit(b, 8, dtype), "text_features": _unit(b, 8, dtype),
              "logit_scale": torch.tensor(14.0, dtype=dtype), "dist_image_features": _unit(b, 5, dtype),
              "dist_text_features": _unit(b, 5, dtype), "dist_logit_scale": torch.tensor(30.0, dtype=dtype),
              "output_dict": output_dict}
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    if part == 0:  # the contrastive loss alone: the teacher gets no gradient (open_clip's neither)
        got, leaves = _run(compat.DistillClipLoss(), inputs, names)
        (got["contrastive_loss"] if output_dict else got[0]).backward()
        assert all(leaves[k].grad is None for k in names[3:])
        names = names[:3]
    key = ("contrastive_loss", "distill_loss")[part]
    compare(open_clip_loss.DistillClipLoss(), compat.DistillClipLoss(), inputs, dtype, names,
            pick=lambda out: out[key] if output_dict else out[part])


@pytest.mark.parametrize("cls", ["ClipLoss", "SigLipLoss"])
def test_world_size_above_one_needs_a_process_group(cls):
    """Several processes go through fastcl's group= (tests/test_compat_distributed.py); without an
    initialised process group the loss says so."""
    loss = getattr(compat, cls)(rank=0, world_size=2)
    feats = _unit(4, 3, torch.float32)
    with pytest.raises(ValueError, match="initialised"):
        loss(feats, feats, torch.tensor(10.0), torch.tensor(-1.0))
