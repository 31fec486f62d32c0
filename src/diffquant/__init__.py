"""diffquant: low-bit post-training quantization of diffusion models.

``diffquant.quantize(pipe, quant="w4a8", method="ptq", ...)`` quantizes a diffusers pipeline's
denoiser (see :mod:`diffquant.api`); ``python run.py ...`` runs whole jobs from Hydra configs.
"""

from typing import Any

__all__ = ["quantize", "quantize_model"]


def __getattr__(name: str) -> Any:  # lazy: `import diffquant` stays cheap
    if name in __all__:
        from diffquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
