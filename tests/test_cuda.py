"""The CUDA backend (``fastcl._C``, ``csrc/``): build, host-side checks, dispatch, and on a GPU
the variant matrix and tile-boundary cases.

On a machine without a GPU (CI): the extension's host checks fire on CPU tensors before any
launch, ``build_info`` reports the extension, and ``backend="cuda"`` explains why it cannot run.
With ``FASTCL_EXPECT_CUDA_EXTENSION=1`` a missing extension fails instead of skipping.

On any machine: the kernels themselves run on CPU threads (``csrc/testing/emulate.h``: blocks as
std::threads, barriers, warp shuffles, a model of WMMA fragments) against a float64 reference of
their contract, every configuration (fp16, bf16, tf32, fp32, fp64) and mode, with tails in N, C
and D, D-chunk loops and splits (``csrc/testing/check_tile_kernels.cpp``). And the Python half of the backend (``fastcl/backends/cuda.py``: one-hot positive
terms, bias, validity, d(scale), split merging) runs the whole variant matrix of
``tests/test_losses.py`` on CPU against the oracle, with ``fastcl._C`` replaced by
:class:`ReferenceC`, a materialised PyTorch model of the kernels' contract (``csrc/ops.h``).

On a GPU: ``pytest tests/test_cuda.py`` runs the direct tests below and, in a subprocess,
``tests/test_losses.py`` with ``FASTCL_TEST_BACKEND=cuda FASTCL_TEST_DEVICE=cuda`` (that needs the
oracle and helpers to build their tensors on ``FASTCL_TEST_DEVICE`` too).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl._dispatch import unavailable_reason
from helpers import RTOL, assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class ReferenceC:
    """The contract of fastcl._C's kernels (csrc/ops.h), materialised in PyTorch: what each entry
    point returns, entry by entry. Test-only (it builds N x C matrices)."""

    @staticmethod
    def built_with_cuda():
        return True

    @staticmethod
    def cuda_archs():
        return ["80", "90"]

    @staticmethod
    def _tile(query, key, scale_rows, positive_index, row_labels, col_labels, col_has_label, exclude_self, decoupled):
        cd = scale_rows.dtype
        s = (query.to(cd) @ key.to(cd).T) * scale_rows[:, None]
        n, c = s.shape
        i = torch.arange(n, device=s.device)[:, None]
        j = torch.arange(c, device=s.device)[None, :]
        excluded = (i == j) & exclude_self
        if row_labels is not None:
            match = (row_labels[:, None] == col_labels[None, :]) & ~excluded
            if col_has_label is not None:
                match &= col_has_label[None, :]
            positive = match
        else:
            match = torch.zeros_like(excluded)
            positive = (j == positive_index[:, None]) if positive_index is not None else match
        in_den = ~excluded & ~(positive & decoupled)
        return s, match, in_den

    @staticmethod
    def softmax_stats(query, key, scale_rows, positive_index=None, row_labels=None, col_labels=None,
                      col_has_label=None, own_rows=True, exclude_self=False, decoupled=False, allow_tf32=False,
                      n_split=0):
        s, match, in_den = ReferenceC._tile(query, key, scale_rows, positive_index, row_labels, col_labels,
                                            col_has_label, exclude_self, decoupled)
        lse = torch.where(in_den, s, float("-inf")).logsumexp(dim=1 if own_rows else 0)
        empty = s.new_empty(0)
        if row_labels is None or not own_rows:
            return lse, empty, empty
        return lse, torch.where(match, s, 0).sum(1), match.sum(1).to(s.dtype)

    @staticmethod
    def softmax_grad(query, key, scale_rows, positive_index, row_labels, col_labels, col_has_label, lse_row, w_row,
                     coef_row, lse_col, w_col, own_rows, n_own, exclude_self, decoupled, allow_tf32=False,
                     n_split=0):
        s, match, in_den = ReferenceC._tile(query, key, scale_rows, positive_index, row_labels, col_labels,
                                            col_has_label, exclude_self, decoupled)
        g = torch.where(in_den & (w_row[:, None] != 0), w_row[:, None] * (s - lse_row[:, None]).exp(), 0)
        if lse_col is not None:
            g = g + torch.where(in_den & (w_col[None, :] != 0), w_col[None, :] * (s - lse_col[None, :]).exp(), 0)
        if coef_row is not None:
            positive = match if row_labels is not None else (
                torch.arange(s.shape[1], device=s.device)[None, :] == positive_index[:, None])
            g = g - positive * coef_row[:, None]
        if own_rows:
            return g @ key.to(s.dtype)
        return ((g * scale_rows[:, None]).T @ query.to(s.dtype))[:n_own]

    @staticmethod
    def sigmoid_pass(query, key, scale_rows, positive_index, bias, own_rows, n_own, accumulate, allow_tf32=False,
                     n_split=0):
        cd = scale_rows.dtype
        logits = (query.to(cd) @ key.to(cd).T) * scale_rows[:, None]
        if bias is not None:
            logits = logits + bias.reshape(())
        positive = torch.arange(logits.shape[1])[None, :] == positive_index[:, None]
        g = logits.sigmoid() - positive.to(cd)
        empty = logits.new_empty(0)
        acc = empty
        if accumulate:
            acc = g @ key.to(cd) if own_rows else ((g * scale_rows[:, None]).T @ query.to(cd))[:n_own]
        if not own_rows:
            return acc, empty, empty
        return acc, F.softplus(torch.where(positive, -logits, logits)).sum(1), g.sum(1)


def _stand_in(module):
    """Make ``module`` fastcl._C for this process and let the CUDA backend take CPU tensors."""
    import fastcl.backends.cuda as cuda_backend

    sys.modules["fastcl._C"] = module
    fastcl._C = module
    cuda_backend.available = lambda device: None


# Loaded as a plugin (-p test_cuda) by the subprocess tests below, the backend runs on CPU
# tensors with a stand-in for the compiled kernels: ReferenceC, or the real host glue and kernel
# code built for CPU threads (FASTCL_CUDA_EMULATED = path of that module).
if os.environ.get("FASTCL_CUDA_REFERENCE") == "1":
    _stand_in(ReferenceC)
elif os.environ.get("FASTCL_CUDA_EMULATED"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location("fastcl_emulated_C", os.environ["FASTCL_CUDA_EMULATED"])
    _emulated = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_emulated)
    _stand_in(_emulated)

try:
    from fastcl import _C
except ImportError as exc:  # not built (FASTCL_BUILD_CUDA=0, no nvcc, CPU-only torch)
    _C, _C_ERROR = None, str(exc)
else:
    _C_ERROR = None

EXPECT_EXTENSION = os.environ.get("FASTCL_EXPECT_CUDA_EXTENSION") == "1"
GPU = torch.cuda.is_available() and _C is not None and unavailable_reason("cuda", torch.device("cuda")) is None
# the kernel tests below run on a GPU, or on CPU tensors inside the emulated-extension subprocess
EMULATED = bool(os.environ.get("FASTCL_CUDA_EMULATED"))
KERNEL_DEVICE = "cpu" if EMULATED else "cuda"

needs_ext = pytest.mark.skipif(_C is None and not EXPECT_EXTENSION,
                               reason=f"fastcl._C is not built ({_C_ERROR}); setup.py skips it with FASTCL_BUILD_CUDA=0 "
                                      "or without nvcc / a CUDA build of torch")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compute capability >= 8.0) and the built extension")
needs_kernels = pytest.mark.skipif(not (GPU or EMULATED),
                                   reason="needs a CUDA GPU (compute capability >= 8.0) and the built extension; "
                                          "test_subprocess_variant_matrix_with_emulated_kernels runs these on CPU")


# --- build ------------------------------------------------------------------------------------

@needs_ext
def test_build_info_reports_the_extension():
    assert _C is not None, f"FASTCL_EXPECT_CUDA_EXTENSION=1 but fastcl._C does not import: {_C_ERROR}"
    info = fastcl.build_info()
    assert info["cuda_extension"] is True
    archs = info["cuda_archs"]
    assert archs and all(isinstance(a, str) and a.rstrip("a").isdigit() and int(a.rstrip("a")) >= 80 for a in archs), archs


def _run_python(code: str, **env):
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def test_import_and_fallback_without_the_extension():
    """fastcl imports, reports no extension, and names the reason when fastcl._C cannot load."""
    code = (
        "import sys; sys.modules['fastcl._C'] = None\n"
        "import torch, fastcl\n"
        "from fastcl.backends import cuda\n"
        "info = fastcl.build_info()\n"
        "assert info['cuda_extension'] is False and info['cuda_archs'] == [], info\n"
        "reason = cuda.available(torch.device('cuda'))\n"
        "assert reason and 'fastcl._C is not built' in reason, reason\n"
        "q = torch.randn(4, 3)\n"
        "fastcl.info_nce(q, q, backend='auto')\n"
        "try:\n"
        "    fastcl.info_nce(q, q, backend='cuda')\n"
        "except RuntimeError as exc:\n"
        "    assert 'not built' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('backend=cuda ran without the extension')\n"
    )
    _run_python(code)


def test_import_does_not_initialise_cuda():
    """Importing fastcl and its CUDA backend must not query the GPU (it raises on CPU machines)."""
    _run_python("import torch, fastcl, fastcl.backends.cuda\n"
                "assert not torch.cuda.is_initialized()\n")


# --- the kernels on CPU threads ----------------------------------------------------------------

def _cuda_include():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    inc = os.path.join(home, "include")
    return inc if os.path.exists(os.path.join(inc, "cuda_fp16.h")) else None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA headers (CUDA_HOME/include) to build the CPU emulation")
def test_tile_kernels_emulated_on_cpu(tmp_path):
    exe = str(tmp_path / "check_tile_kernels")
    build = subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-I", _cuda_include(),
                            os.path.join(ROOT, "csrc", "testing", "check_tile_kernels.cpp"), "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, "\n".join(line for line in run.stdout.splitlines() if not line.startswith("ok"))
    assert "0 failed checks" in run.stdout


def _build_emulated_extension():
    """ops.cpp + bindings.cpp (-DFASTCL_EMULATION_HOST) + the emulated launchers, as a CPU
    extension; cached under build/ (torch rebuilds it when a source changes)."""
    from torch.utils.cpp_extension import load

    csrc = os.path.join(ROOT, "csrc")
    build_dir = os.path.join(ROOT, "build", "fastcl_emulated_C")
    os.makedirs(build_dir, exist_ok=True)
    return load(name="fastcl_emulated_C",
                sources=[os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "bindings.cpp"),
                         os.path.join(csrc, "testing", "emulated_launchers.cpp")],
                extra_cflags=["-O1", "-DFASTCL_EMULATION_HOST"], extra_include_paths=[_cuda_include(), csrc],
                build_directory=build_dir, verbose=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA headers (CUDA_HOME/include) to build the CPU emulation")
def test_subprocess_variant_matrix_with_emulated_kernels():
    """backend="cuda" end to end -- Python half, host glue (checks, splits, merges, fp16 G scaling),
    kernel code -- with the kernels on CPU threads: the variant matrix against the oracle."""
    module = _build_emulated_extension()
    env = dict(os.environ, FASTCL_TEST_BACKEND="cuda", FASTCL_TEST_DEVICE="cpu", FASTCL_CUDA_EMULATED=module.__file__,
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("FASTCL_CUDA_REFERENCE", None)
    kernel_tests = [f"tests/test_cuda.py::{name}" for name in
                    ("test_kernels_clip_and_siglip", "test_kernels_info_nce_variants", "test_kernels_tf32_when_allowed")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "test_cuda", "tests/test_losses.py",
           *kernel_tests]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and "deselected" in run.stdout, run.stdout[-2000:]


# --- dispatch ---------------------------------------------------------------------------------

def test_cuda_backend_on_cpu_tensors_raises_with_the_reason():
    q, k = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu: .*(CUDA tensors|not built)"):
        fastcl.info_nce(q, k, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu"):
        fastcl.siglip_loss(q, k, 10.0, -10.0, backend="cuda")
    reason = unavailable_reason("cuda", torch.device("cpu"))
    assert reason is not None


# --- host-side checks, on CPU tensors: every one must fire before anything touches CUDA -------

def _stats_args(n=6, c=7, d=5, dtype=torch.float32):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(query=torch.randn(n, d).to(dtype), key=torch.randn(c, d).to(dtype), scale_rows=torch.ones(n, dtype=acc),
                positive_index=torch.zeros(n, dtype=torch.long), row_labels=None, col_labels=None,
                col_has_label=None, own_rows=True, exclude_self=False, decoupled=False)


def _grad_args(n=6, c=7, d=5, dtype=torch.float32):
    args = _stats_args(n, c, d, dtype)
    acc = args["scale_rows"].dtype
    args.update(lse_row=torch.zeros(n, dtype=acc), w_row=torch.ones(n, dtype=acc), coef_row=None, lse_col=None,
                w_col=None, n_own=n)
    return args


def _sigmoid_args(n=6, c=7, d=5):
    return dict(query=torch.randn(n, d), key=torch.randn(c, d), scale_rows=torch.ones(n),
                positive_index=torch.arange(n), bias=torch.tensor(-1.0), own_rows=True, n_own=n, accumulate=True)


BAD_INPUTS = {
    # name: (entry point, argument builder, change, expected exception, message pattern)
    "int_query": ("softmax_stats", _stats_args, dict(query=torch.ones(6, 5, dtype=torch.int32),
                                                     key=torch.ones(7, 5, dtype=torch.int32)),
                  TypeError, "query must be float16, bfloat16, float32 or float64"),
    "key_dtype": ("softmax_stats", _stats_args, dict(key=torch.randn(7, 5, dtype=torch.float64)),
                  TypeError, "key must have dtype Float"),
    "query_1d": ("softmax_stats", _stats_args, dict(query=torch.randn(6)), ValueError, r"query must have shape \[N, D\]"),
    "key_width": ("softmax_stats", _stats_args, dict(key=torch.randn(7, 4)), ValueError, "key must have D = 5"),
    "empty_key": ("softmax_stats", _stats_args, dict(key=torch.randn(0, 5)), ValueError, "must be non-empty"),
    "query_strided": ("softmax_stats", _stats_args, dict(query=torch.randn(5, 6).T), ValueError, "query must be contiguous"),
    "scale_dtype": ("softmax_stats", _stats_args, dict(scale_rows=torch.ones(6, dtype=torch.float64)),
                    TypeError, "scale_rows must have dtype Float"),
    "scale_shape": ("softmax_stats", _stats_args, dict(scale_rows=torch.ones(())), ValueError,
                    r"scale_rows must have shape \[6\]"),
    "positive_index_dtype": ("softmax_stats", _stats_args, dict(positive_index=torch.zeros(6, dtype=torch.int32)),
                             TypeError, "positive_index must have dtype Long"),
    "positive_index_length": ("softmax_stats", _stats_args, dict(positive_index=torch.zeros(5, dtype=torch.long)),
                              ValueError, r"positive_index must have shape \[6\]"),
    "labels_without_col_labels": ("softmax_stats", _stats_args, dict(row_labels=torch.zeros(6, dtype=torch.long)),
                                  ValueError, "row_labels and col_labels must be given together"),
    "col_labels_length": ("softmax_stats", _stats_args, dict(row_labels=torch.zeros(6, dtype=torch.long),
                                                             col_labels=torch.zeros(6, dtype=torch.long)),
                          ValueError, r"col_labels must have shape \[7\]"),
    "col_has_label_dtype": ("softmax_stats", _stats_args, dict(row_labels=torch.zeros(6, dtype=torch.long),
                                                               col_labels=torch.zeros(7, dtype=torch.long),
                                                               col_has_label=torch.ones(7, dtype=torch.uint8)),
                            TypeError, "col_has_label must have dtype Bool"),
    "cpu_tensors": ("softmax_stats", _stats_args, {}, ValueError, "query must be a CUDA tensor, got device cpu"),
    "grad_lse_shape": ("softmax_grad", _grad_args, dict(lse_row=torch.zeros(7)), ValueError,
                       r"lse_row must have shape \[6\]"),
    "grad_w_dtype": ("softmax_grad", _grad_args, dict(w_row=torch.zeros(6, dtype=torch.float16)), TypeError,
                     "w_row must have dtype Float"),
    "grad_half_symmetric": ("softmax_grad", _grad_args, dict(lse_col=torch.zeros(7)), ValueError,
                            "lse_col and w_col must be given together"),
    "grad_n_own": ("softmax_grad", _grad_args, dict(own_rows=False, n_own=8), ValueError,
                   r"n_own must lie in \[0, 7\]"),
    "grad_coef_length": ("softmax_grad", _grad_args, dict(coef_row=torch.zeros(5)), ValueError,
                         r"coef_row must have shape \[6\]"),
    "grad_fp64_acc_dtype": ("softmax_grad", lambda: _grad_args(dtype=torch.float64), dict(w_row=torch.zeros(6)),
                            TypeError, "w_row must have dtype Double"),
    "grad_cpu_tensors": ("softmax_grad", _grad_args, {}, ValueError, "query must be a CUDA tensor"),
    "sigmoid_bias_dtype": ("sigmoid_pass", _sigmoid_args, dict(bias=torch.tensor(1.0, dtype=torch.float64)),
                           TypeError, "bias must have dtype Float"),
    "sigmoid_positive_index_dtype": ("sigmoid_pass", _sigmoid_args, dict(positive_index=torch.arange(6.0)),
                                     TypeError, "positive_index must have dtype Long"),
    "sigmoid_bias_shape": ("sigmoid_pass", _sigmoid_args, dict(bias=torch.zeros(2)), ValueError,
                           "bias must hold one value"),
    "sigmoid_cpu_tensors": ("sigmoid_pass", _sigmoid_args, {}, ValueError, "query must be a CUDA tensor"),
}


@needs_ext
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_host_checks_fire_before_any_launch(case):
    entry, build, change, exc_type, pattern = BAD_INPUTS[case]
    args = build()
    args.update(change)
    with pytest.raises(exc_type, match=pattern):
        getattr(_C, entry)(**args)


@needs_ext
def test_mixed_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put one of the tensors on")
    args = _stats_args()
    args["query"] = args["query"].cuda()
    with pytest.raises(ValueError, match="key must be on cuda:0 like query, got cpu"):
        _C.softmax_stats(**args)


# --- GPU: the variant matrix of tests/test_losses.py through backend="cuda" -------------------

def pytest_collection_modifyitems(config, items):
    """Plugin hook, active only in the subprocess that loads this module with ``-p test_cuda``:
    drop the torch backend's second tile shape, which the CUDA backend ignores."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (dropped if params.get("torch_blocks", "default") != "default" else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def test_subprocess_python_half_with_reference_kernels():
    """backend="cuda" minus the kernels: the whole variant matrix on CPU against the oracle."""
    env = dict(os.environ, FASTCL_TEST_BACKEND="cuda", FASTCL_TEST_DEVICE="cpu", FASTCL_CUDA_REFERENCE="1",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "test_cuda", "tests/test_losses.py"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and "deselected" in run.stdout, run.stdout[-2000:]


@needs_gpu
@pytest.mark.parametrize("split", ["auto", "3"])
def test_subprocess_variant_matrix_on_gpu(split):
    env = dict(os.environ, FASTCL_TEST_BACKEND="cuda", FASTCL_TEST_DEVICE="cuda",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    if split != "auto":
        env["FASTCL_CUDA_SPLIT"] = split
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "test_cuda", "tests/test_losses.py"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"


# --- GPU: shapes that cross tile, D-chunk and split boundaries, against the fp64 torch backend -

def _against_torch_fp64(fn, tensors: dict, dtype, rtol=None, grads=None, loss_rtol=None):
    """``fn(backend, **tensors)`` through the kernels in ``dtype`` vs the torch backend in fp64 on
    the CPU (itself checked against the oracle by test_losses.py): the loss and every gradient."""
    names = grads if grads is not None else [k for k, v in tensors.items() if v.dtype.is_floating_point]
    fast, ref = {}, {}
    for k, v in tensors.items():
        if v.dtype.is_floating_point:
            rounded = v.to(dtype if v.dim() >= 2 else v.dtype)
            fast[k] = rounded.to(KERNEL_DEVICE).clone().requires_grad_(k in names)
            ref[k] = rounded.double().clone().requires_grad_(k in names)
        else:
            fast[k], ref[k] = v.to(KERNEL_DEVICE), v
    got = fn("cuda", **fast)
    want = fn("torch", **ref)
    got = torch.cat([g.reshape(-1) for g in got]) if isinstance(got, tuple) else got.reshape(-1)
    want = torch.cat([w.reshape(-1) for w in want]) if isinstance(want, tuple) else want.reshape(-1)
    assert_close("loss", got.cpu(), want, loss_rtol or (2e-5 if dtype != torch.float64 else 1e-10), floor=1.0)
    upstream = torch.rand(want.shape, dtype=torch.float64) + 0.5
    (got * upstream.to(got.device, got.dtype)).sum().backward()
    (want * upstream).sum().backward()
    tol = rtol or RTOL[dtype]
    for k in names:
        assert fast[k].grad is not None and fast[k].grad.dtype == fast[k].dtype, k
        floor = 1e-2 if fast[k].dim() >= 2 else 1.0
        assert_close(f"d{k}", fast[k].grad.cpu(), ref[k].grad, tol, floor=floor)


GPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# tails in N, C and D; D > BK and BX (smaller under emulation, which is slow)
SHAPES = ([(70, 70, 33), (65, 130, 72)] if EMULATED else
          [(70, 70, 33), (130, 200, 64), (65, 300, 200), (200, 129, 1030)])


def _unit(n, d):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)


@needs_kernels
@pytest.mark.parametrize("split", ["auto", "1", "4"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_clip_and_siglip(shape, dtype, split, monkeypatch):
    if split != "auto":
        monkeypatch.setenv("FASTCL_CUDA_SPLIT", split)
    n, _, d = shape
    tensors = {"image_features": _unit(n, d), "text_features": _unit(n, d),
               "logit_scale": torch.tensor(20.0, dtype=torch.float64),
               "logit_bias": torch.tensor(-3.0, dtype=torch.float64)}
    _against_torch_fp64(lambda b, **kw: fastcl.clip_loss(**kw, backend=b), tensors, dtype)
    _against_torch_fp64(lambda b, **kw: fastcl.siglip_loss(**kw, backend=b), tensors, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["labels_exclude_decoupled", "queue_no_grad", "rows_scale_positive_index",
                                     "nt_xent", "labels_queue_unlabelled"])
def test_kernels_info_nce_variants(variant, shape, dtype, monkeypatch):
    monkeypatch.setenv("FASTCL_CUDA_SPLIT", "2")
    n, m, d = shape
    m = max(m, n)
    tensors = {"query": _unit(n, d), "key": _unit(m, d)}
    if variant == "labels_exclude_decoupled":
        opts = dict(labels=torch.randint(0, 5, (n,)), key_labels=torch.randint(0, 5, (m,)), exclude_self=True,
                    decoupled=True, temperature=0.1)
    elif variant == "queue_no_grad":
        negs = _unit(97, d).to(dtype).to(KERNEL_DEVICE)
        opts = dict(temperature=0.07)

        def fn(b, **kw):
            return fastcl.info_nce(**kw, negatives=negs if b == "cuda" else negs.double().cpu(), **opts, backend=b)

        _against_torch_fp64(fn, tensors, dtype)
        return
    elif variant == "rows_scale_positive_index":
        tensors["scale"] = torch.rand(n, dtype=torch.float64) * 20 + 1
        opts = dict(positive_index=torch.randint(0, m, (n,)))
    elif variant == "labels_queue_unlabelled":
        negs = _unit(70, d)
        tensors["negatives"] = negs
        opts = dict(labels=torch.randint(0, 3, (n,)), key_labels=torch.randint(0, 3, (m,)), temperature=0.2)
    else:  # nt_xent
        z = {"z1": tensors["query"], "z2": _unit(n, d)}
        _against_torch_fp64(lambda b, **kw: fastcl.nt_xent(**kw, temperature=0.2, normalize=False, backend=b), z,
                            dtype)
        return

    def fn(b, **kw):
        o = {k: (v.to(KERNEL_DEVICE) if b == "cuda" and isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        return fastcl.info_nce(**kw, **o, reduction="none", backend=b)

    _against_torch_fp64(fn, tensors, dtype)


@needs_kernels
def test_kernels_tf32_when_allowed():
    """float32 through TF32 tensor cores when torch allows TF32 (tolerance of a 10-bit mantissa)."""
    # set and restored by hand: the flag lives behind the module's __getattr__, which newer
    # pytest monkeypatching does not see as an attribute to restore
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        n, d = 150, 96
        tensors = {"image_features": _unit(n, d), "text_features": _unit(n, d),
                   "logit_scale": torch.tensor(10.0, dtype=torch.float64)}
        _against_torch_fp64(lambda b, **kw: fastcl.clip_loss(**kw, backend=b), tensors, torch.float32, rtol=3e-3,
                            loss_rtol=3e-3)
    finally:
        matmul.allow_tf32 = before


@needs_gpu
def test_gpu_deterministic():
    q = torch.randn(300, 257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(300, 257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for _ in range(2):
        q.grad = k.grad = None
        loss = fastcl.clip_loss(q, k, 10.0, backend="cuda")
        loss.backward()
        results.append((loss.detach().clone(), q.grad.clone(), k.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_gpu
def test_gpu_never_allocates_n_by_m():
    n, d = 4096, 64
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fastcl.clip_loss(q, k, 10.0, backend="cuda").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * n * 2 // 4, f"peak extra memory {extra} B is a sizeable fraction of one N x N bf16 matrix"


@needs_gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
def test_gpu_memcheck_small_cases():
    code = (
        "import torch, fastcl\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
        "    q = torch.randn(37, 19, device='cuda', dtype=dt, requires_grad=True)\n"
        "    k = torch.randn(45, 19, device='cuda', dtype=dt, requires_grad=True)\n"
        "    lab = torch.randint(0, 3, (37,), device='cuda'); klab = torch.randint(0, 3, (45,), device='cuda')\n"
        "    fastcl.info_nce(q, k, labels=lab, key_labels=klab, exclude_self=True, decoupled=True, backend='cuda').backward()\n"
        "    fastcl.clip_loss(q, k[:37], 10.0, backend='cuda').backward()\n"
        "    fastcl.siglip_loss(q, k[:37], 10.0, -10.0, backend='cuda').backward()\n"
        "torch.cuda.synchronize()\n"
    )
    run = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", code],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
