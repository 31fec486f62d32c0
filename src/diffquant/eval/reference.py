"""Real images that FID compares against: the held-out digits or a ``.npz`` of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def load_reference_images(reference: str, image_size: int | None = None) -> Tensor:
    """Reference images ``(M, C, H, W)`` in [0, 1].

    ``digits_heldout``: the held-out split of scikit-learn's digits (never seen in training).
    ``*.npz``: an ADM-style reference batch (``arr_0``: uint8 ``(M, H, W, C)``).
    """
    if reference == "digits_heldout":
        from diffquant.data.digits import load_digits

        images, _ = load_digits("heldout", size=image_size or 32)
        return images
    path = Path(reference).expanduser()
    if path.suffix == ".npz" and path.is_file():
        arr = np.load(path)["arr_0"]
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    raise FileNotFoundError(
        f"evaluator.reference={reference!r}: use 'digits_heldout' or an existing .npz of uint8 "
        "(M, H, W, C) images under 'arr_0' (e.g. ADM's VIRTUAL_lsun_bedroom256.npz reference batch)."
    )
