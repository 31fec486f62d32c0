"""Dataclass schemas of every config group, stored in Hydra's ConfigStore.

Each YAML option extends its group's schema (``defaults: [<group>_schema, _self_]``), so a misspelt
key or a wrong type fails when the config is composed, naming the key. Value checks that types
cannot express (bit ranges, positive counts) run in :func:`validate` before any work starts.

Method schemas are declared by the methods themselves (``@METHODS.register(name, schema=...)``)
and stored here as ``method/<name>_schema``; adding a method needs no edit to this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from diffquant.quant.config import FP_BITS, QuantConfig, validate_bits


@dataclass
class ModelConfig:
    """Which diffusion model, where its weights are, and how it samples.

    Attributes:
        name: the model's id in results (``ldm_digits``, ``sd_v1_4``, ...).
        family: the MODELS registry key of the builder (``ldm``: UNet2DModel, ``sd``: text-to-image).
        pretrained: a local diffusers folder, a hub id, or ``zoo:<name>`` for an embedded model.
        local_files_only: never reach the network (set False on a cluster to download).
        num_inference_steps / guidance_scale / eta: the sampler (guidance 1.0 = off).
        scheduler: diffusers scheduler class name to sample with (None: the checkpoint's own).
        scheduler_overrides: keyword overrides of the scheduler config.
        num_classes: class-conditional models: labels 0..num_classes-1 (None: unconditional).
        prompts: text-to-image models: a file with one prompt per line (or a zoo: path).
        latent_scale: override of the autoencoder's latent scaling factor.
        get_weights: the command that downloads or converts the weights (shown when absent).
        random_weights: replace the UNet's trained weights by a seeded random initialisation of
            the same architecture (the "untrained model" baseline of FID tables).
    """

    name: str = MISSING
    family: str = MISSING
    pretrained: str = MISSING
    revision: Optional[str] = None
    local_files_only: bool = True
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    eta: float = 0.0
    scheduler: Optional[str] = None
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None
    prompts: Optional[str] = None
    image_size: Optional[int] = None
    latent_scale: Optional[float] = None
    get_weights: str = ""
    random_weights: bool = False


@dataclass
class EvaluatorConfig:
    """How samples are scored.

    Attributes:
        name: the evaluator option (``digits``, ``standard``, ``clip``...), for logs.
        metrics: EVALUATORS registry keys to compute (``fid``, ``inception_score``, ``fid_to_fp``...).
        backbone: BACKBONES registry key of the feature network (``digits_cnn``, ``inception_v3``).
        backbone_weights: local weights of the backbone (None: its packaged default).
        reference: real images for FID: ``digits_heldout`` or a ``.npz`` of uint8 NHWC images.
        n_samples: images generated per job (FID is biased at small N: compare equal N only).
        batch_size: samples per saved (resumable) batch of a job's progress; it changes no sample.
        chunk_size: samples per model call. Every call (sampler, decoder, backbone) runs on one
            fixed chunk ``[k·chunk_size, (k+1)·chunk_size)`` of the sample indices, so sample
            ``i`` is the same bits whatever ``batch_size`` or shard draws it; a different
            ``chunk_size`` changes the low bits of the samples (kernels block by row count). Speed
            and memory knob: larger is faster until memory runs out.
        clip_model: CLIP model (hub id or local folder) for ``clip_score``.
        grid_size: images in the logged sample grid.
        num_shards / shard_index: sharded evaluation (e.g. 50k-sample FID over a job array): this
            job samples only slice ``shard_index`` of ``num_shards`` contiguous slices of the
            ``n_samples`` indices and saves their features (``shard.pt``); ``python -m
            diffquant.shards <sweep dir>`` merges all slices into one FID / IS. 1 = unsharded.
    """

    name: str = MISSING
    metrics: list[str] = field(default_factory=lambda: ["fid", "inception_score", "fid_to_fp"])
    backbone: str = "digits_cnn"
    backbone_weights: Optional[str] = None
    reference: str = "digits_heldout"
    n_samples: int = 500
    batch_size: int = 100
    chunk_size: int = 32
    clip_model: Optional[str] = None
    grid_size: int = 64
    num_shards: int = 1
    shard_index: Optional[int] = None


@dataclass
class LoggerConfig:
    """Weights & Biases settings (``name: none`` logs nothing but metrics.json).

    ``mode: auto`` logs online when the user is logged in (WANDB_API_KEY or ~/.netrc), else
    offline into the job folder (sync later with ``wandb sync``).
    """

    name: str = "wandb"
    project: str = "diffquant"
    entity: Optional[str] = None
    mode: str = "auto"
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_images: bool = True


@dataclass
class SlurmConfig:
    """Cluster defaults that ``hydra/launcher=slurm`` reads (set them once per machine in the
    git-ignored ``conf/local/default.yaml``; see ``conf/local/default.yaml.example``).

    Attributes:
        partition / account / qos / constraint: sbatch ``--partition`` etc. (None: cluster default).
        timeout_min: wall-clock limit of each job, minutes.
        gpus_per_node / cpus_per_task / mem_gb: resources of each job (None: not requested).
        array_parallelism: array tasks running at once (``--array=0-N%K``).
        max_num_timeout: how often a job that hits its time limit is requeued; it then resumes
            from its checkpoints (finished sample batches, cached calibration / PTQ results).
        setup: shell lines (one string; newlines separate commands) run in the sbatch script
            before the job, after the launcher's own (``export WANDB_MODE=...``).
    """

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 1440
    gpus_per_node: Optional[int] = 1
    cpus_per_task: Optional[int] = 8
    mem_gb: Optional[int] = 64
    array_parallelism: int = 64
    max_num_timeout: int = 3
    setup: str = ""


@dataclass
class AnalysisConfig:
    """Optional analyses of the final model, run after evaluation (any method).

    Attributes:
        error_accumulation: per-step and accumulated error against the FP sampler
            (:mod:`diffquant.analysis.error_accumulation`): ``error_accumulation.json`` / ``.png``
            in the run folder, W&B table and plot, ``erracc_*`` scalars in ``metrics.json``.
        n_samples / batch_size: trajectories measured (the job's seed, indices 0..n-1).
    """

    error_accumulation: bool = False
    n_samples: int = 64
    batch_size: int = 64


@dataclass
class PathsConfig:
    """Folders: the project root, the shared cache, this job's output folder, model weights."""

    root_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING
    models_dir: str = MISSING


@dataclass
class RunConfig:
    """The whole job. ``method`` is typed by the selected method's own schema."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    method: Any = MISSING
    evaluator: EvaluatorConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    task_name: str = "run"
    seed: int = 0
    device: str = "auto"
    save_quantized: bool = False
    tags: list[str] = field(default_factory=list)
    experiment: Optional[str] = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from diffquant.registry import METHODS

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="evaluator", name="evaluator_schema", node=EvaluatorConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
    for name in METHODS.names():
        schema = METHODS.schema(name)
        if schema is not None:
            cs.store(group="method", name=f"{name}_schema", node=schema)


def validate(cfg) -> None:
    """Checks that types cannot express; raises ValueError naming the key and the fix."""
    from diffquant.registry import EVALUATORS, METHODS, MODELS

    validate_bits(cfg.quant)
    if cfg.evaluator.n_samples <= 0:
        raise ValueError(f"evaluator.n_samples={cfg.evaluator.n_samples} must be positive "
                         "(e.g. evaluator.n_samples=500).")
    if cfg.evaluator.batch_size <= 0:
        raise ValueError(f"evaluator.batch_size={cfg.evaluator.batch_size} must be positive.")
    if cfg.model.num_inference_steps <= 0:
        raise ValueError(f"model.num_inference_steps={cfg.model.num_inference_steps} must be positive.")
    if not 0.0 <= cfg.model.eta <= 1.0:
        raise ValueError(f"model.eta={cfg.model.eta} must lie in [0, 1].")
    MODELS.get(cfg.model.family)
    METHODS.get(cfg.method.name)
    for metric in cfg.evaluator.metrics:
        EVALUATORS.get(metric)
    quantized = cfg.quant.weight_bits < FP_BITS or cfg.quant.act_bits < FP_BITS
    if cfg.method.name == "fp" and quantized:
        raise ValueError(f"method=fp evaluates the full-precision model: drop quant={cfg.quant.name} "
                         "(or pick a method, e.g. method=ptq).")
    if cfg.method.name != "fp" and not quantized:
        raise ValueError(f"method={cfg.method.name} needs a bit-width: add quant=w8a8 (or w4a8, "
                         "w4a6, w4a4, w3a8, w3a6); quant=fp32 is only for method=fp.")
    if cfg.logger.mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.mode={cfg.logger.mode!r}: use auto, online, offline or disabled.")
