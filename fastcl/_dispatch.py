"""The one place that chooses a backend: the ``backend=`` argument, then ``FASTCL_BACKEND``,
then ``auto``.

``auto`` picks the fastest backend that can run on the tensors' device and quietly falls back to
``torch``; a backend asked for by name that cannot run raises with the reason.
"""

import importlib
from typing import Optional

import torch

from . import _config

BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}


def _module(name: str):
    return importlib.import_module(f"fastcl.backends.{name}")


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device``, else a sentence saying why not."""
    try:
        return _module(name).available(device)
    except ImportError as exc:
        return f"fastcl.backends.{name} cannot run here: an import failed ({exc})"


def unsupported_reason(name: str, spec) -> Optional[str]:
    """``None`` if backend ``name``'s kernels cover ``spec`` (a lowered call's spec, or ``None``),
    else a sentence saying what they lack: a pass the spec names in ``spec.passes`` that the
    backend lacks, or what its ``unsupported(spec)`` says."""
    if spec is None:
        return None
    module = _module(name)
    missing = [p for p in getattr(spec, "passes", ()) if not hasattr(module, p)]
    if missing:
        return f"it has no {missing[0]} pass"
    check = getattr(module, "unsupported", None)
    return None if check is None else check(spec)


def resolve(backend: Optional[str], device: torch.device, spec=None):
    """Return the backend module to use for tensors on ``device`` and a call described by
    ``spec``: ``auto`` skips backends whose kernels do not cover it, a named one raises."""
    if backend is None:
        backend = _config.backend() or "auto"
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(name, device) is None and unsupported_reason(name, spec) is None:
                return _module(name)
        return _module("torch")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    reason = unsupported_reason(backend, spec)
    if reason is not None:
        others = [b for b in BACKENDS if b != backend and unsupported_reason(b, spec) is None]
        raise ValueError(f"backend={backend!r} does not support this call: {reason}; use "
                         f"{' or '.join(f'backend={b!r}' for b in others)} (or 'auto')")
    return _module(backend)


def usable_backends(device: torch.device):
    """Names of the backends that can run on ``device``."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
