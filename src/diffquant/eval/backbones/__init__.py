"""Feature networks for FID / Inception Score, registered in ``BACKBONES``.

A backbone is an ``nn.Module`` taking images ``(N, C, H, W)`` in [0, 1] and returning
``{"features": (N, d), "logits": (N, k) or None}``, with attributes ``num_features`` (d) and
``name``. Builders take the evaluator config.
"""

from diffquant.eval.backbones import digits, inception  # noqa: F401  (register)
