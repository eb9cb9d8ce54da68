"""fastcl's pip build.

Installs the pure-Python package ``fastcl`` and the Triton kernels in ``triton_kernels/`` as
the subpackage ``fastcl.triton_kernels`` (the top-level name ``triton_kernels`` is taken on PyPI
and by Triton itself). Compiled extensions are optional: the package installs and runs (torch
backend, Triton backend) without them.

The CUDA extension ``fastcl._C`` (``csrc/``) is compiled when torch is a CUDA build and nvcc is
found (``$CUDA_HOME/bin/nvcc``, default ``/usr/local/cuda``); build with
``pip install --no-build-isolation -e .`` so that this script sees the installed torch.
Environment: ``FASTCL_BUILD_CUDA=0`` skips it; ``FASTCL_CUDA_ARCH`` lists the SM architectures
(default ``"80;90"``, sm_80 or newer); ``MAX_JOBS`` caps the parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    scope: dict = {}
    with open(os.path.join(HERE, "fastcl", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def _cuda_archs():
    archs = []
    for token in os.environ.get("FASTCL_CUDA_ARCH", "80;90").replace(",", ";").split(";"):
        arch = token.strip().replace(".", "")
        if not arch:
            continue
        if not arch.rstrip("a").isdigit() or int(arch.rstrip("a")) < 80:
            raise SystemExit(f"FASTCL_CUDA_ARCH: {token!r} is not an SM architecture >= 80 (e.g. '80;90')")
        archs.append(arch)
    return archs


def _cuda_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for fastcl._C, or ``{}`` when it cannot or should not be built."""
    if os.environ.get("FASTCL_BUILD_CUDA", "1") == "0":
        return {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported; its own search can settle on
    # /usr/local (where an nvcc wrapper lives) and then fails to link cudart
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        print(f"fastcl: no nvcc under {cuda_home}; installing without the CUDA extension", file=sys.stderr)
        return {}
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        print(f"fastcl: torch is not importable here ({exc}); installing without the CUDA extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return {}
    if torch.version.cuda is None:
        print("fastcl: torch is a CPU-only build; installing without the CUDA extension", file=sys.stderr)
        return {}
    archs = _cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="fastcl._C",
        sources=sources,
        define_macros=[("FASTCL_WITH_CUDA", None)],
        # the arch list only for the host compiler (nvcc would split a comma list): "80_90"
        extra_compile_args={"cxx": ["-O3", f"-DFASTCL_CUDA_ARCHS={'_'.join(archs)}"], "nvcc": ["-O3", *gencode]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="fastcl",
    version=_version(),
    description="Fused contrastive losses (CLIP, SigLIP, InfoNCE, SimCLR, SupCon, DCL) without the N x N logits",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastcl", "fastcl.backends", "fastcl.compat", "fastcl.ops", "fastcl.triton_kernels"],
    package_dir={"fastcl.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "numpy", "ruff"],
        # the peers the benchmark compares with, and its plots
        "bench": ["open_clip_torch==3.3.0", "matplotlib"],
        # the host libraries the drop-in classes are tested against, at the versions whose
        # quirks they reproduce
        "compat-test": ["open_clip_torch==3.3.0", "pytorch-metric-learning==2.9.0", "lightly==1.6.0",
                        "sentence-transformers==6.2.0", "info-nce-pytorch==0.1.4"],
    },
    **_cuda_extension_kwargs(),
)
