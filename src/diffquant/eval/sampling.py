"""Generating the evaluation samples in batches, resumably.

Each finished batch is saved (features, logits, labels, the seconds it took, and the images of the
first batches for the sample grid) under ``progress_dir``; a job restarted in the same folder
replays them and samples only what is missing. Sample ``i`` is identical whatever the batch size
(see :func:`diffquant.models.base.sample_seed`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from diffquant.cache import atomic_torch_save
from diffquant.eval.metrics import EvalBatch


def batch_ranges(n: int, batch_size: int, start: int = 0) -> list[range]:
    """Consecutive sample-index ranges covering ``start .. start + n``."""
    return [range(start + b, start + min(b + batch_size, n)) for b in range(0, n, batch_size)]


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
) -> Iterator[tuple[EvalBatch, float]]:
    """Yield ``(batch, seconds)`` for samples ``start .. start + n`` of ``seed``.

    ``seconds`` is the wall time of sampling (not of the backbone) recorded when the batch was
    made. Images are kept (uint8) only for the first ``keep_images`` samples.
    """
    ranges = batch_ranges(n, batch_size, start)
    if progress_dir is not None:
        Path(progress_dir).mkdir(parents=True, exist_ok=True)
    for k, idx in enumerate(tqdm(ranges, desc=desc, unit="batch", dynamic_ncols=True)):
        path = None if progress_dir is None else Path(progress_dir) / f"batch_{idx.start:07d}_{len(idx)}.pt"
        if path is not None and path.is_file():
            rec = torch.load(path)
        else:
            t0 = time.perf_counter()
            images, labels = model.sample(list(idx), seed)
            if images.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            out = evaluation.features(images)
            kept = images[: max(0, keep_images - (idx.start - start))]
            rec = {
                "features": out["features"],
                "logits": out["logits"],
                "labels": labels,
                "seconds": seconds,
                "images": (kept.cpu() * 255).round().to(torch.uint8),
                "per_sample": evaluation.per_sample(images, labels),
            }
            if path is not None:
                atomic_torch_save(rec, path)
        images = rec["images"].float() / 255 if rec["images"] is not None and len(rec["images"]) else None
        yield (
            EvalBatch(images, rec["labels"], rec["features"], rec["logits"], rec.get("per_sample", {})),
            rec["seconds"],
        )
