"""Model-wide switches and look-ups over the quantizers of a quantized denoiser.

* :func:`quant_state` — a context that turns weight and/or activation quantization on or off
  everywhere (``None`` leaves a kind as it is), so one model object serves as FP teacher and as
  quantized student::

      with quant_state(denoiser, weights=False, acts=False):
          target = denoiser(**kwargs).sample            # the FP model

* :func:`frozen_weights` — a context in which every quantized layer computes with its
  fake-quantized weight computed once on entry instead of at every call (inference: sampling is
  ``no_grad`` and changes no quantizer), the same values bit for bit.
* :func:`trainable` — a context in which given parameters require gradients (their flags restored
  and gradients dropped on exit).
* :func:`keep_step_sizes_positive` — after an optimizer step, learned step sizes stay positive.
* :func:`activation_drop` — QDrop: within the context, each activation element is quantized with
  a given probability and FP otherwise (PTQ4DM's reconstruction).
* :func:`iter_quantizers` — every leaf quantizer with its qualified name, by kind: ``weight``,
  ``act`` (activation quantizers with a calibrated, learnable range) or ``dynamic`` (dynamic
  per-token activation quantizers, :class:`~diffquant.quant.quantizers.TokenActQuantizer`: no
  range to calibrate or learn, so every method that calibrates or trains ``act`` quantizers skips
  them; :func:`quant_state` switches them with the other activation quantizers).
* :func:`quant_parameters` — the trainable tensors by kind and module-name pattern:

  ==================  ================================================================
  ``act_scale``       step sizes Δ of activation quantizers (LSQ; ``(G, C)`` each; dynamic
                      per-token quantizers have none)
  ``weight_round``    AdaRound α of weights in ``soft`` rounding
  ``weight_latent``   FP latent weights of quantized Conv2d/Linear layers (QuEST)
  ``bias``            biases of quantized Conv2d/Linear layers
  ==================  ================================================================
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import torch
from torch import nn

from diffquant.quant.modules import is_quant_layer
from diffquant.quant.quantizers import ActQuantizer, WeightQuantizer

Quantizer = Union[WeightQuantizer, ActQuantizer]
PARAM_KINDS = ("act_scale", "weight_round", "weight_latent", "bias")


def iter_quantizers(module: nn.Module, kind: Optional[str] = None) -> Iterator[tuple[str, Quantizer]]:
    """``(name, quantizer)`` for every weight (``kind="weight"``), calibrated activation
    (``"act"``), dynamic per-token activation (``"dynamic"``) or any (``None``) leaf quantizer
    under ``module``; split quantizers yield their two halves."""
    want = {None: (WeightQuantizer, ActQuantizer), "weight": (WeightQuantizer,), "act": (ActQuantizer,)}
    want["dynamic"] = (ActQuantizer,)
    if kind not in want:
        raise ValueError(f"unknown quantizer kind {kind!r}; use 'weight', 'act', 'dynamic' or None")
    for name, m in module.named_modules():
        if not isinstance(m, want[kind]):
            continue
        if kind in ("act", "dynamic") and m.dynamic != (kind == "dynamic"):
            continue
        yield name, m


def is_quantized(module: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(module))


def set_quant_state(
    module: nn.Module, weights: Optional[bool] = None, acts: Optional[bool] = None
) -> dict[Quantizer, bool]:
    """Enable/disable weight and activation quantizers; returns the previous flags."""
    previous: dict[Quantizer, bool] = {}
    for _, q in iter_quantizers(module):
        flag = weights if isinstance(q, WeightQuantizer) else acts
        previous[q] = q.enabled
        if flag is not None:
            q.enabled = bool(flag)
    return previous


@contextlib.contextmanager
def quant_state(
    module: nn.Module, weights: Optional[bool] = None, acts: Optional[bool] = None
) -> Iterator[None]:
    """Within the block, weight/activation quantization of ``module`` is on/off as given;
    the previous flags are restored on exit (also on error)."""
    previous = set_quant_state(module, weights, acts)
    try:
        yield
    finally:
        for q, flag in previous.items():
            q.enabled = flag


def _matches(name: str, patterns: Optional[Union[str, Iterable[str]]]) -> bool:
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.search(p, name) for p in patterns)


def quant_parameters(
    module: nn.Module,
    kind: str,
    include: Optional[Union[str, Iterable[str]]] = None,
    exclude: Optional[Union[str, Iterable[str]]] = None,
    max_bits: Optional[int] = None,
) -> dict[str, nn.Parameter]:
    """The parameters of one kind (see the module doc), keyed by qualified parameter name.

    ``include`` / ``exclude``: regular expressions (or lists of them) searched in the parameter's
    qualified name, which contains its module path (a user's selection; methods select layers by
    the denoiser's roles, :mod:`diffquant.models.denoiser`). ``max_bits``: only quantizers/layers with at most that many bits (e.g.
    15 leaves out 16-bit softmax quantizers, as Q-Diffusion's LSQ stage does).
    """
    if kind not in PARAM_KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; use one of {PARAM_KINDS}")
    found: dict[str, nn.Parameter] = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if kind == "act_scale" and isinstance(m, ActQuantizer) and not m.dynamic:
            if max_bits is None or m.bits <= max_bits:
                found[prefix + "scale"] = m.scale
        elif kind == "weight_round" and isinstance(m, WeightQuantizer) and m.adaround is not None:
            if max_bits is None or m.bits <= max_bits:
                found[prefix + "adaround.alpha"] = m.adaround.alpha
        elif kind in ("weight_latent", "bias") and is_quant_layer(m):
            p = m.weight if kind == "weight_latent" else m.bias
            if p is not None:
                found[prefix + ("weight" if kind == "weight_latent" else "bias")] = p
    return {
        n: p
        for n, p in found.items()
        if _matches(n, include) and not (exclude is not None and _matches(n, exclude))
    }


def keep_fp_weights(module: nn.Module, include: Optional[Union[str, Iterable[str]]] = None) -> int:
    """Freeze FP copies of the weights/biases of the quantized layers whose names match
    ``include`` (all if None), so the FP teacher path (``quant_state(weights=False)``) keeps the
    original weights while their latent weights are finetuned. Returns the number of layers."""
    n = 0
    for name, m in module.named_modules():
        if is_quant_layer(m) and _matches(name, include):
            m.keep_fp_copy()
            n += 1
    return n


@contextlib.contextmanager
def frozen_weights(denoiser: nn.Module) -> Iterator[None]:
    """Within the context, each quantized layer with weight quantization on uses the weight its
    quantizer gives on entry (computed once, without a graph) instead of re-quantizing its latent
    weight at every forward; on exit the layers quantize at every call again.

    Only for code that changes no weight, scale or rounding in between and needs no gradient to
    the weights (sampling under ``no_grad``): the frozen weight would go stale. Turning weight
    quantization off inside (:func:`quant_state`) still gives the FP weight. Nested contexts keep
    the outer one's weights.
    """
    frozen = []
    with torch.no_grad():
        for module in denoiser.modules():
            if is_quant_layer(module) and module._weights_on() and module.frozen_weight is None:
                module.frozen_weight = module.compute_quantized_weight().detach()
                frozen.append(module)
    try:
        yield
    finally:
        for module in frozen:
            module.frozen_weight = None


@contextlib.contextmanager
def activation_drop(module: nn.Module, keep_prob: Optional[float]) -> Iterator[None]:
    """QDrop (Wei et al., ICLR 2022; PTQ4DM's reconstruction): within the block, every
    activation quantizer of ``module`` outputs its quantized value for each element with
    probability ``keep_prob`` and the FP value otherwise (a fresh mask per call; see
    :class:`~diffquant.quant.quantizers.ActQuantizer`). ``None`` or 1 changes nothing."""
    if keep_prob is None or keep_prob >= 1.0:
        yield
        return
    quantizers = [q for _, q in iter_quantizers(module, "act")]
    previous = [q.keep_prob for q in quantizers]
    for q in quantizers:
        q.keep_prob = float(keep_prob)
    try:
        yield
    finally:
        for q, p in zip(quantizers, previous):
            q.keep_prob = p


@contextlib.contextmanager
def trainable(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, ``params`` require gradients; on exit (also on error) each gets its
    previous flag back and its gradient is dropped."""
    was = [(p, p.requires_grad) for p in params]
    for p, _ in was:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
            p.grad = None


MIN_STEP_SIZE = 1e-8


@torch.no_grad()
def keep_step_sizes_positive(scales: Iterable[torch.Tensor]) -> None:
    """After an optimizer step on activation step sizes Δ (LSQ and every method that learns
    them), clamp each to at least :data:`MIN_STEP_SIZE` in place, so no grid collapses."""
    for s in scales:
        s.clamp_(min=MIN_STEP_SIZE)
