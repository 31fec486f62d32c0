"""Feature networks for FID / sFID / Inception Score, registered in ``BACKBONES``.

A backbone is an ``nn.Module`` taking images ``(N, C, H, W)`` in [0, 1] and returning
``{"features": (N, d), "logits": (N, k) or None}`` and, when it has them, ``"spatial": (N, s)``
(sFID's flattened intermediate map), with attributes ``num_features`` (d), ``name`` and
``spatial_layer`` (a string naming where the spatial features come from, part of their cache key;
None when it has none). A backbone may also offer ``perceptual_maps(images) -> list of (N, C_l,
H_l, W_l)`` (``lpips_digits``). Builders take the evaluator config.
"""

from diffquant.eval.backbones import digits, inception  # noqa: F401  (register)
