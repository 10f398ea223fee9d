"""Evaluation: FID / precision-recall / MMD in pluggable feature spaces, rewards and CLIP score, reports.

Python API: `evaluate(models, metrics, ref, steps, n, out=None, **options) -> report dict`
(see diffdiv.eval.runner.evaluate); CLI: `diffdiv eval ...` (diffdiv.eval.job).
"""

from diffdiv.eval.runner import EvalOptions, ModelSpec, evaluate

__all__ = ["EvalOptions", "ModelSpec", "evaluate"]
