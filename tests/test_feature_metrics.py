"""training/feature_metrics.py: KID and precision/recall against direct NumPy computations."""

import numpy as np
import pytest

from training import feature_metrics


def random_features(seed, num, dim=8, shift=0.0):
    return np.random.default_rng(seed).standard_normal([num, dim]) + shift


def numpy_kid(real, fake, num_subsets, subset_size, seed):
    """Bińkowski et al.'s estimator written out pair by pair (×10³)."""
    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    kernel = lambda a, b: (a @ b / dim + 1) ** 3
    estimates = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), subset_size, replace=False)]
        y = real[rng.choice(len(real), subset_size, replace=False)]
        m = subset_size
        within = sum(kernel(x[i], x[j]) + kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
        estimates.append(within / (m * (m - 1)) - 2 * across / m ** 2)
    return 1e3 * np.mean(estimates)


def brute_force_precision_recall(real, fake, k):
    def radii(points):
        distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself
    def fraction_inside(queries, centres):
        distances = np.sqrt(((queries[:, None] - centres[None]) ** 2).sum(-1))
        return np.mean((distances <= radii(centres)[None]).any(axis=1))
    return fraction_inside(fake, real), fraction_inside(real, fake)


def test_kid_matches_a_direct_numpy_computation():
    real, fake = random_features(0, 40), random_features(1, 30, shift=0.3)
    kid, _ = feature_metrics.kernel_inception_distance(real, fake, num_subsets=5, max_subset_size=20, seed=3)
    assert kid == pytest.approx(numpy_kid(real, fake, 5, 20, seed=3), rel=1e-6)


def test_kid_of_a_set_against_itself_is_within_its_standard_error():
    # A feature drawn into both subsets pairs with itself, a bias of -2(k(x,x) - k(x,y))/N: small when N >> subset size.
    # The mean of 100 independent estimates is within one standard error of 0 about 2 times in 3; the seeds are fixed.
    features = random_features(2, 20000)
    kid, standard_error = feature_metrics.kernel_inception_distance(features, features, num_subsets=100, max_subset_size=100)
    assert abs(kid) < standard_error


def test_kid_grows_with_a_shift():
    real = random_features(3, 200)
    near, _ = feature_metrics.kernel_inception_distance(real, random_features(4, 200, shift=0.1), num_subsets=10, max_subset_size=100)
    far, _ = feature_metrics.kernel_inception_distance(real, random_features(4, 200, shift=1.0), num_subsets=10, max_subset_size=100)
    assert far > near > 0


def test_kid_subset_size_is_bounded_by_the_smaller_set():
    estimates = feature_metrics.kid_subset_estimates(random_features(5, 30), random_features(6, 10), num_subsets=3)
    assert len(estimates) == 3 and np.isfinite(estimates).all()


def test_precision_and_recall_of_identical_sets_are_one():
    features = random_features(7, 50)
    assert feature_metrics.precision_recall(features, features) == (1.0, 1.0)


def test_precision_of_a_far_shifted_set_is_zero():
    precision, recall = feature_metrics.precision_recall(random_features(8, 50), random_features(9, 50, shift=100.0))
    assert precision == 0.0 and recall == 0.0


@pytest.mark.parametrize('k', [1, 3])
def test_precision_recall_match_a_brute_force_computation(k):
    real, fake = random_features(10, 60, dim=4), random_features(11, 45, dim=4, shift=0.5)
    assert feature_metrics.precision_recall(real, fake, k=k) == pytest.approx(brute_force_precision_recall(real, fake, k), abs=1e-12)


def test_block_size_does_not_change_the_results():
    real, fake = random_features(12, 70, dim=4), random_features(13, 50, dim=4, shift=0.5)
    whole = feature_metrics.precision_recall(real, fake, block_size=1000)
    assert feature_metrics.precision_recall(real, fake, block_size=16) == whole
    assert feature_metrics.precision_recall(real, fake, block_size=3) == whole
    radii = feature_metrics.knn_radii(real, block_size=7)
    assert np.allclose(radii.numpy(), feature_metrics.knn_radii(real, block_size=1000).numpy(), rtol=1e-12)


def test_kid_standard_error_is_nan_when_every_subset_is_the_whole_set():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal([50, 8]), rng.standard_normal([50, 8]) + 0.5
    kid, standard_error = feature_metrics.kernel_inception_distance(real, fake, num_subsets=10, max_subset_size=1000)
    assert np.isfinite(kid) and np.isnan(standard_error)
