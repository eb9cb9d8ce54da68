"""The autograd layer: one Function per loss family over any backend's passes.

:mod:`fastcl.ops.softmax` and :mod:`fastcl.ops.sigmoid` run the passes through a *columns*
object -- :class:`LocalColumns` for a single process (one block of columns, one call of each
pass), or the ring of :mod:`fastcl.distributed` (one block per rank, partials merged) -- and
assemble every gradient once. :mod:`fastcl.ops.epilogues` holds the per-anchor math.
"""

from . import smoothing
from .sigmoid import SigmoidLoss
from .softmax import LocalColumns, SoftmaxLoss

__all__ = ["LocalColumns", "SigmoidLoss", "SoftmaxLoss", "smoothing"]
