"""Matryoshka prefixes (``matryoshka_dims``) against the float64 oracle: the loss summed over
normalised feature prefixes, with every other option, on every backend; the torch backend's
one-sweep pass against its ordinary passes run once per prefix; bad arguments.
"""

import os

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_oracle

import fastcl
from fastcl.backends import torch as torch_backend

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# the kernel backends round the features (fused prefixes) or the normalised prefixes (a pass per
# prefix) to the input dtype (2**-8 relative in bfloat16), which reaches the loss scaled by
# 1/temperature
ROUNDED_PREFIX_RTOL = {torch.bfloat16: 2e-2}


def _loss_rtol(backend, dtype):
    return None if backend == "torch" else ROUNDED_PREFIX_RTOL.get(dtype)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def _raw(n, d):
    """Unnormalised features of uneven norms (each prefix is normalised inside the loss)."""
    return randn(n, d) * (torch.rand(n, 1, dtype=torch.float64, device=DEVICE) * 2 + 0.3)


def _largest_inverse_norm(x, dims):
    return max(float(1 / x[:, :d].norm(dim=1).min()) for d in dims)


def _labels(n, classes):
    return torch.randint(0, classes, (n,), device=DEVICE)


# name -> N, M, K (queue), D, dims, weights, options(n, m, k), temperature
CASES = {
    "default": dict(n=13, m=13, k=0, d=19, dims=[3, 8, 19], opts=lambda n, m, k: {}),
    "unsorted_weighted_without_full_width": dict(n=11, m=14, k=0, d=16, dims=[9, 2, 5], weights=[0.5, 2.0, 1.5],
                                                 opts=lambda n, m, k: {}),
    "one_width": dict(n=7, m=7, k=0, d=6, dims=[6], opts=lambda n, m, k: {}),
    "hard_negatives": dict(n=5, m=20, k=0, d=12, dims=[4, 12], opts=lambda n, m, k: {
        "positive_index": torch.arange(n, device=DEVICE) * 4}),
    "queue_positive_in_queue": dict(n=6, m=6, k=9, d=10, dims=[1, 6, 10], opts=lambda n, m, k: {
        "positive_index": torch.randint(0, m + k, (n,), device=DEVICE)}),
    "queue_no_grad": dict(n=9, m=9, k=11, d=8, dims=[4, 8], opts=lambda n, m, k: {}, negatives_grad=False),
    "labels_queue_labelled": dict(n=12, m=12, k=7, d=9, dims=[3, 9], opts=lambda n, m, k: {
        "labels": _labels(n, 3), "negative_labels": _labels(k, 3)}),
    "labels_exclude_self_decoupled": dict(n=14, m=14, k=0, d=9, dims=[2, 5, 9], opts=lambda n, m, k: {
        "labels": _labels(n, 3), "exclude_self": True, "decoupled": True}),
    "exclude_self": dict(n=10, m=12, k=0, d=7, dims=[3, 7], opts=lambda n, m, k: {
        "positive_index": (torch.arange(n, device=DEVICE) + 3) % n, "exclude_self": True}),
    "symmetric_rows_temperature": dict(n=11, m=11, k=0, d=10, dims=[5, 10], rows_scale=True,
                                       opts=lambda n, m, k: {"symmetric": True}),
    "symmetric_permuted_queue": dict(n=8, m=13, k=4, d=9, dims=[2, 6, 9], opts=lambda n, m, k: {
        "symmetric": True, "positive_index": torch.randperm(m, device=DEVICE)[:n]}),
    "symmetric_exclude_self_decoupled": dict(n=10, m=10, k=0, d=6, dims=[3, 6], opts=lambda n, m, k: {
        "symmetric": True, "exclude_self": True, "decoupled": True,
        "positive_index": (torch.arange(n, device=DEVICE) + 1) % n}),
    "debias_symmetric": dict(n=11, m=11, k=0, d=8, dims=[4, 8], opts=lambda n, m, k: {
        "debias": 0.2, "symmetric": True}),
    "hardness_queue": dict(n=9, m=11, k=5, d=7, dims=[3, 7], opts=lambda n, m, k: {
        "debias": 0.1, "hardness": 1.0}),
    "label_smoothing_labels_queue": dict(n=12, m=12, k=5, d=8, dims=[2, 8], opts=lambda n, m, k: {
        "labels": _labels(n, 4), "exclude_self": True, "label_smoothing": 0.2}),
    "label_smoothing_symmetric": dict(n=9, m=9, k=0, d=8, dims=[3, 8], opts=lambda n, m, k: {
        "symmetric": True, "label_smoothing": 0.1}),
    # masks the prefix passes do not take: one loss per width (each width's own margin thresholds)
    "false_negative_margin_queue": dict(n=10, m=10, k=4, d=8, dims=[3, 8], opts=lambda n, m, k: {
        "false_negative_margin": 0.05}),
    "guide_mask_queue": dict(n=10, m=10, k=4, d=8, dims=[4, 8], opts=lambda n, m, k: {
        "guide_query": randn(n, 5), "guide_key": randn(m, 5), "guide_negatives": randn(k, 5), "guide_margin": 0.02}),
    "low_temperature": dict(n=12, m=12, k=0, d=16, dims=[4, 8, 16], temperature=0.01, opts=lambda n, m, k: {}),
    "low_temperature_symmetric": dict(n=10, m=10, k=0, d=12, dims=[6, 12], temperature=0.02,
                                      opts=lambda n, m, k: {"symmetric": True}),
}
HALF_CASES = ("default", "labels_exclude_self_decoupled", "symmetric_permuted_queue")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_info_nce_matryoshka(case, reduction, dtype, backend, monkeypatch):
    if backend == "torch":  # the one-sweep passes (at these widths a CPU would run a pass per prefix)
        monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    cfg = CASES[case]
    if dtype == torch.bfloat16 and case not in HALF_CASES:
        pytest.skip("bfloat16: three cases cover it")
    n, m, k, d = cfg["n"], cfg["m"], cfg["k"], cfg["d"]
    opts = cfg["opts"](n, m, k)
    dims, weights = cfg["dims"], cfg.get("weights")
    t = cfg.get("temperature", 0.2)
    inputs = {"query": _raw(n, d), "key": _raw(m, d)}
    if k:
        inputs["negatives"] = _raw(k, d)
    inputs["temperature"] = (torch.rand(n, dtype=torch.float64, device=DEVICE) * 0.3 + 0.05 if cfg.get("rows_scale")
                             else torch.tensor(t, dtype=torch.float64, device=DEVICE))
    names = [x for x in ("query", "key", "negatives", "temperature")
             if x in inputs and (x != "negatives" or cfg.get("negatives_grad", True))]
    if backend == "cuda" and ("false_negative_margin" in opts or "guide_query" in opts):
        with pytest.raises(ValueError, match="false-negative mask|guide-model mask"):
            fastcl.info_nce(**inputs, **opts, matryoshka_dims=dims, backend=backend)
        return
    ref_opts = dict(opts)
    if "hardness" in opts:
        ref_opts.setdefault("debias", 0.0)
    # a prefix's normalisation divides its gradient by the prefix's norm; the two parts of that
    # gradient (through the logits, through the norm) cancel to a smaller sum, so rounding
    # errors scale with 1 / |x[:d]| (as in F.normalize's own backward)
    floor = max(_largest_inverse_norm(inputs[x], dims) for x in ("query", "key", "negatives") if x in inputs) / t
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, **opts, matryoshka_dims=dims, matryoshka_weights=weights,
                                     reduction=reduction, backend=backend),
        lambda **kw: oracle.matryoshka(lambda **c: oracle.info_nce(**c, **ref_opts, reduction=reduction), dims,
                                       weights, **kw),
        inputs, dtype, differentiable=names, grad_floor=floor, loss_rtol=_loss_rtol(backend, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_loss_matryoshka(dtype, backend, monkeypatch):
    """CLIP with a bias and label smoothing, over three prefixes, against ``F.cross_entropy``."""
    if backend == "torch":
        monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    n, d = 15, 24
    inputs = {"image_features": _raw(n, d), "text_features": _raw(n, d),
              "logit_scale": torch.tensor(14.0, dtype=torch.float64, device=DEVICE),
              "logit_bias": torch.tensor(-1.5, dtype=torch.float64, device=DEVICE)}
    dims, weights = [24, 6, 12], [1.0, 0.25, 0.5]
    check_against_oracle(
        lambda **kw: fastcl.clip_loss(**kw, label_smoothing=0.1, matryoshka_dims=dims, matryoshka_weights=weights,
                                      backend=backend),
        lambda **kw: oracle.matryoshka(lambda **c: oracle.clip_loss(**c, label_smoothing=0.1), dims, weights, **kw),
        inputs, dtype, grad_floor=14.0 * max(_largest_inverse_norm(inputs[x], dims) for x in
                                             ("image_features", "text_features")),
        loss_rtol=_loss_rtol(backend, dtype))


def test_each_prefix_is_a_loss_on_normalised_prefixes():
    """The weighted sum of fastcl's own losses on normalised prefixes (a second road through the
    ordinary operators) equals the one-pass result; the prefixes differ from each other."""
    n, d = 21, 32
    q, k, queue = _raw(n, d), _raw(n, d), _raw(6, d)
    labels = _labels(n, 4)
    dims, weights = [5, 16, 32], [0.3, 1.0, 2.0]
    got = fastcl.info_nce(q, k, labels=labels, negatives=queue, temperature=0.1, matryoshka_dims=dims,
                          matryoshka_weights=weights, backend="torch")
    parts = [fastcl.info_nce(F.normalize(q[:, :dd]), F.normalize(k[:, :dd]), labels=labels,
                             negatives=F.normalize(queue[:, :dd]), temperature=0.1, backend="torch") for dd in dims]
    torch.testing.assert_close(got, sum(w * p for w, p in zip(weights, parts)), rtol=1e-12, atol=1e-12)
    assert len({round(float(p), 6) for p in parts}) == len(parts)


class _PerPrefix:
    """The torch backend without its fused prefix passes: the ordinary passes once per prefix."""

    def __getattr__(self, name):
        if name in ("softmax_stats_prefixes", "softmax_grad_prefixes"):
            raise AttributeError(name)
        return getattr(torch_backend, name)


@pytest.mark.parametrize("opts", [
    {}, {"symmetric": True}, {"labels": "3", "exclude_self": True, "decoupled": True},
    {"positive_index": "shift", "exclude_self": True, "symmetric": True, "queue": True},
    {"scale": -4.0, "queue": True},
], ids=["plain", "symmetric", "labels_exclude_self_decoupled", "symmetric_exclude_self_queue",
        "negative_scale_queue"])
def test_fused_sweep_equals_a_pass_per_prefix(opts, monkeypatch):
    """The one-sweep pass (snapshots at the prefix boundaries, one matmul per segment in the
    backward) against the ordinary passes once per prefix, in float64, loss and gradients, over
    tiles that cut the segments and the rows unevenly."""
    from fastcl.ops import library

    monkeypatch.setenv("FASTCL_TORCH_BLOCK", "4,6")
    monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    n, d = 17, 13
    opts = dict(opts)
    if opts.pop("labels", None):
        opts["labels"] = _labels(n, 3)
    if opts.pop("positive_index", None):
        opts["positive_index"] = (torch.arange(n, device=DEVICE) + 2) % n
    queue = _raw(5, d).requires_grad_() if opts.pop("queue", False) else None
    # a negative scale takes the plain forms of the one-sweep passes (no division by the scales)
    scale = torch.tensor(opts.pop("scale", 6.0), dtype=torch.float64, device=DEVICE, requires_grad=True)

    calls = []
    fused = torch_backend.softmax_grad_prefixes
    monkeypatch.setattr(torch_backend, "softmax_grad_prefixes", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    results = []
    q0, k0 = _raw(n, d), _raw(n, d)
    for module in (torch_backend, _PerPrefix()):
        monkeypatch.setattr(library, "_backend", lambda name, device, spec, m=module: m)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        leaves = [q, k, scale] + ([queue] if queue is not None else [])
        loss = fastcl.info_nce(q, k, scale=scale, negatives=queue, matryoshka_dims=[3, 7, 13], **opts)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    assert calls, "the fused pass did not run"
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_matryoshka_arguments_raise():
    q = F.normalize(randn(6, 8))
    for dims, error, match in (
            (8, TypeError, "non-empty list"), ([], TypeError, "non-empty list"), ([4.0], TypeError, "ints"),
            ([0, 8], ValueError, r"\[1, D=8\]"), ([9], ValueError, r"\[1, D=8\]"), ([4, 4], ValueError, "distinct")):
        with pytest.raises(error, match=match):
            fastcl.info_nce(q, q, matryoshka_dims=dims, backend="torch")
    with pytest.raises(ValueError, match="one per dimension"):
        fastcl.info_nce(q, q, matryoshka_dims=[4, 8], matryoshka_weights=[1.0], backend="torch")
    with pytest.raises(ValueError, match="finite"):
        fastcl.clip_loss(q, q, 10.0, matryoshka_dims=[4, 8], matryoshka_weights=[1.0, float("nan")], backend="torch")
    with pytest.raises(ValueError, match="needs matryoshka_dims"):
        fastcl.info_nce(q, q, matryoshka_weights=[1.0], backend="torch")


def test_one_sweep_choice_rule(monkeypatch):
    """A CPU with the compiled epilogues always sweeps the prefixes at once; one without them
    when the matmul features saved pay for the extra passes (the measured crossover lies between
    D=256 and D=512 for four halving prefixes); off a CPU always; ``FASTCL_PREFIXES`` overrides,
    and a bad value raises naming the variable."""
    from fastcl.backends import _cpu_epilogues

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FASTCL_PREFIXES", raising=False)
    monkeypatch.setattr(_cpu_epilogues, "module", lambda: object())
    assert torch_backend.prefers_one_sweep(cpu, (32, 64, 128, 256))
    monkeypatch.setattr(_cpu_epilogues, "module", lambda: None)
    assert not torch_backend.prefers_one_sweep(cpu, (32, 64, 128, 256))
    assert torch_backend.prefers_one_sweep(cpu, (64, 128, 256, 512))
    assert torch_backend.prefers_one_sweep(cpu, (96, 192, 384, 768))
    assert torch_backend.prefers_one_sweep(gpu, (3, 8))
    monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    assert torch_backend.prefers_one_sweep(cpu, (3, 8))
    monkeypatch.setenv("FASTCL_PREFIXES", "per_prefix")
    assert not torch_backend.prefers_one_sweep(gpu, (64, 128, 256, 512))
    monkeypatch.setenv("FASTCL_PREFIXES", "sometimes")
    with pytest.raises(ValueError, match="FASTCL_PREFIXES"):
        fastcl.info_nce(randn(4, 6), randn(4, 6), matryoshka_dims=[3, 6], backend="torch")


def _triton_or_skip():
    from fastcl._dispatch import unavailable_reason

    reason = unavailable_reason("triton", torch.device(DEVICE))
    if reason is not None:
        pytest.skip(reason)
    from fastcl.backends import triton as triton_backend

    return triton_backend


@pytest.mark.parametrize("dims", [(5, 16, 17, 40), (3, 9, 30)], ids=["unaligned", "narrower_than_d"])
@pytest.mark.parametrize("opts", [
    {}, {"symmetric": True}, {"labels": "3", "exclude_self": True, "decoupled": True},
    {"labels": "3", "queue": "detached"},
    {"positive_index": "shift", "exclude_self": True, "symmetric": True, "queue": True},
    {"scale": -4.0, "queue": True, "rows_scale": True},
], ids=["plain", "symmetric", "labels_exclude_self_decoupled", "labels_detached_queue", "symmetric_exclude_self_queue",
        "negative_scale_queue_per_row"])
def test_triton_sweep_equals_a_pass_per_prefix(opts, dims, monkeypatch):
    """Triton's one-sweep kernels (``triton_kernels/prefix.py``) against the torch backend's
    ordinary passes once per prefix, in float64, loss and gradients: prefix boundaries inside
    the kernels' 16-wide feature chunks, a widest prefix narrower than D, uneven tiles."""
    from fastcl.ops import library

    triton_backend = _triton_or_skip()
    monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    n, m, d = 19, 23, 40
    opts = dict(opts)
    if opts.pop("labels", None):
        opts["labels"] = _labels(n, 3)
    if opts.pop("positive_index", None):
        opts["positive_index"] = (torch.arange(n, device=DEVICE) + 2) % n
    queue_kind = opts.pop("queue", None)
    queue = _raw(6, d).requires_grad_(queue_kind is True) if queue_kind else None
    if queue is not None and "labels" in opts:
        opts["negative_labels"] = _labels(6, 3)
    sign = opts.pop("scale", 6.0)
    if opts.pop("rows_scale", False):
        scale = (torch.rand(n, dtype=torch.float64, device=DEVICE) + 1) * sign
    else:
        scale = torch.tensor(sign, dtype=torch.float64, device=DEVICE)
    scale.requires_grad_()
    calls = []
    for name in ("softmax_stats_prefixes", "softmax_grad_prefixes"):
        fused = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, f=fused, nm=name, **kw: calls.append(nm) or f(*a, **kw))
    results = []
    q0, k0 = _raw(n, d), _raw(n if opts.get("exclude_self") or opts.get("symmetric") else m, d)
    if "labels" in opts and k0.shape[0] != n:
        opts["key_labels"] = _labels(k0.shape[0], 3)
    for module in (triton_backend, _PerPrefix()):
        monkeypatch.setattr(library, "_backend", lambda name, device, spec, mod=module: mod)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        leaves = [q, k, scale] + ([queue] if queue is not None and queue.requires_grad else [])
        loss = fastcl.info_nce(q, k, scale=scale, negatives=queue, matryoshka_dims=list(dims), **opts)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    assert set(calls) == {"softmax_stats_prefixes", "softmax_grad_prefixes"}, "the Triton kernels did not run"
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", HALF_CASES)
def test_triton_sweep_float16(case, monkeypatch):
    """The Triton kernels in float16 (whose ``G @ X`` product runs in fp32) against the oracle:
    the interpreter runs float16 dots, unlike bfloat16 ones."""
    _triton_or_skip()
    test_info_nce_matryoshka(case, "mean", torch.float16, "triton", monkeypatch)


def test_triton_prefers_one_sweep(monkeypatch):
    """Triton runs the one sweep unless ``FASTCL_PREFIXES=per_prefix``."""
    triton_backend = _triton_or_skip()
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTCL_PREFIXES", "auto")
    assert triton_backend.prefers_one_sweep(cpu, (32, 64, 128, 256))
    monkeypatch.setenv("FASTCL_PREFIXES", "per_prefix")
    assert not triton_backend.prefers_one_sweep(cpu, (32, 64, 128, 256))


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["fused", "per_prefix"])
def test_never_materialises_n_by_m(plan, monkeypatch):
    """Both plans, forward and backward, symmetric with a queue: no tensor of N * M / 4 elements."""
    from test_autograd_memory import _largest_during

    monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    monkeypatch.setenv("FASTCL_PREFIXES", plan)
    n = 2048
    a, b = torch.randn(n, 32, requires_grad=True), torch.randn(n, 32, requires_grad=True)
    queue = torch.randn(256, 32, requires_grad=True)
    mode = _largest_during(lambda: fastcl.info_nce(a, b, negatives=queue, symmetric=True, matryoshka_dims=[8, 16, 32],
                                                   backend="torch").backward())
    assert a.grad is not None and queue.grad is not None
    assert mode.largest < n * n // 4, f"{mode.op} produced {mode.largest} elements"
