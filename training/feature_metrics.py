"""Metrics of two sets of detector features beyond FID: KID and precision/recall (docs/design.md#feature-metrics).

Pure functions of float feature matrices [N, D]. Pairwise distances are computed in blocks of
`block_size` × `block_size`, so two 50,000-image sets never need an N × N matrix in memory.
"""

import numpy as np
import torch

from training import metrics

KID_SCALE = 1e3  # KID is usually reported ×10³
METRICS = ('fid', 'kid', 'pr')  # what `fid.py calc --metrics` can compute
NEEDS_FEATURES = ('kid', 'pr')  # metrics that need the reference's feature matrix, not only μ and Σ


def _as_float64(features, device):
    return torch.as_tensor(features).to(device, torch.float64)


def kid_subset_estimates(real, fake, num_subsets=100, max_subset_size=1000, seed=0):
    """Unbiased MMD² with the cubic kernel k(x, y) = (xᵀy/D + 1)³, one estimate per random subset pair.

    Each subset pair draws m = min(max_subset_size, len(real), len(fake)) rows of `fake` and then of `real`
    without replacement from numpy's `default_rng(seed)` (Bińkowski et al. 2018; as in StyleGAN3's kid.py).
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'KID needs two feature matrices [N, D] of the same D, got {list(real.shape)} and {list(fake.shape)}')
    m = min(max_subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f'KID needs at least 2 features per set, got {len(real)} and {len(fake)}')
    dim = real.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        within = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        across = (x @ y.T / dim + 1) ** 3
        estimates[i] = (within.sum() - np.diag(within).sum()) / (m * (m - 1)) - 2 * across.mean()
    return estimates


def kernel_inception_distance(real, fake, num_subsets=100, max_subset_size=1000, seed=0):
    """(KID, its standard error over the subsets), both ×10³ (KID_SCALE).

    The standard error is NaN when it cannot be estimated: one subset, or subsets that are the whole sets
    (both sets no larger than max_subset_size), which makes every estimate the same.
    """
    estimates = kid_subset_estimates(real, fake, num_subsets, max_subset_size, seed) * KID_SCALE
    whole_sets = max(len(real), len(fake)) <= max_subset_size
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates)) if len(estimates) > 1 and not whole_sets else float('nan')
    return float(estimates.mean()), float(standard_error)


def _blocks(num, block_size):
    return [slice(start, min(start + block_size, num)) for start in range(0, num, block_size)]


def _pairwise_distances(a, b):
    """Euclidean distances [len(a), len(b)] from ‖a‖² + ‖b‖² − 2aᵀb (a matrix product; clamped at 0)."""
    squared = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T
    return squared.clamp(min=0).sqrt()


def knn_radii(features, k=3, block_size=5000, device='cpu'):
    """Distance from each feature to its k-th nearest other feature of the same set [N] (float64)."""
    features = _as_float64(features, device)
    if len(features) <= k:
        raise ValueError(f'{k}-nearest-neighbour radii need more than {k} features, got {len(features)}')
    radii = []
    for rows in _blocks(len(features), block_size):
        nearest = None  # the k + 1 smallest distances so far (the point itself is one of them, at 0)
        for columns in _blocks(len(features), block_size):
            distances = _pairwise_distances(features[rows], features[columns])
            candidates = distances if nearest is None else torch.cat([nearest, distances], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def fraction_in_balls(queries, centres, radii, block_size=5000, device='cpu'):
    """Fraction of `queries` inside at least one ball (centre_i, radius_i), boundary included."""
    queries, centres, radii = _as_float64(queries, device), _as_float64(centres, device), radii.to(device, torch.float64)
    inside = torch.zeros(len(queries), dtype=torch.bool, device=device)
    for rows in _blocks(len(queries), block_size):
        for columns in _blocks(len(centres), block_size):
            distances = _pairwise_distances(queries[rows], centres[columns])
            inside[rows] |= (distances <= radii[columns][None]).any(dim=1)
    return float(inside.to(torch.float64).mean())


def precision_recall(real, fake, k=3, block_size=5000, device='cpu'):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour balls.

    Precision: the fraction of `fake` inside the real manifold (the union of each real feature's ball to its
    k-th nearest real neighbour); recall: the fraction of `real` inside the fake manifold.
    """
    precision = fraction_in_balls(fake, real, knn_radii(real, k, block_size, device), block_size, device)
    recall = fraction_in_balls(real, fake, knn_radii(fake, k, block_size, device), block_size, device)
    return precision, recall


def evaluate(names, stats, reference, device='cpu'):
    """{metric: value} of FeatureStats `stats` against a loaded reference (metrics.load_statistics) for each of
    `names` (METRICS): 'fid' → FID, 'kid' → (KID, standard error) ×10³, 'pr' → (precision, recall)."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f'unknown metric {unknown[0]!r}; expected some of {list(METRICS)}')
    if any(name in NEEDS_FEATURES for name in names) and reference.get('features') is None:
        raise ValueError('the reference holds no features')
    results = {}
    for name in names:
        if name == 'fid':
            results[name] = metrics.frechet_distance(*stats.mean_cov(), reference['mu'], reference['sigma'])
        elif name == 'kid':
            results[name] = kernel_inception_distance(reference['features'], stats.features())
        else:
            results[name] = precision_recall(reference['features'], stats.features(), device=device)
    return results
