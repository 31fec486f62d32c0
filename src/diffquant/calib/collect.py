"""Calibration data: the denoiser inputs of the FP model's own sampling trajectories, on disk.

:func:`collect_calibration` samples ``n_samples`` trajectories with the FP model and records,
through a forward pre-hook (with kwargs) on ``model.denoiser``, the inputs of every
``step_stride``-th sampler step (steps 0, k, 2k, ...; 0 = noisiest), or of ``n_steps`` evenly
spaced steps chosen as Q-Diffusion / QuEST do (``qdiff/utils.py`` ``get_train_samples``:
``range(0, nsteps, nsteps // cali_st)``; :meth:`CalibSettings.stride`). Every row of the batched
denoiser call is a sample: with guidance a step gives ``2 · n_samples`` rows (unconditional and
conditional inputs), as in Q-Diffusion's SD calibration set. A row holds the denoiser's keyword
arguments (the latents (C, h, w) and time step () under the names the family's
:class:`~diffquant.models.denoiser.DenoiserSpec` gives, and the condition, e.g. ``class_labels``
() or ``encoder_hidden_states`` (L, D)) and the sampler step index (``_step``).

Rows are written in shards (``shard_00000.pt`` ...) under a :class:`~diffquant.cache.CacheEntry`
keyed by everything that produced them (model identity and weights fingerprint, scheduler and
sampler settings, calibration settings), so concurrent jobs compute it once and later jobs reuse
it. :class:`CalibStream` reads it back one shard at a time: the whole set is never in memory;
:meth:`CalibStream.reference_order` gives the rows in the reference code's order (time-step
major, conditional rows before unconditional ones), independent of the sampling batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import CacheEntry, atomic_torch_save, load_torch
from diffquant.numerics import numerics_identity
from diffquant.quant.state import quant_state
from diffquant.quant.typed import as_dataclass
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)

STEP_KEY = "_step"
INDEX_FILE = "index.json"
STEP_SAMPLINGS = ("stride", "normal")


@dataclass
class CalibSettings:
    """How calibration trajectories are gathered.

    Attributes:
        n_samples: trajectories sampled (rows per recorded step: n_samples, ×2 with guidance).
        step_stride: record every k-th sampler step (1 = all steps).
        n_steps: when set, record ``n_steps`` evenly spaced steps exactly as Q-Diffusion / QuEST
            select them (``cali_st``): stride ``nsteps // n_steps`` over the sampler's ``nsteps``
            denoiser calls, i.e. ``range(0, nsteps, nsteps // n_steps)``, which overrides
            ``step_stride``. When ``nsteps`` is not a multiple, that is more than ``n_steps``
            steps (51 PNDM calls / 25 → stride 2 → 26 steps), as in the reference.
        batch_size: trajectories sampled together.
        seed: base seed of the calibration trajectories (keep it apart from evaluation seeds;
            re-seeded by the run's ``calib_seed``, :mod:`diffquant.seeds`).
        shard_rows: rows per shard file.
        step_sampling: ``stride`` (the recorded steps above, every trajectory at each) or
            ``normal``: PTQ4DM's normally distributed time-step calibration (NDTC): trajectory
            ``i`` is recorded at one sampler step only, ``k_i = clamp(trunc((μ + σ·z_i) · S),
            0, S - 1)`` with ``z_i ~ N(0, 1)`` drawn from a generator seeded by ``seed`` and
            ``i`` (``S`` sampler steps, 0 = noisiest; PTQ4DM ``quant_image_sample.py`` lines
            53-56, 70), so ``n_samples`` trajectories give ``n_samples`` rows (×2 with guidance).
        normal_mean / normal_std: μ and σ of ``normal``, as fractions of the sampler's steps
            (PTQ4DM's script: 0.4 and 0.4).
    """

    n_samples: int = 64
    step_stride: int = 2
    n_steps: Optional[int] = None
    batch_size: int = 64
    seed: int = 10_000
    shard_rows: int = 4096
    step_sampling: str = "stride"
    normal_mean: float = 0.4
    normal_std: float = 0.4

    #: left out of cache keys at these values (:func:`~diffquant.quant.typed.key_dict`)
    KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, Any]] = {
        "step_sampling": "stride",
        "normal_mean": 0.4,
        "normal_std": 0.4,
    }

    def __post_init__(self) -> None:
        positive(self, "n_samples", "step_stride", "n_steps", "batch_size", "shard_rows", "normal_std")
        one_of(self, "step_sampling", STEP_SAMPLINGS)

    def normal_steps(self, indices: list[int], n_sampler_steps: int) -> Tensor:
        """``step_sampling=normal``: the one recorded sampler step of each trajectory index."""
        steps = []
        for i in indices:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            z = float(torch.randn((), generator=g, dtype=torch.float64))
            k = int((self.normal_mean + self.normal_std * z) * n_sampler_steps)  # trunc toward 0
            steps.append(min(max(k, 0), n_sampler_steps - 1))
        return torch.tensor(steps, dtype=torch.long)

    def stride(self, n_sampler_steps: int) -> int:
        """The stride of recorded steps for a sampler of ``n_sampler_steps`` denoiser calls."""
        if self.n_steps is None:
            return self.step_stride
        if self.n_steps > n_sampler_steps:
            raise InvalidSetting(
                "n_steps",
                f"={self.n_steps} is more than the sampler's "
                f"{n_sampler_steps} steps: use at most {n_sampler_steps}.",
            )
        return n_sampler_steps // self.n_steps

    def recorded_steps(self, n_sampler_steps: int) -> list[int]:
        """The sampler steps (0 = noisiest) whose denoiser inputs are recorded."""
        return list(range(0, n_sampler_steps, self.stride(n_sampler_steps)))


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


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies the FP model, its sampler and the numerics
    (:func:`~diffquant.numerics.numerics_identity`), for cache keys (JSON-able)."""
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
    s.pop("n_steps")  # the stride it selects is what changes the rows
    if settings.step_sampling == "stride":  # left out at their defaults: older keys stay valid
        for k in ("step_sampling", "normal_mean", "normal_std"):
            s.pop(k)
        s["step_stride"] = settings.stride(len(model.timesteps))
    else:
        s.pop("step_stride")
    return {"model": identity or model_identity(model), "calib": s}


# ---------------------------------------------------------------------------- recording
class _Recorder:
    """Forward pre-hook that keeps the denoiser kwargs of recorded steps, row-wise on CPU."""

    def __init__(self, stride: int, spec: Any) -> None:
        self.stride = stride
        self.spec = spec
        self.step: Optional[int] = None
        self.rows: list[dict[str, Tensor]] = []
        #: per trajectory of the batch, its one recorded step (``step_sampling=normal``)
        self.chosen: Optional[Tensor] = None

    def on_step(self, i: int, x: Tensor) -> None:
        self.step = i

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.step is None:
            return
        keep: Optional[Tensor] = None
        if self.chosen is not None:
            keep = self.chosen == self.step
            if not keep.any():
                return
        elif self.step % self.stride:
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
        if keep is not None:  # rows are [uncond; cond] blocks of the batch's trajectories
            mask = keep.repeat(n // len(keep))
            row = {k: v[mask] for k, v in row.items()}
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
            which = (
                f"every {s.stride(len(model.timesteps))}-th"
                if s.step_sampling == "stride"
                else f"one step each, N({s.normal_mean}, {s.normal_std}) x"
            )
            log.info(
                "collecting calibration data: %d trajectories, %s of %d steps -> %s",
                s.n_samples,
                which,
                len(model.timesteps),
                entry.path,
            )
            with entry.writing() as tmp:
                _write_shards(model, s, tmp)
    return CalibStream(entry.path)


def _write_shards(model: Any, s: CalibSettings, folder: Path) -> None:
    stride = s.stride(len(model.timesteps))
    recorder = _Recorder(stride, model.spec)
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
                if s.step_sampling == "normal":
                    recorder.chosen = s.normal_steps(indices, len(model.timesteps))
                model.sample_latents(indices, s.seed, on_step=recorder.on_step)
                for row in recorder.rows:
                    keys = keys or list(row)
                    pending.append(row)
                    if sum(p[STEP_KEY].shape[0] for p in pending) >= s.shard_rows:
                        flush()
            flush()
    finally:
        handle.remove()
    steps = (
        list(range(0, len(model.timesteps), stride))
        if s.step_sampling == "stride"
        else sorted(set(s.normal_steps(list(range(s.n_samples)), len(model.timesteps)).tolist()))
    )
    index = {
        "rows": sum(sh["rows"] for sh in shards),
        "shards": shards,
        "keys": keys,
        "steps": steps,
        "step_sampling": s.step_sampling,
        "guided": bool(model.guided),
        # how rows were written (trajectory batches x steps x [uncond; cond]): lets
        # CalibStream.reference_order sort them independently of the batch size
        "layout": {"n_samples": s.n_samples, "batch_size": s.batch_size},
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

    def reference_order(self) -> Tensor:
        """Every global row index in the order of the reference code's calibration tensor
        (Q-Diffusion / QuEST ``get_train_samples``: time-step major — all rows of the first
        recorded step, then the next, ... — and with guidance all conditional rows first, then
        all unconditional ones; within a step by trajectory index). Independent of the sampling
        batch size the set was written with. Only for sets with every trajectory at every
        recorded step (``step_sampling=stride``)."""
        if self.index.get("step_sampling", "stride") != "stride":
            raise InvalidSetting(
                "calib.step_sampling",
                f"={self.index['step_sampling']}: this set has one step per trajectory, so there "
                "is no reference time-step-major order; use act_init_select=random and no "
                "running statistics in steps order (act_running_order=shuffled)",
            )
        steps = list(self.index["steps"])
        guided = bool(self.index.get("guided"))
        n, bs = self._layout(steps, guided)
        branch, step, traj = [], [], []
        for start in range(0, n, bs):
            ids = list(range(start, min(n, start + bs)))
            for s in steps:
                for b in (1, 0) if guided else (0,):  # stored [uncond; cond]: cond sorts first
                    branch += [b] * len(ids)
                    step += [s] * len(ids)
                    traj += ids
        if len(step) != self.n_rows:
            raise RuntimeError(
                f"calibration set {self.path}: {self.n_rows} rows, but its layout gives {len(step)}"
            )
        key = (torch.tensor(branch) * (max(steps) + 1) + torch.tensor(step)) * n + torch.tensor(traj)
        return torch.argsort(key, stable=True)

    def _layout(self, steps: list[int], guided: bool) -> tuple[int, int]:
        """(trajectories, trajectories per sampling batch) the set was written with: from the
        index, or, for sets written before it was recorded, from the step column (the first
        denoiser call holds ``batch`` rows, ``2 · batch`` with guidance)."""
        layout = self.index.get("layout")
        if layout is not None:
            return int(layout["n_samples"]), int(layout["batch_size"])
        per_row = len(steps) * (2 if guided else 1)
        n = self.n_rows // per_row
        recorded = torch.cat([b[STEP_KEY] for b in self.batches(4096, with_step=True)])
        if len(steps) == 1:
            if guided:
                raise RuntimeError(
                    f"calibration set {self.path} predates the row layout record "
                    "and has one recorded step: delete it to collect it again"
                )
            return n, n
        first = int((recorded != recorded[0]).nonzero()[0])  # rows of the first call
        return n, first // (2 if guided else 1)

    def ordered_batches(
        self,
        batch_size: int,
        rows: Tensor,
        *,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        with_step: bool = False,
        cache_shards: int = 4,
    ) -> Iterator[dict[str, Tensor]]:
        """Batches of ``batch_size`` rows in exactly the order of ``rows`` (global indices; any
        order, e.g. :meth:`reference_order` or a permutation). Shards are loaded on demand and
        the last ``cache_shards`` kept. ``drop_last`` drops a last, smaller batch."""
        rows = torch.as_tensor(rows).long()
        bounds = torch.tensor([0] + [sh["rows"] for sh in self.index["shards"]]).cumsum(0)
        loaded: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

        def shard(i: int) -> dict[str, Tensor]:
            if i in loaded:
                loaded.move_to_end(i)
                return loaded[i]
            data = load_torch(
                self.path / self.index["shards"][i]["file"], map_location="cpu", weights_only=True
            )
            loaded[i] = data
            while len(loaded) > cache_shards:
                loaded.popitem(last=False)
            return data

        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            if chunk.numel() and (chunk.min() < 0 or chunk.max() >= self.n_rows):
                raise IndexError(f"row indices outside the {self.n_rows} calibration rows")
            which = torch.bucketize(chunk, bounds[1:], right=True)
            parts, positions = [], []
            for i in which.unique().tolist():
                sel = (which == i).nonzero().flatten()
                data = shard(i)
                local = chunk[sel] - bounds[i]
                parts.append({k: v[local] for k, v in data.items()})
                positions.append(sel)
            back = torch.argsort(torch.cat(positions))  # parts are grouped by shard: restore order
            batch = {k: torch.cat([p[k] for p in parts])[back] for k in parts[0]}
            yield self._out(batch, device, with_step)

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
