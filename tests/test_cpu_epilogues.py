"""The compiled CPU tile epilogues (``fastcl._cpu``, ``csrc/cpu``): each kernel against its
definition evaluated in float64 (random tiles of odd sizes, strided rows, the exp's whole range
and its special values), their argument checks, and the torch backend's Matryoshka one sweep
with them against the float64 oracle, checked to have called them.

CI builds the extension (``.ci/run`` asserts ``build_info()["cpu_extension"]``); a build without
a C++ compiler skips this file, saying so.
"""

import oracle
import pytest
import torch
from helpers import check_against_oracle

import fastcl
from fastcl.backends import _cpu_epilogues

ext = _cpu_epilogues.module()
pytestmark = pytest.mark.skipif(ext is None, reason=f"fastcl._cpu is not built: {_cpu_epilogues.NOT_BUILT_BECAUSE}")


def _strided(rows, cols, pad=5):
    """A ``rows x cols`` float32 tile whose rows lie ``cols + pad`` apart (a view into a wider one)."""
    return torch.randn(rows, cols + pad)[:, :cols]


def test_exp_over_its_range():
    """One value per row: ``exp(x)`` within 3e-7 relative over the normal float range, 0 below
    2**-125 (the documented flush), +inf above ln(FLT_MAX) and for +inf, 0 for -inf, NaN for NaN."""
    x = torch.cat([torch.linspace(-86.5, 88.7, 100003), torch.tensor([0.0, -1e-30, 1e-30])])
    one = torch.ones(1)
    got = ext.exp_row_sums(x[:, None].contiguous(), one, torch.zeros(len(x)), torch.ones(len(x))).double()
    want = torch.exp(x.double())
    assert ((got - want) / want).abs().max() < 3e-7
    special = torch.tensor([-87.0, -200.0, -float("inf"), 88.73, 1e30, float("inf"), float("nan")])
    got = ext.exp_row_sums(special[:, None].contiguous(), one, torch.zeros(7), torch.ones(7))
    assert got[:3].eq(0).all() and got[3:6].eq(float("inf")).all() and got[6].isnan()


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 15), (33, 17), (64, 130)])
def test_exp_row_sums_matches_its_definition(rows, cols):
    prod = _strided(rows, cols)
    col_scale, row_scale = torch.rand(cols) + 0.5, torch.rand(rows) * 4 + 1
    shift = -torch.rand(rows) * 3
    got = ext.exp_row_sums(prod, col_scale, shift, row_scale)
    d = {k: v.double() for k, v in dict(p=prod, c=col_scale, s=row_scale, h=shift).items()}
    want = torch.exp(d["s"][:, None] * (d["c"][None, :] * d["p"] + d["h"][:, None])).sum(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


def _grad_reference(prods, col_scale, row_scale, gamma, sign, coef, pos):
    """``prefix_logit_grads``'s definition (csrc/cpu/tile_epilogues.h) in float64."""
    n_pre, (rows, cols) = len(prods), prods[0].shape
    d_row, d_col = torch.zeros(n_pre, rows, dtype=torch.float64), torch.zeros(n_pre, cols, dtype=torch.float64)
    h, out = torch.zeros(rows, cols, dtype=torch.float64), [None] * n_pre
    hit = (pos >= 0).nonzero()[:, 0]
    for p in reversed(range(n_pre)):
        x = prods[p].double()
        g = torch.exp(row_scale[p, :, None].double() * (col_scale[p].double() * x + gamma[p, :, None].double()))
        g = g * (1.0 if sign is None else sign[p, :, None].double())
        g[hit, pos[hit]] -= coef[p, hit].double()
        d_row[p] = (g * x) @ col_scale[p].double()
        d_col[p] = (g * x).sum(dim=0)
        h = h + g * col_scale[p].double()
        out[p] = h
    return out, d_row, d_col


@pytest.mark.parametrize("n_pre, rows, cols, signed", [(1, 5, 9, False), (3, 17, 33, True), (4, 40, 129, False)])
def test_prefix_logit_grads_match_their_definition(n_pre, rows, cols, signed):
    """Every prefix's summed tile ``H^p`` (written over the products), row sums and column sums,
    with some rows' positive in the tile, some outside (-1), optional row signs; the sums are
    accumulated onto what the output arrays held."""
    base = torch.empty(rows, cols + 3)  # every prefix's tile shares one stride
    prods = [torch.randn_like(base)[:, :cols] for _ in range(n_pre)]
    col_scale, row_scale = torch.rand(n_pre, cols) + 0.5, torch.rand(n_pre, rows) * 4 + 1
    gamma = -torch.rand(n_pre, rows) * 2 - 1
    sign = torch.where(torch.rand(n_pre, rows) < 0.5, -1.0, 1.0) if signed else None
    coef = torch.rand(n_pre, rows)
    pos = torch.randint(-1, cols, (rows,))
    pos[0] = -1
    want_h, want_row, want_col = _grad_reference(prods, col_scale, row_scale, gamma, sign, coef, pos)
    start_row, start_col = torch.randn(n_pre, rows), torch.randn(n_pre, cols)
    d_row, d_col = start_row.clone(), start_col.clone()
    ext.prefix_logit_grads(prods, col_scale, row_scale, gamma, sign, coef, pos, d_row, d_col)
    for p in range(n_pre):
        torch.testing.assert_close(prods[p].double(), want_h[p], rtol=1e-5, atol=1e-5 * float(want_h[p].abs().max()))
    torch.testing.assert_close((d_row - start_row).double(), want_row, rtol=1e-4, atol=1e-5 * float(want_row.abs().max()))
    torch.testing.assert_close((d_col - start_col).double(), want_col, rtol=1e-4, atol=1e-5 * float(want_col.abs().max()))


def test_bad_arguments_raise():
    prod, vec = torch.randn(4, 6), torch.ones(6)
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        ext.exp_row_sums(prod.double(), vec, torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="unit column stride"):
        ext.exp_row_sums(torch.randn(6, 4).T, vec, torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="col_scale"):
        ext.exp_row_sums(prod, torch.ones(5), torch.ones(4), torch.ones(4))
    args = dict(col_scale=torch.ones(1, 6), row_scale=torch.ones(1, 4), gamma=torch.ones(1, 4), sign=None,
                coef=torch.ones(1, 4), pos=torch.full((4,), -1), d_row=torch.zeros(1, 4), d_col=torch.zeros(1, 6))
    with pytest.raises(RuntimeError, match="outside the tile"):
        ext.prefix_logit_grads([prod], **{**args, "pos": torch.tensor([0, 1, 6, -1])})
    with pytest.raises(RuntimeError, match="one shape and stride"):
        ext.prefix_logit_grads([prod, torch.randn(4, 5)], **args)
    with pytest.raises(RuntimeError, match="per-prefix row vector"):
        ext.prefix_logit_grads([prod], **{**args, "gamma": torch.ones(4)})


def _spy(monkeypatch):
    """Count the torch backend's calls into the compiled epilogues."""
    calls = {"exp_row_sums": 0, "prefix_logit_grads": 0}

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls[name] += 1
                return getattr(ext, name)(*args)
            return call

    monkeypatch.setattr(_cpu_epilogues, "module", lambda: Spy())
    return calls


# name -> N, M (keys), K (queue), D, dims, weights, options, temperature, tile
CASES = {
    "diagonal_many_tiles": dict(n=37, m=37, k=0, d=29, dims=[3, 10, 29], t=0.1, tile="8,11"),
    "hard_negatives_weighted": dict(n=9, m=27, k=0, d=20, dims=[20, 4, 11], weights=[1.0, -0.5, 2.0], t=0.2,
                                    tile="4,10", positive_index=lambda n: torch.arange(n) * 3),
    "queue_without_grad": dict(n=14, m=14, k=19, d=16, dims=[5, 16], t=0.05, tile="5,7", queue_grad=False),
    # unrelated keys: a cold loss that float32 can resolve (near positives would drive it to ~0),
    # whose shifted sums fall below the floor (the forward redoes those tiles exactly)
    "cold_temperature": dict(n=20, m=20, k=0, d=24, dims=[6, 12, 24], t=0.005, tile="6,9", unrelated=True),
    "one_tile": dict(n=30, m=30, k=6, d=12, dims=[1, 4, 12], t=0.1, tile=None),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_sweep_with_compiled_epilogues_against_the_oracle(case, reduction, monkeypatch):
    cfg = CASES[case]
    monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    if cfg["tile"]:
        monkeypatch.setenv("FASTCL_TORCH_BLOCK", cfg["tile"])
    calls = _spy(monkeypatch)
    n, m, k, d = cfg["n"], cfg["m"], cfg["k"], cfg["d"]
    # rows of uneven norms with a positive close to each query (the forward's shifted sums hold)
    query = torch.randn(n, d, dtype=torch.float64) * (torch.rand(n, 1, dtype=torch.float64) + 0.5)
    key = torch.randn(m, d, dtype=torch.float64)
    opts = {}
    if "positive_index" in cfg:
        opts["positive_index"] = cfg["positive_index"](n)
    pos = opts.get("positive_index", torch.arange(n))
    if not cfg.get("unrelated"):
        key[pos] = query + torch.randn(n, d, dtype=torch.float64)
    inputs = {"query": query, "key": key, "temperature": torch.tensor(cfg["t"], dtype=torch.float64)}
    if k:
        inputs["negatives"] = torch.randn(k, d, dtype=torch.float64)
    names = [x for x in inputs if x != "negatives" or cfg.get("queue_grad", True)]
    dims, weights = cfg["dims"], cfg.get("weights")
    floor = max(float(1 / inputs[x][:, :dd].norm(dim=1).min()) for x in ("query", "key") for dd in dims) / cfg["t"]
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, **opts, matryoshka_dims=dims, matryoshka_weights=weights,
                                     reduction=reduction, backend="torch"),
        lambda **kw: oracle.matryoshka(lambda **c: oracle.info_nce(**c, **opts, reduction=reduction), dims,
                                       weights, **kw),
        inputs, torch.float32, differentiable=names, grad_floor=floor)
    assert calls["exp_row_sums"] > 0 and calls["prefix_logit_grads"] > 0, calls


def test_masks_and_float64_take_the_pytorch_form(monkeypatch):
    """What the kernels do not cover (a masked entry, label positives, float64) never reaches them."""
    monkeypatch.setenv("FASTCL_PREFIXES", "fused")
    calls = _spy(monkeypatch)
    q, k = torch.randn(12, 8), torch.randn(12, 8)
    shifted = (torch.arange(12) + 1) % 12
    for dtype, opts in ((torch.float32, {"exclude_self": True, "positive_index": shifted}),
                        (torch.float32, {"decoupled": True}),
                        (torch.float32, {"labels": torch.arange(12) % 3}), (torch.float64, {})):
        qq = q.to(dtype).requires_grad_()
        fastcl.info_nce(qq, k.to(dtype), matryoshka_dims=[4, 8], backend="torch", **opts).backward()
    assert calls == {"exp_row_sums": 0, "prefix_logit_grads": 0}


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("FASTCL_CPU_EPILOGUES", "0")
    assert _cpu_epilogues.module() is None
    monkeypatch.setenv("FASTCL_CPU_EPILOGUES", "yes")
    with pytest.raises(ValueError, match="FASTCL_CPU_EPILOGUES"):
        _cpu_epilogues.module()
