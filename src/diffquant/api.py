"""The Python API, for a user's own pipeline (what torchao / ModelOpt users expect)::

    import diffquant
    pipe = diffquant.quantize(pipe, quant="w4a8", method="ptq", prompts=captions)
    images = pipe(prompt).images          # sampled with the fake-quantized UNet

It runs the same typed configs, methods and cache as ``run.py``: ``quant`` is a bit-width name
(``w8a8``, ``w4a8``, ``w4a6``, ``w4a4``, ``w3a8``, ``w3a6``: the ``conf/quant`` options), a
:class:`~diffquant.quant.config.QuantConfig` or a dict of its fields; ``method`` a registered
method name; ``**overrides`` the method's settings (nested dicts for nested settings, e.g.
``recon={"weight_iters": 500}``), validated like the config files (a misspelt key names the
closest valid one); ``calib_seed`` re-seeds all of calibration as ``run.py``'s ``calib_seed``
does (:mod:`diffquant.seeds`; 0: the method's own seeds).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.context import RunContext
from diffquant.methods.base import MethodResult
from diffquant.models.base import DiffusionModel
from diffquant.quant.config import FP_BITS, QuantConfig
from diffquant.registry import METHODS
from diffquant.schema import typed
from diffquant.seeds import check_calib_seed, with_calib_seed
from diffquant.validation import ConfigError, InvalidSetting


def quant_preset(name: str) -> QuantConfig:
    """The ``conf/quant/<name>.yaml`` option as a dataclass: ``w<W>a<A>`` or ``fp32``."""
    if name == "fp32":
        return QuantConfig(name="fp32", weight_bits=FP_BITS, act_bits=FP_BITS)
    match = re.fullmatch(r"w(\d+)a(\d+)", name)
    if match is None:
        raise ConfigError(f"quant={name!r}: use w<W>a<A> (e.g. w8a8, w4a8, w4a4, w3a6) or fp32")
    return QuantConfig(name=name, weight_bits=int(match[1]), act_bits=int(match[2]))


def quant_config(quant: str | QuantConfig | dict[str, Any]) -> QuantConfig:
    if isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        return quant_preset(quant)
    base = quant_preset(quant["name"]) if "name" in quant else QuantConfig()
    return typed(
        {**{k: getattr(base, k) for k in ("name", "weight_bits", "act_bits")}, **quant}, QuantConfig, "quant"
    )


def method_config(method: str, overrides: dict[str, Any], calib_seed: int = 0) -> Any:
    """The method's config dataclass with ``overrides`` (validated, naming bad keys), its seeds
    derived for ``calib_seed`` (:func:`diffquant.seeds.with_calib_seed`)."""
    METHODS.get(method)
    try:
        check_calib_seed(calib_seed)
    except InvalidSetting as err:
        raise ConfigError(f"calib_seed={calib_seed!r} {err.message}") from None
    return with_calib_seed(typed({"name": method, **overrides}, METHODS.schema(method), "method"), calib_seed)


def quantize_model(
    model: DiffusionModel,
    quant: str | QuantConfig | dict[str, Any] = "w4a8",
    method: str = "ptq",
    *,
    cache_dir: str | Path = "cache",
    output_dir: str | Path = "outputs/api",
    seed: int = 0,
    calib_seed: int = 0,
    **overrides: Any,
) -> MethodResult:
    """Quantize ``model.denoiser`` in place with ``method`` at ``quant``; returns the method's
    result (the model, the final quant config, its metrics). Cached under ``cache_dir`` exactly
    like ``run.py`` jobs."""
    from diffquant.app import quantize

    qcfg, mcfg = quant_config(quant), method_config(method, overrides, calib_seed)
    if method != "fp" and not qcfg.enabled:
        raise ConfigError(f"method={method} needs a bit-width, not quant={qcfg.name}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(run_dir=output_dir, cache_dir=Path(cache_dir), device=model.device, seed=seed)
    return quantize(model, qcfg, mcfg, ctx)


def quantize(
    pipe: Any,
    quant: str | QuantConfig | dict[str, Any] = "w4a8",
    method: str = "ptq",
    *,
    prompts: Optional[Sequence[str]] = None,
    num_inference_steps: int = 50,
    guidance_scale: Optional[float] = None,
    num_classes: Optional[int] = None,
    name: str = "pipeline",
    cache_dir: str | Path = "cache",
    output_dir: str | Path = "outputs/api",
    seed: int = 0,
    calib_seed: int = 0,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> Any:
    """Quantize a diffusers pipeline's denoiser in place and return the pipeline.

    ``pipe`` is a diffusers pipeline (see :func:`diffquant.models.pipeline.from_pipeline`; the
    sampler settings, ``prompts`` and ``num_classes`` say how calibration trajectories are
    sampled: use the settings you will sample with) or a diffquant model wrapper. The method's
    result (metrics, final quant config) is attached as ``pipe.diffquant_result``.
    """
    from diffquant.models.pipeline import from_pipeline

    model = (
        pipe
        if isinstance(pipe, DiffusionModel)
        else from_pipeline(
            pipe,
            name=name,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            prompts=prompts,
            num_classes=num_classes,
            device=device,
        )
    )
    result = quantize_model(
        model,
        quant,
        method,
        cache_dir=cache_dir,
        output_dir=output_dir,
        seed=seed,
        calib_seed=calib_seed,
        **overrides,
    )
    object.__setattr__(pipe, "diffquant_result", result)
    return pipe
