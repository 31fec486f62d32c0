"""Evaluation: metrics (``EVALUATORS``), feature backbones (``BACKBONES``), sampling."""

from diffquant.eval import (
    clip_score,  # noqa: F401  (registers clip_score)
    lpips,  # noqa: F401  (registers lpips, lpips_digits)
    metrics,  # noqa: F401  (registers fid, sfid, fid_to_fp, inception_score)
    paired,  # noqa: F401  (registers psnr, ssim)
)
