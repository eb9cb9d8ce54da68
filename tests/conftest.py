"""The one place that configures how the suite runs each backend.

The ``backend`` fixture is the backend axis of every loss test: ``torch`` (with its default tile
shape and with tiny 5 x 7 tiles, so every tile boundary appears at test sizes), ``triton`` and
``cuda``, and each of them with the chunked gradient pass forced in chunks of 3 rows. Where a backend cannot run, its tests are skipped and the reason is shown (``-rs``):

* ``FASTCL_TEST_DEVICE`` (default ``cpu``) is where the tensors live. On ``cpu``:
  ``triton`` runs the real kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set here
  before anything imports the kernels), in float64/float32/float16 -- the interpreter's bfloat16
  ``tl.dot`` is wrong, so bfloat16 is left to GPU runs; ``cuda`` runs the real host glue and
  kernel code of ``csrc/`` with the kernels on CPU threads (``csrc/testing/``: emulated
  barriers, shuffles and WMMA fragments), an extension built once per session under ``build/``.
* On ``cuda``: both GPU backends run compiled, on the GPU, in every dtype, Triton with fixed
  block sizes (``GPU_TEST_BLOCKS``). Their items carry the ``gpu`` marker (``-m gpu``: what a GPU
  visit runs, with ``tests/test_cuda.py`` and ``tests/test_triton.py``).

``FASTCL_TEST_BACKENDS=torch,triton`` restricts the axis; ``FASTCL_TEST_SEED=<n>`` draws a fresh
set of random inputs for the whole run.
"""

import os
import shutil
import sys
import zlib

import pytest

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    # Triton chooses interpreter or compiler when it decorates the kernels, at their first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTED = [b for b in os.environ.get("FASTCL_TEST_BACKENDS", "torch,triton,cuda").split(",") if b]
# (backend, torch tile override): tiny torch tiles cross every tile boundary at test sizes
# "chunked": the chunked gradient pass forced (FASTCL_BACKWARD=chunked) with chunks of at most
# CHUNK_ROWS rows, so every test size crosses chunk boundaries and has an odd tail
BACKEND_PARAMS = [("torch", None), ("torch", "5,7"), ("torch", "chunked"), ("triton", None), ("triton", "chunked"),
                  ("cuda", None), ("cuda", "chunked")]
CHUNK_ROWS = 3


def cuda_include():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    inc = os.path.join(home, "include")
    return inc if os.path.exists(os.path.join(inc, "cuda_fp16.h")) else None


def emulation_missing():
    """Why the CPU emulation of the CUDA kernels cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include() is None:
        return "the CUDA headers (CUDA_HOME/include) are missing"
    return None


_emulated = {}


def emulated_extension():
    """``csrc/ops.cpp`` + ``bindings.cpp`` (``-DFASTCL_EMULATION_HOST``) + the emulated launchers as
    a CPU extension: ``fastcl._C``'s entry points on CPU tensors. Built once, cached in build/."""
    if "module" not in _emulated:
        from torch.utils.cpp_extension import load

        csrc = os.path.join(ROOT, "csrc")
        build_dir = os.path.join(ROOT, "build", "fastcl_emulated_C")
        os.makedirs(build_dir, exist_ok=True)
        _emulated["module"] = load(
            name="fastcl_emulated_C",
            sources=[os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "bindings.cpp"),
                     os.path.join(csrc, "testing", "emulated_launchers.cpp")],
            extra_cflags=["-O1", "-DFASTCL_EMULATION_HOST"], extra_include_paths=[cuda_include(), csrc],
            build_directory=build_dir, verbose=False)
    return _emulated["module"]


def use_emulated_cuda(monkeypatch) -> None:
    """Route ``backend="cuda"`` to the emulated kernels on CPU tensors for one test."""
    import fastcl.backends.cuda as cuda_backend

    module = emulated_extension()
    monkeypatch.setattr(cuda_backend, "_ext", lambda: module)
    monkeypatch.setattr(cuda_backend, "available", lambda device: None)


# On a GPU the kernels compile for real: fixed block sizes (one compile per kernel variant and
# dtype instead of one per autotuning config) keep the GPU-marked matrix short; test_triton.py
# covers the autotuned configs
GPU_TEST_BLOCKS = "64,64,32,64"


def pytest_collection_modifyitems(config, items):
    """The oracle matrix's compiled-backend items (``triton``, ``cuda``, each with both gradient
    passes) carry the ``gpu`` marker, so ``-m gpu`` runs every loss variant once per compiled
    backend and pass and never the torch backend's (the CPU path) items."""
    for item in items:
        spec = getattr(item, "callspec", None)
        param = spec.params.get("backend") if spec is not None else None
        if isinstance(param, tuple) and param[0] in ("triton", "cuda"):
            item.add_marker(pytest.mark.gpu)


def force_chunked(monkeypatch, rows: int = CHUNK_ROWS) -> None:
    """Every gradient pass of this test chunked, in chunks of at most ``rows`` rows (within the
    memory budget too: the cap only lowers the budget's row count)."""
    from fastcl.backends import chunked

    monkeypatch.setenv("FASTCL_BACKWARD", "chunked")
    budget_rows = chunked.chunk_rows
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args, **kwargs: min(rows, budget_rows(*args, **kwargs)))


def backend_skip_reason(name: str, dtype=None):
    """Why ``name`` cannot run the tests here (None if it can)."""
    from fastcl._dispatch import unavailable_reason

    if name not in SELECTED:
        return f"FASTCL_TEST_BACKENDS={','.join(SELECTED)}"
    if name == "triton":
        reason = unavailable_reason("triton", torch.device(DEVICE))
        if reason is None and DEVICE == "cpu" and dtype == torch.bfloat16:
            return "Triton's interpreter computes bfloat16 dots wrongly; bfloat16 runs on a GPU"
        return reason
    if name == "cuda" and DEVICE == "cpu":
        return emulation_missing()
    return unavailable_reason(name, torch.device(DEVICE))


def _param_id(p):
    name, blocks = p
    return name if blocks is None else f"{name}-{blocks}"


@pytest.fixture(params=BACKEND_PARAMS, ids=_param_id)
def backend(request, monkeypatch):
    """The backend under test (a name to pass as ``backend=``), set up for this device."""
    name, blocks = request.param
    dtype = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dtype")
    reason = backend_skip_reason(name, dtype)
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")
    if blocks == "chunked":
        force_chunked(monkeypatch)
        blocks = None
    else:
        monkeypatch.delenv("FASTCL_BACKWARD", raising=False)
    if name == "torch":
        if blocks is None:
            monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
        else:
            monkeypatch.setenv("FASTCL_TORCH_BLOCK", blocks)
    if name == "triton":
        if DEVICE == "cpu":
            monkeypatch.delenv("FASTCL_TRITON_BLOCK", raising=False)
        else:
            monkeypatch.setenv("FASTCL_TRITON_BLOCK", GPU_TEST_BLOCKS)
    if name == "cuda" and DEVICE == "cpu":
        use_emulated_cuda(monkeypatch)
    return name


@pytest.fixture(params=["default", "5,7"])
def torch_blocks(request, monkeypatch):
    """The torch backend's tile shape, for tests of that backend alone."""
    if request.param == "default":
        monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    else:
        monkeypatch.setenv("FASTCL_TORCH_BLOCK", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # different random inputs in every test, reproducible from the test id; FASTCL_TEST_SEED
    # draws a new set for the whole run
    base = int(os.environ.get("FASTCL_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ base)
