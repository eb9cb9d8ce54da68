"""The autograd layer: one Function per loss family over any backend's passes.

:mod:`fastcl.ops.softmax` and :mod:`fastcl.ops.sigmoid` run the passes through a *columns*
object -- :class:`LocalColumns` for a single process (one block of columns, one call of each
pass), or the ring of :mod:`fastcl.distributed` (one block per rank, partials merged) -- and
assemble every gradient once. :mod:`fastcl.ops.epilogues` holds the per-anchor math.

A single process runs the passes as PyTorch custom operators (:mod:`fastcl.ops.library`): the
statistics pass is differentiable (its backward is the gradient pass), so the epilogue runs under
ordinary autograd and ``torch.compile`` traces the whole loss. The ring keeps the Functions,
whose backward circulates the key blocks once more.
"""

from . import distill, library, matryoshka, smoothing
from .sigmoid import SigmoidLoss
from .softmax import LocalColumns, SoftmaxLoss

__all__ = ["LocalColumns", "SigmoidLoss", "SoftmaxLoss", "distill", "library", "matryoshka", "smoothing"]
