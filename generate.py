"""Generate images from a trained network: one PNG per seed, optionally a grid, on one or many processes.

Under `torchrun` each rank samples its share of the seeds; every image depends on its seed alone
(training/sampling.py), so the files are the same whatever the batch size or the number of processes.
"""

import inspect
import math
import os
import re

import click

from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

# Before torch loads OpenMP: spinning idle threads are fastest on free cores, sleeping ones on busy cores.
OPENMP_WAIT_POLICY = cpu_runtime.choose_openmp_wait_policy()
cpu_runtime.keep_freed_memory()

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

import dnnlib  # noqa: E402
from torch_utils import distributed  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import sampling  # noqa: E402


class SeedList(click.ParamType):
    """Comma-separated seeds and inclusive ranges, e.g. '0-63,100'; duplicates are dropped, order is kept."""

    name = 'seeds'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        seeds = []
        for item in str(value).split(','):
            match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', item)
            if match is None:
                self.fail(f'{item!r} is not a non-negative integer or a range a-b (e.g. 0-63,100)', param, ctx)
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                self.fail(f'range {item!r} is empty: its end is below its start', param, ctx)
            seeds.extend(range(first, last + 1))
        return list(dict.fromkeys(seeds))


def choose_sampler(solver, discretization, schedule, scaling):
    """EDM's rule: any ablation option selects the ablation sampler; dpm/dpm2m select DPM-Solver++."""
    if solver in ('dpm', 'dpm2m'):
        for flag, value in (('--disc', discretization), ('--schedule', schedule), ('--scaling', scaling)):
            if value is not None:
                raise click.ClickException(f'{flag} applies to the ablation sampler (--solver euler|heun), not to --solver {solver}')
        return solver
    if any(value is not None for value in (solver, discretization, schedule, scaling)):
        return 'ablation'
    return 'edm'


OPTION_NAMES = {'num_steps': 'steps', 'discretization': 'disc'}  # sampler keyword → command-line option


def sampler_from_options(sampler_options):
    """(sampler name, its keyword arguments) from the command-line sampler options; unset ones are left out."""
    sampler_options = {key: value for key, value in sampler_options.items() if value is not None}
    sampler_name = choose_sampler(*(sampler_options.get(key) for key in ('solver', 'discretization', 'schedule', 'scaling')))
    if sampler_name != 'ablation':
        sampler_options.pop('solver', None)
    check_sampler_options(sampler_name, sampler_options)
    return sampler_name, sampler_options


def check_sampler_options(sampler_name, options):
    """Every given option must be one the sampler takes, and the step count must be one it can run."""
    accepted = inspect.signature(sampling.SAMPLERS[sampler_name]).parameters
    for key in options:
        if key not in accepted:
            raise click.ClickException(f'--{OPTION_NAMES.get(key, key)} does not apply to the {sampler_name} sampler')
    num_steps = options.get('num_steps', accepted['num_steps'].default)
    if num_steps < sampling.MIN_NUM_STEPS[sampler_name]:
        raise click.ClickException(f'--steps {num_steps}: the {sampler_name} sampler needs at least {sampling.MIN_NUM_STEPS[sampler_name]}')


def load_network(network_url, device):
    """The EMA network of a snapshot (ours or a published FDM/EDM pickle), read without running code from it."""
    try:
        with dnnlib.util.open_url(network_url, verbose=distributed.is_main()) as f:
            snapshot = persistence.load_network_pickle(f)
    except Exception as error:  # a file we cannot read or refuse to read is the user's input, not a bug
        raise click.ClickException(f'--network {network_url}: {type(error).__name__}: {error}'.replace('\n', ' '))
    if not isinstance(snapshot, dict) or 'ema' not in snapshot:
        raise click.ClickException(f'--network {network_url}: the pickle holds no \'ema\' network')
    return snapshot['ema'].eval().requires_grad_(False).to(device)


def image_path(outdir, seed, subdirs):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def save_png(path, image_hwc):
    """Write a uint8 HWC image as PNG (gray when it has one channel), atomically."""
    pil_image = PIL.Image.fromarray(image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc, 'L' if image_hwc.shape[2] == 1 else 'RGB')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pil_image.save(f, format='PNG')


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


def split_seeds(seeds, max_batch_size, rank, world_size):
    """This rank's batches: the seeds split into a multiple of world_size near-equal batches, dealt round-robin."""
    num_batches = (max(len(seeds) - 1, 0) // (max_batch_size * world_size) + 1) * world_size
    all_batches = np.array_split(np.array(seeds, dtype=np.int64), num_batches)
    return all_batches[rank::world_size], all_batches


@click.command()
@click.option('--network', 'network_url', help='Network pickle: path or URL', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save one PNG per seed', metavar='DIR', type=str)
@click.option('--grid', 'grid_path', help='Also save all images as one PNG grid', metavar='PATH', type=str)
@click.option('--seeds', help='Random seeds, e.g. 0-63,100', metavar='LIST', type=SeedList(), default='0-63', show_default=True)
@click.option('--subdirs', help='Save into subfolders of 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--steps', 'num_steps', help='Number of sampling steps  [default: 18]', metavar='INT', type=int)
@click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho', help='Time step exponent  [default: 7]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--S_churn', 'S_churn', help='Stochasticity strength  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_min', 'S_min', help='Stochastic min noise level  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_max', 'S_max', help='Stochastic max noise level  [default: inf]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_noise', 'S_noise', help='Stochastic noise inflation  [default: 1]', metavar='FLOAT', type=float)
@click.option('--solver', help='Solver  [default: heun (EDM sampler)]', type=click.Choice(['euler', 'heun', 'dpm', 'dpm2m']))
@click.option('--disc', 'discretization', help='Time step discretization (ablation sampler)', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule', help='Noise schedule σ(t) (ablation sampler)', type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling', help='Signal scaling s(t) (ablation sampler)', type=click.Choice(['vp', 'none']))
@click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--precision', help='Network arithmetic; fp32 = bit-exact whatever the batch  [default: tf32 on CUDA, else fp32]', type=click.Choice(list(sampling.PRECISIONS)))
def main(network_url, outdir, grid_path, seeds, subdirs, class_idx, max_batch_size, device, precision, **sampler_options):
    """Generate images from a trained diffusion model.

    \b
    # 64 images with the EDM sampler (18 Heun steps, 35 evaluations)
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=training-runs/00000-cifar10-cond-ddpmpp-fdm_edm/network-snapshot-200000.pkl

    \b
    # 50,000 images for FID on 8 GPUs with DPM-Solver++
    torchrun --standalone --nproc_per_node=8 generate.py --outdir=fid --seeds=0-49999 --subdirs \\
        --solver=dpm --network=network-snapshot-200000.pkl
    """
    if outdir is None and grid_path is None:
        raise click.ClickException('nothing to write: give --outdir, --grid, or both')
    sampler_name, sampler_options = sampler_from_options(sampler_options)
    try:
        device = distributed.init(device)
    except ValueError as error:
        raise click.ClickException(f'--device: {error}')
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    precision = precision or sampling.default_precision(device)
    if precision != 'fp32' and device.type != 'cuda':
        raise click.ClickException(f'--precision {precision} needs a CUDA device; this run uses {device.type}')

    # Rank 0 loads first, so that a URL is downloaded into the cache once.
    if rank != 0:
        distributed.barrier()
    distributed.print0(f'Loading network from "{network_url}"...')
    net = load_network(network_url, device)
    if rank == 0:
        distributed.barrier()
    if class_idx is not None and not net.label_dim:
        raise click.ClickException(f'--class {class_idx}: the network is unconditional (label_dim 0)')
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class {class_idx}: out of range, the network has classes 0-{net.label_dim - 1}')

    rank_batches, all_batches = split_seeds(seeds, max_batch_size, rank, world_size)
    distributed.print0(f'Generating {len(seeds)} images with the {sampler_name} sampler {sampler_options} in {precision} '
        f'on {world_size} process(es) to "{outdir or grid_path}"...')
    keep_for_grid = {}
    progress = tqdm.tqdm(total=len(seeds), unit='img', disable=rank != 0)
    for round_index, batch_seeds in enumerate(rank_batches):
        if len(batch_seeds):
            images = sampling.generate_images(net, batch_seeds.tolist(), sampler_name, sampler_options, device, class_idx, precision)
            images_hwc = images.permute(0, 2, 3, 1).cpu().numpy()
            for seed, image in zip(batch_seeds.tolist(), images_hwc):
                if outdir is not None:
                    path = image_path(outdir, seed, subdirs)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    save_png(path, image)
                if grid_path is not None:
                    keep_for_grid[seed] = image
        # The batches of this round on all ranks, counted here so rank 0 shows the total images/s.
        progress.update(sum(len(b) for b in all_batches[round_index * world_size:(round_index + 1) * world_size]))
    progress.close()

    if grid_path is not None:
        all_images = gather_to_main(keep_for_grid)
        if all_images is not None:
            os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
            save_png(grid_path, tile_grid([all_images[seed] for seed in seeds]))
    distributed.barrier()
    distributed.print0('Done.')
    distributed.shutdown()


if __name__ == '__main__':
    main()
