"""QuEST (Wang et al., ICCV 2025): temporal and sensitive-layer selective finetuning.

``method=quest`` starts from the baseline PTQ result (``method=ptq``, loaded from the cache when
the same model, quant config and PTQ settings were calibrated before: ``method.ptq`` holds exactly
``conf/method/ptq.yaml``) and then

1. **time-step-aware activations**: every activation quantizer gets one (Δ, z) set per group of
   sampler steps — by default one per recorded calibration step, as the QuEST code keeps one
   quantizer per calibration time step (the paper's text says a single set; the code does not).
   The denoiser's time-step hook picks the set at every sampler step. ``timestep_init``:
   ``lp`` / ``minmax`` set each group's range from that group's calibration rows (the QuEST code
   calibrates per time step; its search is a percentile one, ours the L_p one of the PTQ init);
   ``ptq`` copies PTQ's (LSQ-refined) set into every group.
2. **TLA**, then 3. **CMA**: selective finetuning of the time-embedding projections (the
   denoiser roles ``tla_roles``, default ``time_projection``) and of the critical layers with all
   remaining step sizes (:mod:`diffquant.methods.quest_finetune` says exactly which parameters
   train, the loss, and where targets come from).

Critical layers (``critical_layers``), read from the denoiser's roles
(:mod:`diffquant.models.denoiser`), never from module names:

* ``by_family`` (default) — the roles of the model family in ``critical_roles_by_family``:
  ``ldm`` (UNet2DModel with self-attention blocks, e.g. ldm_digits, LSUN LDMs) →
  ``self_attention_qkv`` (the QuEST code's ``qkv`` for LSUN); ``sd`` → ``feed_forward``,
  ``self_attention_qkv``, ``cross_attention_q`` (the QuEST code's ImageNet LDM-4 choice; its SD
  script uses the feed-forward layers only); any other family → ``default``.
* ``auto`` — the activation sensitivity sweep (:mod:`diffquant.methods.quest_sensitivity`) on
  the FP model picks the ``critical_top_k`` most sensitive units; its ranking is a file of the
  result (``sensitivity.md``) and is cached.
* a list of regular expressions searched in ``<layer>.weight`` (for users naming layers).

Ablations (``conf/method/quest_*.yaml``): ``tla: false`` (CMA only), ``cma: false`` (TLA only),
``global_loss_weight: 0`` (no L_G).

Metrics added to ``metrics.json``: ``finetune_s`` (TLA + CMA seconds), ``quest_setup_s`` (sweep,
time-step split and range init), ``n_trainable_params`` (scalars trained in any stage) and its
``trainable_param_frac`` of the denoiser, per-stage counts, losses and steps (``tla_*``, ``cma_*``),
and the denoiser-output MSE against FP on calibration rows not trained on, after PTQ
(``quest_eps_mse_ptq``), after the time-step split (``quest_eps_mse_init``) and at the end
(``quest_eps_mse_final``; None when no row was held out). The finetuned denoiser and these
metrics are cached (:mod:`diffquant.methods.result_cache`; ``quest_cached`` says whether this job
loaded them). A stopped job resumes the finetuning where it was saved last — after every epoch and
every ``progress_every`` optimiser steps (:mod:`diffquant.methods.progress`) — with the result of
an uninterrupted job; everything before it (PTQ base, time-step split, ranges) is loaded from the
cache or recomputed, and must match the saved fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import CacheEntry
from diffquant.calib.collect import CalibStream, collect_calibration, model_identity
from diffquant.calib.ranges import calibrate_act_ranges, minmax_patterns
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.progress import Checkpointer, cpu_tensors, load_tensors, tensor_digest
from diffquant.methods.ptq import PTQConfig, load_or_run_ptq
from diffquant.methods.quest_finetune import (
    FPTeacher,
    Stage,
    StageReport,
    layers_matching,
    load_rows,
    output_mse,
    plan_stages,
    rows_per_step,
    train_stage,
)
from diffquant.methods.quest_sensitivity import (
    JSON_FILE,
    SensitivityReport,
    SensitivitySettings,
    activation_sensitivity,
    load_report,
)
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.quant.config import FP_BITS, QuantConfig
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import iter_quantizers, quant_parameters
from diffquant.quant.timestep import attach_timestep_router
from diffquant.quant.typed import as_dict
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)

TIMESTEP_INITS = ("lp", "minmax", "ptq")


def _default_critical_by_family() -> dict[str, list[str]]:
    return {
        "ldm": ["self_attention_qkv"],
        "sd": ["feed_forward", "self_attention_qkv", "cross_attention_q"],
        "default": ["self_attention_qkv", "cross_attention_q", "cross_attention_kv"],
    }


@dataclass
class QuestConfig:
    """``method=quest``.

    Attributes:
        name: ``quest``.
        ptq: the baseline PTQ it starts from (``conf/method/ptq.yaml``; same values → same cache
            entry as ``method=ptq``).
        timestep_groups: activation parameter sets (groups of sampler steps); None = one per
            recorded calibration step (sampler steps / ``ptq.calib.step_stride``).
        timestep_init: per-group initial ranges from calibration rows by the ``lp`` search or
            ``minmax``, or ``ptq``: a copy of PTQ's single set in every group.
        timestep_init_rows: calibration rows for ``lp`` / ``minmax`` (None = all).
        tla / cma: run the Temporal Layer Alignment / Critical Module Alignment stage.
        global_loss_weight: λ of the UNet-output loss L_G (paper: 2).
        weight_lr / act_lr: Adam learning rates of latent weights (and biases) / step sizes.
        tla_epochs / cma_epochs: passes over the training rows per stage.
        samples_per_step: training rows drawn per recorded calibration step.
        batch_size: rows per optimiser step.
        train_bias: also finetune the selected layers' biases (the QuEST code does in TLA).
        tla_roles: the denoiser roles TLA finetunes (default ``time_projection``).
        critical_layers: ``by_family``, ``auto`` or a list of regexes (CMA's layers).
        critical_roles_by_family: model family → denoiser roles, for ``by_family``.
        critical_top_k: units ``auto`` picks from the sensitivity ranking.
        sensitivity: the sweep's settings (bits, rows).
        eval_rows: calibration rows not trained on, for the ``quest_eps_mse_*`` diagnostics.
        seed: row sampling and shuffling.
        progress_every: besides after every epoch, save the finetuning progress every that many
            optimiser steps (0: after epochs only), so that a stopped job resumes there
            (:mod:`diffquant.methods.progress`; results do not depend on it).
        ablation: a label only (``tla_only``, ``cma_only``, ``no_global``): the job's table row is
            ``quest[<ablation>]`` (``metrics.json``'s ``method_label``), not ``quest``.
        save_checkpoint: write the finetuned quantized UNet (with latent weights) to the run folder.
    """

    name: str = "quest"
    ptq: PTQConfig = field(default_factory=PTQConfig)
    timestep_groups: Optional[int] = None
    timestep_init: str = "lp"
    timestep_init_rows: Optional[int] = 512
    tla: bool = True
    cma: bool = True
    global_loss_weight: float = 2.0
    weight_lr: float = 1e-5
    act_lr: float = 1e-4
    tla_epochs: int = 4
    cma_epochs: int = 4
    samples_per_step: int = 32
    batch_size: int = 32
    train_bias: bool = True
    tla_roles: list[str] = field(default_factory=lambda: ["time_projection"])
    critical_layers: Any = "by_family"
    critical_roles_by_family: dict[str, list[str]] = field(default_factory=_default_critical_by_family)
    critical_top_k: int = 4
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)
    eval_rows: int = 128
    seed: int = 0
    progress_every: int = 20
    ablation: Optional[str] = None
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        validate_quest(self)


def validate_quest(cfg: QuestConfig) -> None:
    """Raise :class:`~diffquant.validation.InvalidSetting` naming the key and the fix for
    settings that cannot work (``QuestConfig`` calls it on construction)."""
    from diffquant.models.denoiser import ROLES

    one_of(cfg, "timestep_init", TIMESTEP_INITS)
    positive(cfg, "samples_per_step", "batch_size", "timestep_groups", "timestep_init_rows")
    positive(
        cfg, "global_loss_weight", "tla_epochs", "cma_epochs", "eval_rows", "progress_every", allow_zero=True
    )
    if isinstance(cfg.critical_layers, str) and cfg.critical_layers not in ("auto", "by_family"):
        raise InvalidSetting(
            "critical_layers",
            "is unknown: use 'auto', 'by_family' or a list of name patterns, e.g. '[to_q,ff.net]'",
        )
    roles = [*cfg.tla_roles, *(r for rs in cfg.critical_roles_by_family.values() for r in rs)]
    unknown = sorted({r for r in roles if r not in ROLES})
    if unknown:
        raise InvalidSetting(
            "tla_roles" if set(unknown) & set(cfg.tla_roles) else "critical_roles_by_family",
            f"has unknown role(s) {unknown}; roles are {', '.join(ROLES)}",
        )


# ---------------------------------------------------------------------------- time steps
def make_timestep_aware(denoiser: nn.Module, spec: Any, timesteps, n_groups: int) -> int:
    """Give every activation quantizer of ``denoiser`` ``n_groups`` parameter sets, each a copy of
    its current (single) set, and install the time-step router; returns the quantizers changed.

    The new quantizers are exactly those :func:`~diffquant.quant.swap.quantize_denoiser` builds with
    ``timestep_aware=True``, so a checkpoint saved afterwards loads with that config.
    """
    changed = 0
    for name, q in list(iter_quantizers(denoiser, "act")):
        if q.n_groups == n_groups:
            continue
        if q.n_groups != 1:
            raise ValueError(
                f"{name} already has {q.n_groups} time-step groups, not {n_groups}: "
                "set method.timestep_groups to match quant.timestep_groups"
            )
        new = ActQuantizer(q.bits, q.mode, q.channels, n_groups, q.per_channel)
        new.to(q.scale.device)
        with torch.no_grad():
            new.scale.data.copy_(q.scale.data.expand_as(new.scale))
            new.zero_point.copy_(q.zero_point.expand_as(new.zero_point))
            new.initialized.copy_(q.initialized)
        new.enabled = q.enabled
        parent, _, attr = name.rpartition(".")
        setattr(denoiser.get_submodule(parent) if parent else denoiser, attr, new)
        changed += 1
    attach_timestep_router(denoiser, spec, [int(t) for t in timesteps], n_groups)
    return changed


def resolve_groups(cfg: QuestConfig, qcfg: QuantConfig, stream: CalibStream, n_steps: int) -> int:
    if cfg.timestep_groups is not None:
        groups = cfg.timestep_groups
    elif qcfg.timestep_aware:
        groups = qcfg.timestep_groups
    else:
        groups = len(stream.index.get("steps") or range(0, n_steps, cfg.ptq.calib.step_stride))
    if not 1 <= groups <= n_steps:
        raise ValueError(f"method.timestep_groups={groups} must be in 1..{n_steps} (sampler steps)")
    return int(groups)


# ---------------------------------------------------------------------------- critical layers
def sensitivity_report(
    model: Any, qcfg: QuantConfig, cfg: QuestConfig, stream: CalibStream, ctx: Any
) -> SensitivityReport:
    """The activation sensitivity sweep of the FP ``model.denoiser``, cached by model, quant
    config, calibration set and sweep settings."""
    key = {
        "model": model_identity(model),
        "quant": {k: v for k, v in as_dict(qcfg).items() if k != "name"},
        "calib": as_dict(cfg.ptq.calib),
        "sensitivity": as_dict(cfg.sensitivity),
    }
    entry = CacheEntry(ctx.cache_dir, "quest_sensitivity", key)
    with entry.lock():
        if not entry.done():
            report = activation_sensitivity(
                model.denoiser, model.spec, qcfg, stream, cfg.sensitivity, model.device
            )
            with entry.writing() as tmp:
                report.write(tmp)
    return load_report(entry.path / JSON_FILE)


def resolve_critical_layers(
    model: Any,
    qcfg: QuantConfig,
    cfg: QuestConfig,
    stream: CalibStream,
    ctx: Any,
    exclude: list[str],
    result: MethodResult,
) -> list[str]:
    """CMA's layers (qualified names; see the module doc), none of ``exclude``; runs the sweep
    for ``auto`` and adds its ranking to ``result``."""
    denoiser, spec, choice = model.denoiser, model.spec, cfg.critical_layers
    if choice == "auto":
        report = sensitivity_report(model, qcfg, cfg, stream, ctx)
        selected = report.select(cfg.critical_top_k, exclude=exclude)
        result.files["sensitivity.md"] = report.to_markdown(selected)
        result.files["sensitivity.json"] = (
            json.dumps({**report.to_dict(), "selected": selected}, indent=2) + "\n"
        )
        result.tables["quest_sensitivity"] = Table(
            ["rank", "unit", "type", "mse", "rel_mse"],
            [[i + 1, u.name, u.type, u.error, u.rel_error] for i, u in enumerate(report.units)],
        )
        log.info("QuEST critical layers (auto, top %d): %s", cfg.critical_top_k, selected)
        return selected
    if choice is None or choice == "by_family":
        table = cfg.critical_roles_by_family
        roles = table.get(model.family, table.get("default", []))
        layers = spec.require(denoiser, *roles, purpose=f"QuEST's CMA (roles {roles})")
    else:
        layers = layers_matching(denoiser, [choice] if isinstance(choice, str) else list(choice))
    return [n for n in layers if n not in exclude]


# ---------------------------------------------------------------------------- the method
def _probe_batches(
    stream: CalibStream, train_rows: Tensor, cfg: QuestConfig, device
) -> list[dict[str, Tensor]]:
    """``eval_rows`` calibration rows not used for training (fewer if the set is small), in
    batches on ``device``: where the ``quest_eps_mse_*`` diagnostics are measured."""
    free = torch.ones(len(stream), dtype=torch.bool)
    free[train_rows] = False
    candidates = free.nonzero().flatten()
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    rows = candidates[torch.randperm(len(candidates), generator=g)[: cfg.eval_rows]].sort().values
    return list(stream.batches(cfg.batch_size, rows, device=device)) if len(rows) else []


@METHODS.register("quest", schema=QuestConfig)
class Quest(Method):
    """``method=quest``: PTQ base → time-step-aware activations → TLA → CMA (module doc)."""

    version = 2
    not_in_key = (*Method.not_in_key, "progress_every")

    def changed_parameters(self, model: Any) -> dict[str, nn.Parameter]:
        """The latent weights and biases of the quantized layers (TLA/CMA finetune them)."""
        return {
            **quant_parameters(model.denoiser, "weight_latent"),
            **quant_parameters(model.denoiser, "bias"),
        }

    def fingerprint(
        self,
        cfg: QuestConfig,
        quant: QuantConfig,
        stages: list[Stage],
        rows: dict[str, Tensor],
        denoiser: nn.Module,
    ) -> dict[str, Any]:
        """What saved finetuning progress must match to be resumed: the settings, the stage plan
        and the denoiser's state when finetuning starts (PTQ base, time-step split, ranges)."""
        start = {
            **quantizer_state_dict(denoiser),
            **{n: p for s in stages for n, p in {**s.weights, **s.act_scales}.items()},
        }
        return {
            "method": {k: v for k, v in as_dict(cfg).items() if k not in self.not_in_key},
            "quant": as_dict(quant),
            "stages": [[s.name, s.epochs, list(s.weights), list(s.act_scales)] for s in stages],
            "rows": tensor_digest(rows),
            "start": tensor_digest(start),
        }

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: QuestConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        """QuEST on the FP ``model.denoiser`` (quantized in place); the result's quant config is
        time-step aware when the activations were split into groups."""
        denoiser, spec, device = model.denoiser, model.spec, model.device
        result = MethodResult(model, quant)
        stream = collect_calibration(model, cfg.ptq.calib, ctx.cache_dir)  # shared with the base
        t_setup = time.perf_counter()
        time_layers = spec.layers(denoiser, *cfg.tla_roles)
        if cfg.tla:
            spec.require(denoiser, *cfg.tla_roles, purpose=f"QuEST's TLA (roles {cfg.tla_roles})")
        critical = (
            resolve_critical_layers(model, quant, cfg, stream, ctx, time_layers, result) if cfg.cma else []
        )
        setup_s = time.perf_counter() - t_setup

        result.merge(load_or_run_ptq(model, quant, cfg.ptq, ctx))
        t_setup = time.perf_counter()
        train_rows = rows_per_step(stream, cfg.samples_per_step, cfg.seed)
        probe = _probe_batches(stream, train_rows, cfg, device)
        metrics: dict[str, Any] = {
            "quest_eps_mse_ptq": output_mse(denoiser, spec, probe, FPTeacher(denoiser, []))
        }

        groups = resolve_groups(cfg, quant, stream, len(model.timesteps))
        split = groups > 1 and quant.act_bits < FP_BITS
        result.quant = dataclasses.replace(
            quant, timestep_aware=split, timestep_groups=groups if split else 1
        )
        if quant.act_bits < FP_BITS:
            if split:
                make_timestep_aware(denoiser, spec, model.timesteps, groups)
            if cfg.timestep_init != "ptq":
                calibrate_act_ranges(
                    denoiser,
                    stream,
                    method=cfg.timestep_init,
                    n_rows=cfg.timestep_init_rows,
                    batch_size=cfg.ptq.act_init_batch_size,
                    p=quant.lp_norm,
                    n_candidates=quant.lp_candidates,
                    seed=cfg.seed,
                    device=device,
                    minmax_layers=minmax_patterns(denoiser, spec, quant),
                )
        stages = plan_stages(
            denoiser,
            time_layers=time_layers,
            critical_layers=critical,
            tla=cfg.tla,
            cma=cfg.cma,
            tla_epochs=cfg.tla_epochs,
            cma_epochs=cfg.cma_epochs,
            train_bias=cfg.train_bias,
        )
        teacher = FPTeacher(denoiser, [p for s in stages for p in s.weights.values()])
        metrics["quest_eps_mse_init"] = output_mse(denoiser, spec, probe, teacher)
        rows = load_rows(stream, train_rows)
        finetuned = {n: p for s in stages for n, p in {**s.weights, **s.act_scales}.items()}
        ckpt = Checkpointer(
            progress,
            self.fingerprint(cfg, quant, stages, rows, denoiser),
            every=cfg.progress_every,
            what="QuEST finetuning",
        )
        resume = ckpt.load()
        reports = [StageReport(**r) for r in resume["reports"]] if resume else []
        if resume:
            load_tensors(finetuned, resume["params"])
        setup_s += time.perf_counter() - t_setup

        for i, stage in enumerate(stages):
            if i < len(reports):
                continue  # finished before the job was stopped
            log.info(
                "QuEST %s: %d layers, %d weight tensors, %d step-size tensors (%d scalars), "
                "%d rows x %d epochs",
                stage.name,
                len(stage.layers),
                len(stage.weights),
                len(stage.act_scales),
                stage.n_params,
                len(next(iter(rows.values()))),
                stage.epochs,
            )
            saver = ckpt.within(
                lambda stage_state, i=i: {
                    "stage": i,
                    "stage_state": stage_state,
                    "params": cpu_tensors(finetuned),
                    "reports": [dataclasses.asdict(r) for r in reports],
                }
            )
            reports.append(
                train_stage(
                    denoiser,
                    spec,
                    stage,
                    rows,
                    teacher,
                    weight_lr=cfg.weight_lr,
                    act_lr=cfg.act_lr,
                    global_weight=cfg.global_loss_weight,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed + i,
                    device=device,
                    tracker=ctx.tracker,
                    progress=saver,
                    resume=resume["stage_state"] if resume and resume["stage"] == i else None,
                )
            )
        if ckpt.written:
            log.info("QuEST: %s", ckpt.summary())
        metrics["quest_eps_mse_final"] = output_mse(denoiser, spec, probe, teacher)

        trained = {id(p): p for s in stages for p in s.parameters()}
        n_trainable = sum(p.numel() for p in trained.values())
        n_denoiser = sum(p.numel() for p in denoiser.parameters())
        metrics.update(
            {
                "finetune_s": round(sum(r.seconds for r in reports), 3),
                "quest_setup_s": round(setup_s, 3),
                "n_trainable_params": n_trainable,
                "trainable_param_frac": round(n_trainable / max(n_denoiser, 1), 5),
                "timestep_groups": groups,
                "critical_layers": critical,
                "train_rows": int(len(next(iter(rows.values())))),
            }
        )
        for r in reports:
            metrics.update(r.metrics())
        result.metrics.update(metrics)
        result.metrics.pop("ptq_cached", None)  # the base's provenance, not this result's
        log.info("QuEST done: %s", {k: v for k, v in metrics.items() if k != "critical_layers"})
        return result
