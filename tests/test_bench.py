"""The benchmark suite (bench/) at tiny sizes on the CPU, so it cannot rot; the naive peers it
compares against, checked against fastcl; and pytest-benchmark microbenchmarks of the hot
public functions (``pytest tests/test_bench.py --benchmark-only`` prints their table).
"""

import io
import os
import subprocess
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import __main__ as cli  # noqa: E402
from bench import peers, plot, results  # noqa: E402
from bench.cases import CASES, Shape  # noqa: E402

# one thread in the worker: tiny ops stay fast when other jobs share the machine's cores
TINY = ["--device", "cpu", "--d", "8", "--target-s", "0.01", "--min-reps", "1", "--threads", "1"]


def _json(out_dir):
    (name,) = [f for f in os.listdir(out_dir) if f.endswith(".json")]
    return os.path.join(out_dir, name)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    cli.main(["quick", "--n", "32", "48", *TINY, "--out", str(out)])
    return results.load(_json(out)), out


def test_quick_writes_tagged_results(quick_run):
    data, out = quick_run
    meta, rows = data["meta"], data["rows"]
    assert meta["device"]["type"] == "cpu" and meta["device"]["name"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["fastcl"]
    assert meta["git_commit"] and len(meta["source_sha"]) == 12
    assert any(f.endswith(".csv") for f in os.listdir(out))
    fastcl_rows = [r for r in rows if r["impl"] == "fastcl"]
    assert {(r["loss"], r["n"]) for r in fastcl_rows} == {(l, n) for l in ("clip_loss", "siglip_loss") for n in (32, 48)}
    for r in fastcl_rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["pct_matmul"] > 0
        assert r["flops"] == 8 * r["n"] * r["n"] * r["d"]
        assert r["vs_fastcl"] == 1.0 and r["vs_naive"] > 0
        assert r["extra_mb"] is not None and r["peak_mb"] >= 0
        assert r["loss_rel_diff"] < 1e-5
    for r in rows:
        if r["impl"] == "open_clip":
            assert r["status"] == "ok" or "open_clip" in r["reason"], r
            if r["status"] == "ok":
                assert r["loss_rel_diff"] < 1e-5
        if r["impl"] == "inf_cl":
            assert r["status"] == "skipped" and r["reason"]
    assert {r["loss"] for r in rows if r["impl"] == "matmul" and r["status"] == "ok"} == {"matmul", "matmul_peak"}


def test_full_runs_every_loss_and_mode(tmp_path):
    cli.main(["full", "--losses", *CASES, "--n", "24", "--modes", "fwd", "fwd+bwd", "--backends", "torch", "triton",
              "--peers", "naive", "inf_cl", *TINY, "--out", str(tmp_path)])
    rows = results.load(_json(tmp_path))["rows"]
    for loss in CASES:
        for mode in ("fwd", "fwd+bwd"):
            group = {r["impl"] + str(r["backend"]): r for r in rows if r["loss"] == loss and r["mode"] == mode}
            assert group["fastcltorch"]["status"] == "ok", group["fastcltorch"]
            assert group["naiveNone"]["status"] == "ok", group["naiveNone"]
            assert group["fastcltorch"]["loss_rel_diff"] < 1e-5, (loss, mode)
            assert group["fastcltriton"]["status"] in ("ok", "skipped")
            assert group["inf_clNone"]["status"] == "skipped" and group["inf_clNone"]["reason"]


def test_maxbatch_stops_naive_at_the_memory_cap(tmp_path):
    # 40 MB: fastcl's tiles (a few pieces on worker threads, 2 MiB buffers each) fit with room to
    # spare at N = 2048; the materialised loss's 2048^2 logits and their gradients (~64 MB) do not
    cli.main(["maxbatch", "--start-n", "256", "--max-n", "2048", "--d", "8", "--mem-cap-gb", "0.04",
              "--backends", "torch", "--peers", "naive", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    data = results.load(_json(tmp_path))
    largest = {s["impl"]: s for s in data["meta"]["maxbatch"]}
    assert largest["fastcl"]["largest_n"] == 2048, largest
    assert largest["naive"]["largest_n"] is not None and largest["naive"]["largest_n"] < 2048, largest
    assert "cap" in largest["naive"]["stopped"]


def test_plot_draws_pngs(quick_run):
    pytest.importorskip("matplotlib")
    _, out = quick_run
    paths = plot.main([_json(out)])
    assert len(paths) == 2 and all(os.path.getsize(p) > 0 for p in paths)


def test_summary_table(quick_run):
    _, out = quick_run
    text = results.summary(_json(out))
    assert "clip_loss" in text and "x naive" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_gpu_visit_skips_cleanly_without_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_visit.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU stages skipped" in proc.stdout
    assert (tmp_path / "summary.txt").exists() and (tmp_path / "visit.log").exists()


def _visit(tmp_path, budget, *stages):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, VISIT_SMOKE="1",
               VISIT_BUDGET_S=str(budget), VISIT_RESULTS=str(tmp_path / "res"))
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_visit.sh"), *stages], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, tmp_path / "out"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_gpu_visit_smoke_runs_every_stage(tmp_path):
    """VISIT_SMOKE=1: every stage's plumbing at tiny sizes; results published, <= 8 files."""
    proc, out = _visit(tmp_path, 540)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert ("deadlines (s from start): tests=194 check=248 headline=345 second=388 sweep=464 maxbatch=491 "
            "sanitize=518 quick=529") in text
    for stage in ("tests", "check", "headline", "second", "sweep", "maxbatch", "sanitize", "quick"):
        assert f"stage {stage}: rc=0" in text, text
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and "results.tar.gz" in files, files
    names = subprocess.run(["tar", "tzf", str(out / "results.tar.gz")], capture_output=True, text=True).stdout
    assert "full_headline.json" in names and "full_sweep.json" in names and "maxbatch.json" in names
    assert "full_second.json" in names
    assert (out / "next_stages.txt").read_text().strip() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_gpu_visit_deadlines_cut_and_name_the_stages_left(tmp_path):
    proc, out = _visit(tmp_path, 10, "headline", "quick")
    text = proc.stdout + proc.stderr
    assert "deadlines (s from start): headline=6 quick=9" in text, text  # 64% and 98% of 10 s
    # a stage starts only with >= 10 s left: neither deadline leaves that, however fast the start
    assert "stage headline: not reached" in text and "stage quick: not reached" in text, text
    assert "quick" in (out / "next_stages.txt").read_text().split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_gpu_checks_skip_without_gpu(capsys):
    assert cli.main(["check"]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(CASES))
def test_naive_peer_matches_fastcl(name):
    """The bench compares like with like: the naive peer is the same loss (value and gradients)."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    inputs, leaves = case.make(13, 7, torch.float64, torch.device("cpu"), True, gen)
    want = peers.NAIVE[name](inputs)
    want_grads = torch.autograd.grad(want, leaves)
    got = case.fastcl(inputs, "torch")
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["clip_loss", "info_nce_queue", "info_nce_hardneg"])
def test_inf_cl_adapter_composes_the_same_loss(monkeypatch, name):
    """Inf-CL needs CUDA; a stand-in with its documented semantics (per-row LSE minus the positive
    logit, averaged) checks how the adapter feeds it: scale, both directions, queue, labels."""
    fake = types.ModuleType("inf_cl")

    def cal_inf_loss(q, k, labels=None, scale=None, head_dim=256):
        rows = torch.arange(q.shape[0])
        labels = rows if labels is None else labels
        logits = q @ k.T
        return (torch.logsumexp(logits, 1) - logits[rows, labels]).mean()

    fake.cal_inf_loss = cal_inf_loss
    monkeypatch.setitem(sys.modules, "inf_cl", fake)
    inputs, _ = CASES[name].make(11, 16, torch.float64, torch.device("cpu"), False, torch.Generator().manual_seed(3))
    got = peers.make("inf_cl", name, 16)(inputs)
    torch.testing.assert_close(got, peers.NAIVE[name](inputs))


def _round_rows(fastcl_ms, peer_ms):
    base = dict(loss="clip_loss", n=64, d=8, dtype="float32", mode="fwd+bwd", device="cpu", status="ok",
                extra_mb=1.0)
    rows = [dict(base, impl="fastcl", backend="torch", median_ms=sorted(fastcl_ms)[1], round_ms=fastcl_ms),
            dict(base, impl="open_clip", backend=None, median_ms=sorted(peer_ms)[1], round_ms=peer_ms)]
    results.derive(rows)
    return rows


def test_headline_is_a_range_when_rounds_disagree():
    """Interleaved rounds that disagree (a busy machine) give a range, steady ones one ratio."""
    steady = results.headlines(_round_rows([10.0, 10.2, 9.9], [20.0, 20.1, 19.8]))
    assert len(steady) == 1 and "0.50x open_clip's time" in steady[0] and "rounds" not in steady[0]
    unsteady = results.headlines(_round_rows([10.0, 30.0, 10.0], [20.0, 20.0, 40.0]))
    assert "0.25x to 1.50x open_clip's time over 3 rounds (unsteady" in unsteady[0], unsteady
    busy = results.headlines(_round_rows([10.0, 10.2, 9.9], [20.0, 20.1, 19.8]), busy=True)
    assert "to" in busy[0] and "over 3 rounds" in busy[0], busy


def test_quick_interleaves_three_rounds_by_default(quick_run):
    data, _ = quick_run
    fastcl_rows = [r for r in data["rows"] if r["impl"] == "fastcl"]
    assert fastcl_rows and all(r.get("rounds") == 3 for r in fastcl_rows), fastcl_rows[:1]


def test_flop_count_is_design_section_7():
    assert Shape(5, 5, 5).flops(3, backward=True) == 8 * 5 * 5 * 3
    assert Shape(5, 5, 5).flops(3, backward=False) == 2 * 5 * 5 * 3
    assert Shape(4, 8, 4).flops(3, backward=True) == 3 * 2 * 4 * 8 * 3 + 2 * 4 * 4 * 3  # queue: no dK on it


def test_peer_skip_reasons():
    cpu = torch.device("cpu")
    assert peers.unavailable("naive", "supcon", cpu, 64) is None
    assert "open_clip has no" in peers.unavailable("open_clip", "supcon", cpu, 64)
    assert "CUDA" in peers.unavailable("inf_cl", "clip_loss", cpu, 64)
    assert peers.inf_cl_head_dim(768) == 256 and peers.inf_cl_head_dim(384) == 128
    assert peers.inf_cl_head_dim(100) is None
    assert "siglip_loss only" in peers.unavailable("siglip_kernel", "clip_loss", cpu, 64)
    assert "CUDA only" in peers.unavailable("siglip_kernel", "siglip_loss", cpu, 64)
    assert "clip_loss only" in peers.unavailable("memeff", "siglip_loss", cpu, 64)
    assert "CUDA only" in peers.unavailable("memeff", "clip_loss", cpu, 64)


def test_fused_peers_are_called_as_their_readmes_say(monkeypatch):
    """The adapters pass what each package documents: siglip-kernel a log temperature that keeps
    the scale's gradient, memeff a float temperature 1/scale with stable=False on unit rows."""
    seen = {}

    def fused_siglip_loss(img, txt, log_temp, bias):
        seen["siglip"] = (img, txt, log_temp, bias)
        return (log_temp + bias).sum()

    class MemoryEfficientCLIPLoss:
        def __init__(self, **kw):
            seen["memeff"] = kw

        def __call__(self, x, y):
            return (x * y).sum()

    monkeypatch.setitem(sys.modules, "siglip_kernel", types.SimpleNamespace(fused_siglip_loss=fused_siglip_loss))
    monkeypatch.setitem(sys.modules, "memeff", types.SimpleNamespace(MemoryEfficientCLIPLoss=MemoryEfficientCLIPLoss))
    scale = torch.tensor(10.0, requires_grad=True)
    x, y, bias = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-10.0)
    peers.make("siglip_kernel", "siglip_loss", 3)(dict(x=x, y=y, scale=scale, bias=bias)).backward()
    assert torch.allclose(seen["siglip"][2], torch.log(scale)) and scale.grad is not None
    peers.make("memeff", "clip_loss", 3)(dict(x=x, y=y, scale=torch.tensor(1 / 0.07)))
    assert seen["memeff"] == dict(temperature=pytest.approx(0.07), normalized_inputs=True, stable=False)


def test_no_torch_backend_rows_at_large_n_on_a_gpu():
    from bench import worker

    def spec(n, backend):
        return dict(impl="fastcl", loss="clip_loss", backend=backend, n=n, d=768)

    gpu = torch.device("cuda")
    assert "not run on a GPU above N=65536" in worker._skip_reason(spec(65537, "torch"), gpu)
    assert worker._skip_reason(spec(65536, "torch"), gpu) == ""
    assert worker._skip_reason(spec(262144, "torch"), torch.device("cpu")) == ""


def test_backend_names_can_force_the_gradient_pass(monkeypatch):
    """``triton:chunked`` is a known backend name; a row with it runs under FASTCL_BACKWARD=chunked,
    and the next plain row under the variable as the worker got it."""
    from bench import runner, worker

    runner.check_names(backends=["triton:chunked", "torch:fused", "cuda", "auto"])
    with pytest.raises(SystemExit, match="triton:bogus"):
        runner.check_names(backends=["triton:bogus"])
    monkeypatch.delenv("FASTCL_BACKWARD", raising=False)
    monkeypatch.setattr(worker, "_BACKWARD_AS_GIVEN", None)
    assert worker._force_pass("torch:chunked") == "torch" and os.environ["FASTCL_BACKWARD"] == "chunked"
    assert worker._force_pass("torch") == "torch" and "FASTCL_BACKWARD" not in os.environ
    assert "not run on a GPU" in worker._skip_reason(dict(impl="fastcl", loss="clip_loss", backend="torch:fused",
                                                          n=262144, d=768), torch.device("cuda"))


def test_worker_exits_after_a_cuda_error(monkeypatch, capsys):
    from bench import worker

    gpu = torch.device("cuda")
    assert worker._is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"), gpu)
    assert not worker._is_device_fault(torch.cuda.OutOfMemoryError("CUDA out of memory"), gpu)
    assert not worker._is_device_fault(RuntimeError("CUDA error: launch failure"), torch.device("cpu"))
    assert not worker._is_device_fault(ValueError("bad shape"), gpu)

    rows = []

    def fake_row(spec):
        rows.append(spec)
        return {"status": "error", "reason": "CUDA error, worker exits: ...", "fatal": spec["i"] == 0}

    monkeypatch.setattr(worker, "run_row", fake_row)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"i": 0}\n{"i": 1}\n'))
    with pytest.raises(SystemExit):
        worker.main()
    assert rows == [{"i": 0}]  # the second row never ran in the poisoned process
    assert capsys.readouterr().out.count(worker.MARK) == 1  # and the first one's result was written


def test_driver_restarts_the_worker_after_a_fatal_row():
    """The row after a CUDA error runs in a fresh worker, not in the exiting one ("crashed")."""
    from bench import runner, worker

    fake = (f"import sys, json; sys.stdin.readline(); "
            f"print({worker.MARK!r} + json.dumps(dict(status='error', fatal=True)), flush=True); sys.exit(3)")

    class FakeWorker(runner.Worker):
        starts = 0

        def _start(self):
            FakeWorker.starts += 1
            self.proc = subprocess.Popen([sys.executable, "-c", fake], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         bufsize=0)
            self._buf = b""

    w = FakeWorker()
    try:
        assert [w.run({}, timeout=60)["status"] for _ in range(3)] == ["error"] * 3
    finally:
        w.close()
    assert FakeWorker.starts == 3


# --- microbenchmarks of the hot functions (small sizes; pytest-benchmark) -----------------

@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss", "info_nce_labels", "nt_xent"])
def test_microbench_forward_backward(benchmark, one_thread, name):
    case = CASES[name]
    inputs, leaves = case.make(256, 64, torch.float32, torch.device("cpu"), True, torch.Generator().manual_seed(0))

    def step():
        for t in leaves:
            t.grad = None
        case.fastcl(inputs, "torch").backward()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert all(t.grad is not None for t in leaves)


def test_microbench_clip_forward(benchmark, one_thread):
    case = CASES["clip_loss"]
    inputs, _ = case.make(512, 64, torch.float32, torch.device("cpu"), False, torch.Generator().manual_seed(0))
    value = benchmark.pedantic(lambda: case.fastcl(inputs, "torch"), rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(value)
