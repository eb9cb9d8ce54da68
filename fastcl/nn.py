"""``torch.nn.Module`` wrappers: they hold configuration and call :mod:`fastcl.functional`."""

from typing import Optional

import torch

from . import functional as F


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`fastcl.info_nce`; keyword arguments are stored and passed through.

    ``forward(query, key, **overrides)`` -- per-call keyword arguments (``positive_index``,
    ``labels``, ``negatives``, ...) override the stored ones.
    """

    def __init__(self, temperature: float = 0.1, **options):
        super().__init__()
        self.temperature = temperature
        self.options = options

    def forward(self, query, key, **overrides):
        options = {**self.options, **overrides}
        if "scale" not in options:
            options.setdefault("temperature", self.temperature)
        return F.info_nce(query, key, **options)


class ClipLoss(torch.nn.Module):
    """Module form of :func:`fastcl.clip_loss`: ``forward(image_features, text_features,
    logit_scale, logit_bias=None)``."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return F.clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)


class SigLipLoss(torch.nn.Module):
    """Module form of :func:`fastcl.siglip_loss`: ``forward(image_features, text_features,
    logit_scale, logit_bias)``."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return F.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)


class NTXentLoss(torch.nn.Module):
    """Module form of :func:`fastcl.nt_xent`: ``forward(z1, z2)``."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.normalize, self.backend = temperature, normalize, backend

    def forward(self, z1, z2):
        return F.nt_xent(z1, z2, self.temperature, normalize=self.normalize, backend=self.backend)


class SupConLoss(torch.nn.Module):
    """Module form of :func:`fastcl.supcon`: ``forward(features[B, V, D], labels=None)``."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None,
                 contrast_mode: str = "all", backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.base_temperature = temperature, base_temperature
        self.contrast_mode, self.backend = contrast_mode, backend

    def forward(self, features, labels=None):
        return F.supcon(features, labels, temperature=self.temperature, base_temperature=self.base_temperature,
                        contrast_mode=self.contrast_mode, backend=self.backend)


class DCLLoss(torch.nn.Module):
    """Module form of :func:`fastcl.dcl`: ``forward(z1, z2)``; ``weight_sigma`` gives DCLW."""

    def __init__(self, temperature: float = 0.1, weight_sigma: Optional[float] = None, normalize: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.weight_sigma = temperature, weight_sigma
        self.normalize, self.backend = normalize, backend

    def forward(self, z1, z2):
        return F.dcl(z1, z2, self.temperature, weight_sigma=self.weight_sigma, normalize=self.normalize,
                     backend=self.backend)
