"""Dataclass schemas of every config group, stored in Hydra's ConfigStore.

Each YAML option extends its group's schema (``defaults: [<group>_schema, _self_]``), so a misspelt
key or a wrong type fails when the config is composed, naming the key. The app converts the
composed config into these dataclasses once (:func:`typed_run_config`); value checks that types
cannot express (bit ranges, positive counts, choices) run in each dataclass's ``__post_init__``,
before any work starts, and fail naming the key's full path and the fix.

Method schemas are declared by the methods themselves (``@METHODS.register(name, schema=...)``)
and stored here as ``method/<name>_schema``; adding a method needs no edit to this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from diffquant.quant.config import QuantConfig
from diffquant.seeds import check_calib_seed, with_calib_seed
from diffquant.validation import ConfigError, InvalidSetting, one_of, positive


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
        learned_variance: sample with the denoiser's learned variance (DiT's ``learn_sigma``: 2C
            output channels) through ``DDPMScheduler`` with ``variance_type=learned_range``;
            false: the variance half is dropped, as diffusers' DiT pipeline does.
        guidance_channels: guide only the first k ε channels (DiT's ``forward_with_cfg``: 3);
            None: all.
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
    learned_variance: bool = False
    guidance_channels: Optional[int] = None

    def __post_init__(self) -> None:
        positive(self, "num_inference_steps", "guidance_channels")
        if not 0.0 <= self.eta <= 1.0:
            raise InvalidSetting("eta", "must lie in [0, 1]")


@dataclass
class EvaluatorConfig:
    """How samples are scored.

    Attributes:
        name: the evaluator option (``digits``, ``standard``, ``clip``...), for logs.
        metrics: EVALUATORS registry keys to compute (``fid``, ``sfid``, ``inception_score``,
            ``fid_to_fp``, ``psnr``, ``ssim``, ``lpips``, ``lpips_digits``, ``clip_score``).
        backbone: BACKBONES registry key of the feature network (``digits_cnn``, ``inception_v3``).
        backbone_weights: local weights of the backbone (None: its packaged default).
        reference: real images for FID and sFID: ``digits_heldout`` or a ``.npz`` of uint8 NHWC
            images.
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
        kernels: how the quantized model's Conv2d / Linear layers execute while sampling:
            ``fake`` (fake quantization in FP32, the papers' simulation) or ``int8`` (oneDNN int8
            kernels on x86 CPUs for the layers with static per-tensor inputs and per-channel
            weights of at most 8 bits, :mod:`diffquant.quant.int8`; the same values up to FP32
            summation order, which can move a later activation across a rounding boundary).
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
    kernels: str = "fake"

    def __post_init__(self) -> None:
        positive(self, "n_samples", "batch_size", "chunk_size", "num_shards")
        one_of(self, "kernels", ("fake", "int8"))
        positive(self, "grid_size", allow_zero=True)


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

    def __post_init__(self) -> None:
        one_of(self, "mode", ("auto", "online", "offline", "disabled"))


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
class GridConfig:
    """The values a sweep config (``conf/sweep/*.yaml``) sweeps; an experiment pins them. Jobs do
    not read this node: the sweep config interpolates it into ``hydra.sweeper.grids``.

    Attributes:
        quant: the table's bit-widths (``quant`` options).
        methods: the methods run at every bit-width (``method`` options; the FP row is the
            sweep config's own grid).
        ablation_quant / ablations: ``sweep=ablations`` (and ``sweep=embedded``) runs these
            methods (the full method and its ablations) at this one bit-width.
        calib_seeds: the calibration seeds (``calib_seed``) every quantized job runs with; the
            FP row, which calibrates nothing, runs once. Jobs are ordered by calibration seed
            first, so the ``calib_seed=0`` jobs keep the numbers (folder names) of a sweep
            without calibration seeds.
        sd_calib_seeds: the calibration seeds of ``sweep=embedded``'s second model
            (``sd_digits``), which the benchmark runs with fewer seeds than ``ldm_digits``.
        dit_calib_seeds: the calibration seeds of ``sweep=embedded``'s transformer
            (``dit_digits``).
    """

    quant: list[str] = field(default_factory=lambda: ["w8a8", "w4a8", "w4a4"])
    methods: list[str] = field(default_factory=lambda: ["ptq_minmax", "ptq", "quest", "accuquant"])
    ablation_quant: str = "w4a4"
    ablations: list[str] = field(default_factory=list)
    calib_seeds: list[int] = field(default_factory=lambda: [0])
    sd_calib_seeds: list[int] = field(default_factory=lambda: [0])
    dit_calib_seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        for key in ("calib_seeds", "sd_calib_seeds", "dit_calib_seeds"):
            for calib_seed in getattr(self, key):
                check_calib_seed(calib_seed, key)


@dataclass
class PathsConfig:
    """Folders: the project root, the shared cache, this job's output folder, model weights."""

    root_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING
    models_dir: str = MISSING


@dataclass
class RunConfig:
    """The whole job. ``method`` is typed by the selected method's own schema.

    ``seed`` is the evaluation seed (which samples are drawn); ``calib_seed`` re-seeds every random
    choice of calibration (:mod:`diffquant.seeds`): :func:`typed_run_config` replaces the method
    config's base seeds by their derived seeds, so methods read them from their typed config.
    """

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    method: Any = MISSING
    evaluator: EvaluatorConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    task_name: str = "run"
    seed: int = 0
    calib_seed: int = 0
    device: str = "auto"
    save_quantized: bool = False
    tags: list[str] = field(default_factory=list)
    experiment: Optional[str] = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self) -> None:
        check_calib_seed(self.calib_seed)


def calib_tag(calib_seed: Any) -> str:
    """The suffix a calibration seed adds to job folder names (``${diffquant.calib_tag:...}`` in
    ``conf/config.yaml``): none for 0, so names stay those of before; ``_c<k>`` otherwise."""
    return "" if int(calib_seed) == 0 else f"_c{int(calib_seed)}"


def register_resolvers() -> None:
    """Register the config's own OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("diffquant.calib_tag"):
        OmegaConf.register_new_resolver("diffquant.calib_tag", calib_tag)


# At import, not only in register_configs: a submitit job process resolves its folder name
# (hydra.sweep.subdir) after unpickling the ConfigStore, which imports this module, and before
# anything of ours runs.
register_resolvers()


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore and register the resolvers (idempotent)."""
    from diffquant.registry import METHODS

    register_resolvers()
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


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def typed(node: Any, cls: type, path: str = "", types: Optional[dict[str, type]] = None) -> Any:
    """``node`` (a DictConfig, dict or dataclass instance) as a ``cls`` instance, nested config
    dataclasses included (``types`` overrides the type of some fields); each dataclass validates
    itself in ``__post_init__``. Unknown keys and invalid values raise :class:`ConfigError`
    naming the key's path and, for a misspelt key, the closest valid one."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    hints = {**typing.get_type_hints(cls), **(types or {})}
    names = [f.name for f in dataclasses.fields(cls)]
    join = lambda key: f"{path}.{key}" if path else str(key)  # noqa: E731
    for key in node:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {join(close[0])}?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"{join(key)} is not a setting of {cls.__name__}.{hint}")
    kwargs = {}
    for name in names:
        if name not in node:
            continue
        value, hint = node[name], hints[name]
        if value is not None and dataclasses.is_dataclass(hint):
            kwargs[name] = typed(value, hint, join(name))
        else:
            kwargs[name] = _plain(value)
    try:
        return cls(**kwargs)
    except InvalidSetting as err:
        shown = kwargs.get(err.key, "?")
        raise ConfigError(f"{join(err.key)}={shown!r} {err.message}") from None


def typed_run_config(cfg: Any) -> RunConfig:
    """The composed config as typed dataclasses, converted once (the method's part by its own
    schema, its base seeds replaced by those ``calib_seed`` derives: :mod:`diffquant.seeds`) and
    validated before any work: bad values fail naming their key and the fix."""
    from diffquant.registry import EVALUATORS, METHODS, MODELS

    if isinstance(cfg, RunConfig):
        return cfg
    node = {k: cfg[k] for k in cfg if k != "hydra"}
    method_name = node["method"]["name"]
    METHODS.get(method_name)
    run = typed(node, RunConfig, types={"method": METHODS.schema(method_name)})
    run.method = with_calib_seed(run.method, run.calib_seed)
    MODELS.get(run.model.family)
    for metric in run.evaluator.metrics:
        EVALUATORS.get(metric)
    if method_name != "fp" and not run.quant.enabled:
        raise ConfigError(
            f"method={method_name} needs a bit-width: add quant=w8a8 (or w4a8, "
            "w4a6, w4a4, w3a8, w3a6); quant=fp32 is only for method=fp."
        )
    try:
        METHODS.get(method_name).check(run.quant, run.method)
    except InvalidSetting as err:
        raise ConfigError(f"method.{err.key} {err.message}") from None
    return run


def validate(cfg: Any) -> RunConfig:
    """Checks that types cannot express; raises :class:`ConfigError` naming the key and the fix.
    Returns the typed config (:func:`typed_run_config`)."""
    return typed_run_config(cfg)
