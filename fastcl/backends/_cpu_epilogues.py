"""The compiled CPU tile epilogues (``csrc/cpu``, built as ``fastcl._cpu``).

The torch backend's Matryoshka one sweep spends its CPU time, beyond the matmuls, in
elementwise passes over each tile (scale, exponentiate, reduce, accumulate), four to eight per
prefix. ``fastcl._cpu`` does each tile's step in one pass over the raw products; the torch
backend calls it where its preconditions hold (float32, row-scaled form, no masks, one-hot
positives) and runs the PyTorch form everywhere else. ``setup.py`` builds it wherever a C++
compiler is found; without it (or with ``FASTCL_CPU_EPILOGUES=0``) the PyTorch form runs.
"""

from typing import Optional

from .. import _config

try:
    from .. import _cpu as _module
    NOT_BUILT_BECAUSE: Optional[str] = None
except ImportError as exc:  # a build without a C++ compiler, or a source tree never built
    _module = None
    NOT_BUILT_BECAUSE = f"fastcl._cpu did not import: {exc}"


def module():
    """``fastcl._cpu`` when it is built and not switched off (``FASTCL_CPU_EPILOGUES=0``), else
    ``None``."""
    return _module if _module is not None and _config.cpu_epilogues() else None
