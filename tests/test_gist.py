"""Guide-model false-negative masks (GISTEmbed: ``guide_query``/``guide_key``/``guide_negatives``)
against the float64 oracle on the backend axis (the CUDA backend must refuse a named call), the
mask's effect, and the arguments' errors."""

import os

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_oracle

import fastcl

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def unit(n, d):
    return F.normalize(randn(n, d), dim=1)


# name -> N, M, K, D, guide width, options, temperature
CASES = {
    "default": dict(n=13, m=13, k=0, d=9, g=6, opts=lambda n, m, k: {}),
    "queue_with_grad": dict(n=9, m=9, k=11, d=7, g=5, opts=lambda n, m, k: {}),
    "hard_negatives": dict(n=6, m=18, k=0, d=8, g=4, opts=lambda n, m, k: {
        "positive_index": torch.arange(n, device=DEVICE) * 3}),
    "positive_in_queue": dict(n=7, m=7, k=6, d=5, g=8, opts=lambda n, m, k: {
        "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "exclude_self": dict(n=10, m=12, k=0, d=6, g=3, opts=lambda n, m, k: {
        "positive_index": (torch.arange(n, device=DEVICE) + 2) % n, "exclude_self": True}),
    "rows_temperature": dict(n=11, m=14, k=3, d=7, g=5, opts=lambda n, m, k: {}, rows_scale=True),
    "low_temperature": dict(n=12, m=12, k=0, d=16, g=16, opts=lambda n, m, k: {}, temperature=0.01),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", [-0.1, 0.0, 0.2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_info_nce_guide_mask(case, margin, dtype, backend):
    cfg = CASES[case]
    if dtype == torch.bfloat16 and case != "default":
        pytest.skip("bfloat16: the default case covers it")
    n, m, k, d, g = cfg["n"], cfg["m"], cfg["k"], cfg["d"], cfg["g"]
    opts = cfg["opts"](n, m, k)
    t = cfg.get("temperature", 0.2)
    inputs = {"query": unit(n, d), "key": unit(m, d)}
    guides = {"guide_query": randn(n, g), "guide_key": randn(m, g), "guide_margin": margin}
    if k:
        inputs["negatives"] = unit(k, d)
        guides["guide_negatives"] = randn(k, g)
    inputs["temperature"] = (torch.rand(n, dtype=torch.float64, device=DEVICE) * 0.3 + 0.05 if cfg.get("rows_scale")
                             else torch.tensor(t, dtype=torch.float64, device=DEVICE))
    if backend == "cuda":
        with pytest.raises(ValueError, match="no guide-model mask"):
            fastcl.info_nce(**inputs, **opts, **guides, backend=backend)
        backend = "auto"  # takes another backend for it
    names = [x for x in ("query", "key", "negatives", "temperature") if x in inputs]
    check_against_oracle(lambda **kw: fastcl.info_nce(**kw, **opts, **guides, backend=backend),
                         lambda **kw: oracle.info_nce(**kw, **opts, **guides), inputs, dtype, differentiable=names,
                         grad_floor=1.0 / t)
    # the guide took something out (random guides: about half the columns beat the positive)
    masked = oracle.info_nce(**inputs, **opts, **guides)
    assert not torch.allclose(masked, oracle.info_nce(**inputs, **opts), rtol=1e-3)


def test_a_guide_that_agrees_with_the_positive_masks_nothing():
    """Guides whose positive is every row's most similar column (and a margin that keeps the
    rest below it) leave the loss unchanged: the mask is the guide's, not the student's."""
    n, d = 10, 6
    q, k = unit(n, d), unit(n, d)
    guide = torch.eye(n, dtype=torch.float64, device=DEVICE)  # cos = 1 on the positive, 0 elsewhere
    got = fastcl.info_nce(q, k, temperature=0.1, guide_query=guide, guide_key=guide, guide_margin=0.5,
                          backend="torch")
    torch.testing.assert_close(got, fastcl.info_nce(q, k, temperature=0.1, backend="torch"), rtol=1e-12, atol=0)
    everything = fastcl.info_nce(q, k, temperature=0.1, guide_query=guide, guide_key=guide, guide_margin=1.5,
                                 backend="torch")
    torch.testing.assert_close(everything, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)


def test_bad_guide_arguments_raise():
    q, g = unit(6, 4), randn(6, 3)
    with pytest.raises(ValueError, match="go together"):
        fastcl.info_nce(q, q, guide_query=g, backend="torch")
    with pytest.raises(ValueError, match="exactly when negatives are"):
        fastcl.info_nce(q, q, guide_query=g, guide_key=g, negatives=unit(3, 4), backend="torch")
    with pytest.raises(ValueError, match="guide_key has 5 rows but key has 6"):
        fastcl.info_nce(q, q, guide_query=g, guide_key=g[:5], backend="torch")
    with pytest.raises(ValueError, match="guide_key has feature width D=2"):
        fastcl.info_nce(q, q, guide_query=g, guide_key=g[:, :2], backend="torch")
    with pytest.raises(TypeError, match="guide_margin"):
        fastcl.info_nce(q, q, guide_query=g, guide_key=g, guide_margin=float("nan"), backend="torch")
    for other in ({"labels": torch.arange(6, device=DEVICE) % 2}, {"decoupled": True}, {"debias": 0.1},
                  {"label_smoothing": 0.1}, {"symmetric": True}, {"false_negative_margin": 0.1}):
        with pytest.raises(ValueError, match=f"cannot be combined with {next(iter(other))}"):
            fastcl.info_nce(q, q, guide_query=g, guide_key=g, **other, backend="torch")


@pytest.mark.slow
def test_never_materialises_n_by_m(monkeypatch):
    from test_autograd_memory import _largest_during

    monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    n = 2048
    a, b = unit(n, 32).float().requires_grad_(), unit(n, 32).float().requires_grad_()
    ga, gb = randn(n, 24).float(), randn(n, 24).float()
    mode = _largest_during(lambda: fastcl.info_nce(a, b, guide_query=ga, guide_key=gb, backend="torch").backward())
    assert a.grad is not None and b.grad is not None
    assert mode.largest < n * n // 4, f"{mode.op} produced {mode.largest} elements"
