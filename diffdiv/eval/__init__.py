"""Evaluation: FID / precision-recall / MMD in pluggable feature spaces, rewards and CLIP score, reports.

Python API: `evaluate(models, metrics, ref, steps, n, out=None, **options) -> report dict`
(diffdiv.eval.runner.evaluate); CLI: `diffdiv eval ...` (diffdiv.eval.job). Building blocks:
`build_features` / `extract` (feature extractors), `FeatureStats` / `fid_from_stats` (cached moments, FID),
`precision_recall` / `feature_mmd` (k-NN manifold, MMD), `write_report`.
"""

from diffdiv.eval.features import build_features, extract
from diffdiv.eval.manifold import feature_mmd, precision_recall
from diffdiv.eval.report import write_report
from diffdiv.eval.runner import EvalOptions, ModelSpec, evaluate
from diffdiv.eval.stats import FeatureStats, fid_from_stats

__all__ = ["EvalOptions", "FeatureStats", "ModelSpec", "build_features", "evaluate", "extract", "feature_mmd",
           "fid_from_stats", "precision_recall", "write_report"]
