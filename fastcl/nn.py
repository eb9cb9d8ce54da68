"""``torch.nn.Module`` wrappers: they hold configuration and call :mod:`fastcl.functional`.

Every module takes ``group=None, gather="all_gather", local_loss=False`` (cross-rank negatives on
a ``torch.distributed`` process group; see :func:`fastcl.info_nce` and :mod:`fastcl.distributed`
for the modes and the gradient convention).
"""

from typing import Optional

import torch

from . import functional as F
from ._lower import DEFAULT_TEMPERATURE


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`fastcl.info_nce`; keyword arguments are stored and passed through.

    ``forward(query, key, **overrides)`` -- per-call keyword arguments (``positive_index``,
    ``labels``, ``negatives``, ...) override the stored ones. ``group``, ``gather`` and
    ``local_loss`` are options like the others.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, **options):
        super().__init__()
        if options.get("scale") is not None and temperature is not DEFAULT_TEMPERATURE:
            raise ValueError("InfoNCELoss: set either temperature or scale, not both")
        self.temperature = temperature
        self.options = options

    def forward(self, query, key, **overrides):
        options = {**self.options, **overrides}
        if options.get("scale") is None:
            options.setdefault("temperature", self.temperature)
        return F.info_nce(query, key, **options)


class _Distributed(torch.nn.Module):
    """Holds the backend and the cross-rank options shared by every module."""

    def __init__(self, backend: Optional[str], group, gather: str, local_loss: bool):
        super().__init__()
        self.backend, self.group, self.gather, self.local_loss = backend, group, gather, local_loss

    def _options(self) -> dict:
        return {"backend": self.backend, "group": self.group, "gather": self.gather, "local_loss": self.local_loss}


class ClipLoss(_Distributed):
    """Module form of :func:`fastcl.clip_loss`: ``forward(image_features, text_features,
    logit_scale, logit_bias=None)``; ``label_smoothing`` and ``false_negative_margin`` as there."""

    def __init__(self, backend: Optional[str] = None, *, label_smoothing: float = 0.0,
                 false_negative_margin: Optional[float] = None, group=None, gather: str = "all_gather",
                 local_loss: bool = False):
        super().__init__(backend, group, gather, local_loss)
        self.label_smoothing, self.false_negative_margin = label_smoothing, false_negative_margin

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                           label_smoothing=self.label_smoothing, false_negative_margin=self.false_negative_margin,
                           **self._options())


class SigLipLoss(_Distributed):
    """Module form of :func:`fastcl.siglip_loss`: ``forward(image_features, text_features,
    logit_scale, logit_bias, labels=None)`` (``labels``: group ids of the pairs, as there)."""

    def __init__(self, backend: Optional[str] = None, *, group=None, gather: str = "all_gather",
                 local_loss: bool = False):
        super().__init__(backend, group, gather, local_loss)

    def forward(self, image_features, text_features, logit_scale, logit_bias, labels=None):
        return F.siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                             **self._options())


class NTXentLoss(_Distributed):
    """Module form of :func:`fastcl.nt_xent`: ``forward(z1, z2)``."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True, backend: Optional[str] = None, *,
                 group=None, gather: str = "all_gather", local_loss: bool = False):
        super().__init__(backend, group, gather, local_loss)
        self.temperature, self.normalize = temperature, normalize

    def forward(self, z1, z2):
        return F.nt_xent(z1, z2, self.temperature, normalize=self.normalize, **self._options())


class SupConLoss(_Distributed):
    """Module form of :func:`fastcl.supcon`: ``forward(features[B, V, D], labels=None)``."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None,
                 contrast_mode: str = "all", backend: Optional[str] = None, *, group=None,
                 gather: str = "all_gather", local_loss: bool = False):
        super().__init__(backend, group, gather, local_loss)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.contrast_mode = contrast_mode

    def forward(self, features, labels=None):
        return F.supcon(features, labels, temperature=self.temperature, base_temperature=self.base_temperature,
                        contrast_mode=self.contrast_mode, **self._options())


class DCLLoss(_Distributed):
    """Module form of :func:`fastcl.dcl`: ``forward(z1, z2)``; ``weight_sigma`` gives DCLW."""

    def __init__(self, temperature: float = 0.1, weight_sigma: Optional[float] = None, normalize: bool = True,
                 backend: Optional[str] = None, *, group=None, gather: str = "all_gather", local_loss: bool = False):
        super().__init__(backend, group, gather, local_loss)
        self.temperature, self.weight_sigma, self.normalize = temperature, weight_sigma, normalize

    def forward(self, z1, z2):
        return F.dcl(z1, z2, self.temperature, weight_sigma=self.weight_sigma, normalize=self.normalize,
                     **self._options())
