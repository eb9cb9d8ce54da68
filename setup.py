"""fastcl's pip build.

Installs the pure-Python package ``fastcl`` and the Triton kernels in ``triton_kernels/`` as
the subpackage ``fastcl.triton_kernels`` (the top-level name ``triton_kernels`` is taken on PyPI
and by Triton itself). Compiled extensions are optional: the package installs and runs (torch
backend, Triton backend) without them.
"""

import os

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


setup(
    name="fastcl",
    version=_version(),
    description="Fused contrastive losses (CLIP, SigLIP, InfoNCE, SimCLR, SupCon, DCL) without the N x N logits",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastcl", "fastcl.backends", "fastcl.triton_kernels"],
    package_dir={"fastcl.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "numpy"],
    },
)
