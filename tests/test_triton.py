"""The Triton backend beyond the variant matrix (which ``tests/test_losses.py`` runs through the
backend axis of ``tests/conftest.py``): widths and block shapes, half precision, bitwise
determinism, no N x M allocation, availability, and an ahead-of-time compile of every launch for
sm_90.

On a CPU the direct tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by
the conftest before the kernels are first imported); on a GPU
(``FASTCL_TEST_DEVICE=cuda``) they run compiled.
"""

import os
import subprocess
import sys

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_oracle
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastcl
from fastcl._dispatch import unavailable_reason

pytestmark = pytest.mark.gpu  # the visit's GPU correctness stage selects these files

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
ON_GPU = DEVICE.startswith("cuda")

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")


def _triton_reason():
    if not HAVE_TRITON:
        return "Triton is not installed"
    return unavailable_reason("triton", torch.device(DEVICE))


direct = pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason()))


# --- import -----------------------------------------------------------------------------------

def test_subprocess_import_without_numpy():
    """Triton's interpreter needs numpy, a minimal install may lack it: fastcl still imports,
    reports its backends (with the kernels loaded) and runs."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch, fastcl, fastcl.triton_kernels.info_nce\n"
        "info = fastcl.build_info()\n"
        "assert 'torch' in info['backends'], info\n"
        "q = torch.randn(4, 3)\n"
        "fastcl.info_nce(q, q)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_subprocess_import_without_triton():
    """fastcl imports, reports the reason and falls back when Triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastcl\n"
        "from fastcl.backends import triton as tb\n"
        "reason = tb.available(torch.device('cpu'))\n"
        "assert reason and 'Triton is not installed' in reason, reason\n"
        "q = torch.randn(4, 3)\n"
        "fastcl.info_nce(q, q, backend='auto')\n"
        "try:\n"
        "    fastcl.info_nce(q, q, backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    assert 'Triton is not installed' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('backend=triton ran without triton')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# --- direct tests: the backend in this process ----------------------------------------------

def unit(n, d):
    return F.normalize(torch.randn(n, d, dtype=torch.float64, device=DEVICE), dim=1)


@pytest.fixture
def blocks(request, monkeypatch):
    value = getattr(request, "param", None)
    if value is None:
        monkeypatch.delenv("FASTCL_TRITON_BLOCK", raising=False)
    else:
        monkeypatch.setenv("FASTCL_TRITON_BLOCK", value)
    return value


# (D, FASTCL_TRITON_BLOCK): D tails inside one S chunk and across several; gradient accumulator
# D-chunks narrower (several per row block) and wider than the S chunks; odd tile counts
WIDTH_BLOCKS = [(1, None), (19, None), (40, "16,32,32,16"), (67, "32,16,16,64")]
if ON_GPU:
    WIDTH_BLOCKS += [(300, None), (777, None), (4096, None)]


@direct
@pytest.mark.parametrize("d,blocks", WIDTH_BLOCKS, indirect=["blocks"], ids=str)
def test_widths_and_block_shapes(d, blocks):
    n, m = 21, 37
    labels = torch.randint(0, 4, (n,), device=DEVICE)
    key_labels = torch.randint(0, 4, (m,), device=DEVICE)
    for dtype in (torch.float64,) if blocks else (torch.float64, torch.float32):
        check_against_oracle(
            lambda **kw: fastcl.info_nce(**kw, positive_index=torch.arange(n, device=DEVICE) + 3, symmetric=True,
                                         backend="triton"),
            lambda **kw: oracle.info_nce(**kw, positive_index=torch.arange(n, device=DEVICE) + 3, symmetric=True),
            {"query": unit(n, d), "key": unit(m, d), "temperature": torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.05},
            dtype)
        check_against_oracle(
            lambda **kw: fastcl.info_nce(**kw, labels=labels, key_labels=key_labels, decoupled=True, backend="triton"),
            lambda **kw: oracle.info_nce(**kw, labels=labels, key_labels=key_labels, decoupled=True),
            {"query": unit(n, d), "key": unit(m, d), "temperature": 0.2}, dtype)
        check_against_oracle(
            lambda **kw: fastcl.siglip_loss(**kw, backend="triton"), oracle.siglip_loss,
            {"image_features": unit(n, d), "text_features": unit(n, d),
             "logit_scale": torch.tensor(10.0, dtype=torch.float64, device=DEVICE),
             "logit_bias": torch.tensor(-5.0, dtype=torch.float64, device=DEVICE)}, dtype)


@direct
@pytest.mark.parametrize("resident", [True, False])
def test_owned_tile_resident_or_streamed(resident, monkeypatch):
    """Both ways of building S: the owned tile kept on chip for the whole loop (one dot at the
    padded width, the looped tile reused for G @ X when one chunk spans D) and both sides
    streamed through D in BLOCK_D chunks (the wide-D path, here forced at a small D)."""
    from fastcl.backends import triton as tb

    if not resident:
        monkeypatch.setattr(tb, "RESIDENT_ROW_BYTES", 0)
    monkeypatch.setenv("FASTCL_TRITON_BLOCK", "16,16,16,32")  # D = 19: one 32-wide accumulator chunk
    n, m, d = 21, 30, 19
    assert (tb.resident_width(d, 4) > 0) == resident
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, symmetric=True, positive_index=torch.arange(n, device=DEVICE) + 2,
                                     backend="triton"),
        lambda **kw: oracle.info_nce(**kw, symmetric=True, positive_index=torch.arange(n, device=DEVICE) + 2),
        {"query": unit(n, d), "key": unit(m, d), "temperature": 0.1}, torch.float32)
    check_against_oracle(
        lambda **kw: fastcl.siglip_loss(**kw, backend="triton"), oracle.siglip_loss,
        {"image_features": unit(n, d), "text_features": unit(n, d),
         "logit_scale": torch.tensor(10.0, dtype=torch.float64, device=DEVICE),
         "logit_bias": torch.tensor(-5.0, dtype=torch.float64, device=DEVICE)}, torch.float32)


@direct
@pytest.mark.parametrize("which", ["scale", "bias", "scale_and_bias"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_scalar_gradients_without_feature_gradients(loss, which):
    """Only the scale and/or bias need a gradient: the row pass runs without storing dQ."""
    n, d = 19, 20
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d),
              "logit_scale": torch.tensor(10.0, dtype=torch.float64, device=DEVICE),
              "logit_bias": torch.tensor(-3.0, dtype=torch.float64, device=DEVICE)}
    names = {"scale": ["logit_scale"], "bias": ["logit_bias"], "scale_and_bias": ["logit_scale", "logit_bias"]}[which]
    fast, ref = {"clip": (fastcl.clip_loss, oracle.clip_loss), "siglip": (fastcl.siglip_loss, oracle.siglip_loss)}[loss]
    check_against_oracle(lambda **kw: fast(**kw, backend="triton"), ref, inputs, torch.float32, differentiable=names)


@direct
def test_no_grad_forward_matches():
    n, d = 17, 12
    q, k = unit(n, d).float(), unit(n, d).float()
    with torch.no_grad():
        for fn in (lambda b: fastcl.clip_loss(q, k, 20.0, backend=b),
                   lambda b: fastcl.siglip_loss(q, k, 10.0, -10.0, backend=b),
                   lambda b: fastcl.nt_xent(q, k, backend=b)):
            torch.testing.assert_close(fn("triton"), fn("torch"), rtol=2e-5, atol=1e-6)


HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@direct
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision(dtype):
    """fp16 (and, on a GPU, bf16) inputs: tensor-core dots with fp32 accumulation."""
    n, d = 23, 40
    inputs = {"image_features": unit(n, d), "text_features": unit(n, d),
              "logit_scale": torch.tensor(30.0, dtype=torch.float64, device=DEVICE)}
    check_against_oracle(lambda **kw: fastcl.clip_loss(**kw, backend="triton"), oracle.clip_loss, inputs, dtype)
    inputs["logit_bias"] = torch.tensor(-10.0, dtype=torch.float64, device=DEVICE)
    check_against_oracle(lambda **kw: fastcl.siglip_loss(**kw, backend="triton"), oracle.siglip_loss, inputs, dtype)
    feats = F.normalize(torch.randn(9, 2, d, dtype=torch.float64, device=DEVICE), dim=-1)
    labels = torch.randint(0, 3, (9,), device=DEVICE)
    check_against_oracle(lambda **kw: fastcl.supcon(**kw, labels=labels, backend="triton"),
                         lambda **kw: oracle.supcon(**kw, labels=labels), {"features": feats}, dtype)


@direct
@pytest.mark.parametrize("mode", ["fused", "chunked"])
def test_float16_small_gradients_do_not_underflow(mode, monkeypatch):
    """fp16 rounds G for its tensor-core product: with a small upstream gradient (a loss weight,
    or the 1/N of a large batch) and spread-out softmaxes, G_ij = w_i p_ij falls into fp16's
    subnormal range (below 6e-5) and loses its bits, while the gradients themselves are normal
    fp16 numbers; G is staged divided by its largest weight."""
    from conftest import force_chunked

    if mode == "chunked":
        force_chunked(monkeypatch, rows=256)
    monkeypatch.setenv("FASTCL_TRITON_BLOCK", "64,64,16,16")
    n, d = 640, 16
    weight = 1e-4  # w_i = 1e-4, p_ij ~ 1/640: G ~ 1.6e-7, a few fp16 subnormal steps; gradients ~ 1e-4
    check_against_oracle(
        lambda **kw: fastcl.info_nce(**kw, temperature=1.0, symmetric=True, reduction="sum", backend="triton")
        * weight,
        lambda **kw: oracle.info_nce(**kw, temperature=1.0, symmetric=True, reduction="sum") * weight,
        {"query": unit(n, d), "key": unit(n, d)}, torch.float16, grad_floor=weight)


def _loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


CALLS = {
    "clip": lambda q, k, s, b: fastcl.clip_loss(q, k, s, b, backend="triton"),
    "siglip": lambda q, k, s, b: fastcl.siglip_loss(q, k, s, b, backend="triton"),
    "supcon": lambda q, k, s, b: fastcl.info_nce(q, k, scale=s, labels=torch.arange(q.shape[0], device=q.device) % 5,
                                                 key_labels=torch.arange(k.shape[0], device=q.device) % 5,
                                                 backend="triton"),
    "queue": lambda q, k, s, b: fastcl.info_nce(q, k[: q.shape[0]], negatives=k[q.shape[0]:], scale=s,
                                                symmetric=True, decoupled=True, backend="triton"),
}


@direct
@pytest.mark.parametrize("call", sorted(CALLS))
def test_backward_is_bitwise_deterministic(call):
    n, d = (200, 48) if ON_GPU else (40, 24)
    g = torch.Generator(device="cpu").manual_seed(1)
    tensors = [torch.randn(n, d, generator=g).to(DEVICE), torch.randn(n + 7, d, generator=g).to(DEVICE),
               torch.tensor(8.0, device=DEVICE), torch.tensor(-4.0, device=DEVICE)]
    if call in ("clip", "siglip"):
        tensors[1] = tensors[1][:n]
    first = _loss_and_grads(CALLS[call], tensors)
    second = _loss_and_grads(CALLS[call], tensors)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@direct
@pytest.mark.parametrize("call", ["clip", "siglip", "supcon", "queue"])
def test_launcher_never_allocates_n_by_m(call, monkeypatch):
    n, d = 512, 16
    if not ON_GPU:
        # 64-wide tiles keep the interpreter to seconds at this size; the launcher allocates the
        # same buffers whatever the blocks
        monkeypatch.setenv("FASTCL_TRITON_BLOCK", "64,64,16,16")
    tensors = [torch.randn(n, d, device=DEVICE), torch.randn(n + 64, d, device=DEVICE),
               torch.tensor(10.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)]
    if call in ("clip", "siglip"):
        tensors[1] = tensors[1][:n]
    tensors = [t.requires_grad_() for t in tensors]
    m = tensors[1].shape[0]
    if ON_GPU:
        CALLS[call](*tensors).backward()  # warm-up: compile and autotune outside the recording
    with _LargestAllocation() as mode:
        CALLS[call](*tensors).backward()
    assert mode.ops > 0
    assert mode.largest >= n * d  # the recording saw the gradients being made
    assert mode.largest < n * m // 4, f"{call}: a tensor of {mode.largest} elements for N={n}, M={m}"


# --- the second-stream kernels (Matryoshka prefixes, distillation, the guide mask) ---------------
# their oracle tests, selected for the GPU visit's correctness stage (these files are gpu-marked):
# on a GPU they run compiled, bfloat16 included, on the tensor-core paths the interpreter skips
SECOND_STREAM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@direct
@pytest.mark.parametrize("dtype", SECOND_STREAM_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["default", "labels_exclude_self_decoupled", "symmetric_permuted_queue"])
def test_matryoshka_one_sweep_kernels(case, dtype, monkeypatch):
    import test_matryoshka

    test_matryoshka.test_info_nce_matryoshka(case, "mean", dtype, "triton", monkeypatch)


@direct
@pytest.mark.parametrize("dtype", SECOND_STREAM_DTYPES, ids=str)
def test_distillation_kernels(dtype):
    import test_distill

    for case in sorted(test_distill.CASES):
        test_distill.test_distill_clip_loss(case, dtype, "triton")


@direct
@pytest.mark.parametrize("dtype", SECOND_STREAM_DTYPES, ids=str)
def test_guide_mask_kernels(dtype):
    import test_gist

    test_gist.test_info_nce_guide_mask("default", 0.0, dtype, "triton")


@needs_triton
def test_available_reasons(monkeypatch):
    from fastcl.backends import triton as tb

    loaded = sys.modules.get("fastcl.triton_kernels.info_nce")
    interpreted = loaded is not None and tb._kernels_interpreted(loaded)
    assert tb.available(torch.device("meta"))
    for env in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        reason = tb.available(torch.device("cpu"))
        if interpreted or (loaded is None and env == "1"):
            assert reason is None
        elif loaded is None:
            assert "TRITON_INTERPRET=1" in reason
        else:  # compiled for a GPU earlier in this process: the interpreter cannot take over
            assert "loaded compiled" in reason
        if not torch.cuda.is_available() and not interpreted and (loaded is not None or env == "0"):
            assert "no CUDA device" in tb.available(torch.device("cuda"))


@needs_triton
def test_launches_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code that the compiler rejects: every launch the launcher makes for a
    spread of variants and dtypes, compiled ahead of time for sm_90 (``tests/triton_aot.py``). It
    runs in a process of its own because Triton's interpreter, once used, patches the language
    module that the compiler needs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCL_TRITON_BLOCK")}
    run = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "compiled" in run.stdout, run.stdout
