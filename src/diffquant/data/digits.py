"""scikit-learn's bundled 8×8 handwritten digits, upsampled into small images.

The digits set (1,797 images, 10 classes) ships inside scikit-learn, so it is always available
offline. It is the training and reference data for the embedded models in :mod:`diffquant.zoo`
(the ``ldm_digits`` latent diffusion model and the ``digits_classifier`` FID/IS backbone).

The split is fixed: a stratified 80/20 split with ``random_state=0`` gives 1,437 ``train`` and
360 ``heldout`` images. Nothing is cached on disk; a call costs a few milliseconds.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Split = Literal["train", "heldout", "all"]

#: Fraction of the data in the held-out split.
HELDOUT_FRACTION = 0.2
#: Seed of the split; changing it changes every number measured on the held-out split.
SPLIT_SEED = 0
#: Largest raw pixel value in scikit-learn's digits (pixels are integers 0..16).
RAW_MAX = 16.0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the (train, heldout) index arrays of the fixed stratified split, each sorted."""
    from sklearn.model_selection import train_test_split

    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)),
        test_size=HELDOUT_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return np.sort(train_idx), np.sort(heldout_idx)


def upsample(images: Tensor, size: int) -> Tensor:
    """Resize ``(N, 1, h, w)`` images in [0, 1] to ``(N, 1, size, size)``, bilinear, clamped to [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.clamp(0.0, 1.0)
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp(0.0, 1.0)


def load_digits(split: Split = "train", size: int = 32) -> tuple[Tensor, Tensor]:
    """Load a split of the digits as images and labels.

    Args:
        split: ``"train"`` (1,437 images), ``"heldout"`` (360 images, a fixed stratified 20%
            split with ``random_state=0``) or ``"all"`` (1,797 images, in scikit-learn's order).
        size: side of the returned images in pixels; the 8×8 originals are bilinearly upsampled
            (``align_corners=False``) and clamped.

    Returns:
        ``(images, labels)``: images ``(N, 1, size, size)`` float32 in [0, 1] (raw pixel / 16,
        1 = ink) and labels ``(N,)`` int64 in 0..9. Train and held-out rows are in increasing
        order of their index in scikit-learn's data.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    bunch = _sk_load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32) / RAW_MAX  # (1797, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    if split != "all":
        train_idx, heldout_idx = _split_indices(labels)
        idx = train_idx if split == "train" else heldout_idx
        pixels, labels = pixels[idx], labels[idx]
    images = upsample(torch.from_numpy(pixels).unsqueeze(1), size)
    return images.contiguous(), torch.from_numpy(labels)
