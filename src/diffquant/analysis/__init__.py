"""Analyses of a quantized model beyond the evaluator's metrics.

* :mod:`diffquant.analysis.error_accumulation` — per-step vs accumulated error against the FP
  sampler (``analysis.error_accumulation=true`` in a job; ``python -m
  diffquant.analysis.error_accumulation plot RUN_DIR ... --out X.png`` to overlay runs).

(Submodules are not imported here, so that ``python -m`` runs them without a double import.)
"""
