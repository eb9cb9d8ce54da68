"""The CUDA backend (``fastcl._C``, ``csrc/``): build, host-side checks, dispatch, and the
kernels across tile, D-chunk and split boundaries.

The whole variant matrix of ``tests/test_losses.py`` runs through ``backend="cuda"`` by the
backend axis of ``tests/conftest.py``: on a GPU with the compiled kernels, on a CPU with the real
host glue and kernel code on CPU threads (``csrc/testing/emulate.h``: blocks as std::threads,
barriers, warp shuffles, a model of WMMA fragments). The kernel tests below take the same two
routes (``kernel_device``). That emulation cannot catch real fragment layouts, code generation
or races; a GPU run does.

On a machine without a GPU (CI) the extension's host checks fire on CPU tensors before any
launch, ``build_info`` reports the extension, and ``backend="cuda"`` explains why it cannot run.
With ``FASTCL_EXPECT_CUDA_EXTENSION=1`` a missing extension fails instead of skipping.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_include, emulated_extension, emulation_missing, use_emulated_cuda
from helpers import RTOL, assert_close

import fastcl
from fastcl._dispatch import unavailable_reason

pytestmark = pytest.mark.gpu  # the visit's GPU correctness stage selects these files

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


try:
    from fastcl import _C
except ImportError as exc:  # not built (FASTCL_BUILD_CUDA=0, no nvcc, CPU-only torch)
    _C, _C_ERROR = None, str(exc)
else:
    _C_ERROR = None

EXPECT_EXTENSION = os.environ.get("FASTCL_EXPECT_CUDA_EXTENSION") == "1"
GPU = torch.cuda.is_available() and _C is not None and unavailable_reason("cuda", torch.device("cuda")) is None
# without a GPU the kernel tests below run on CPU tensors through the emulated kernels
EMULATED = not GPU
KERNEL_DEVICE = "cuda" if GPU else "cpu"

needs_ext = pytest.mark.skipif(_C is None and not EXPECT_EXTENSION,
                               reason=f"fastcl._C is not built ({_C_ERROR}); setup.py skips it with FASTCL_BUILD_CUDA=0 "
                                      "or without nvcc / a CUDA build of torch")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compute capability >= 8.0) and the built extension")


@pytest.fixture
def kernels(monkeypatch):
    """The kernels of backend="cuda": compiled on a GPU, else emulated on CPU threads."""
    if not GPU:
        reason = emulation_missing()
        if reason is not None:
            pytest.skip(f"no GPU, and the CPU emulation cannot be built: {reason}")
        use_emulated_cuda(monkeypatch)


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

@pytest.mark.skipif(shutil.which("g++") is None or cuda_include() is None,
                    reason="needs g++ and the CUDA headers (CUDA_HOME/include) to build the CPU emulation")
def test_tile_kernels_emulated_on_cpu(tmp_path):
    exe = str(tmp_path / "check_tile_kernels")
    build = subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-I", cuda_include(),
                            os.path.join(ROOT, "csrc", "testing", "check_tile_kernels.cpp"), "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, "\n".join(line for line in run.stdout.splitlines() if not line.startswith("ok"))
    assert "0 failed checks" in run.stdout


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


def _logit_args(n=6, c=7, d=5, rows=4):
    return dict(query=torch.randn(n, d), key=torch.randn(c, d), scale_rows=torch.ones(n),
                positive_index=torch.arange(n), row_labels=None, col_labels=None, col_has_label=None,
                lse_row=torch.zeros(n), w_row=torch.ones(n), coef_row=torch.ones(n), lse_col=None, w_col=None,
                bias=None, g_scale=None, g=torch.empty(rows, c), row0=1, sigmoid=False, exclude_self=False,
                decoupled=False)


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
    "logit_g_dtype": ("logit_grad", _logit_args, dict(g=torch.empty(4, 7, dtype=torch.float16)), TypeError,
                      "g must have dtype Float"),
    "logit_g_width": ("logit_grad", _logit_args, dict(g=torch.empty(4, 6)), ValueError, r"g must have shape \[R, 7\]"),
    "logit_rows_past_n": ("logit_grad", _logit_args, dict(row0=3), ValueError, r"rows \[3, 7\) must lie in \[0, 6\)"),
    "logit_softmax_without_lse": ("logit_grad", _logit_args, dict(lse_row=None), ValueError,
                                  "the softmax logit gradient needs lse_row and w_row"),
    "logit_g_scale_shape": ("logit_grad", _logit_args, dict(g_scale=torch.ones(2)), ValueError,
                            "g_scale must hold one value"),
    "logit_g_strided": ("logit_grad", _logit_args, dict(g=torch.empty(7, 4).T), ValueError, "g must be contiguous"),
    "logit_cpu_tensors": ("logit_grad", _logit_args, {}, ValueError, "query must be a CUDA tensor"),
}


def _call(entry, args):
    """An entry point of the extension through its ``torch.ops`` operator, with the launch
    options (and the optional tensors) a test leaves out."""
    from fastcl.backends.cuda import kernel_operators

    ops = kernel_operators(_C)
    extra = {"allow_tf32": False, "n_split": 0}
    if entry == "softmax_grad":
        extra["g_scale"] = None
    if entry == "sigmoid_pass":
        extra.update(row_labels=None, col_labels=None)
    return getattr(ops, entry)(**{**extra, **args})


@needs_ext
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_host_checks_fire_before_any_launch(case):
    entry, build, change, exc_type, pattern = BAD_INPUTS[case]
    args = build()
    args.update(change)
    with pytest.raises(exc_type, match=pattern):
        _call(entry, args)


def test_kernel_operators_pass_opcheck():
    """The extension's entry points are ``TORCH_LIBRARY`` operators with schemas and fake
    implementations: ``torch.library.opcheck`` on each, through the CPU emulation build."""
    reason = emulation_missing()
    if reason is not None:
        pytest.skip(reason)
    from fastcl.backends import cuda

    module = emulated_extension()
    assert module.ops_namespace() == "fastcl_emulated"
    ops = cuda.kernel_operators(module)
    launch = dict(allow_tf32=False, n_split=2)
    stats = dict(_stats_args(), row_labels=torch.arange(6) % 2, col_labels=torch.arange(7) % 2, positive_index=None,
                 **launch)
    torch.library.opcheck(ops.softmax_stats, (), stats)
    grad = dict(_grad_args(), coef_row=torch.ones(6), lse_col=torch.zeros(7), w_col=torch.ones(7), g_scale=None,
                **launch)
    torch.library.opcheck(ops.softmax_grad, (), grad)
    torch.library.opcheck(ops.sigmoid_pass, (), dict(_sigmoid_args(), row_labels=None, col_labels=None, **launch))
    # logit_grad writes G into the caller's workspace (Tensor(a!) g): AOTAutograd does not
    # functionalise a mutating custom operator that returns a list, so its AOT check is left out
    # (it only ever runs inside fastcl's own operators, opaque to the compiler)
    mutating = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.logit_grad, (), dict(_logit_args(), **launch), test_utils=mutating)
    torch.library.opcheck(ops.logit_grad, (), dict(_logit_args(), sigmoid=True, lse_row=None, w_row=None,
                                                   coef_row=None, bias=torch.tensor(-1.0), **launch),
                          test_utils=mutating)


@needs_ext
def test_mixed_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put one of the tensors on")
    args = _stats_args()
    args["query"] = args["query"].cuda()
    with pytest.raises(ValueError, match="key must be on cuda:0 like query, got cpu"):
        _call("softmax_stats", args)


# --- the kernels: shapes that cross tile, D-chunk and split boundaries, against the fp64 torch backend

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


@pytest.mark.parametrize("split", ["auto", "1", "4"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_clip_and_siglip(shape, dtype, split, monkeypatch, kernels):
    if split != "auto":
        monkeypatch.setenv("FASTCL_CUDA_SPLIT", split)
    n, _, d = shape
    tensors = {"image_features": _unit(n, d), "text_features": _unit(n, d),
               "logit_scale": torch.tensor(20.0, dtype=torch.float64),
               "logit_bias": torch.tensor(-3.0, dtype=torch.float64)}
    _against_torch_fp64(lambda b, **kw: fastcl.clip_loss(**kw, backend=b), tensors, dtype)
    _against_torch_fp64(lambda b, **kw: fastcl.siglip_loss(**kw, backend=b), tensors, dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["labels_exclude_decoupled", "queue_no_grad", "rows_scale_positive_index",
                                     "nt_xent", "labels_queue_unlabelled"])
def test_kernels_info_nce_variants(variant, shape, dtype, monkeypatch, kernels):
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


def test_kernels_tf32_when_allowed(kernels):
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
    """Every kernel mode of the CUDA backend once, small and odd-shaped, under memcheck."""
    run = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-m",
                          "bench.sanitize", "--backend", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
