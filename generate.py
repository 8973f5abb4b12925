"""Generate images from a trained network: one PNG per seed, optionally a grid, on one or many processes.

Under `torchrun` each rank samples its share of the seeds; every image depends on its seed alone
(training/sampling.py), so the files are the same whatever the batch size or the number of processes (on CPUs
to the bit, docs/compatibility.md#batch-invariance).
"""

import math
import os

import click

import torch_utils.before_torch  # noqa: F401  (first: settings that torch's libraries read when they load)
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed
from training import cli
from training import solvers


def image_path(outdir, seed, subdirs):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def save_png(path, image_hwc):
    """Write a uint8 HWC image as PNG (gray when it has one channel), atomically."""
    pil_image = PIL.Image.fromarray(image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc, 'L' if image_hwc.shape[2] == 1 else 'RGB')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pil_image.save(f, format='PNG')


def prepare_outputs(outdir, grid_path, seeds, subdirs):
    """Check that every output folder takes files before sampling starts, and remove the temporaries of the files this
    run writes that a killed run left (rank 0, before any rank writes)."""
    folders = {}  # folder → names of the files written there
    for seed in seeds if outdir is not None else []:
        folder, name = os.path.split(image_path(outdir, seed, subdirs))
        folders.setdefault(folder, []).append(name)
    if grid_path is not None:
        folders.setdefault(os.path.dirname(os.path.abspath(grid_path)), []).append(os.path.basename(grid_path))
    for folder, names in folders.items():
        try:
            dnnlib.util.check_writable_folder(folder)
            dnnlib.util.remove_stale_temporaries(folder, names)
        except OSError as error:
            raise click.ClickException(f'cannot write to {error.filename or folder}: {error.strerror or error}') from None


def write_png(path, image_hwc):
    """save_png, with the folder made first and any OSError (disk full, ...) one line naming the file."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_png(path, image_hwc)
    except OSError as error:
        raise click.ClickException(f'cannot write {path}: {error.strerror or error}') from None


def tile_grid(images_hwc):
    """Images in a near-square grid, row by row; unfilled cells stay black."""
    num_columns = math.ceil(math.sqrt(len(images_hwc)))
    num_rows = math.ceil(len(images_hwc) / num_columns)
    height, width, channels = images_hwc[0].shape
    grid = np.zeros([num_rows * height, num_columns * width, channels], dtype=np.uint8)
    for i, image in enumerate(images_hwc):
        row, column = divmod(i, num_columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def gather_to_main(images_by_seed):
    """Every rank's {seed: image} merged on rank 0 (other ranks get None)."""
    if distributed.get_world_size() == 1:
        return images_by_seed
    gathered = [None] * distributed.get_world_size() if distributed.is_main() else None
    torch.distributed.gather_object(images_by_seed, gathered, dst=0)
    return {seed: image for part in gathered for seed, image in part.items()} if distributed.is_main() else None


@click.command()
@click.option('--network', 'network_url', help='Network file (pickle or safetensors): path or URL', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save one PNG per seed', metavar='DIR', type=str)
@click.option('--grid', 'grid_path', help='Also save all images as one PNG grid', metavar='PATH', type=str)
@click.option('--seeds', help='Random seeds, e.g. 0-63,100', metavar='LIST', type=cli.SeedList(), default='0-63', show_default=True)
@click.option('--subdirs', help='Save into subfolders of 1000 seeds', is_flag=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@cli.sampler_options
@click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
def main(network_url, outdir, grid_path, seeds, subdirs, class_idx, max_batch_size, device, precision, guidance, gnet_url,
         **sampler_options):
    """Generate images from a trained diffusion model.

    \b
    # 64 images with the EDM sampler (18 Heun steps, 35 evaluations)
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=training-runs/00000-cifar10-cond-ddpmpp-fdm_edm/network-snapshot-200000.pkl

    \b
    # Few steps: UniPC with exactly 10 network evaluations (--solver ipndm|unipc|deis|dpm3m|dpm2m|dpm|heun,
    # --schedule edm|time|logsnr|polylog, --afs for the multistep solvers)
    python generate.py --outdir=out --seeds=0-63 --solver=unipc --nfe=10 --network=network-snapshot-200000.pkl

    \b
    # 50,000 images for FID on 8 GPUs with DPM-Solver++
    torchrun --standalone --nproc_per_node=8 generate.py --outdir=fid --seeds=0-49999 --subdirs \\
        --solver=dpm --network=network-snapshot-200000.pkl
    """
    dnnlib.util.tolerate_undecodable_output()
    if outdir is None and grid_path is None:
        raise click.ClickException('nothing to write: give --outdir, --grid, or both')
    if outdir == '':
        raise click.BadParameter('an empty path names no folder', param_hint='--outdir')
    if grid_path is not None and not os.path.basename(grid_path):
        raise click.BadParameter(f'{grid_path!r} names no file', param_hint='--grid')
    if outdir is not None and os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    if grid_path is not None and os.path.isdir(grid_path):
        raise click.BadParameter(f'{grid_path} is a folder; give the PNG file to write', param_hint='--grid')
    sampler_name, sampler_options = cli.sampler_from_options(sampler_options)
    device, precision = cli.init_device(device, precision)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()

    distributed.print0(f'Loading network from "{network_url}"...')
    net = cli.rank0_first(lambda: cli.load_network(network_url, device))  # a URL is downloaded into the cache once
    cli.check_class_idx(class_idx, net)
    net = cli.guided_network(net, guidance, gnet_url, device)
    if distributed.is_main():
        prepare_outputs(outdir, grid_path, seeds, subdirs)
    distributed.barrier()  # no rank writes before the stale temporaries are gone

    rank_batches, all_batches = cli.split_seeds(seeds, max_batch_size, rank, world_size)
    nfe = solvers.network_evaluations(sampler_name, **sampler_options)
    distributed.print0(f'Generating {len(seeds)} images with the {sampler_name} sampler {sampler_options} ({nfe} network '
        f'evaluations per image) in {precision} on {world_size} process(es) to "{outdir or grid_path}"...')
    keep_for_grid = {}
    with tqdm.tqdm(total=len(seeds), unit='img', disable=rank != 0) as progress:  # closed first: an error gets its own line
        for round_index, batch_seeds in enumerate(rank_batches):
            if len(batch_seeds):
                images = cli.generate_images(net, batch_seeds.tolist(), sampler_name, sampler_options, device, class_idx,
                                             precision)
                for seed, image in zip(batch_seeds.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
                    if outdir is not None:
                        write_png(image_path(outdir, seed, subdirs), image)
                    if grid_path is not None:
                        keep_for_grid[seed] = image
            # The batches of this round on all ranks, counted here so rank 0 shows the total images/s.
            progress.update(sum(len(b) for b in all_batches[round_index * world_size:(round_index + 1) * world_size]))

    if grid_path is not None:
        all_images = gather_to_main(keep_for_grid)
        if all_images is not None:
            write_png(grid_path, tile_grid([all_images[seed] for seed in seeds]))
    distributed.barrier()
    distributed.print0('Done.')
    distributed.shutdown()


if __name__ == '__main__':
    main()
