"""Diffusion model wrappers, one builder per family, registered in ``MODELS``."""

from diffquant.models import ldm  # noqa: F401  (registers "ldm")
from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings  # noqa: F401
from diffquant.models.loading import build_model  # noqa: F401
