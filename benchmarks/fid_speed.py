"""FID speed: images/s of detector feature extraction, and seconds for one FID from 2048-d statistics.

Feature extraction is timed on random uint8 images of the given resolution, resize to 299² included (what
fid.py runs per batch); the FID is timed on two random full-rank 2048×2048 covariances. Prints a table
and writes JSON.

    python benchmarks/fid_speed.py                             # offline detector, 32x32 images, batch 64
    python benchmarks/fid_speed.py --detector=nvidia --batches=5 --out=fid_speed.json
"""

import pathlib
import statistics
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (the repository root must be on the path first)
from training import metrics  # noqa: E402


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def random_images(resolution, batch, device):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, generator=generator).to(device)


@torch.no_grad()
def images_per_second(run, batch, num_batches, device):
    """Images/s of `run()` (one batch) over `num_batches` timed calls after one warm-up call."""
    run()
    synchronize(device)
    start_s = time.perf_counter()
    for _ in range(num_batches):
        run()
    synchronize(device)
    return batch * num_batches / (time.perf_counter() - start_s)


def time_features(detector, resolution, batch, num_batches, device):
    """Images/s of `metrics.Detector` on random uint8 images (resize to 299² included)."""
    images = random_images(resolution, batch, device)
    return images_per_second(lambda: detector(images), batch, num_batches, device)


def time_bare_module(detector, resolution, batch, num_batches, device):
    """Images/s of the detector's TorchScript module alone, called on inputs prepared outside the timing:
    the bare loop that `time_features` (the same images through `metrics.Detector`) is compared with."""
    images = random_images(resolution, batch, device)
    if detector.convention == 'uint8':
        return images_per_second(lambda: detector.module(images, return_features=True), batch, num_batches, device)
    x = (metrics.resize_tf1_bilinear(images.to(torch.float32), metrics.INCEPTION_RESOLUTION) - 128) / 128
    return images_per_second(lambda: detector.module(x), batch, num_batches, device)


def time_fid(feature_dim, repeats):
    """Median seconds of `metrics.frechet_distance` on two random full-rank covariances."""
    rng = np.random.default_rng(0)
    statistics_pairs = []
    for _ in range(2):
        features = rng.standard_normal([2 * feature_dim, feature_dim]) * rng.uniform(0.1, 2, size=feature_dim)
        statistics_pairs += [features.mean(0), np.cov(features, rowvar=False)]
    seconds = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        metrics.frechet_distance(*statistics_pairs)
        seconds.append(time.perf_counter() - start_s)
    return statistics.median(seconds)


@click.command()
@click.option('--detector', help='nvidia, offline or a TorchScript file', metavar='nvidia|offline|PATH', default='offline', show_default=True)
@click.option('--resolution', help='Image size in pixels', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--batch', help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--batches', 'num_batches', help='Timed batches', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--repeats', help='Timed FID computations', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--out', 'out_path', help='JSON results', metavar='PATH', default='fid_speed.json', show_default=True)
def main(detector, resolution, batch, num_batches, repeats, device, out_path):
    """Feature extraction images/s and the seconds of one FID from statistics."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        detector_net = metrics.load_detector(detector, device=device, verbose=True)
    except metrics.DetectorError as e:
        raise click.BadParameter(str(e), param_hint='--detector') from None
    bare_images_per_s = time_bare_module(detector_net, resolution, batch, num_batches, device)
    images_per_s = time_features(detector_net, resolution, batch, num_batches, device)
    fid_s = time_fid(2048, repeats)

    print(f'{detector_net.identity}, {device}, {torch.get_num_threads()} threads')
    print(common.markdown_table(['measure', 'value'], [
        [f'feature extraction, {resolution}x{resolution} images, batch {batch} (images/s)', images_per_s],
        ['the bare TorchScript module on prepared 299x299 inputs (images/s)', bare_images_per_s],
        ['feature extraction / bare module', images_per_s / bare_images_per_s],
        ['one FID from 2048-d statistics (s)', fid_s],
    ]))
    common.write_json(out_path, dict(detector=detector_net.identity, resolution=resolution, batch=batch,
        num_batches=num_batches, images_per_s=images_per_s, bare_module_images_per_s=bare_images_per_s, fid_seconds=fid_s, fid_repeats=repeats, device=str(device),
        threads=torch.get_num_threads(), torch=torch.__version__, machine=common.machine_description()))
    print(f'Wrote {out_path}')


if __name__ == '__main__':
    main()
