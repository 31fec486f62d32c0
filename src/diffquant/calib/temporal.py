"""TFMQ-DM's temporal information aware reconstruction (TIAR; Huang et al., CVPR 2024).

The *temporal information block* is what a denoiser computes from the time step alone (and a
class label where the family embeds it with the time step): the ``time_embedding`` layers and
every ``time_projection`` layer that feeds the embedding into a block (a UNet's
``time_emb_proj``, a DiT's adaLN modulation). TFMQ-DM reconstructs it on its own outputs before
any block (TFMQ-DM ``quant/calibration.py`` lines 68-73, ``quant/quant_block.py`` lines 101-115):

1. AdaRound on the weights of every quantized layer of the two roles, activations off;
2. loss: the sum over the ``time_projection`` outputs ``(B, C_i)`` of
   ``‖out_q - out_fp‖_p^p`` (summed over channels, mean over rows; p = ``weight_p``), plus the
   rounding regulariser; targets are the FP block's outputs on the same inputs, computed in the
   same iteration (the block is a few small matmuls);
3. inputs: the time steps (and labels) of the weight-calibration rows, batches of
   ``batch_size`` drawn at random;
4. the roundings are hardened; block reconstruction then leaves these layers' weights alone
   (:class:`~diffquant.calib.reconstruct.Reconstructor`'s ``skip_weight_layers``).

The block runs alone through :meth:`~diffquant.models.denoiser.DenoiserSpec.temporal_outputs`,
which each family declares; :func:`check_temporal_outputs` first compares it with the outputs
the layers give inside a full denoiser call, so a family whose forward computes the embedding
differently fails before any work instead of reconstructing the wrong function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import atomic_torch_save
from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.calib.reconstruct import ReconSettings, _check_finite, _Tail, lp_loss
from diffquant.quant.adaround import AdaRound, RoundingSchedule
from diffquant.quant.checkpoint import load_quant_state, quantizer_state_dict
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.state import quant_state
from diffquant.stopping import check_stop

log = logging.getLogger(__name__)

ROLES = ("time_embedding", "time_projection")


@torch.no_grad()
def check_temporal_outputs(denoiser: nn.Module, spec: Any, batch: dict[str, Tensor]) -> None:
    """Raise if ``spec.temporal_outputs`` differs from what the ``time_projection`` layers output
    inside a full FP call of ``denoiser`` on ``batch`` (or names other layers)."""
    names = spec.layers(denoiser, "time_projection")
    modules = dict(denoiser.named_modules())
    seen: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.detach().clone()))
        for n in names
    ]
    try:
        with quant_state(denoiser, weights=False, acts=False):
            spec.forward(denoiser, batch)
            alone = spec.temporal_outputs(denoiser, spec.temporal_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    if set(alone) != set(seen):
        raise RuntimeError(
            f"{spec.family} temporal_outputs gives layers {sorted(alone)[:4]}..., the denoiser's "
            f"time_projection layers are {sorted(seen)[:4]}...: they must be the same"
        )
    for n, ref in seen.items():
        out = alone[n].reshape(ref.shape)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            err = float((out - ref).abs().max())
            raise RuntimeError(
                f"{spec.family} temporal_outputs differs from the denoiser's own forward at {n} "
                f"(max |diff| {err:.3g}): the family's time-step embedding is not run as its "
                "forward runs it; TIAR would reconstruct the wrong function"
            )


def temporal_layers(denoiser: nn.Module, spec: Any) -> list[str]:
    """The quantized layers with a weight quantizer in the temporal information block."""
    modules = dict(denoiser.named_modules())
    return [
        n
        for n in spec.require(denoiser, "time_projection", purpose="TFMQ-DM's TIAR")
        + spec.layers(denoiser, "time_embedding")
        if is_quant_layer(modules[n]) and modules[n].weight_quantizer is not None
    ]


def _inputs(stream: CalibStream, rows: Tensor, spec: Any) -> dict[str, Tensor]:
    """The temporal inputs of ``rows`` (small: a time step and maybe a label per row)."""
    parts: list[dict[str, Tensor]] = []
    for batch in stream.ordered_batches(4096, rows):
        batch.pop(STEP_KEY, None)
        parts.append(spec.temporal_inputs(batch))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def reconstruct_temporal(
    denoiser: nn.Module,
    spec: Any,
    stream: CalibStream,
    settings: ReconSettings,
    iters: int,
    *,
    state_file: Optional[Path] = None,
) -> dict[str, Any]:
    """TIAR (module doc) on the quantized ``denoiser`` in place; returns
    ``{"layers": names, "loss": final loss}``. With ``state_file``, a finished reconstruction is
    saved there and loaded instead of rerun (a resumed job)."""
    layers = temporal_layers(denoiser, spec)
    modules = dict(denoiser.named_modules())
    device = next(denoiser.parameters()).device
    if state_file is not None and Path(state_file).exists():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        for n in layers:
            prefix = f"{n}."
            load_quant_state(
                modules[n], {k[len(prefix) :]: v for k, v in saved["state"].items() if k.startswith(prefix)}
            )
        log.info("TIAR: loaded the finished temporal reconstruction from %s", state_file)
        return {"layers": layers, "loss": float(saved["loss"])}
    rows = stream.subset(settings.max_rows, settings.seed)
    inputs = {k: v.to(device) for k, v in _inputs(stream, rows, spec).items()}
    check_temporal_outputs(denoiser, spec, next(stream.batches(2, rows[:2], device=device)))
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    denoiser.requires_grad_(False)
    roundings: list[AdaRound] = []
    for n in layers:
        r = modules[n].weight_quantizer.start_adaround(modules[n].weight)
        roundings.extend(r if isinstance(r, list) else [r])
    opt = torch.optim.Adam([r.alpha for r in roundings], lr=settings.weight_lr)
    schedule = RoundingSchedule(
        iters, settings.round_reg, settings.warmup, settings.beta_start, settings.beta_end
    )
    gen = torch.Generator().manual_seed(settings.seed * 7919 + 104_729)
    torch.manual_seed(settings.seed * 7919 + 104_729)
    tail = _Tail(iters)
    n_rows = len(rows)
    try:
        for it in range(iters):
            check_stop(where=f"TIAR: iteration {it} of {iters}")
            idx = torch.randperm(n_rows, generator=gen)[: settings.batch_size].to(device)
            batch = {k: v[idx] for k, v in inputs.items()}
            with torch.no_grad(), quant_state(denoiser, weights=False, acts=False):
                target = spec.temporal_outputs(denoiser, batch)
            with quant_state(denoiser, weights=True, acts=False):
                out = spec.temporal_outputs(denoiser, batch)
            rec = sum(lp_loss(out[k], target[k], settings.weight_p, "channels") for k in target)
            loss = rec + schedule.loss(it, roundings).to(rec.device)
            _check_finite(loss, "the temporal information block", "weight")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tail.add(it, float(rec.item()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    for n in layers:
        modules[n].weight_quantizer.harden()
    result = {"layers": layers, "loss": tail.mean()}
    if state_file is not None:
        state = {f"{n}.{k}": v for n in layers for k, v in quantizer_state_dict(modules[n]).items()}
        atomic_torch_save({"state": state, "loss": result["loss"]}, Path(state_file))
    log.info("TIAR: %d layers, %d iterations, final loss %.4g", len(layers), iters, result["loss"])
    return result
