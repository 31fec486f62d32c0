"""Quantized checkpoints: the quantization state of a denoiser, saved and loaded on its FP weights.

A checkpoint holds

* the :class:`QuantConfig` (so loading rebuilds the same quantized modules);
* every quantizer's state: weight Δ/z per output channel and the frozen AdaRound choices
  (``round_up`` masks: the rounded integer weight is ``floor(W / Δ) + round_up``), activation
  Δ/z per time-step group;
* SVDQuant's per-layer transforms (smoothing factors and low-rank branch,
  :mod:`diffquant.quant.lowrank`), where a method set them;
* the time-step schedule of time-step-aware quantizers;
* optionally parameters of the denoiser by name (the ones a method changed beyond the quantizer
  state, e.g. the latent weights QuEST finetunes; PTQ leaves the pretrained weights unchanged);
* free-form ``meta`` (calibration time, losses, ...).

Loading applies it to a fresh FP UNet of the same model, so evaluation never repeats calibration::

    save_quantized(model.denoiser, path, quant_cfg, meta={"calib_time_s": 81.2})
    summary, meta = load_quantized(fresh_model.denoiser, fresh_model.spec, path)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from diffquant.cache import atomic_torch_save, load_torch
from diffquant.quant.config import QuantConfig
from diffquant.quant.state import iter_quantizers
from diffquant.quant.swap import QuantSummary, quantize_denoiser
from diffquant.quant.timestep import get_router
from diffquant.quant.typed import as_dataclass, as_dict

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec

FORMAT = "diffquant-quant-v1"


def quantizer_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``denoiser.state_dict()`` that belong to quantizers and layer transforms
    (detached, on CPU)."""
    prefixes = tuple(f"{name}." for name, _ in iter_quantizers(denoiser)) + tuple(
        f"{name}.transform."
        for name, m in denoiser.named_modules()
        if getattr(m, "transform", None) is not None
    )
    return {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items() if k.startswith(prefixes)}


def save_quantized(
    denoiser: nn.Module,
    path: Path | str,
    quant_cfg: Any,
    *,
    meta: Optional[dict[str, Any]] = None,
    params: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write the quantization state of ``denoiser`` and the values of ``params`` (qualified
    parameter names of ``denoiser``) to ``path`` (atomically); returns ``path``."""
    router = get_router(denoiser)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "quant_cfg": as_dict(as_dataclass(quant_cfg, QuantConfig)),
        "timesteps": router.state() if router is not None else None,
        "quantizers": quantizer_state_dict(denoiser),
        "weights": {k: v.detach().cpu().clone() for k, v in (params or {}).items()} or None,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    payload = load_torch(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a diffquant quantized checkpoint "
            f"(format {payload.get('format')!r}, expected {FORMAT!r})"
        )
    return payload


def load_quant_state(denoiser: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load quantizer state into an already quantized ``denoiser``; every quantizer must be covered."""
    expected = set(quantizer_state_dict(denoiser))
    result = denoiser.load_state_dict(state, strict=False)
    missing = sorted(k for k in result.missing_keys if k in expected)
    if missing or result.unexpected_keys:
        raise ValueError(
            "quantized checkpoint does not match the model's quantizers: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]} — was it saved with another model or "
            "quant config?"
        )


def load_quantized(
    denoiser: nn.Module, spec: DenoiserSpec, path: Path | str
) -> tuple[QuantSummary, dict[str, Any]]:
    """Quantize the FP ``denoiser`` (described by ``spec``, its family's
    :class:`~diffquant.models.denoiser.DenoiserSpec`) as recorded in ``path`` and load its state;
    returns the summary and the checkpoint's ``meta``."""
    payload = read_checkpoint(path)
    cfg = as_dataclass(payload["quant_cfg"], QuantConfig)
    ts = payload["timesteps"]
    summary = quantize_denoiser(
        denoiser, spec, cfg, timesteps=None if ts is None else ts["schedule"], init_weights=False
    )
    if ts is not None and get_router(denoiser) is None:
        raise ValueError(f"{path}: time-step schedule saved but the config is not time-step aware")
    if payload["weights"]:
        own = dict(denoiser.named_parameters())
        unknown = sorted(set(payload["weights"]) - set(own))
        if unknown:
            raise ValueError(f"{path}: saved parameters {unknown[:5]} are not in the denoiser")
        with torch.no_grad():
            for k, v in payload["weights"].items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))
    device = next(denoiser.parameters()).device
    load_quant_state(denoiser, {k: v.to(device) for k, v in payload["quantizers"].items()})
    return summary, payload["meta"]
