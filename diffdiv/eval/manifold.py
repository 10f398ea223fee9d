"""k-NN precision / recall (Kynkäänniemi et al. 2019) and MMD in a feature space."""

from __future__ import annotations

import torch
from torch import Tensor

from diffdiv.eval.mixture import mmd_rbf


def knn_radii(feats: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (self excluded)."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, {len(feats) - 1}], got {k}")
    f = feats.double()
    out = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)
        out.append(torch.kthvalue(d, k + 1, dim=1).values)  # index 0 of the sorted row is the point itself
    return torch.cat(out)


def in_manifold(query: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """f(q, Phi) of Kynkäänniemi et al. 2019, Eq. 1: q lies within some support point's k-NN ball."""
    q, s = query.double(), support.double()
    out = []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i:i + chunk], s)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 2): fraction of fake samples on the
    real manifold, and fraction of real samples on the fake manifold."""
    real = real.reshape(len(real), -1)
    fake = fake.reshape(len(fake), -1)
    precision = in_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = in_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def median_distance(x: Tensor, max_points: int = 1000) -> float:
    """Median pairwise distance of (up to max_points of) x: the kernel bandwidth scale."""
    x = x.reshape(len(x), -1).double()[:max_points]
    d = torch.cdist(x, x)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    return float(d[iu[0], iu[1]].median())


def feature_mmd(real: Tensor, fake: Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0),
                max_samples: int = 2000, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, Eq. 3) with RBF kernels at `scales` x the median distance
    of the real features (or x `bandwidth`)."""
    real = real.reshape(len(real), -1).double()[:max_samples]
    fake = fake.reshape(len(fake), -1).double()[:max_samples]
    h = bandwidth if bandwidth is not None else median_distance(real)
    return mmd_rbf(real, fake, tuple(s * h for s in scales))


def median_mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None, paired: bool = False) -> tuple[float, float]:
    """Unbiased MMD^2 with one RBF kernel of bandwidth h (default: the median distance within y); (mmd2, h)."""
    h = bandwidth if bandwidth is not None else max(median_distance(y, max_points=len(y)), 1e-12)
    return mmd_rbf(x, y, (h,), paired=paired), h


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean L2 distance between distinct samples (flattened)."""
    x = x.reshape(x.shape[0], -1).double()
    n = len(x)
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))

