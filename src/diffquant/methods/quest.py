"""QuEST (Wang et al., ICCV 2025): temporal and sensitive-layer selective finetuning.

``method=quest`` starts from the baseline PTQ result (``method=ptq``, loaded from the cache when
the same model, quant config and PTQ settings were calibrated before: ``method.ptq`` holds exactly
``conf/method/ptq.yaml``) and then

1. **time-step-aware activations**: every activation quantizer gets one (Δ, z) set per group of
   sampler steps — by default one per recorded calibration step, as the QuEST code keeps one
   quantizer per calibration time step (the paper's text says a single set; the code does not).
   The denoiser's time-step hook picks the set at every sampler step, by the sampler's step
   index (:mod:`diffquant.quant.timestep`). Each group's initial ranges come from calibration
   rows (``timestep_init*``, :mod:`diffquant.methods.quest_init`): ``minmax``, ``percentile``
   (the QuEST code's search) or ``lp`` (the PTQ init's search), on the ``fp`` or the
   ``quantized`` network (the QuEST code's), from the first ``timestep_init_rows_per_step`` rows
   of every step (the QuEST code's 64) or a random subset, optionally followed by running
   statistics; or ``ptq`` copies PTQ's (LSQ-refined) set into every group. The default is the
   QuEST code's (percentile search, quantized network, first 64 rows of each step, no running
   statistics): on ldm_digits it halves FID→FP against our earlier L_p init on the FP network
   from 512 random rows (W4A4 0.066 vs 0.146; W4A8 0.026 vs 0.041; sd_digits W4A4 0.081 vs
   0.190; experiments/FIDELITY.md).
2. **TLA**, then 3. **CMA**: selective finetuning of the time-embedding projections (the
   denoiser roles ``tla_roles``, default ``time_projection``) and of the critical layers with all
   remaining step sizes (:mod:`diffquant.methods.quest_finetune` says exactly which parameters
   train, the loss, and where targets come from). ``loss_form``: ``paper`` (Eq. 7: each stage's
   layer-local losses + λ·L_G, λ = ``global_loss_weight`` = 2) or ``code`` (the QuEST code: L_G
   weighted by the stage's number of layers K, and CMA's local term only where
   ``cma_local_loss``, i.e. in its SD script; :func:`stage_loss_weights`).

Critical layers (``critical_layers``), read from the denoiser's roles
(:mod:`diffquant.models.denoiser`), never from module names:

* ``by_family`` (default) — the roles of the model family in ``critical_roles_by_family``:
  ``ldm`` (UNet2DModel with self-attention blocks, e.g. ldm_digits, LSUN-Bedroom) and
  ``ldm_compvis`` (LSUN-Church) → ``self_attention_qkv`` (the QuEST code's ``qkv`` for LSUN,
  ``post_layer_recon_uncond.py`` 36/54); ``ldm_class_context`` (the ImageNet LDM-4) → ``feed_forward``, ``self_attention_qkv``,
  ``cross_attention_q`` (its ``ff.net``, ``to_q``, ``attn1.to_k/v``,
  ``post_layer_recon_imagenet.py`` 35-49/62); ``sd`` → the same three roles, the embedded
  default (sd_digits): the QuEST SD script trains ``ff.net`` only (``post_layer_recon_sd.py``
  35/53), which ``method=quest_paper_sd`` selects (``critical_roles_by_family.sd:
  [feed_forward]``); the transformers (no QuEST code for them): ``dit`` → ``feed_forward``,
  ``self_attention_qkv`` (a DiT block is self-attention + MLP), ``pixart`` → the ``sd`` roles;
  any other family → ``default``.
* ``auto`` — the activation sensitivity sweep (:mod:`diffquant.methods.quest_sensitivity`) on
  the FP model picks the ``critical_top_k`` most sensitive units; its ranking is a file of the
  result (``sensitivity.md``) and is cached.
* a list of regular expressions searched in ``<layer>.weight`` (for users naming layers).

**Guards** (:mod:`diffquant.methods.guard`), judged by the final-image error on held-out FP
trajectories (``guard_samples`` chains of seed ``guard_seed``: not the evaluation samples) against
the PTQ base's (its single set of ranges copied into every group, its weights):

* ``init_guard``: right after the per-step range init, the PTQ ranges are put back if the init
  is worse. Measured on ldm_digits W8A8 (256 held-out trajectories): PTQ 0.00039, per-step
  percentile init 0.0032 (FID→FP 0.000637 vs 0.00310 with no finetuning), while the per-step
  ε MSE on held-out calibration rows said the opposite (0.000442 vs 0.000368): at 8 bits the
  percentile search clips ranges that PTQ's LSQ had fitted, and a few samples leave the FP
  trajectory altogether;
* ``guard``: after TLA and CMA, the finetuned model is kept only if it is not worse than the
  PTQ base; otherwise the base is put back.

The paper configs turn both off (the QuEST code has no such step).

Ablations (``conf/method/quest_*.yaml``): ``tla: false`` (CMA only), ``cma: false`` (TLA only),
``global_loss_weight: 0`` (no L_G, in either ``loss_form``).

Metrics added to ``metrics.json``: ``finetune_s`` (TLA + CMA seconds), ``quest_setup_s`` (sweep,
time-step split and range init), ``n_trainable_params`` (scalars trained in any stage) and its
``trainable_param_frac`` of the denoiser, per-stage counts, losses and steps (``tla_*``, ``cma_*``),
and the denoiser-output MSE against FP on calibration rows not trained on, after PTQ
(``quest_eps_mse_ptq``), after the time-step split (``quest_eps_mse_init``) and at the end
(``quest_eps_mse_final``, of the finetuned model whichever the guard keeps; None when no row
was held out), and the guard's ``quest_guard_loss_base`` / ``quest_guard_loss_final`` /
``quest_guard_kept`` (absent with ``guard: false``), and the init guard's ``quest_init_guard_*``
(absent with ``init_guard: false`` or ``timestep_init: ptq``). The finetuned denoiser and these
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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import CacheEntry
from diffquant.calib.collect import CalibStream, collect_calibration, model_identity
from diffquant.calib.ranges import minmax_patterns
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.guard import CRITERIA as GUARD_CRITERIA
from diffquant.methods.guard import RefinementGuard
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
from diffquant.methods.quest_init import (
    INIT_NETWORKS,
    INIT_SCOPES,
    TIMESTEP_INITS,
    StepInit,
    init_timestep_ranges,
)
from diffquant.methods.quest_sensitivity import (
    JSON_FILE,
    SensitivityReport,
    SensitivitySettings,
    activation_sensitivity,
    load_report,
)
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.quant.config import FP_BITS, QuantConfig, quant_key
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import iter_quantizers, quant_parameters
from diffquant.quant.timestep import attach_timestep_router
from diffquant.quant.typed import as_dict, key_dict
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)

LOSS_FORMS = ("paper", "code")


def _default_critical_by_family() -> dict[str, list[str]]:
    return {
        "ldm": ["self_attention_qkv"],
        "ldm_compvis": ["self_attention_qkv"],  # LSUN-Church (LDM-8, converted from CompVis)
        "ldm_class_context": ["feed_forward", "self_attention_qkv", "cross_attention_q"],
        "sd": ["feed_forward", "self_attention_qkv", "cross_attention_q"],
        # transformers: every block is attention + MLP; as the UNets with transformer blocks
        "dit": ["feed_forward", "self_attention_qkv"],
        "pixart": ["feed_forward", "self_attention_qkv", "cross_attention_q"],
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
        timestep_init: per-group initial ranges from calibration rows by the ``lp`` search,
            ``minmax`` or the QuEST code's ``percentile`` search; or ``ptq``: a copy of PTQ's
            single set in every group (:mod:`diffquant.methods.quest_init`).
        timestep_init_network: ``fp`` (weights FP, inputs observed unquantized) or ``quantized``
            (the QuEST code: weights quantized, every quantizer quantizes once its range is set,
            so later layers see quantized inputs).
        timestep_init_scope: ``per_step`` (every group from its own rows) or ``shared`` (the
            QuEST SD script: one set from ``timestep_init_rows`` random rows of all steps, copied
            into every group; running statistics then move the first group only, as there).
        timestep_init_rows_per_step: the ``per_step`` scope's rows: the first that many rows of
            every recorded step, one forward per step (the QuEST code: 64); None: random rows.
        timestep_init_rows: random calibration rows over all steps (None = all), for the
            ``shared`` scope, and for ``per_step`` when ``timestep_init_rows_per_step`` is None.
        timestep_init_running_stat: after the initial ranges, the QuEST code's running statistics
            (``--running_stat``): each step's rows in batches of
            ``timestep_init_running_batch_size`` move its ranges to the EMA (momentum
            ``timestep_init_momentum``) of per-batch min / max; None = on above 4 activation
            bits (the QuEST README drops ``--running_stat`` at W4A4).
        tla / cma: run the Temporal Layer Alignment / Critical Module Alignment stage.
        loss_form: ``paper`` (each stage: local losses + ``global_loss_weight`` · L_G) or
            ``code`` (the QuEST code: L_G weighted by the stage's number of layers K; CMA's
            local term only with ``cma_local_loss``); :func:`stage_loss_weights`.
        global_loss_weight: λ of the UNet-output loss L_G (paper: 2); 0 turns L_G off in
            either ``loss_form``.
        cma_local_loss: CMA's loss has the critical layers' local term (the QuEST code's SD
            script: yes; its LSUN / ImageNet scripts: no). TLA always has its local term.
        weight_lr / act_lr: Adam learning rates of latent weights (and biases) / step sizes.
        tla_act_lr: TLA's step-size learning rate (None = ``act_lr``; the QuEST code: 1e-5).
        tla_epochs / cma_epochs: passes over the training rows per stage.
        samples_per_step: training rows drawn per recorded calibration step.
        batch_size: rows per optimiser step.
        tla_samples_per_step / tla_batch_size: the same for TLA (None = as CMA; the QuEST code
            trains TLA on 8 rows per step, 2 per optimiser step).
        cma_exclude_act_roles: denoiser roles whose input step sizes CMA leaves alone (the
            QuEST code: the time-embedding MLP, ``time_embedding``).
        train_bias: also finetune the selected layers' biases (the QuEST code does in TLA).
        tla_roles: the denoiser roles TLA finetunes (default ``time_projection``).
        critical_layers: ``by_family``, ``auto`` or a list of regexes (CMA's layers).
        critical_roles_by_family: model family → denoiser roles, for ``by_family``.
        critical_top_k: units ``auto`` picks from the sensitivity ranking.
        sensitivity: the sweep's settings (bits, rows).
        eval_rows: calibration rows not trained on, for the ``quest_eps_mse_*`` diagnostics.
        guard: keep the finetuned model only if its final-image error on held-out FP
            trajectories is not above the PTQ base's, else put the base back (module doc).
        init_guard: keep the per-step range init only if it is not worse than PTQ's ranges by
            the same measure, else start the finetuning from PTQ's ranges (module doc: on
            ldm_digits W8A8 the init was 8x worse on held-out trajectories).
        guard_samples / guard_seed / guard_batch_size: the held-out trajectories and the batch
            they are sampled in.
        guard_criterion: ``mse`` (the mean per-image error), ``log_mse`` (the mean of its
            log10) or ``both`` (neither may get worse): :data:`diffquant.methods.guard.CRITERIA`.
        seed: base seed of row sampling and shuffling (re-seeded by the run's ``calib_seed``).
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
    timestep_init: str = "percentile"
    timestep_init_network: str = "quantized"
    timestep_init_scope: str = "per_step"
    timestep_init_rows_per_step: Optional[int] = 64
    timestep_init_rows: Optional[int] = None
    timestep_init_running_stat: Optional[bool] = False
    timestep_init_running_batch_size: int = 64
    timestep_init_momentum: float = 0.95
    tla: bool = True
    cma: bool = True
    loss_form: str = "paper"
    global_loss_weight: float = 2.0
    cma_local_loss: bool = True
    weight_lr: float = 1e-5
    act_lr: float = 1e-4
    tla_act_lr: Optional[float] = None
    tla_epochs: int = 4
    cma_epochs: int = 4
    samples_per_step: int = 32
    batch_size: int = 32
    tla_samples_per_step: Optional[int] = None
    tla_batch_size: Optional[int] = None
    cma_exclude_act_roles: list[str] = field(default_factory=list)
    train_bias: bool = True
    tla_roles: list[str] = field(default_factory=lambda: ["time_projection"])
    critical_layers: Any = "by_family"
    critical_roles_by_family: dict[str, list[str]] = field(default_factory=_default_critical_by_family)
    critical_top_k: int = 4
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)
    eval_rows: int = 128
    guard: bool = True
    init_guard: bool = True
    # 256, not 64: the per-step init's damage at W8A8 is a few samples that leave the FP
    # trajectory; 64 held-out chains missed them (latent final-state error 0.00032 vs PTQ's 0.00038),
    # 256 did not (0.0032 vs 0.00039), ranking as FID→FP does (0.00310 vs 0.000637)
    guard_samples: int = 256
    guard_seed: int = 30_000
    guard_batch_size: int = 64
    guard_criterion: str = "mse"
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
    one_of(cfg, "timestep_init_network", INIT_NETWORKS)
    one_of(cfg, "timestep_init_scope", INIT_SCOPES)
    one_of(cfg, "loss_form", LOSS_FORMS)
    positive(
        cfg,
        "samples_per_step",
        "batch_size",
        "timestep_groups",
        "timestep_init_rows",
        "timestep_init_rows_per_step",
        "timestep_init_running_batch_size",
        "tla_samples_per_step",
        "tla_batch_size",
        "tla_act_lr",
        "guard_samples",
        "guard_batch_size",
    )
    positive(
        cfg, "global_loss_weight", "tla_epochs", "cma_epochs", "eval_rows", "progress_every", allow_zero=True
    )
    one_of(cfg, "guard_criterion", GUARD_CRITERIA)
    if not 0.0 <= cfg.timestep_init_momentum < 1.0:
        raise InvalidSetting("timestep_init_momentum", "must lie in [0, 1) (the QuEST code: 0.95)")
    if cfg.timestep_init == "ptq" and cfg.timestep_init_running_stat:
        raise InvalidSetting(
            "timestep_init_running_stat",
            "needs ranges set from calibration rows, not timestep_init=ptq (the PTQ copy): set it to false",
        )
    if isinstance(cfg.critical_layers, str) and cfg.critical_layers not in ("auto", "by_family"):
        raise InvalidSetting(
            "critical_layers",
            "is unknown: use 'auto', 'by_family' or a list of name patterns, e.g. '[to_q,ff.net]'",
        )
    for key, roles in (
        ("tla_roles", cfg.tla_roles),
        ("cma_exclude_act_roles", cfg.cma_exclude_act_roles),
        ("critical_roles_by_family", [r for rs in cfg.critical_roles_by_family.values() for r in rs]),
    ):
        unknown = sorted({r for r in roles if r not in ROLES})
        if unknown:
            raise InvalidSetting(key, f"has unknown role(s) {unknown}; roles are {', '.join(ROLES)}")


def step_init(cfg: QuestConfig, quant: QuantConfig) -> StepInit:
    """The per-group range init of ``cfg`` under ``quant`` (``timestep_init_running_stat=None``
    resolves to on above 4 activation bits)."""
    running = cfg.timestep_init_running_stat
    if running is None:
        running = cfg.timestep_init != "ptq" and quant.act_bits > 4
    return StepInit(
        method=cfg.timestep_init,
        network=cfg.timestep_init_network,
        scope=cfg.timestep_init_scope,
        rows=cfg.timestep_init_rows,
        rows_per_step=cfg.timestep_init_rows_per_step,
        running=bool(running),
        running_batch_size=cfg.timestep_init_running_batch_size,
        momentum=cfg.timestep_init_momentum,
        batch_size=cfg.ptq.act_init_batch_size,
        p=quant.lp_norm,
        n_candidates=quant.lp_candidates,
        seed=cfg.seed,
    )


def stage_loss_weights(cfg: QuestConfig, stage: Stage) -> tuple[bool, float]:
    """``(local term, λ)`` of a stage's loss under ``cfg.loss_form``: ``paper`` — both stages
    local + ``global_loss_weight``; ``code`` — λ = K, the stage's number of layers (the QuEST code
    adds L_G once per hooked layer: ``post_layer_recon_*.py``, e.g. imagenet 102-105 / 233-236),
    CMA's local term only with ``cma_local_loss``. ``global_loss_weight = 0`` is λ = 0 in both."""
    local = stage.name != "cma" or cfg.cma_local_loss
    if cfg.global_loss_weight == 0:
        return local, 0.0
    if cfg.loss_form == "code":
        return local, float(len(stage.layers))
    return local, float(cfg.global_loss_weight)


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
        "calib": key_dict(cfg.ptq.calib),
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
    return list(stream.batches(cfg.batch_size, rows, device=device, with_step=True)) if len(rows) else []


@METHODS.register("quest", schema=QuestConfig)
class Quest(Method):
    """``method=quest``: PTQ base → time-step-aware activations → TLA → CMA (module doc)."""

    #: 4: the held-out guard; 5: judged on decoded images; 6: both held-out measures in the
    #: metrics; 7: the time-step ranges observe attention probabilities in query blocks (an
    #: attention whose scores span several blocks can move in the last bit; single-block
    #: attention, as in the embedded models, is unchanged)
    version = 7
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
            "method": {k: v for k, v in key_dict(cfg).items() if k not in self.not_in_key},
            "quant": quant_key(quant),
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
        tla_rows = train_rows
        if cfg.tla_samples_per_step not in (None, cfg.samples_per_step):
            tla_rows = rows_per_step(stream, cfg.tla_samples_per_step, cfg.seed + 1)
        probe = _probe_batches(stream, torch.cat([train_rows, tla_rows]).unique(), cfg, device)
        metrics: dict[str, Any] = {
            "quest_eps_mse_ptq": output_mse(denoiser, spec, probe, FPTeacher(denoiser, []))
        }

        groups = resolve_groups(cfg, quant, stream, len(model.timesteps))
        split = groups > 1 and quant.act_bits < FP_BITS
        result.quant = dataclasses.replace(
            quant, timestep_aware=split, timestep_groups=groups if split else 1
        )
        if split:
            make_timestep_aware(denoiser, spec, model.timesteps, groups)
        guard = (
            RefinementGuard(
                model, cfg.guard_samples, cfg.guard_seed, cfg.guard_batch_size, cfg.guard_criterion
            )
            if cfg.guard or cfg.init_guard
            else None
        )
        if quant.act_bits < FP_BITS and cfg.timestep_init != "ptq":
            init_timestep_ranges(
                denoiser,
                stream,
                step_init(cfg, quant),
                device=device,
                minmax_layers=minmax_patterns(denoiser, spec, quant),
            )
            if cfg.init_guard:
                metrics.update(guard.judge("quest_init").metrics("quest_init"))
        stages = plan_stages(
            denoiser,
            time_layers=time_layers,
            critical_layers=critical,
            tla=cfg.tla,
            cma=cfg.cma,
            tla_epochs=cfg.tla_epochs,
            cma_epochs=cfg.cma_epochs,
            train_bias=cfg.train_bias,
            cma_exclude_act_layers=spec.layers(denoiser, *cfg.cma_exclude_act_roles),
        )
        teacher = FPTeacher(denoiser, [p for s in stages for p in s.weights.values()])
        metrics["quest_eps_mse_init"] = output_mse(denoiser, spec, probe, teacher)
        spill = progress / "rows"  # where a set too large for RAM is paged from (removed at the end)
        rows = load_rows(stream, train_rows, spill / "train")
        stage_rows = {
            "tla": rows if tla_rows is train_rows else load_rows(stream, tla_rows, spill / "tla"),
            "cma": rows,
        }
        finetuned = {n: p for s in stages for n, p in {**s.weights, **s.act_scales}.items()}
        all_rows = {
            **rows,
            **{f"tla.{k}": v for k, v in stage_rows["tla"].items() if stage_rows["tla"] is not rows},
        }
        ckpt = Checkpointer(
            progress,
            self.fingerprint(cfg, quant, stages, all_rows, denoiser),
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
            is_tla = stage.name == "tla"
            local, global_weight = stage_loss_weights(cfg, stage)
            data = stage_rows[stage.name]
            log.info(
                "QuEST %s: %d layers, %d weight tensors, %d step-size tensors (%d scalars), "
                "%d rows x %d epochs; loss %s + %g * L_G",
                stage.name,
                len(stage.layers),
                len(stage.weights),
                len(stage.act_scales),
                stage.n_params,
                len(next(iter(data.values()))),
                stage.epochs,
                "local" if local else "0",
                global_weight,
            )
            saver = ckpt.within(
                lambda stage_state, i=i: {
                    "stage": i,
                    "stage_state": stage_state,
                    "params": cpu_tensors(finetuned),
                    "reports": [dataclasses.asdict(r) for r in reports],
                }
            )
            act_lr = cfg.tla_act_lr if is_tla and cfg.tla_act_lr is not None else cfg.act_lr
            batch_size = cfg.tla_batch_size if is_tla and cfg.tla_batch_size else cfg.batch_size
            reports.append(
                train_stage(
                    denoiser,
                    spec,
                    stage,
                    data,
                    teacher,
                    weight_lr=cfg.weight_lr,
                    act_lr=act_lr,
                    global_weight=global_weight,
                    local=local,
                    batch_size=batch_size,
                    seed=cfg.seed + i,
                    device=device,
                    tracker=ctx.tracker,
                    progress=saver,
                    resume=resume["stage_state"] if resume and resume["stage"] == i else None,
                )
            )
        if ckpt.written:
            log.info("QuEST: %s", ckpt.summary())
        train_rows_n = int(len(next(iter(rows.values()))))
        tla_rows_n = int(len(next(iter(stage_rows["tla"].values()))))
        del rows, stage_rows, all_rows
        shutil.rmtree(spill, ignore_errors=True)
        metrics["quest_eps_mse_final"] = output_mse(denoiser, spec, probe, teacher)
        if cfg.guard:
            metrics.update(guard.judge("quest").metrics("quest"))

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
                "train_rows": train_rows_n,
                "tla_train_rows": tla_rows_n,
            }
        )
        for r in reports:
            metrics.update(r.metrics())
        result.metrics.update(metrics)
        result.metrics.pop("ptq_cached", None)  # the base's provenance, not this result's
        log.info("QuEST done: %s", {k: v for k, v in metrics.items() if k != "critical_layers"})
        return result
