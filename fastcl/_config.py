"""Every ``FASTCL_*`` environment variable, parsed in one place; a bad value raises naming the
variable. Read at each call (tests and users change them between calls).

| variable | meaning |
| --- | --- |
| ``FASTCL_BACKEND`` | backend when ``backend=None``: ``auto``, ``torch``, ``triton``, ``cuda`` |
| ``FASTCL_TORCH_BLOCK`` | ``"rows,cols"``: the torch backend's tile shape |
| ``FASTCL_TRITON_BLOCK`` | ``"A,B,D,X"``: fixed Triton block sizes (no autotuning) |
| ``FASTCL_CUDA_SPLIT`` | ``k >= 0``: pieces the CUDA kernels cut the other side into (0: chosen) |
| ``FASTCL_BACKWARD`` | gradient pass: ``auto`` (a cost model), ``fused`` or ``chunked`` (docs/design.md §7) |
| ``FASTCL_MEMORY_BUDGET_MB`` | ``m > 0``: the chunked pass's workspace limit in MiB (default 512) |
| ``FASTCL_PREFIXES`` | Matryoshka prefixes: ``auto`` (a cost rule), ``fused`` (one sweep) or ``per_prefix`` |
| ``FASTCL_CPU_EPILOGUES`` | ``0``: the torch backend's one sweep skips the compiled CPU epilogues (``fastcl._cpu``) |

(``FASTCL_BUILD_CUDA`` and ``FASTCL_CUDA_ARCH`` are read by ``setup.py`` at build time.)
"""

import os
from typing import Optional, Tuple

BACKWARD_PASSES = ("auto", "fused", "chunked")
PREFIX_PLANS = ("auto", "fused", "per_prefix")
DEFAULT_MEMORY_BUDGET_MB = 512


def _ints(name: str, count: int, minimum: int) -> Optional[Tuple[int, ...]]:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != count or any(v < minimum for v in values):
        raise ValueError(f"{name}={raw!r}: expected {count} comma-separated integers >= {minimum}")
    return values


def backend() -> Optional[str]:
    return os.environ.get("FASTCL_BACKEND") or None


def torch_block() -> Optional[Tuple[int, int]]:
    return _ints("FASTCL_TORCH_BLOCK", 2, 1)


def triton_block() -> Optional[Tuple[int, int, int, int]]:
    return _ints("FASTCL_TRITON_BLOCK", 4, 1)


def cuda_split() -> int:
    value = _ints("FASTCL_CUDA_SPLIT", 1, 0)
    return 0 if value is None else value[0]


def backward() -> str:
    raw = os.environ.get("FASTCL_BACKWARD") or "auto"
    if raw not in BACKWARD_PASSES:
        raise ValueError(f"FASTCL_BACKWARD={raw!r}: expected one of {', '.join(BACKWARD_PASSES)}")
    return raw


def prefixes() -> str:
    raw = os.environ.get("FASTCL_PREFIXES") or "auto"
    if raw not in PREFIX_PLANS:
        raise ValueError(f"FASTCL_PREFIXES={raw!r}: expected one of {', '.join(PREFIX_PLANS)}")
    return raw


def cpu_epilogues() -> bool:
    raw = os.environ.get("FASTCL_CPU_EPILOGUES") or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"FASTCL_CPU_EPILOGUES={raw!r}: expected 0 or 1")
    return raw == "1"


def memory_budget_bytes() -> int:
    """The budget in bytes; fractions of a MiB are allowed (tests force many small chunks)."""
    raw = os.environ.get("FASTCL_MEMORY_BUDGET_MB")
    if not raw:
        return DEFAULT_MEMORY_BUDGET_MB << 20
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"FASTCL_MEMORY_BUDGET_MB={raw!r}: expected a number of MiB > 0")
    return max(1, int(value * (1 << 20)))
