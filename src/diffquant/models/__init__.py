"""Diffusion model wrappers, one builder per family, registered in ``MODELS``."""

from diffquant.models import ldm  # noqa: F401  (registers "ldm")
from diffquant.models import ldm_compvis  # noqa: F401  (registers "ldm_compvis")
from diffquant.models import ldm_cond  # noqa: F401  (registers "ldm_class_context")
from diffquant.models import sd  # noqa: F401  (registers "sd")
from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings  # noqa: F401
from diffquant.models.loading import build_model  # noqa: F401
