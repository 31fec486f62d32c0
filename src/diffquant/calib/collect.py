"""Calibration data: the denoiser inputs of the FP model's own sampling trajectories, on disk.

:func:`collect_calibration` samples ``n_samples`` trajectories with the FP model and records,
through a forward pre-hook (with kwargs) on ``model.denoiser``, the inputs of every
``step_stride``-th sampler step (steps 0, k, 2k, ...; 0 = noisiest). Every row of the batched
denoiser call is a sample: with guidance a step gives ``2 · n_samples`` rows (unconditional and
conditional inputs), as in Q-Diffusion's SD calibration set. A row holds the denoiser's keyword
arguments (the latents (C, h, w) and time step () under the names the family's
:class:`~diffquant.models.denoiser.DenoiserSpec` gives, and the condition, e.g. ``class_labels``
() or ``encoder_hidden_states`` (L, D)) and the sampler step index (``_step``).

Rows are written in shards (``shard_00000.pt`` ...) under a :class:`~diffquant.cache.CacheEntry`
keyed by everything that produced them (model identity and weights fingerprint, scheduler and
sampler settings, calibration settings), so concurrent jobs compute it once and later jobs reuse
it. :class:`CalibStream` reads it back one shard at a time: the whole set is never in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import CacheEntry, atomic_torch_save, load_torch
from diffquant.quant.state import quant_state
from diffquant.quant.typed import as_dataclass
from diffquant.validation import positive

log = logging.getLogger(__name__)

STEP_KEY = "_step"
INDEX_FILE = "index.json"


@dataclass
class CalibSettings:
    """How calibration trajectories are gathered.

    Attributes:
        n_samples: trajectories sampled (rows per recorded step: n_samples, ×2 with guidance).
        step_stride: record every k-th sampler step (1 = all steps).
        batch_size: trajectories sampled together.
        seed: seed of the calibration trajectories (keep it apart from evaluation seeds).
        shard_rows: rows per shard file.
    """

    n_samples: int = 64
    step_stride: int = 2
    batch_size: int = 64
    seed: int = 10_000
    shard_rows: int = 4096

    def __post_init__(self) -> None:
        positive(self, "n_samples", "step_stride", "batch_size", "shard_rows")


# ---------------------------------------------------------------------------- identity
def denoiser_fingerprint(denoiser: nn.Module) -> str:
    """A short hash of the denoiser's FP weights (quantizer state left out), so cache entries made
    from other weights under the same model name are never reused."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "quantizer." in name or ".adaround." in name:
                continue
            d = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{d.sum().item():.6e}:{d.abs().sum().item():.6e};".encode())
    return h.hexdigest()[:16]


def numerics_identity(device: torch.device | str) -> dict[str, Any]:
    """What changes floating-point results on the same machine: the device type and, on CPU, the
    intra-op thread count (it changes summation order: W4A4 ``ptq`` on ldm_digits calibrated with
    1 thread gives FID→FP 0.621, with 2 threads 0.555). Part of every cache key, so that a cached
    result is only reused where recomputing it would give the same numbers."""
    kind = torch.device(device).type
    return {"device": kind, "cpu_threads": torch.get_num_threads() if kind == "cpu" else None}


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies the FP model, its sampler and the numerics, for cache keys (JSON-able)."""
    sched_cfg = {k: v for k, v in dict(model.scheduler.config).items() if not k.startswith("_")}
    return {
        "name": model.name,
        "family": model.family,
        "latent_shape": list(model.latent_shape),
        "meta": model.meta,
        "weights": denoiser_fingerprint(model.denoiser),
        "scheduler": {"class": type(model.scheduler).__name__, **sched_cfg},
        "sampler": asdict(model.sampler),
        "timesteps": [int(t) for t in model.timesteps],
        "numerics": numerics_identity(model.device),
    }


def calib_cache_key(
    model: Any, settings: CalibSettings, identity: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    s = asdict(settings)
    s.pop("batch_size")  # does not change the rows (per-sample seeding)
    s.pop("shard_rows")
    return {"model": identity or model_identity(model), "calib": s}


# ---------------------------------------------------------------------------- recording
class _Recorder:
    """Forward pre-hook that keeps the denoiser kwargs of recorded steps, row-wise on CPU."""

    def __init__(self, stride: int, spec: Any) -> None:
        self.stride = stride
        self.spec = spec
        self.step: Optional[int] = None
        self.rows: list[dict[str, Tensor]] = []

    def on_step(self, i: int, x: Tensor) -> None:
        self.step = i

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.step is None or self.step % self.stride:
            return
        if args:
            raise RuntimeError(
                "calibration recording expects the denoiser to be called with "
                "keyword arguments (DiffusionModel.denoiser_kwargs)"
            )
        n = self.spec.batch_size(kwargs)
        row: dict[str, Tensor] = {}
        for k, v in kwargs.items():
            if v is None:
                continue
            if not isinstance(v, Tensor):
                raise RuntimeError(
                    f"denoiser argument {k!r} is a {type(v).__name__}, not a "
                    "tensor: a calibration row can only hold per-row tensors"
                )
            if v.dim() == 0 or v.shape[0] != n:
                raise RuntimeError(f"denoiser argument {k!r} has no batch dimension of {n}")
            row[k] = v.detach().to("cpu").clone()
        row[STEP_KEY] = torch.full((n,), self.step, dtype=torch.long)
        self.rows.append(row)


def _cat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def collect_calibration(
    model: Any, settings: Any, cache_dir: Path | str, *, identity: Optional[dict[str, Any]] = None
) -> CalibStream:
    """Gather (or reuse) the calibration set of ``model`` and return a stream over it.

    The FP path is used even if ``model.denoiser`` is already quantized (quantization is switched
    off while sampling).
    """
    s = as_dataclass(settings, CalibSettings)
    entry = CacheEntry(cache_dir, "calib", calib_cache_key(model, s, identity))
    with entry.lock():
        if not entry.done():
            log.info(
                "collecting calibration data: %d trajectories, every %d-th of %d steps -> %s",
                s.n_samples,
                s.step_stride,
                len(model.timesteps),
                entry.path,
            )
            with entry.writing() as tmp:
                _write_shards(model, s, tmp)
    return CalibStream(entry.path)


def _write_shards(model: Any, s: CalibSettings, folder: Path) -> None:
    recorder = _Recorder(s.step_stride, model.spec)
    shards: list[dict[str, Any]] = []
    pending: list[dict[str, Tensor]] = []
    keys: list[str] = []

    def flush() -> None:
        if not pending:
            return
        data = _cat(pending)
        pending.clear()
        name = f"shard_{len(shards):05d}.pt"
        atomic_torch_save(data, folder / name)
        shards.append({"file": name, "rows": int(data[STEP_KEY].shape[0])})

    handle = model.denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        with quant_state(model.denoiser, weights=False, acts=False):
            for start in range(0, s.n_samples, s.batch_size):
                indices = list(range(start, min(s.n_samples, start + s.batch_size)))
                recorder.rows.clear()
                model.sample_latents(indices, s.seed, on_step=recorder.on_step)
                for row in recorder.rows:
                    keys = keys or list(row)
                    pending.append(row)
                    if sum(p[STEP_KEY].shape[0] for p in pending) >= s.shard_rows:
                        flush()
            flush()
    finally:
        handle.remove()
    index = {
        "rows": sum(sh["rows"] for sh in shards),
        "shards": shards,
        "keys": keys,
        "steps": list(range(0, len(model.timesteps), s.step_stride)),
        "guided": bool(model.guided),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------- streaming
class CalibStream:
    """Read access to a calibration set on disk, one shard in memory at a time.

    ``batches`` yields dicts of denoiser keyword arguments with ``batch_size`` rows each (the last
    batch may be smaller); ``rows`` restricts it to given global row indices (in their order of
    storage). The sampler step of each row is included under ``_step`` when ``with_step``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.index = json.loads((self.path / INDEX_FILE).read_text())
        self.n_rows: int = int(self.index["rows"])
        self.denoiser_keys = [k for k in self.index["keys"] if k != STEP_KEY]

    def __len__(self) -> int:
        return self.n_rows

    def subset(self, n: Optional[int], seed: int = 0) -> Tensor:
        """``min(n, len)`` global row indices drawn without replacement (sorted); all if None."""
        if n is None or n >= self.n_rows:
            return torch.arange(self.n_rows)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(self.n_rows, generator=g)[:n].sort().values

    def batches(
        self,
        batch_size: int,
        rows: Optional[Tensor] = None,
        *,
        device: torch.device | str = "cpu",
        with_step: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        wanted = None if rows is None else torch.as_tensor(rows).sort().values
        rest: Optional[dict[str, Tensor]] = None
        offset = 0
        for shard in self.index["shards"]:
            lo, hi = offset, offset + shard["rows"]
            offset = hi
            if wanted is not None:
                local = wanted[(wanted >= lo) & (wanted < hi)] - lo
                if local.numel() == 0:
                    continue
            data = load_torch(self.path / shard["file"], map_location="cpu", weights_only=True)
            if wanted is not None:
                data = {k: v[local] for k, v in data.items()}
            if rest is not None:
                data = _cat([rest, data])
            n, start = int(data[STEP_KEY].shape[0]), 0
            while n - start >= batch_size:
                yield self._out(
                    {k: v[start : start + batch_size] for k, v in data.items()}, device, with_step
                )
                start += batch_size
            rest = {k: v[start:] for k, v in data.items()} if start < n else None
        if rest is not None:
            yield self._out(rest, device, with_step)

    @staticmethod
    def _out(batch: dict[str, Tensor], device, with_step: bool) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in batch.items() if with_step or k != STEP_KEY}
