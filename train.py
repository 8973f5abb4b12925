"""Train a diffusion model (FDM or its EDM/VP/VE baselines) on an image dataset.

Parses the options into one plain config dict in which every pluggable piece is a dotted class name,
prints it, saves it as `training_options.json` in a fresh run directory and hands it to
`training.training_loop.training_loop`. `python train.py …` runs as one process; under
`torchrun --nproc_per_node=N [--nnodes=M …] train.py …` every process trains one share of each batch.
"""

import json
import os
import pickle
import re
import secrets

import click

from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

# Before torch loads OpenMP: spinning idle threads are fastest on free cores, sleeping ones on busy cores.
OPENMP_WAIT_POLICY = cpu_runtime.choose_openmp_wait_policy()
cpu_runtime.keep_freed_memory()

import torch  # noqa: E402
import torch.distributed  # noqa: E402

import dnnlib  # noqa: E402
from torch_utils import distributed  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import networks  # noqa: E402
from training import training_loop  # noqa: E402

# Loss class of each preconditioner: the FDM variants train with their baseline's loss (plus warm-up).
PRECOND_LOSSES = {
    'vp':      'training.loss.VPLoss',
    've':      'training.loss.VELoss',
    'edm':     'training.loss.EDMLoss',
    'fdm_vp':  'training.loss.VPLoss',
    'fdm_ve':  'training.loss.VELoss',
    'fdm_edm': 'training.loss.EDMLoss',
}

# --fdm_multiplier when not given; reproduces the published runs (their VE-FDM ignored m, i.e. used 1).
FDM_MULTIPLIER_DEFAULTS = {'fdm_edm': 2.0, 'fdm_vp': 2.0, 'fdm_ve': 1.0}

# Geometric augmentations enabled by --augment (each applied with probability p), as EDM trains.
AUGMENT_OPTIONS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
AUGMENT_DIM = 9


def parse_int_list(text):
    """'1,2,2' or '0-3' ranges → [1, 2, 2] / [0, 1, 2, 3]."""
    if isinstance(text, list):
        return text
    values = []
    for part in text.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', part)
        if match:
            values.extend(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            try:
                values.append(int(part))
            except ValueError:
                raise click.BadParameter(f'{text!r} is not a comma-separated list of integers') from None
    return values


def _broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (identity in a single process)."""
    if distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _open_dataset(dataset_kwargs):
    """Open the training set once to check it and learn its resolution, channels and labels."""
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data={dataset_kwargs["path"]}: {err}')


def build_config(opts, world_size):
    """The whole truth of a run as one plain dict; raises click errors for inconsistent options."""
    if not opts.precond.startswith('fdm_'):
        for name, value in (('--warmup_ite', opts.warmup_ite), ('--fdm_multiplier', opts.fdm_multiplier)):
            if value is not None:
                raise click.UsageError(f'{name} applies only to the FDM preconditioners (fdm_edm, fdm_vp, '
                                       f'fdm_ve), not --precond={opts.precond}')
    if opts.transfer is not None and opts.resume is not None:
        raise click.UsageError('--transfer and --resume cannot be used together')

    precision = opts.precision or ('fp16' if opts.fp16 else 'fp32')
    if opts.fp16 and precision != 'fp16':
        raise click.UsageError(f'--fp16 contradicts --precision={precision}')

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(opts.device == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2

    c.network_kwargs = dnnlib.EasyDict(class_name=networks.PRECONDITIONERS[opts.precond])
    c.network_kwargs.update(networks.ARCH_PRESETS[opts.arch])
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=(precision == 'fp16'))
    c.loss_kwargs = dnnlib.EasyDict(class_name=PRECOND_LOSSES[opts.precond])
    if opts.precond.startswith('fdm_'):
        multiplier = opts.fdm_multiplier if opts.fdm_multiplier is not None else FDM_MULTIPLIER_DEFAULTS[opts.precond]
        c.network_kwargs.fdm_multiplier = multiplier
        c.loss_kwargs.warmup_ite = opts.warmup_ite
    c.augment_kwargs = None
    if opts.augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, **AUGMENT_OPTIONS)
        c.network_kwargs.augment_dim = AUGMENT_DIM
    # fused: one kernel per step instead of ~10 per tensor (the same maths; a large share of a CPU step).
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8, fused=True)

    if opts.batch % world_size != 0:
        raise click.BadParameter(f'{opts.batch} is not divisible by the number of processes ({world_size})',
                                 param_hint='--batch')
    batch_per_process = opts.batch // world_size
    batch_gpu = min(opts.batch_gpu or batch_per_process, batch_per_process)
    if batch_per_process % batch_gpu != 0:
        raise click.BadParameter(f'{batch_gpu} does not divide the per-process batch {batch_per_process} '
                                 f'(--batch={opts.batch} over {world_size} processes)', param_hint='--batch-gpu')

    c.update(
        seed                = opts.seed,
        batch_size          = opts.batch,
        batch_gpu           = batch_gpu,
        total_kimg          = opts.duration * 1000,
        ema_halflife_kimg   = opts.ema * 1000,
        ema_rampup_ratio    = None if opts.transfer is not None else training_loop.EMA_RAMPUP_RATIO,
        lr_rampup_kimg      = opts.lr_rampup * 1000,
        loss_scaling        = opts.ls,
        kimg_per_tick       = opts.tick,
        snapshot_ticks      = opts.snap or None,
        state_dump_ticks    = opts.dump or None,
        resume_pkl          = opts.transfer,
        resume_state        = None,
        cudnn_benchmark     = opts.bench,
        allow_tf32          = opts.tf32,
        precision           = precision,
        compile             = opts.compile,
        device              = opts.device,
    )
    return c


def check_precision(precision, device_type):
    if precision == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise click.BadParameter('this GPU does not support bfloat16; use fp16 or fp32', param_hint='--precision')


def check_resume(c, resume):
    """Resolve --resume to a state file, check it is readable and take the run's seed from it if none given."""
    try:
        c.resume_state = training_loop.resolve_resume_path(resume)
        state = training_loop.load_training_state(c.resume_state, mmap=True)
    except training_loop.TrainingStateError as err:
        raise click.ClickException(f'--resume: {err}')
    if c.seed is None:
        c.seed = state['options']['seed']
    changed = sorted(key for key in ('network_kwargs', 'loss_kwargs', 'augment_kwargs', 'batch_size', 'seed')
                     if json.dumps(state['options'].get(key), sort_keys=True) != json.dumps(c[key], sort_keys=True))
    return changed


def check_transfer(path, net):
    """Load a snapshot (ours or a published one, without executing code) and check that it fits the network."""
    try:
        with dnnlib.util.open_url(path) as f:
            data = persistence.load_network_pickle(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise click.ClickException(f'--transfer={path}: {err}')
    try:
        training_loop.check_transferable(data, net)
    except training_loop.TrainingStateError as err:
        raise click.ClickException(f'--transfer={path}: {err}')


def dry_run_build(c, dataset):
    """Build the network, loss and augmentation pipe once, as the training loop will."""
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    try:
        net = dnnlib.util.construct_class_by_name(**c.network_kwargs, **interface)
        dnnlib.util.construct_class_by_name(**c.loss_kwargs)
        if c.augment_kwargs is not None:
            dnnlib.util.construct_class_by_name(**c.augment_kwargs)
    except ValueError as err:
        raise click.ClickException(f'cannot build the network: {err}')
    return net


def make_run_dir(outdir, desc, nosubdir):
    """Create `{outdir}/{id:05d}-{desc}` with the next free id (or `outdir` itself); safe against a concurrent run."""
    os.makedirs(outdir, exist_ok=True)
    if nosubdir:
        return outdir
    while True:
        ids = [int(m.group()) for name in os.listdir(outdir) if (m := re.match(r'\d+', name))]
        run_dir = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            continue


@click.command()
# Main options.
@click.option('--outdir',       help='Where to save the results', metavar='DIR',                     type=str, required=True)
@click.option('--data',         help='Path to the dataset (ZIP or folder)', metavar='ZIP|DIR',       type=str, required=True)
@click.option('--cond',         help='Train class-conditional model', metavar='BOOL',                type=bool, default=False, show_default=True)
@click.option('--arch',         help='Network architecture',                                         type=click.Choice(sorted(networks.ARCH_PRESETS)), default='ddpmpp', show_default=True)
@click.option('--precond',      help='Preconditioning & loss function',                              type=click.Choice(sorted(PRECOND_LOSSES)), default='fdm_edm', show_default=True)
# Hyperparameters.
@click.option('--duration',     help='Training duration', metavar='MIMG',                            type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',        help='Total batch size', metavar='INT',                              type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',    help='Limit batch size per GPU', metavar='INT',                      type=click.IntRange(min=1))
@click.option('--cbase',        help='Channel multiplier  [default: varies]', metavar='INT',         type=click.IntRange(min=1))
@click.option('--cres',         help='Channels per resolution  [default: varies]', metavar='LIST',   type=parse_int_list)
@click.option('--lr',           help='Learning rate', metavar='FLOAT',                               type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr_rampup',    help='Learning rate ramp-up duration', metavar='MIMG',               type=click.FloatRange(min=0), default=10, show_default=True)
@click.option('--ema',          help='EMA half-life', metavar='MIMG',                                type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout',      help='Dropout probability', metavar='FLOAT',                         type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',      help='Augment probability', metavar='FLOAT',                         type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',        help='Enable dataset x-flips', metavar='BOOL',                       type=bool, default=False, show_default=True)
@click.option('--warmup_ite',   help='FDM loss-weight warm-up length (optimizer steps)', metavar='INT', type=click.IntRange(min=1))
@click.option('--fdm_multiplier', '--fdm_multipler', 'fdm_multiplier',
                                help='FDM multiplier m  [default: 2 for fdm_edm/fdm_vp, 1 for fdm_ve]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
# Performance-related.
@click.option('--fp16',         help='Run the network in float16 on CUDA', metavar='BOOL',           type=bool, default=False, show_default=True)
@click.option('--precision',    help='Arithmetic: fp16 = --fp16, bf16 = bfloat16 autocast  [default: fp32]', type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--ls',           help='Loss scaling', metavar='FLOAT',                                type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',        help='Enable cuDNN benchmarking', metavar='BOOL',                    type=bool, default=True, show_default=True)
@click.option('--tf32',         help='Allow TF32 matmuls/convolutions on CUDA', metavar='BOOL',      type=bool, default=False, show_default=True)
@click.option('--compile',      help='torch.compile the network', metavar='BOOL',                    type=bool, default=False, show_default=True)
@click.option('--cache',        help='Cache dataset in CPU memory', metavar='BOOL',                  type=bool, default=True, show_default=True)
@click.option('--workers',      help='DataLoader worker processes', metavar='INT',                   type=click.IntRange(min=0), default=8, show_default=True)
@click.option('--device',       help='Where to train (auto: cuda if present)',                       type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
# I/O-related.
@click.option('--desc',         help='String to include in result dir name', metavar='STR',          type=str)
@click.option('--nosubdir',     help='Do not create a subdirectory for results',                     is_flag=True)
@click.option('--tick',         help='How often to print progress', metavar='KIMG',                  type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',         help='How often to save snapshots (0 = only at the end)', metavar='TICKS', type=click.IntRange(min=0), default=200, show_default=True)
@click.option('--dump',         help='How often to dump training state (0 = only at the end)', metavar='TICKS', type=click.IntRange(min=0), default=500, show_default=True)
@click.option('--seed',         help='Random seed  [default: random]', metavar='INT',                type=click.IntRange(min=0, max=2**31 - 1))
@click.option('--transfer',     help='Transfer learning from network pickle', metavar='PKL|URL',     type=str)
@click.option('--resume',       help='Resume from training state (file or run directory)', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit',                             is_flag=True)
def main(**kwargs):
    """Train a diffusion model (FDM by default) as in "Fast Diffusion Model" and "Elucidating the Design Space
    of Diffusion-Based Generative Models".

    \b
    # CIFAR-10 EDM-FDM, class-conditional, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --precond=fdm_edm --warmup_ite=200
    """
    opts = dnnlib.EasyDict(kwargs)
    try:
        device = distributed.init(None if opts.device == 'auto' else opts.device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    opts.device = device.type
    try:
        _main(opts)
    finally:
        distributed.shutdown()


def _main(opts):
    world_size = distributed.get_world_size()
    c = build_config(opts, world_size)
    check_precision(c.precision, opts.device)

    dataset = _open_dataset(c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise click.ClickException(f'--cond=True needs class labels, but {opts.data} has none (dataset.json "labels")')
    c.dataset_kwargs.resolution = dataset.resolution

    resume_changes = check_resume(c, opts.resume) if opts.resume is not None else []
    if c.seed is None:
        c.seed = _broadcast_from_rank0(secrets.randbelow(2**31))

    net = None
    if opts.dry_run or opts.transfer is not None:
        net = dry_run_build(c, dataset)
    if opts.transfer is not None:
        check_transfer(opts.transfer, net)

    cond_str = 'cond' if opts.cond else 'uncond'
    desc = f'{dataset.name}-{cond_str}-{opts.arch}-{opts.precond}-gpus{world_size}-batch{c.batch_size}-{c.precision}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'

    if opts.dry_run:
        c.run_dir = None
        _print_summary(c, opts, dataset, world_size, resume_changes)
        distributed.print0(f'Network parameters:      {sum(p.numel() for p in net.parameters()):,}')
        distributed.print0('Dry run; exiting.')
        return

    run_dir = None
    if distributed.is_main():
        try:
            run_dir = make_run_dir(opts.outdir, desc, opts.nosubdir)
        except OSError as err:
            run_dir = err
    run_dir = _broadcast_from_rank0(run_dir)
    if isinstance(run_dir, OSError):
        raise click.ClickException(f'--outdir={opts.outdir}: {run_dir}')
    c.run_dir = run_dir

    logger = None
    if distributed.is_main():
        with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    try:
        _print_summary(c, opts, dataset, world_size, resume_changes)
        del dataset, net
        training_loop.training_loop(**c)
    except training_loop.TrainingStateError as err:
        raise click.ClickException(str(err))
    finally:
        if logger is not None:
            logger.close()


def _print_summary(c, opts, dataset, world_size, resume_changes):
    distributed.print0()
    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0()
    distributed.print0(f'Output directory:        {c.run_dir}')
    distributed.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    distributed.print0(f'Dataset size:            {len(dataset)} images of {dataset.num_channels}x{dataset.resolution}x{dataset.resolution}')
    distributed.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    distributed.print0(f'Network architecture:    {opts.arch}')
    distributed.print0(f'Preconditioning & loss:  {opts.precond}')
    distributed.print0(f'Device:                  {opts.device}')
    distributed.print0(f'Number of processes:     {world_size}')
    if opts.device == 'cpu':
        distributed.print0(f'OpenMP thread waiting:   {OPENMP_WAIT_POLICY}')
    distributed.print0(f'Batch size:              {c.batch_size} ({c.batch_gpu} per pass)')
    distributed.print0(f'Precision:               {c.precision}')
    distributed.print0(f'Seed:                    {c.seed}')
    if c.resume_state is not None:
        distributed.print0(f'Resuming from:           {c.resume_state}')
        if resume_changes:
            distributed.print0(f'Changed since the state: {", ".join(resume_changes)} (the run will not repeat exactly)')
    distributed.print0()


if __name__ == '__main__':
    main()
