"""Diffusion model wrappers, one builder per family, registered in ``MODELS`` (one module each;
:class:`~diffquant.registry.Registry` imports every module of this package). A family declares
its denoiser in :mod:`diffquant.models.denoiser`."""

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings  # noqa: F401
from diffquant.models.loading import build_model  # noqa: F401
