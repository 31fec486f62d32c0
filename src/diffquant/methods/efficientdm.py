"""``efficientdm``: EfficientDM (He et al., ICLR 2024) — data-free quantization-aware low-rank
finetuning.

Steps, keyed to the paper and its code (``ThisisBillhe/EfficientDM``; file and line for each
setting in ``experiments/FIDELITY.md``):

1. **Naive PTQ base** (``base``: ``method=ptq_minmax``'s settings, its cached result shared):
   weights round-to-nearest on per-channel ranges, activations calibrated once.
2. **TALSQ**: every activation quantizer gets one step size per sampler step (the job's quant
   config made time-step aware with ``S`` groups, each a copy of the base's), learned below.
3. **QALoRA**: every quantized Conv2d / Linear outside ``exclude_roles`` gets a rank-``rank``
   update ``ΔW = B·A`` (A: Kaiming-uniform, B: zeros; for a conv, A is a ``k×k`` conv to ``r``
   channels and B a ``1×1``), as a :mod:`torch.nn.utils.parametrize` parametrization of its
   weight, so the layer computes with ``Q(W + B·A)`` (the weight quantizer's per-channel grid,
   straight-through rounding).
4. **Distillation, data-free**: ``epochs`` FP trajectories of ``batch_size`` samples (seed
   ``seed``, the model's own conditions and sampler; the chain follows the FP prediction); at
   every sampler step the quantized model's guided ε is regressed onto the FP model's on the
   same ``x_t`` (summed squared error), one AdamW step per sampler step: LoRA at
   ``mean(Δ_w) / lora_lr_divisor`` per layer, step sizes at ``act_lr``, linear decay to 0.
5. **Merge**: ``W ← W + B·A`` (the parametrization removed, its value kept), so the model is an
   ordinary quantized model: its weights quantize to the configured bits exactly as during
   finetuning (the code keeps A and B and recomputes ``Q(W + B·A)`` at every call: the same
   values).

A stopped run resumes after its last finished trajectory (``efficientdm_progress.pt``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from diffquant.cache import atomic_torch_save
from diffquant.methods.base import Method, MethodResult
from diffquant.methods.ptq import PTQMinMaxConfig, _check_finite_quantizers
from diffquant.methods.quest import make_timestep_aware
from diffquant.methods.result_cache import run_method
from diffquant.methods.trajectory import Trajectories, fp_trajectories
from diffquant.models.base import step_noise_kwargs
from diffquant.quant.config import FP_BITS, QuantConfig
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.state import (
    iter_quantizers,
    keep_step_sizes_positive,
    quant_parameters,
    quant_state,
    trainable,
)
from diffquant.quant.timestep import sampler_step
from diffquant.registry import METHODS
from diffquant.stopping import check_stop
from diffquant.validation import InvalidSetting, positive

log = logging.getLogger(__name__)

PROGRESS_FILE = "efficientdm_progress.pt"
SOFTMAX_FP_BITS = 16


class LoRADelta(nn.Module):
    """Parametrization ``W ↦ W + B·A`` of a Conv2d / Linear weight ``(C_out, C_in, ...)``:
    ``A`` ``(r, C_in, ...)`` (Kaiming-uniform, a = √5), ``B`` ``(C_out, r)`` (zeros).
    ``enabled = False`` returns ``W`` (the FP teacher)."""

    def __init__(self, weight: Tensor, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, *weight.shape[1:], dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], rank, dtype=weight.dtype, device=weight.device))
        self.enabled = True

    def delta(self) -> Tensor:
        return (self.B @ self.A.flatten(1)).view(self.B.shape[0], *self.A.shape[1:])

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta() if self.enabled else weight


@dataclass
class EfficientDMConfig:
    """``method=efficientdm`` (module doc).

    Attributes:
        name: ``efficientdm``.
        base: the naive PTQ base (``method=ptq_minmax``'s settings; its cached result is reused).
        rank: LoRA rank r.
        exclude_roles: denoiser roles whose layers get no LoRA (the code's four 8-bit layers:
            the time-embedding MLP, the input and the output convolution).
        talsq: one activation step size per sampler step (else one for all steps), learned.
        epochs: FP trajectories distilled along (one AdamW step per sampler step each).
        batch_size: samples per trajectory (×2 rows with guidance).
        lora_lr_divisor: a layer's LoRA learning rate is its mean weight step size / this (the
            code's 2,500 for 16,000 iterations; the embedded default 100 keeps the product of
            learning rate and iterations for its 640: 2,500 × 640 / 16,000).
        act_lr: learning rate of the activation step sizes.
        weight_decay: AdamW's weight decay (PyTorch's default, as the code).
        seed: base seed of the trajectories and of the LoRA initialisation (re-seeded by the
            run's ``calib_seed``).
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "efficientdm"
    base: PTQMinMaxConfig = field(default_factory=PTQMinMaxConfig)
    rank: int = 32
    exclude_roles: list[str] = field(default_factory=lambda: ["first", "last", "time_embedding"])
    talsq: bool = True
    epochs: int = 32
    batch_size: int = 8
    lora_lr_divisor: float = 100.0
    act_lr: float = 5e-4
    weight_decay: float = 0.01
    seed: int = 40_000
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        positive(self, "rank", "epochs", "batch_size", "lora_lr_divisor", "act_lr")
        positive(self, "weight_decay", allow_zero=True)
        if self.base.name != "ptq_minmax":
            raise InvalidSetting("base.name", f"={self.base.name}: EfficientDM starts from ptq_minmax")


def lora_layers(denoiser: nn.Module, spec: Any, exclude_roles: list[str]) -> dict[str, nn.Module]:
    """The quantized layers with a weight quantizer that get LoRA."""
    excluded = set(spec.layers(denoiser, *exclude_roles)) if exclude_roles else set()
    return {
        n: m
        for n, m in denoiser.named_modules()
        if is_quant_layer(m) and m.weight_quantizer is not None and n not in excluded
    }


def attach_lora(layers: dict[str, nn.Module], rank: int) -> dict[str, LoRADelta]:
    """Parametrize every layer's weight as ``W + B·A`` (rank ``min(rank, C_out, C_in·k·k)``)."""
    deltas = {}
    for n, m in layers.items():
        r = min(rank, m.weight.shape[0], m.weight[0].numel())
        parametrize.register_parametrization(m, "weight", LoRADelta(m.weight.detach(), r))
        deltas[n] = m.parametrizations.weight[0]
    return deltas


def merge_lora(layers: dict[str, nn.Module]) -> None:
    """``W ← W + B·A``: remove the parametrizations, keeping their value as the weight."""
    for m in layers.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        m.weight.requires_grad_(False)


def _weight_step(layer: nn.Module) -> float:
    q = layer.weight_quantizer
    scales = [h.scale for h in (q.head, q.tail)] if hasattr(q, "head") else [q.scale]
    return float(torch.cat([s.flatten() for s in scales]).abs().mean())


@METHODS.register("efficientdm", schema=EfficientDMConfig)
class EfficientDM(Method):
    """``method=efficientdm``: naive PTQ → TALSQ + QALoRA distillation → merge (module doc)."""

    version = 1

    def changed_parameters(self, model: Any) -> dict[str, nn.Parameter]:
        """The merged weights of the quantized layers."""
        return quant_parameters(model.denoiser, "weight_latent")

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: EfficientDMConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        denoiser, spec = model.denoiser, model.spec
        # 1. naive PTQ base
        base = run_method(METHODS.get("ptq_minmax")(), model, quant, cfg.base, ctx)
        result = MethodResult(model, base.quant).merge(base)
        quant = base.quant
        steps = len(model.timesteps)
        # 2. TALSQ: one step size per sampler step
        if cfg.talsq and quant.act_bits < FP_BITS and steps > 1:
            make_timestep_aware(denoiser, spec, model.timesteps, steps)
            result.quant = dataclasses.replace(quant, timestep_aware=True, timestep_groups=steps)
        # 3. QALoRA
        torch.manual_seed(cfg.seed)
        layers = lora_layers(denoiser, spec, cfg.exclude_roles)
        deltas = attach_lora(layers, cfg.rank)
        scales = [q.scale for _, q in iter_quantizers(denoiser, "act") if q.bits < SOFTMAX_FP_BITS]
        groups = [
            {"params": [d.A, d.B], "lr": _weight_step(layers[n]) / cfg.lora_lr_divisor}
            for n, d in deltas.items()
        ]
        if scales:
            groups.append({"params": scales, "lr": cfg.act_lr})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        total = cfg.epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1.0 - it / total))
        # 4. distillation along FP trajectories, resumable per trajectory
        t0 = time.perf_counter()
        # the probe: one FP trajectory of batch_size samples of seed + 1 (the teacher: LoRA is
        # still zero, quantization off), sampled once for both measurements
        probe = fp_trajectories(model, list(range(cfg.batch_size)), cfg.seed + 1, cfg.batch_size)
        probe_before = probe_loss(model, probe)
        with trainable([p for g in groups for p in g["params"]]):
            losses = self._distill(model, cfg, deltas, scales, opt, sched, Path(progress) / PROGRESS_FILE)
        probe_after = probe_loss(model, probe)
        # 5. merge: the quantized weights are Q(W + BA), as during finetuning
        merge_lora(layers)
        _check_finite_quantizers(denoiser, cfg.name)
        result.metrics.update(
            efficientdm_lora_layers=len(layers),
            efficientdm_iters=total,
            efficientdm_loss_first=losses[0],
            efficientdm_loss_last=losses[-1],
            efficientdm_probe_loss_before=probe_before,
            efficientdm_probe_loss_after=probe_after,
            efficientdm_talsq_sets=result.quant.timestep_groups,
            finetune_s=round(time.perf_counter() - t0, 3),
        )
        log.info(
            "EfficientDM: %d LoRA layers, %d iterations, loss per trajectory %.4g -> %.4g",
            len(layers),
            total,
            losses[0],
            losses[-1],
        )
        return result

    def _distill(
        self,
        model: Any,
        cfg: EfficientDMConfig,
        deltas: dict[str, LoRADelta],
        scales: list[nn.Parameter],
        opt: torch.optim.Optimizer,
        sched: Any,
        state_file: Path,
    ) -> list[float]:
        """Step 4 (module doc); returns the mean loss per trajectory."""
        params = {f"{n}.{k}": p for n, d in deltas.items() for k, p in (("A", d.A), ("B", d.B))}
        params.update({f"act_scale.{i}": s for i, s in enumerate(scales)})
        losses: list[float] = []
        start = 0
        state_file.parent.mkdir(parents=True, exist_ok=True)
        if state_file.exists():
            saved = torch.load(state_file, map_location=model.device, weights_only=True)
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved["params"][k])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            losses, start = list(saved["losses"]), int(saved["epoch"])
            log.info("EfficientDM: resuming after trajectory %d of %d", start, cfg.epochs)
        steps = len(model.timesteps)
        for epoch in range(start, cfg.epochs):
            check_stop(where=f"EfficientDM: trajectory {epoch} of {cfg.epochs}")
            indices = list(range(epoch * cfg.batch_size, (epoch + 1) * cfg.batch_size))
            cond = model.conditions(indices, cfg.seed).to(model.device)
            x = model.initial_noise(indices, cfg.seed)
            model.scheduler.set_timesteps(model.sampler.num_inference_steps)
            total = 0.0
            for i in range(steps):
                t = model.timesteps[i]
                with sampler_step(model.denoiser, i):
                    with torch.no_grad(), _teacher(model.denoiser, deltas):
                        target = model.eps(x, t, cond)
                    out = model.eps(x, t, cond)
                loss = (out - target).pow(2).sum()
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"EfficientDM diverged at trajectory {epoch}, step {i} (loss {loss.item()}): "
                        "raise method.lora_lr_divisor or lower method.act_lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                keep_step_sizes_positive(scales)
                total += float(loss.detach())
                kwargs = step_noise_kwargs(model._step_kwargs, model.sampler.eta, x, i, indices, cfg.seed)
                with torch.no_grad():
                    x = model.scheduler.step(target, t, x, **kwargs).prev_sample
            losses.append(total / steps)
            atomic_torch_save(
                {
                    "epoch": epoch + 1,
                    "params": {k: p.detach() for k, p in params.items()},
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "losses": losses,
                },
                state_file,
            )
        return losses


@torch.no_grad()
def probe_loss(model: Any, probe: Trajectories) -> float:
    """The distillation loss (summed squared error of the guided ε, mean over sampler steps) of
    the quantized model on ``probe``, FP trajectories the finetuning never sees."""
    total = 0.0
    for i in range(probe.n_steps):
        with sampler_step(model.denoiser, i):
            out = model.eps(probe.states[i], model.timesteps[i], probe.cond)
        total += float((out - probe.outputs[i]).pow(2).sum())
    return total / probe.n_steps


class _teacher:
    """The FP model from the same module: quantization off, LoRA updates off."""

    def __init__(self, denoiser: nn.Module, deltas: dict[str, LoRADelta]) -> None:
        self.denoiser, self.deltas = denoiser, deltas
        self.state: Optional[Any] = None

    def __enter__(self) -> None:
        for d in self.deltas.values():
            d.enabled = False
        self.state = quant_state(self.denoiser, weights=False, acts=False)
        self.state.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.state.__exit__(*exc)
        for d in self.deltas.values():
            d.enabled = True
