"""Evaluation: metrics (``EVALUATORS``), feature backbones (``BACKBONES``), sampling."""

from diffquant.eval import (
    clip_score,  # noqa: F401  (registers clip_score)
    metrics,  # noqa: F401  (registers fid, fid_to_fp, inception_score)
)
