"""fastcl: fused contrastive losses that never materialise the N x M similarity matrix.

Public API: the loss functions in :mod:`fastcl.functional` (re-exported here), the modules in
:mod:`fastcl.nn`, and :func:`build_info`.
"""

from . import nn
from ._version import __version__
from .functional import clip_loss, dcl, distill_clip_loss, info_nce, nt_xent, siglip_loss, supcon

__all__ = ["__version__", "build_info", "clip_loss", "dcl", "distill_clip_loss", "info_nce", "nn", "nt_xent",
           "siglip_loss", "supcon"]


def build_info() -> dict:
    """What this installation of fastcl was built with and can run.

    Returns a dict with ``version``; ``torch`` and ``triton`` versions (``triton`` is None when
    Triton is not installed); ``cuda_extension`` (True when the compiled ``fastcl._C`` extension
    was built with CUDA kernels); ``cuda_extension_reason`` (why not, else None); ``cuda_archs``
    (the architectures it was built for); ``cpu_extension`` (True when ``fastcl._cpu``, the
    torch backend's compiled CPU epilogues, imports) and ``cpu_extension_reason`` (why not);
    ``backends`` (the backends usable for tensors on this machine: CUDA tensors if a GPU is
    visible, else CPU tensors).
    """
    import torch

    from ._dispatch import usable_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    reason = None
    try:
        from . import _C

        cuda_extension = bool(_C.built_with_cuda())
        cuda_archs = list(_C.cuda_archs())
        if not cuda_extension:
            reason = "fastcl._C was built without CUDA kernels"
    except ImportError as exc:
        cuda_extension, cuda_archs = False, []
        try:
            from ._build import CUDA_EXTENSION_SKIPPED
        except ImportError:  # a source tree no setup.py has built
            CUDA_EXTENSION_SKIPPED = None
        reason = CUDA_EXTENSION_SKIPPED or f"fastcl._C does not import ({exc})"
    from .backends import _cpu_epilogues

    cpu_reason = None
    if _cpu_epilogues.NOT_BUILT_BECAUSE is not None:
        try:
            from ._build import CPU_EXTENSION_SKIPPED
        except ImportError:  # a source tree no setup.py has built, or one built before fastcl._cpu
            CPU_EXTENSION_SKIPPED = None
        cpu_reason = CPU_EXTENSION_SKIPPED or _cpu_epilogues.NOT_BUILT_BECAUSE
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "version": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_extension": cuda_extension,
        "cuda_extension_reason": reason,
        "cuda_archs": cuda_archs,
        "cpu_extension": cpu_reason is None,
        "cpu_extension_reason": cpu_reason,
        "device": str(device),
        "backends": usable_backends(device),
    }
