"""fastcl.compat under several processes against the host libraries' own distributed code, on
gloo ranks on CPU.

One launch per world size runs every case (process start-up and the host imports dominate the
cost) and writes a JSON report per rank that the tests below read. Each rank builds the same
global float64 batch, takes its (equal) shard, runs the host loss and the compat loss on it,
backpropagates both, and records: the per-rank loss, each rank's gradient of its own features
(open_clip's, lightly's and sentence-transformers' gathers sum the gradient over ranks, as
fastcl's does, so these agree rank by rank), and the sum over ranks of the gradient of a
replicated scalar (logit scale, bias: what DDP averages).

Run one world size by hand: ``python tests/test_compat_distributed.py RANK WORLD OUTDIR`` per rank
(the ranks meet through a file store in OUTDIR, so no TCP port can collide with other jobs).
"""

import importlib.util
import json
import os
import sys
import tempfile
import traceback
from datetime import timedelta
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from spawn import leave, run_ranks

RTOL = 1e-10
LAUNCH_TIMEOUT_S = 240
# open_clip's loss file is cheap to load: it also runs at W = 3 and 4; everything runs at W = 2
WORLDS = {2: None, 3: ("open_clip",), 4: ("open_clip",)}


def _unit(g, n, d):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _leaves(tensors):
    return {k: v.detach().clone().requires_grad_(v.dtype.is_floating_point) for k, v in tensors.items()}


def _compare(rank, world, host_call, compat_call, local, shared):
    """Run both on fresh leaves of ``local`` (this rank's features) and ``shared`` (replicated
    scalars); return [(quantity, max |err|, max |reference|)]."""
    a_loc, a_sh = _leaves(local), _leaves(shared)
    b_loc, b_sh = _leaves(local), _leaves(shared)
    want = host_call(**a_loc, **a_sh)
    got = compat_call(**b_loc, **b_sh)
    want.backward()
    got.backward()
    rows = [("loss", (got - want).abs().item(), want.abs().item())]
    for k in local:
        rows.append((f"d{k}", (b_loc[k].grad - a_loc[k].grad).abs().max().item(), a_loc[k].grad.abs().max().item()))
    for k in shared:
        pair = torch.stack([a_sh[k].grad.reshape(-1), b_sh[k].grad.reshape(-1)])
        torch.distributed.all_reduce(pair)
        rows.append((f"sum_ranks_d{k}", (pair[1] - pair[0]).abs().max().item(), pair[0].abs().max().item()))
    return rows


def _shard(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


# ----------------------------------------------------------------------------------------------
# Cases: case(rank, world, g) -> rows


def _open_clip_loss():
    """open_clip's ``loss.py`` loaded on its own: it needs only torch, while ``import open_clip``
    pulls in timm and torchvision, seconds per rank."""
    name = "_open_clip_loss_py"
    if name not in sys.modules:
        root = importlib.util.find_spec("open_clip").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "loss.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def case_open_clip_clip(rank, world, g, gather_with_grad, local_loss, bias):
    from fastcl.compat import open_clip as compat
    host = _open_clip_loss()
    b, d = 4, 6
    local = {"image_features": _shard(_unit(g, b * world, d), rank, world),
             "text_features": _shard(_unit(g, b * world, d), rank, world)}
    shared = {"logit_scale": torch.tensor(9.0, dtype=torch.float64)}
    if bias:
        shared["logit_bias"] = torch.tensor(-1.5, dtype=torch.float64)
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
    return _compare(rank, world, host.ClipLoss(**kw), compat.ClipLoss(**kw), local, shared)


def case_open_clip_distill(rank, world, g, gather_with_grad, local_loss):
    """DistillClipLoss: contrastive + 0.7 distill, so every gradient (the teacher's too) checks both."""
    from fastcl.compat import open_clip as compat
    host = _open_clip_loss()
    b = 4
    local = {k: _shard(_unit(g, b * world, d), rank, world) for k, d in (
        ("image_features", 6), ("text_features", 6), ("dist_image_features", 5), ("dist_text_features", 5))}
    shared = {"logit_scale": torch.tensor(9.0, dtype=torch.float64),
              "dist_logit_scale": torch.tensor(14.0, dtype=torch.float64)}
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)

    def combined(loss):
        return lambda **x: (lambda c, d: c + 0.7 * d)(*loss(**x))
    return _compare(rank, world, combined(host.DistillClipLoss(**kw)), combined(compat.DistillClipLoss(**kw)), local,
                    shared)


def case_open_clip_siglip(rank, world, g, dist_impl):
    from fastcl.compat import open_clip as compat
    host = _open_clip_loss()
    b, d = 3, 5
    local = {"image_features": _shard(_unit(g, b * world, d), rank, world),
             "text_features": _shard(_unit(g, b * world, d), rank, world)}
    shared = {"logit_scale": torch.tensor(10.0, dtype=torch.float64),
              "logit_bias": torch.tensor(-4.0, dtype=torch.float64)}
    kw = dict(rank=rank, world_size=world, dist_impl=dist_impl)
    return _compare(rank, world, host.SigLipLoss(**kw), compat.SigLipLoss(**kw), local, shared)


def _views(g, rank, world, b=4, d=6):
    return {"out0": _shard(torch.randn(b * world, d, generator=g, dtype=torch.float64), rank, world),
            "out1": _shard(torch.randn(b * world, d, generator=g, dtype=torch.float64), rank, world)}


def case_lightly(rank, world, g, cls, **kwargs):
    import lightly.loss as host

    from fastcl.compat import lightly as compat
    kwargs["gather_distributed"] = True
    return _compare(rank, world, getattr(host, cls)(**kwargs), getattr(compat, cls)(**kwargs), _views(g, rank, world),
                    {})


def _sq_distance(a, b):
    return torch.sum((a - b) ** 2, dim=1)


def case_lightly_bank(rank, world, g):
    """MoCo mode with gather_distributed: local loss, every rank's keys enqueued."""
    import lightly.loss as host

    from fastcl.compat import lightly as compat
    torch.manual_seed(7)
    h = host.NTXentLoss(0.3, memory_bank_size=(10, 6), gather_distributed=True).double()
    torch.manual_seed(7)
    c = compat.NTXentLoss(0.3, memory_bank_size=(10, 6), gather_distributed=True).double()
    rows = []
    for _ in range(3):
        rows += _compare(rank, world, h, c, _views(g, rank, world, b=3), {})
    rows.append(("bank", (h.memory_bank.bank - c.memory_bank.bank).abs().max().item(), 1.0))
    rows.append(("bank_ptr", float(int(h.memory_bank.bank_ptr) != int(c.memory_bank.bank_ptr)), 1.0))
    return rows


def case_st(rank, world, g, n_columns, symmetric):
    from sentence_transformers.sentence_transformer import losses as host

    from fastcl.compat import sentence_transformers as compat
    b, d = 3, 5
    cols = {f"c{i}": _shard(torch.randn(b * world, d, generator=g, dtype=torch.float64), rank, world)
            for i in range(n_columns)}
    kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    h = host.MultipleNegativesRankingLoss(None, gather_across_devices=True, **kw)
    c = compat.MultipleNegativesRankingLoss(None, gather_across_devices=True, **kw)
    return _compare(rank, world, lambda **x: h.compute_loss_from_embeddings(list(x.values()), None),
                    lambda **x: c.compute_loss_from_embeddings(list(x.values()), None), cols, {})


CASES = {
    **{f"open_clip.ClipLoss[gather_with_grad={gw},local_loss={ll},bias={bias}]":
       ("open_clip", partial(case_open_clip_clip, gather_with_grad=gw, local_loss=ll, bias=bias))
       for gw in (True, False) for ll in (False, True) for bias in (False, True)},
    **{f"open_clip.DistillClipLoss[gather_with_grad={gw},local_loss={ll}]":
       ("open_clip", partial(case_open_clip_distill, gather_with_grad=gw, local_loss=ll))
       for gw in (True, False) for ll in (False, True)},
    **{f"open_clip.SigLipLoss[{impl}]": ("open_clip", partial(case_open_clip_siglip, dist_impl=impl))
       for impl in ("bidir", "shift", "reduce", "gather")},
    "lightly.NTXentLoss": ("lightly", partial(case_lightly, cls="NTXentLoss", temperature=0.2)),
    "lightly.NTXentLoss[memory_bank]": ("lightly", case_lightly_bank),
    "lightly.DCLLoss": ("lightly", partial(case_lightly, cls="DCLLoss", temperature=0.3)),
    "lightly.DCLWLoss": ("lightly", partial(case_lightly, cls="DCLWLoss", temperature=0.3, sigma=0.4)),
    "lightly.DCLLoss[weight_fn]": ("lightly", partial(case_lightly, cls="DCLLoss", weight_fn=_sq_distance)),
    "sentence_transformers.MNRL[3 columns]": ("sentence_transformers", partial(case_st, n_columns=3,
                                                                                symmetric=False)),
    "sentence_transformers.MNRL[symmetric, 3 columns]": ("sentence_transformers",
                                                         partial(case_st, n_columns=3, symmetric=True)),
}


def _available(lib):
    return importlib.util.find_spec(lib) is not None


def _worker(rank: int, world: int, outdir: str) -> None:
    store = os.path.join(outdir, f"store_{world}")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=180))
    libs = WORLDS[world]
    report = {}
    for i, (name, (lib, case)) in enumerate(CASES.items()):
        if (libs is not None and lib not in libs) or not _available(lib):
            continue
        g = torch.Generator().manual_seed(1000 + i)
        try:
            report[name] = case(rank, world, g)
        except Exception:
            report[name] = traceback.format_exc()
        torch.distributed.barrier()
    with open(os.path.join(outdir, f"report_{world}_{rank}.json"), "w") as f:
        json.dump(report, f)
    leave()


def _launch(world: int, outdir: str) -> list:
    paths = [os.path.join(outdir, f"report_{world}_{r}.json") for r in range(world)]
    run_ranks(__file__, world, [outdir], {"TOKENIZERS_PARALLELISM": "false"}, LAUNCH_TIMEOUT_S, paths)
    reports = []
    for x in paths:
        with open(x) as f:
            reports.append(json.load(f))
    return reports


_REPORTS = {}


def _reports(world):
    if world not in _REPORTS:
        with tempfile.TemporaryDirectory() as outdir:
            _REPORTS[world] = _launch(world, outdir)
    return _REPORTS[world]


def _needs_group():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


PARAMS = [(w, name) for w, libs in WORLDS.items() for name, (lib, _) in CASES.items()
          if libs is None or lib in libs]


@pytest.mark.parametrize("world, name", PARAMS, ids=[f"W{w}-{n}" for w, n in PARAMS])
def test_matches_host_across_ranks(world, name):
    _needs_group()
    lib = CASES[name][0]
    if not _available(lib):
        pytest.skip(f"{lib} is not installed")
    for rank, report in enumerate(_reports(world)):
        rows = report[name]
        assert not isinstance(rows, str), f"rank {rank} raised:\n{rows}"
        for quantity, err, scale in rows:
            assert err <= RTOL * max(scale, 1.0), f"rank {rank}: {quantity}: |err| {err:.3e} (scale {scale:.3e})"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
