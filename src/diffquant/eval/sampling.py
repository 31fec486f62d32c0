"""Generating the evaluation samples: on a fixed grid of chunks, in batches, resumably.

**Fixed chunks.** CPU and GPU kernels (oneDNN / cuDNN convolutions, GEMMs, the VAE, the feature
backbone) pick their blocking and reduction order by the number of rows they get, so the same
sample computed in a call of 1, 7 or 250 rows comes out with different low bits; after a
quantizer's rounding these differences grow to visibly different FIDs. So the model never sees
``batch_size``: the indices ``0 .. n_samples - 1`` of the evaluation are cut into fixed chunks
``[k·C, min((k+1)·C, n_samples))`` (``C`` = ``evaluator.chunk_size``, see :class:`SampleGrid`),
and every model call (conditioning, the whole sampler, the decoder, the backbone, per-sample
metrics) is on exactly one whole chunk. A job that needs part of a chunk (a shard slice that
starts or ends inside one) computes the whole chunk and keeps its rows. Sample ``i`` is therefore
the same bits whatever ``batch_size`` or shard it is drawn in (with the same ``chunk_size``,
``n_samples``, device and thread count); ``chunk_size`` is the speed / memory knob.

**Batches.** ``batch_size`` only sets how many samples make one yielded and saved batch. Each
finished batch (features, logits, spatial features when a metric needs them, labels, per-sample
metric values, the sampling seconds, and the images of the first ``keep_images`` samples, for the
grid or the FP reference's images) is saved under ``progress_dir``; a job restarted in the same
folder replays them and samples only what is missing.

**Keyed progress.** A batch file is only replayed by the configuration that made it: its name
carries a tag hashed from ``progress_key`` (the caller's digest of its configuration, e.g. the
job's config hash), the seed, the chunk grid and the numerics (:mod:`diffquant.numerics`).
Batches of any other tag in the folder are left alone and named in a warning.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from diffquant.cache import atomic_torch_save, stable_hash
from diffquant.eval.metrics import EvalBatch
from diffquant.numerics import numerics_identity
from diffquant.stopping import check_stop

log = logging.getLogger("diffquant")

DEFAULT_CHUNK_SIZE = 32
_BATCH_FILE = re.compile(r"batch_(\d+)_(\d+)(?:_([0-9a-f]+))?\.pt$")


def batch_ranges(n: int, batch_size: int, start: int = 0) -> list[range]:
    """Consecutive sample-index ranges covering ``start .. start + n``."""
    return [range(start + b, start + min(b + batch_size, n)) for b in range(0, n, batch_size)]


@dataclass(frozen=True)
class SampleGrid:
    """The fixed chunks ``[k·chunk_size, min((k+1)·chunk_size, total))`` of sample indices
    ``0 .. total - 1`` that every model call runs on."""

    total: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(
                f"evaluator.chunk_size={self.chunk_size} must be positive "
                f"(e.g. evaluator.chunk_size={DEFAULT_CHUNK_SIZE})."
            )
        if self.total <= 0:
            raise ValueError(f"evaluator.n_samples={self.total} must be positive.")

    @classmethod
    def of(cls, eval_cfg: Any) -> SampleGrid:
        """The grid of an evaluator config (``n_samples``, ``chunk_size``)."""
        chunk = getattr(eval_cfg, "chunk_size", None)
        return cls(int(eval_cfg.n_samples), DEFAULT_CHUNK_SIZE if chunk is None else int(chunk))

    def chunks(self, start: int, stop: int) -> list[range]:
        """The chunks that overlap ``start .. stop - 1`` (whole chunks, in order)."""
        if not 0 <= start <= stop <= self.total:
            raise ValueError(
                f"samples {start}..{stop - 1} lie outside the evaluation's "
                f"{self.total} samples (evaluator.n_samples)"
            )
        first = start // self.chunk_size * self.chunk_size
        return [range(c, min(c + self.chunk_size, self.total)) for c in range(first, stop, self.chunk_size)]


def progress_tag(progress_key: Optional[str], seed: int, grid: SampleGrid, device: torch.device) -> str:
    """The tag in the names of saved batches: what must match for a batch to be replayed."""
    return stable_hash(
        {
            "key": progress_key,
            "seed": int(seed),
            "n_samples": grid.total,
            "chunk_size": grid.chunk_size,
            "numerics": numerics_identity(device),
        },
        length=12,
    )


class _Progress:
    """Saved batches of one tag in ``progress_dir`` (None: nothing saved)."""

    def __init__(self, progress_dir: Optional[Path], tag: str) -> None:
        self.dir = None if progress_dir is None else Path(progress_dir)
        self.tag = tag
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._warn_foreign()

    def _warn_foreign(self) -> None:
        foreign = sorted(
            p.name
            for p in self.dir.glob("batch_*.pt")
            if (m := _BATCH_FILE.match(p.name)) and m.group(3) != self.tag
        )
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            log.warning(
                "%s holds %d saved sample batch(es) of another configuration or version "
                "(%s); they are ignored and this job samples afresh (progress tag %s)",
                self.dir,
                len(foreign),
                shown,
                self.tag,
            )

    def path(self, idx: range) -> Optional[Path]:
        return None if self.dir is None else self.dir / f"batch_{idx.start:07d}_{len(idx)}_{self.tag}.pt"

    def load(self, idx: range) -> Optional[dict[str, Any]]:
        path = self.path(idx)
        if path is None or not path.is_file():
            return None
        try:
            rec = torch.load(path)
        except Exception as err:  # a damaged file is recomputed, never trusted
            log.warning("ignoring unreadable saved batch %s (%s): sampling it again", path, err)
            return None
        if rec.get("tag") != self.tag or rec.get("indices") != [idx.start, idx.stop]:
            log.warning("ignoring saved batch %s: it holds other samples or another configuration", path)
            return None
        return rec

    def save(self, idx: range, rec: dict[str, Any]) -> None:
        path = self.path(idx)
        if path is not None:
            atomic_torch_save({**rec, "tag": self.tag, "indices": [idx.start, idx.stop]}, path)


def _sample_chunk(model, evaluation, chunk: range, seed: int, keep_until: int) -> dict[str, Any]:
    """Everything the batches need of one whole chunk, each part computed in one call on it."""
    t0 = time.perf_counter()
    images, labels = model.sample(list(chunk), seed)
    if images.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = evaluation.features(images, batch_size=len(chunk))
    n_keep = max(0, min(len(chunk), keep_until - chunk.start))
    return {
        "range": chunk,
        "seconds": seconds,
        "features": out["features"],
        "logits": out["logits"],
        "spatial": out.get("spatial"),
        "labels": list(labels),
        "per_sample": evaluation.per_sample(images, labels, chunk),
        "images": (images[:n_keep].cpu() * 255).round().to(torch.uint8),
    }


def _rows(chunk_rec: dict[str, Any], idx: range) -> tuple[slice, int, int]:
    c = chunk_rec["range"]
    lo, hi = max(idx.start, c.start), min(idx.stop, c.stop)
    return slice(lo - c.start, hi - c.start), lo, hi


def _assemble(parts: list[dict[str, Any]], idx: range, keep_until: int, seconds: float) -> dict[str, Any]:
    """The record of batch ``idx`` from the chunks that cover it."""
    feats, logits, spatial, labels, images, per_sample = [], [], [], [], [], {}
    for rec in parts:
        rows, lo, hi = _rows(rec, idx)
        feats.append(rec["features"][rows])
        if rec["logits"] is not None:
            logits.append(rec["logits"][rows])
        if rec.get("spatial") is not None:
            spatial.append(rec["spatial"][rows])
        labels.extend(rec["labels"][rows])
        for k, v in rec["per_sample"].items():
            per_sample.setdefault(k, []).append(v[rows])
        n_img = max(0, min(hi, keep_until) - lo)
        images.append(rec["images"][rows.start : rows.start + n_img])
    return {
        "features": torch.cat(feats),
        "logits": torch.cat(logits) if logits else None,
        "spatial": torch.cat(spatial) if spatial else None,
        "labels": labels,
        "seconds": seconds,
        "images": torch.cat(images),
        "per_sample": {k: torch.cat(v) for k, v in per_sample.items()},
    }


def generate(
    model,
    evaluation,
    n: int,
    seed: int,
    batch_size: int,
    progress_dir: Optional[Path],
    keep_images: int = 64,
    desc: str = "sampling",
    start: int = 0,
    progress_key: Optional[str] = None,
) -> Iterator[tuple[EvalBatch, float]]:
    """Yield ``(batch, seconds)`` for samples ``start .. start + n`` of ``seed``, ``batch_size``
    samples a batch.

    The samples are computed on the fixed chunks of ``evaluation.cfg`` (``n_samples``,
    ``chunk_size``: see the module doc), so their values do not depend on ``batch_size`` or
    ``start``. ``progress_key`` identifies the configuration whose batches may be replayed from
    ``progress_dir`` (pass the job's config hash; the folder of a cache entry is keyed already).
    ``seconds`` is the wall time of sampling (not of the backbone) spent on the batch when it was
    made. Images are kept (uint8) only for the first ``keep_images`` samples.
    """
    grid = SampleGrid.of(evaluation.cfg)
    grid.chunks(start, start + n)  # fail early on samples outside the evaluation
    progress = _Progress(progress_dir, progress_tag(progress_key, seed, grid, torch.device(model.device)))
    keep_until = start + keep_images
    computed: dict[int, dict[str, Any]] = {}  # chunk start -> its record, while a batch needs it
    ranges = batch_ranges(n, batch_size, start)
    for k, idx in enumerate(tqdm(ranges, desc=desc, unit="batch", dynamic_ncols=True)):
        check_stop(where=f"{desc}: {k} of {len(ranges)} batches done")  # a stop signal stops here
        rec = progress.load(idx)
        if rec is None:
            seconds, parts = 0.0, []
            for chunk in grid.chunks(idx.start, idx.stop):
                if chunk.start not in computed:
                    computed[chunk.start] = _sample_chunk(model, evaluation, chunk, seed, keep_until)
                    seconds += computed[chunk.start]["seconds"]
                parts.append(computed[chunk.start])
            rec = _assemble(parts, idx, keep_until, seconds)
            progress.save(idx, rec)
        for c in [c for c, r in computed.items() if r["range"].stop <= idx.stop]:
            del computed[c]  # batches run in order: no later batch needs it
        images = rec["images"].float() / 255 if rec["images"] is not None and len(rec["images"]) else None
        batch = EvalBatch(
            images,
            rec["labels"],
            rec["features"],
            rec["logits"],
            rec.get("per_sample", {}),
            rec.get("spatial"),
        )
        yield batch, rec["seconds"]
