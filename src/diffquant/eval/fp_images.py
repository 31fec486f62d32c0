"""The FP model's 8-bit images, kept for the metrics that compare each quantized sample with the
FP sample of the same index (seed, noise, class or prompt): ``psnr``, ``ssim``, ``lpips``,
``lpips_digits``.

They live in the FP reference's cache entry (beside ``features.pt``, see
:func:`diffquant.app.fp_reference`) as blocks ``images_<start>_<stop>.pt``: uint8
``(stop - start, C, H, W)`` for samples ``start .. stop - 1``, one block per saved batch of the
FP samples. Neither writing (:class:`ImageBlockWriter`, one batch at a time) nor reading
(:class:`FPImages`, the blocks a chunk overlaps) holds all of them: a 50k-sample ImageNet 256²
reference is 9.8 GB, a 500-sample digits one 0.5 MB. The cache entry's manifest verifies them
like its other files.
"""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from diffquant.cache import atomic_torch_save, load_torch

_BLOCK = re.compile(r"images_(\d+)_(\d+)\.pt$")


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] (any shape) → the 8-bit images they would be saved as (uint8, 0..255)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def block_name(indices: range) -> str:
    return f"images_{indices.start:07d}_{indices.stop:07d}.pt"


def blocks_in(folder: Path) -> list[tuple[range, Path]]:
    """The image blocks in ``folder``, ordered by first sample."""
    found = []
    for path in Path(folder).glob("images_*.pt"):
        if m := _BLOCK.match(path.name):
            found.append((range(int(m[1]), int(m[2])), path))
    return sorted(found, key=lambda b: (b[0].start, b[0].stop))


def tiles(blocks: list[tuple[range, Path]], indices: range) -> bool:
    """Whether ``blocks`` cover ``indices`` exactly, each sample once."""
    pos = indices.start
    for idx, _ in blocks:
        if idx.start != pos or idx.stop <= idx.start:
            return False
        pos = idx.stop
    return pos == indices.stop


class ImageBlockWriter:
    """Writes one block per batch into ``folder`` (atomically); :meth:`move_into` hands the blocks
    that tile a job's samples to a cache entry being written."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, indices: range, images: Tensor) -> None:
        """Save images ``(len(indices), C, H, W)`` in [0, 1] (or uint8) of samples ``indices``."""
        if len(images) != len(indices):
            raise ValueError(f"{len(images)} images for samples {indices.start}..{indices.stop - 1}")
        data = images if images.dtype == torch.uint8 else to_uint8(images)
        atomic_torch_save(data.cpu().contiguous(), self.folder / block_name(indices))

    def move_into(self, dest: Path, indices: range) -> None:
        """Move the blocks covering ``indices`` into ``dest``; fail if they do not tile them."""
        blocks = [
            b for b in blocks_in(self.folder) if b[0].start >= indices.start and b[0].stop <= indices.stop
        ]
        if not tiles(blocks, indices):
            have = ", ".join(f"{i.start}..{i.stop - 1}" for i, _ in blocks) or "none"
            raise RuntimeError(
                f"FP images in {self.folder} do not cover samples {indices.start}..{indices.stop - 1} "
                f"(blocks: {have})"
            )
        for _, path in blocks:
            shutil.move(str(path), str(Path(dest) / path.name))
        self.discard()

    def discard(self) -> None:
        """Remove the folder and what is left in it."""
        shutil.rmtree(self.folder, ignore_errors=True)


class FPImages:
    """Read access to the FP images of samples ``indices`` stored as blocks in ``folder``."""

    CACHED_BLOCKS = 2  # a chunk rarely spans more than two saved batches

    def __init__(self, folder: Path, indices: range, blocks: list[tuple[range, Path]]) -> None:
        self.folder = Path(folder)
        self.indices = indices
        self.blocks = blocks
        self._loaded: OrderedDict[int, Tensor] = OrderedDict()

    @classmethod
    def open(cls, folder: Path, indices: range) -> Optional[FPImages]:
        """The images of ``indices`` in ``folder``, or None when its blocks do not cover them."""
        blocks = [b for b in blocks_in(folder) if b[0].start >= indices.start and b[0].stop <= indices.stop]
        return cls(folder, indices, blocks) if tiles(blocks, indices) else None

    def _block(self, k: int) -> Tensor:
        if k in self._loaded:
            self._loaded.move_to_end(k)
        else:
            self._loaded[k] = load_torch(self.blocks[k][1])
            while len(self._loaded) > self.CACHED_BLOCKS:
                self._loaded.popitem(last=False)
        return self._loaded[k]

    def get(self, indices: range) -> tuple[Tensor, Tensor]:
        """``(images, present)`` for samples ``indices``: uint8 ``(n, C, H, W)`` and bool ``(n,)``.

        Samples outside this reference's ``indices`` (a chunk that a shard boundary cuts) are
        zeros with ``present`` False."""
        parts: dict[int, Tensor] = {}
        for k, (idx, _) in enumerate(self.blocks):
            lo, hi = max(idx.start, indices.start), min(idx.stop, indices.stop)
            if lo < hi:
                parts[lo] = self._block(k)[lo - idx.start : hi - idx.start]
        if not parts:
            raise ValueError(
                f"no FP images for samples {indices.start}..{indices.stop - 1}: this reference holds "
                f"{self.indices.start}..{self.indices.stop - 1}"
            )
        shape = next(iter(parts.values())).shape[1:]
        out = torch.zeros((len(indices), *shape), dtype=torch.uint8)
        present = torch.zeros(len(indices), dtype=torch.bool)
        for lo, part in parts.items():
            out[lo - indices.start : lo - indices.start + len(part)] = part
            present[lo - indices.start : lo - indices.start + len(part)] = True
        return out, present
