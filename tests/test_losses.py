"""Every public loss x its options x dtypes x backends, against the float64 oracle (loss and all
gradients). The backend axis is the ``backend`` fixture of ``tests/conftest.py``.
"""

import os

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_oracle

import fastcl

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# nt_xent/dcl normalise inside the op and hand the kernels features rounded to the input dtype:
# with bf16 that rounding (2**-8 relative) reaches the loss, scaled by 1/temperature.
NORMALIZED_LOSS_RTOL = {torch.bfloat16: 2e-2}


def unit(n, d, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, dtype=dtype, device=DEVICE), dim=1)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


# (name, N, M, K, D, builder) -- builder(N, M, K) returns (fastcl kwargs, oracle kwargs) beyond the
# tensors query/key/negatives, which the test makes.
def _labels(n, classes):
    return torch.randint(0, classes, (n,), device=DEVICE)


INFO_NCE_CASES = {
    "default": dict(n=13, m=13, k=0, d=19, opts=lambda n, m, k: {}),
    "n_ne_m": dict(n=11, m=17, k=0, d=16, opts=lambda n, m, k: {}),
    "n_is_1": dict(n=1, m=5, k=0, d=7, opts=lambda n, m, k: {}),
    "d_is_1": dict(n=6, m=6, k=0, d=1, opts=lambda n, m, k: {}),
    "positive_index": dict(n=7, m=23, k=0, d=9, opts=lambda n, m, k: {"positive_index": torch.randint(0, m, (n,), device=DEVICE)}),
    "grouped_hard_negatives": dict(n=5, m=20, k=0, d=12, opts=lambda n, m, k: {"positive_index": torch.arange(n, device=DEVICE) * 4}),
    "queue_no_grad": dict(n=9, m=9, k=31, d=10, opts=lambda n, m, k: {}, negatives_grad=False),
    "queue_with_grad": dict(n=9, m=9, k=31, d=10, opts=lambda n, m, k: {}),
    "positive_in_queue": dict(n=6, m=6, k=8, d=5, opts=lambda n, m, k: {"positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "labels": dict(n=17, m=17, k=0, d=11, opts=lambda n, m, k: {"labels": _labels(n, 4)}),
    "labels_keys": dict(n=7, m=15, k=0, d=11, opts=lambda n, m, k: {"labels": _labels(n, 3), "key_labels": _labels(m, 3)}),
    "labels_rows_without_positive": dict(n=12, m=12, k=0, d=8, opts=lambda n, m, k: {"labels": torch.arange(n, device=DEVICE) % 9, "exclude_self": True}),
    "labels_queue_unlabelled": dict(n=8, m=8, k=13, d=6, opts=lambda n, m, k: {"labels": _labels(n, 3)}),
    "labels_queue_labelled": dict(n=8, m=8, k=13, d=6, opts=lambda n, m, k: {"labels": _labels(n, 3), "negative_labels": _labels(k, 3)}),
    "labels_exclude_self_decoupled": dict(n=14, m=14, k=0, d=9, opts=lambda n, m, k: {"labels": _labels(n, 3), "exclude_self": True, "decoupled": True}),
    "exclude_self": dict(n=10, m=10, k=0, d=6, opts=lambda n, m, k: {"positive_index": (torch.arange(n, device=DEVICE) + 3) % n, "exclude_self": True}),
    "exclude_self_m_gt_n": dict(n=6, m=11, k=0, d=6, opts=lambda n, m, k: {"positive_index": torch.arange(n, device=DEVICE) + 5, "exclude_self": True}),
    "decoupled": dict(n=12, m=15, k=0, d=7, opts=lambda n, m, k: {"decoupled": True}),
    "symmetric": dict(n=13, m=13, k=0, d=17, opts=lambda n, m, k: {"symmetric": True}),
    "symmetric_permuted_n_lt_m": dict(n=9, m=14, k=0, d=8, opts=lambda n, m, k: {"symmetric": True, "positive_index": torch.randperm(m, device=DEVICE)[:n]}),
    "symmetric_decoupled_queue": dict(n=8, m=8, k=6, d=8, opts=lambda n, m, k: {"symmetric": True, "decoupled": True}),
    "symmetric_exclude_self": dict(n=10, m=10, k=0, d=5, opts=lambda n, m, k: {"symmetric": True, "exclude_self": True, "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
    "debias": dict(n=13, m=16, k=0, d=9, opts=lambda n, m, k: {"debias": 0.1}),
    "debias_zero": dict(n=7, m=7, k=0, d=6, opts=lambda n, m, k: {"debias": 0.0}),
    "debias_queue_exclude_self": dict(n=8, m=8, k=6, d=7, opts=lambda n, m, k: {"debias": 0.2, "exclude_self": True, "positive_index": (torch.arange(n, device=DEVICE) + 3) % n}),
    "debias_positive_in_queue": dict(n=6, m=6, k=8, d=5, opts=lambda n, m, k: {"debias": 0.3, "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "debias_symmetric": dict(n=11, m=11, k=0, d=8, opts=lambda n, m, k: {"debias": 0.3, "symmetric": True}),
    "debias_symmetric_exclude_self_queue": dict(n=9, m=9, k=5, d=6, opts=lambda n, m, k: {"debias": 0.05, "symmetric": True, "exclude_self": True, "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(INFO_NCE_CASES))
def test_info_nce(case, reduction, dtype, backend):
    c = INFO_NCE_CASES[case]
    n, m, k, d = c["n"], c["m"], c["k"], c["d"]
    opts = c["opts"](n, m, k)
    inputs = {"query": randn(n, d) / 2, "key": randn(m, d) / 2, "temperature": 0.3}
    if k:
        inputs["negatives"] = randn(k, d) / 2
    names = [x for x in ("query", "key", "negatives") if x in inputs and (x != "negatives" or c.get("negatives_grad", True))]

    def fast(**kw):
        return fastcl.info_nce(**kw, **opts, reduction=reduction, backend=backend)

    def ref(**kw):
        return oracle.info_nce(**kw, **opts, reduction=reduction)

    check_against_oracle(fast, ref, inputs, dtype, differentiable=names)


@pytest.mark.parametrize("debias", [None, 0.2])
@pytest.mark.parametrize("form", ["temperature_scalar", "temperature_rows", "scale_scalar", "scale_rows", "scale_shape1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_info_nce_scale_gradients(form, dtype, debias, backend):
    n, m, d = 11, 14, 9
    value = {
        "temperature_scalar": torch.tensor(0.2, dtype=torch.float64),
        "temperature_rows": torch.rand(n, dtype=torch.float64) * 0.5 + 0.05,
        "scale_scalar": torch.tensor(12.0, dtype=torch.float64),
        "scale_rows": torch.rand(n, dtype=torch.float64) * 20 + 1,
        "scale_shape1": torch.tensor([7.0], dtype=torch.float64),
    }[form].to(DEVICE)
    arg = form.split("_")[0]
    inputs = {"query": unit(n, d), "key": unit(m, d), arg: value}
    for symmetric in (False, True):
        check_against_oracle(
            lambda **kw: fastcl.info_nce(**kw, symmetric=symmetric, debias=debias, backend=backend),
            lambda **kw: oracle.info_nce(**kw, symmetric=symmetric, debias=debias), inputs, dtype)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_debias_floor_branch(dtype, symmetric, backend):
    """tau+ = 0.5 with strong positives: the estimate of the negatives' sum goes below its floor
    on some rows (checked here from the inputs), so both branches of the max are exercised, with
    a per-row scale whose gradient also flows through the floor."""
    n, d = 12, 6
    q = unit(n, d)
    # aligned pairs put their row on the floor, anti-aligned pairs keep theirs off it
    k = F.normalize(torch.cat([q[:6], -q[6:]]) + 0.2 * randn(n, d), dim=1)
    scale = torch.rand(n, dtype=torch.float64, device=DEVICE) * 4 + 3
    logits = scale[:, None] * (q @ k.T)
    neg = ~torch.eye(n, dtype=torch.bool, device=DEVICE)
    estimate = (torch.where(neg, logits.exp(), 0).sum(1) - (n - 1) * 0.5 * logits.diag().exp()) / 0.5
    floor = torch.where(neg, (-scale[:, None]).exp().expand(n, n), 0).sum(1)
    below = estimate < floor
    assert 0 < int(below.sum()) < n, "the inputs should put some rows, not all, on the floor"
    inputs = {"query": q, "key": k, "scale": scale}
    check_against_oracle(lambda **kw: fastcl.info_nce(**kw, debias=0.5, symmetric=symmetric, backend=backend),
                         lambda **kw: oracle.info_nce(**kw, debias=0.5, symmetric=symmetric), inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_debias_extreme_temperature(dtype, backend):
    """Temperature 0.01 with unit features: logits reach +-100, past exp's fp32 range."""
    n, d = 17, 5
    q, k = unit(n, d), unit(n, d)
    k[:4] = q[:4]
    for symmetric in (False, True):
        check_against_oracle(
            lambda **kw: fastcl.info_nce(**kw, temperature=0.01, debias=0.1, symmetric=symmetric, backend=backend),
            lambda **kw: oracle.info_nce(**kw, temperature=0.01, debias=0.1, symmetric=symmetric),
            {"query": q, "key": k}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "tensor", "float"])
@pytest.mark.parametrize("shape", [(1, 3), (13, 19), (37, 64)])
def test_clip_loss(shape, bias, dtype, backend):
    n, d = shape
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d),
              "logit_scale": torch.tensor(14.3, dtype=torch.float64, device=DEVICE)}
    if bias == "tensor":
        inputs["logit_bias"] = torch.tensor(-2.5, dtype=torch.float64, device=DEVICE)
    elif bias == "float":
        inputs["logit_bias"] = -2.5
    # n = 1: the exact feature gradients are 0, a difference of terms of size logit_scale * |k| = 14.3
    # whose rounding any fp32 backward keeps (~1e-6); judge it against that size, not 1e-2
    check_against_oracle(lambda **kw: fastcl.clip_loss(**kw, backend=backend), oracle.clip_loss, inputs, dtype,
                         grad_floor=14.3 if n == 1 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3), (13, 19), (37, 64)])
def test_siglip_loss(shape, dtype, backend):
    n, d = shape
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d),
              "logit_scale": torch.tensor(10.0, dtype=torch.float64, device=DEVICE),
              "logit_bias": torch.tensor(-10.0, dtype=torch.float64, device=DEVICE)}
    check_against_oracle(lambda **kw: fastcl.siglip_loss(**kw, backend=backend), oracle.siglip_loss, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 13])
def test_nt_xent(n, normalize, dtype, backend):
    inputs = {"z1": randn(n, 10), "z2": randn(n, 10)}
    if not normalize:
        inputs = {k: v / 3 for k, v in inputs.items()}
    check_against_oracle(
        lambda **kw: fastcl.nt_xent(**kw, temperature=0.5, normalize=normalize, backend=backend),
        lambda **kw: oracle.nt_xent(**kw, temperature=0.5, normalize=normalize), inputs, dtype,
        loss_rtol=NORMALIZED_LOSS_RTOL.get(dtype) if normalize else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon(views, labelled, mode, dtype, backend):
    b = 11
    features = F.normalize(randn(b, views, 9), dim=-1)
    labels = _labels(b, 4) if labelled else None
    check_against_oracle(
        lambda **kw: fastcl.supcon(**kw, labels=labels, temperature=0.1, base_temperature=0.07, contrast_mode=mode, backend=backend),
        lambda **kw: oracle.supcon(**kw, labels=labels, temperature=0.1, base_temperature=0.07, contrast_mode=mode),
        {"features": features}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sigma", [None, 0.5])
@pytest.mark.parametrize("n", [2, 9])
def test_dcl(n, sigma, dtype, backend):
    inputs = {"z1": randn(n, 12), "z2": randn(n, 12)}
    check_against_oracle(
        lambda **kw: fastcl.dcl(**kw, temperature=0.1, weight_sigma=sigma, backend=backend),
        lambda **kw: oracle.dcl(**kw, temperature=0.1, weight_sigma=sigma), inputs, dtype,
        loss_rtol=NORMALIZED_LOSS_RTOL.get(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_extreme_scale_no_overflow(dtype, backend):
    """Logit scale 100 with unit features: logits reach +-100, past exp's fp32 range."""
    n, d = 29, 8
    img, txt = unit(n, d), unit(n, d)
    txt[:5] = img[:5]  # some logits at exactly +100
    scale = torch.tensor(100.0, dtype=torch.float64, device=DEVICE)
    check_against_oracle(lambda **kw: fastcl.clip_loss(**kw, backend=backend), oracle.clip_loss,
                         {"image_features": img, "text_features": -txt, "logit_scale": scale}, dtype)
    check_against_oracle(lambda **kw: fastcl.siglip_loss(**kw, backend=backend), oracle.siglip_loss,
                         {"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": -10.0}, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_tiny_temperature_labels(dtype, backend):
    n, d = 23, 8
    labels = _labels(n, 3)
    opts = dict(temperature=0.01, labels=labels, exclude_self=True)
    check_against_oracle(lambda **kw: fastcl.info_nce(**kw, **opts, backend=backend),
                         lambda **kw: oracle.info_nce(**kw, **opts),
                         {"query": unit(n, d), "key": unit(n, d)}, dtype)


def test_no_positive_anywhere_gives_zero_loss_and_zero_grads(backend):
    q = randn(6, 4).requires_grad_()
    k = randn(6, 4).requires_grad_()
    loss = fastcl.info_nce(q, k, labels=torch.arange(6, device=DEVICE), key_labels=torch.arange(6, device=DEVICE) + 100,
                           backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0
    feats = torch.nn.functional.normalize(randn(5, 1, 3), dim=-1).requires_grad_()
    loss = fastcl.supcon(feats, backend=backend)  # one view, own class each: no positives
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(feats.grad) == 0


def test_empty_denominator_row_is_left_out(backend):
    # one key column, decoupled: row 0's only column is its positive, so its denominator is empty
    q, k = randn(3, 4).requires_grad_(), randn(1, 4).requires_grad_()
    pos = torch.zeros(3, dtype=torch.long, device=DEVICE)
    got = fastcl.info_nce(q, k, positive_index=pos, decoupled=True, reduction="none", backend=backend)
    assert torch.equal(got.detach(), torch.zeros(3, dtype=got.dtype, device=DEVICE))
    fastcl.info_nce(q, k, positive_index=pos, decoupled=True, backend=backend).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_propagates(where, backend):
    q, k = randn(9, 5), randn(9, 5)
    (q if where == "query" else k)[3, 2] = float("nan")
    assert torch.isnan(fastcl.info_nce(q, k, backend=backend))
    assert torch.isnan(fastcl.clip_loss(q, k, 10.0, backend=backend))
    assert torch.isnan(fastcl.siglip_loss(q, k, 10.0, -10.0, backend=backend))


def test_inf_does_not_become_finite(backend):
    q, k = randn(9, 5), randn(9, 5)
    k[4, 1] = float("inf")
    assert not torch.isfinite(fastcl.info_nce(q, k, backend=backend))
    assert not torch.isfinite(fastcl.clip_loss(q, k, 10.0, backend=backend))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_symmetric_wide_logit_range(spread, dtype, backend):
    """Rows whose logits differ by more than exp's range within one tile: the shared-exponent
    shortcuts must hand those rows and columns to the exact path."""
    n, d = 21, 6
    scale = torch.ones(n, dtype=torch.float64, device=DEVICE)
    scale[::3] = spread
    inputs = {"query": unit(n, d), "key": unit(n, d), "scale": scale}
    check_against_oracle(lambda **kw: fastcl.info_nce(**kw, symmetric=True, backend=backend),
                         lambda **kw: oracle.info_nce(**kw, symmetric=True), inputs, dtype)


SMOOTHING_CASES = {
    "default": dict(n=13, m=13, k=0, d=9, opts=lambda n, m, k: {}),
    "queue_positive_index": dict(n=7, m=11, k=6, d=8, opts=lambda n, m, k: {
        "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "exclude_self_decoupled": dict(n=10, m=12, k=0, d=6, opts=lambda n, m, k: {
        "positive_index": (torch.arange(n, device=DEVICE) + 3) % n, "exclude_self": True, "decoupled": True}),
    "labels_queue_exclude_self": dict(n=12, m=12, k=5, d=7, opts=lambda n, m, k: {
        "labels": _labels(n, 3), "negative_labels": _labels(k, 3), "exclude_self": True}),
    "labels_decoupled_unlabelled_queue": dict(n=9, m=9, k=4, d=5, opts=lambda n, m, k: {
        "labels": _labels(n, 3), "decoupled": True}),
    "symmetric": dict(n=11, m=11, k=0, d=8, opts=lambda n, m, k: {"symmetric": True}),
    "symmetric_exclude_self_decoupled": dict(n=10, m=10, k=0, d=6, opts=lambda n, m, k: {
        "symmetric": True, "exclude_self": True, "decoupled": True,
        "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
    "symmetric_rows_scale_n_lt_m": dict(n=8, m=13, k=0, d=7, opts=lambda n, m, k: {
        "symmetric": True, "positive_index": torch.randperm(m, device=DEVICE)[:n]}, rows_scale=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", sorted(SMOOTHING_CASES))
def test_info_nce_label_smoothing(case, reduction, dtype, backend):
    cfg = SMOOTHING_CASES[case]
    n, m, k, d = cfg["n"], cfg["m"], cfg["k"], cfg["d"]
    opts = cfg["opts"](n, m, k)
    inputs = {"query": unit(n, d), "key": unit(m, d)}
    if k:
        inputs["negatives"] = unit(k, d)
    inputs["temperature"] = (torch.rand(n, dtype=torch.float64, device=DEVICE) * 0.3 + 0.05 if cfg.get("rows_scale")
                             else torch.tensor(0.2, dtype=torch.float64, device=DEVICE))
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, **opts, label_smoothing=0.15, reduction=reduction, backend=backend),
        lambda **kw: oracle.info_nce(**kw, **opts, label_smoothing=0.15, reduction=reduction), inputs, dtype)


def _clip_inputs(n=17, d=12):
    """CLIP features with a logit scale and a bias, float64 (cast by ``check_against_oracle``)."""
    return {"image_features": unit(n, d), "text_features": unit(n, d),
            "logit_scale": torch.tensor(14.3, dtype=torch.float64, device=DEVICE),
            "logit_bias": torch.tensor(-2.0, dtype=torch.float64, device=DEVICE)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_loss_label_smoothing_is_pytorch_cross_entropy(dtype, backend):
    """Against ``F.cross_entropy(label_smoothing=)`` itself (the oracle's clip_loss calls it)."""
    inputs = _clip_inputs()
    check_against_oracle(lambda **kw: fastcl.clip_loss(**kw, label_smoothing=0.1, backend=backend),
                         lambda **kw: oracle.clip_loss(**kw, label_smoothing=0.1), inputs, dtype)


FALSE_NEGATIVE_CASES = {
    "default": dict(n=13, m=13, k=0, d=8, opts=lambda n, m, k: {}),
    "queue_positive_index": dict(n=9, m=11, k=6, d=7, opts=lambda n, m, k: {
        "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "exclude_self": dict(n=10, m=12, k=3, d=6, opts=lambda n, m, k: {
        "positive_index": (torch.arange(n, device=DEVICE) + 3) % n, "exclude_self": True}),
    "rows_temperature": dict(n=12, m=15, k=0, d=8, opts=lambda n, m, k: {}, rows_scale=True),
    "symmetric": dict(n=11, m=11, k=0, d=8, opts=lambda n, m, k: {"symmetric": True}),
    "symmetric_n_lt_m_queue": dict(n=8, m=13, k=4, d=7, opts=lambda n, m, k: {
        "symmetric": True, "positive_index": torch.randperm(m, device=DEVICE)[:n]}),
    "symmetric_exclude_self": dict(n=10, m=10, k=0, d=6, opts=lambda n, m, k: {
        "symmetric": True, "exclude_self": True, "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
}


HARDNESS_CASES = {
    "default": dict(n=13, m=13, k=0, d=8, opts=lambda n, m, k: {"debias": 0.1, "hardness": 0.5}),
    "no_debias_queue": dict(n=9, m=11, k=6, d=7, opts=lambda n, m, k: {
        "hardness": 1.0, "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "exclude_self_low_temperature": dict(n=10, m=12, k=0, d=6, opts=lambda n, m, k: {
        "debias": 0.2, "hardness": 2.0, "exclude_self": True, "positive_index": (torch.arange(n, device=DEVICE) + 3) % n},
        temperature=0.02),
    "rows_temperature": dict(n=12, m=15, k=3, d=8, opts=lambda n, m, k: {"debias": 0.05, "hardness": 0.3},
                             rows_scale=True),
    "symmetric_exclude_self": dict(n=10, m=10, k=0, d=6, opts=lambda n, m, k: {
        "debias": 0.1, "hardness": 0.7, "symmetric": True, "exclude_self": True,
        "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
    "symmetric_rows_temperature_queue": dict(n=8, m=13, k=4, d=7, opts=lambda n, m, k: {
        "debias": 0.1, "hardness": 0.4, "symmetric": True, "positive_index": torch.randperm(m, device=DEVICE)[:n]},
        rows_scale=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(HARDNESS_CASES))
def test_info_nce_hardness(case, dtype, backend):
    """Hard-negative reweighting on the debiased loss, against the formula in float64."""
    cfg = HARDNESS_CASES[case]
    if dtype == torch.bfloat16 and case not in ("default", "symmetric_exclude_self"):
        pytest.skip("bfloat16: the default and symmetric cases cover it")
    n, m, k, d = cfg["n"], cfg["m"], cfg["k"], cfg["d"]
    opts = cfg["opts"](n, m, k)
    inputs = {"query": unit(n, d), "key": unit(m, d)}
    if k:
        inputs["negatives"] = unit(k, d)
    t = cfg.get("temperature", 0.2)
    inputs["temperature"] = (torch.rand(n, dtype=torch.float64, device=DEVICE) * 0.3 + 0.05 if cfg.get("rows_scale")
                             else torch.tensor(t, dtype=torch.float64, device=DEVICE))
    reduction = "none" if opts.get("symmetric") else "mean"
    ref_opts = dict(opts, debias=opts.get("debias", 0.0))  # hardness alone means debias=0
    check_against_oracle(lambda **kw: fastcl.info_nce(**kw, **opts, reduction=reduction, backend=backend),
                         lambda **kw: oracle.info_nce(**kw, **ref_opts, reduction=reduction), inputs, dtype,
                         grad_floor=1.0 / t)
    # the tilt changes the loss (hardness 0 is the debiased loss)
    plain = dict(ref_opts, hardness=None)
    assert not torch.allclose(oracle.info_nce(**inputs, **ref_opts), oracle.info_nce(**inputs, **plain), rtol=1e-3)


def test_hardness_zero_is_the_debiased_loss_and_bad_values_raise():
    q, k = unit(9, 5), unit(9, 5)
    assert torch.equal(fastcl.info_nce(q, k, debias=0.1, hardness=0.0, backend="torch"),
                       fastcl.info_nce(q, k, debias=0.1, backend="torch"))
    for bad, error in ((-0.5, ValueError), (float("inf"), TypeError), (True, TypeError)):
        with pytest.raises(error, match="hardness"):
            fastcl.info_nce(q, k, hardness=bad, backend="torch")
    for other in ({"labels": torch.arange(9, device=DEVICE) % 3}, {"decoupled": True}):
        with pytest.raises(ValueError, match=f"hardness .* cannot be combined with {next(iter(other))}"):
            fastcl.info_nce(q, k, **other, hardness=0.5, backend="torch")
    with pytest.raises(ValueError, match="label_smoothing and debias"):
        fastcl.info_nce(q, k, hardness=0.5, label_smoothing=0.1, backend="torch")


def _expect_unsupported_on_cuda(backend, call):
    """The CUDA kernels have no false-negative mask: an explicit ``backend="cuda"`` must raise."""
    if backend != "cuda":
        return False
    with pytest.raises(ValueError, match="false-negative mask"):
        call()
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", [-0.15, 0.1])
@pytest.mark.parametrize("case", sorted(FALSE_NEGATIVE_CASES))
def test_info_nce_false_negative_margin(case, margin, dtype, backend):
    cfg = FALSE_NEGATIVE_CASES[case]
    if dtype in (torch.float16, torch.bfloat16) and case not in ("default", "symmetric"):
        pytest.skip("half precision: the default and symmetric cases cover it")
    n, m, k, d = cfg["n"], cfg["m"], cfg["k"], cfg["d"]
    opts = dict(cfg["opts"](n, m, k), false_negative_margin=margin)
    inputs = {"query": unit(n, d), "key": unit(m, d)}
    if k:
        inputs["negatives"] = unit(k, d)
    inputs["temperature"] = (torch.rand(n, dtype=torch.float64, device=DEVICE) * 0.3 + 0.05 if cfg.get("rows_scale")
                             else torch.tensor(0.2, dtype=torch.float64, device=DEVICE))
    if _expect_unsupported_on_cuda(backend, lambda: fastcl.info_nce(**inputs, **opts, backend=backend)):
        return
    reduction = "none" if case == "symmetric" else "mean"
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, **opts, reduction=reduction, backend=backend),
        lambda **kw: oracle.info_nce(**kw, **opts, reduction=reduction), inputs, dtype)
    # the mask took something out: the loss differs from the unmasked one
    plain = {k_: v for k_, v in opts.items() if k_ != "false_negative_margin"}
    masked = oracle.info_nce(**inputs, **opts)
    assert not torch.allclose(masked, oracle.info_nce(**inputs, **plain), rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_loss_false_negative_margin(dtype, backend):
    """Against ``F.cross_entropy`` over logits with the masked pairs at -inf, both directions."""
    inputs = _clip_inputs()
    if _expect_unsupported_on_cuda(backend, lambda: fastcl.clip_loss(**inputs, false_negative_margin=0.0,
                                                                      backend=backend)):
        return
    check_against_oracle(lambda **kw: fastcl.clip_loss(**kw, false_negative_margin=0.0, backend=backend),
                         lambda **kw: oracle.clip_loss(**kw, false_negative_margin=0.0), inputs, dtype,
                         grad_floor=14.3)


@pytest.mark.parametrize("other, value", [("labels", None), ("decoupled", True), ("debias", 0.1),
                                          ("label_smoothing", 0.1)])
def test_false_negative_margin_names_the_option_it_cannot_join(other, value):
    q = unit(6, 3)
    extra = {"labels": torch.arange(6, device=DEVICE) % 2} if other == "labels" else {other: value}
    with pytest.raises(ValueError, match=f"false_negative_margin cannot be combined with {other}"):
        fastcl.info_nce(q, q, false_negative_margin=0.1, **extra, backend="torch")


def test_false_negative_margin_rejects_bad_values_and_scales():
    q = unit(6, 3)
    for bad in (float("nan"), True, "0.1"):
        with pytest.raises(TypeError, match="false_negative_margin"):
            fastcl.info_nce(q, q, false_negative_margin=bad, backend="torch")
    with pytest.raises(ValueError, match="positive scale"):
        fastcl.info_nce(q, q, scale=-2.0, false_negative_margin=0.1, backend="torch")
    with pytest.raises(ValueError, match="positive logit_scale"):
        fastcl.clip_loss(q, q, torch.tensor(0.0), false_negative_margin=0.1, backend="torch")
    with pytest.raises(ValueError, match="scalar temperature"):
        fastcl.info_nce(q, q, temperature=torch.full((6,), 0.1), symmetric=True, false_negative_margin=0.1,
                        backend="torch")


def test_auto_skips_a_backend_without_the_call_and_a_named_one_raises(monkeypatch):
    """Dispatch by what a call needs: ``auto`` passes over a backend whose kernels lack it."""
    from fastcl import _dispatch
    from fastcl.backends import cuda

    order = {"cpu": ("cuda", "torch")}
    monkeypatch.setattr(_dispatch, "_AUTO_ORDER", order)
    monkeypatch.setattr(cuda, "available", lambda device: None)
    spec = fastcl._lower.towers(unit(4, 3), unit(4, 3), 10.0, None, sigmoid=False, false_negative_margin=0.1).spec
    assert _dispatch.resolve("auto", torch.device("cpu"), spec).__name__ == "fastcl.backends.torch"
    plain = fastcl._lower.towers(unit(4, 3), unit(4, 3), 10.0, None, sigmoid=False).spec
    assert _dispatch.resolve("auto", torch.device("cpu"), plain).__name__ == "fastcl.backends.cuda"
    with pytest.raises(ValueError, match="backend='cuda' does not support this call"):
        _dispatch.resolve("cuda", torch.device("cpu"), spec)


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.0, ValueError), (True, TypeError), ("0.1", TypeError)])
def test_label_smoothing_rejects_bad_values(value, error):
    q = unit(4, 3)
    with pytest.raises(error, match="label_smoothing"):
        fastcl.info_nce(q, q, label_smoothing=value, backend="torch")


def test_label_smoothing_with_debias_names_both():
    q = unit(4, 3)
    with pytest.raises(ValueError, match="label_smoothing and debias"):
        fastcl.info_nce(q, q, label_smoothing=0.1, debias=0.1, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 4, 37])
@pytest.mark.parametrize("n", [1, 13, 37])
def test_siglip_loss_labels(n, classes, dtype, backend):
    """Multi-positive SigLIP: every pair with equal labels is a positive (one class: all are;
    as many classes as rows: mostly the diagonal and a few duplicates)."""
    d = 16
    labels = torch.randint(0, classes, (n,), device=DEVICE)
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d),
              "logit_scale": torch.tensor(10.0, dtype=torch.float64, device=DEVICE),
              "logit_bias": torch.tensor(-5.0, dtype=torch.float64, device=DEVICE)}
    check_against_oracle(lambda **kw: fastcl.siglip_loss(**kw, labels=labels, backend=backend),
                         lambda **kw: oracle.siglip_loss(**kw, labels=labels), inputs, dtype)


def test_siglip_loss_labels_checked():
    q = unit(5, 3)
    with pytest.raises(ValueError, match="labels"):
        fastcl.siglip_loss(q, q, 10.0, -10.0, labels=torch.zeros(4, dtype=torch.long, device=DEVICE), backend="torch")
    with pytest.raises(TypeError, match="labels"):
        fastcl.siglip_loss(q, q, 10.0, -10.0, labels=torch.zeros(5, device=DEVICE), backend="torch")
