"""A training run from train.py's options: check them, build the config dict, make the run directory, train.

`run(opts)` is what `train.py` does after parsing; benchmarks call it with `DEFAULTS` updated by their own
options. Errors are click exceptions with one-line messages naming the option at fault.
"""

import importlib.util
import json
import os
import re
import secrets
import traceback

import click
import torch
import torch.distributed

import dnnlib
from torch_utils import cpu_runtime
from torch_utils import distributed
from training import augment
from training import ema as power_ema
from training import networks
from training import recipes
from training import resume
from training import run_dir as run_dirs
from training import safe_build
from training import snapshot_metrics
from training import training_loop
from training import training_state
from training.precision import PRECISIONS, describe_choice

# train.py's options when not given (click's defaults come from here).
DEFAULTS = dict(
    cond=False, arch='ddpmpp', precond='fdm_edm', duration=200, batch=512, batch_gpu=None, cbase=None, cres=None, blocks=None, attn=None,
    lr=10e-4, lr_rampup=10, ema=0.5, dropout=0.13, label_dropout=0, augment=0.12, xflip=False, warmup_ite=None, fdm_multiplier=None,
    fp16=False, precision=None, ls=1, bench=True, tf32=False, compile=False, cache=True, workers=8, device='auto',
    desc=None, nosubdir=False, tick=50, snap=200, dump=500, seed=None, transfer=None, resume=None, resume_force=False,
    dry_run=False, ema_profiles=None, metrics=None, metric_ref=None, metric_num=None, metric_detector='nvidia',
    metric_profiles=False, tensorboard=False, format='pickle', nan_policy='stop', preset=None,
)


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
    fdm_multiplier_default = recipes.fdm_multiplier_default(opts.precond)
    if fdm_multiplier_default is None:
        for name, value in (('--warmup_ite', opts.warmup_ite), ('--fdm_multiplier', opts.fdm_multiplier)):
            if value is not None:
                raise click.UsageError(f'{name} applies only to the FDM preconditioners (fdm_edm, fdm_vp, '
                                       f'fdm_ve), not --precond={opts.precond}')
    if opts.label_dropout and not opts.cond:
        raise click.BadParameter('label dropout (for classifier-free guidance) needs a class-conditional run (--cond=1)',
                                 param_hint='--label_dropout')
    if opts.transfer is not None and opts.resume is not None:
        raise click.UsageError('--transfer and --resume cannot be used together')

    if opts.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise click.UsageError('--tensorboard=True needs the tensorboard package: pip install tensorboard')

    precision = opts.precision or ('fp16' if opts.fp16 else 'fp32')
    if opts.fp16 and precision != 'fp16':
        raise click.UsageError(f'--fp16 contradicts --precision={precision}')
    device_type = opts.device if opts.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    precision, choice = describe_choice(precision, device_type)  # the config records what 'auto' chose
    if choice is not None:
        distributed.print0(choice)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(opts.device == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2

    recipe = recipes.RECIPES[opts.precond]
    c.network_kwargs = dnnlib.EasyDict(class_name=recipe.network)
    c.network_kwargs.update(networks.ARCH_PRESETS[opts.arch])
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        if not opts.cres or min(opts.cres) < 1:
            raise click.BadParameter(f'{",".join(map(str, opts.cres)) or "an empty list"}: channel multipliers are '
                                     f'positive integers, one per resolution, e.g. 1,2,2', param_hint='--cres')
        c.network_kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        c.network_kwargs.num_blocks = opts.blocks
    if opts.attn is not None:
        c.network_kwargs.attn_resolutions = opts.attn
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=PRECISIONS[precision].train_use_fp16)
    if opts.label_dropout:
        c.network_kwargs.label_dropout = opts.label_dropout  # also recorded in the snapshot; sampling checks it for --guidance
    c.loss_kwargs = dnnlib.EasyDict(class_name=recipe.loss)
    if fdm_multiplier_default is not None:
        c.network_kwargs.fdm_multiplier = opts.fdm_multiplier if opts.fdm_multiplier is not None else fdm_multiplier_default
        c.loss_kwargs.warmup_ite = opts.warmup_ite
    c.augment_kwargs = None
    if opts.augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, **recipes.AUGMENT_OPTIONS)
        c.network_kwargs.augment_dim = augment.AugmentPipe.augment_dim
    # fused: one kernel per step instead of ~10 per tensor (the same maths; a large share of a CPU step).
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8, fused=True)

    try:
        batch_gpu, _ = training_loop.batch_rounds(opts.batch, opts.batch_gpu, world_size)
    except training_loop.BatchSizeError as err:
        raise click.BadParameter(str(err), param_hint={'batch_size': '--batch', 'batch_gpu': '--batch-gpu'}[err.argument]) from None

    c.update(
        ema_profiles        = _ema_profiles(opts.ema_profiles),
        metric_kwargs       = _metric_kwargs(opts),
        tensorboard         = opts.tensorboard,
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
        snapshot_format     = opts.format,
        state_dump_ticks    = opts.dump or None,
        resume_pkl          = opts.transfer,
        resume_state        = None,
        cudnn_benchmark     = opts.bench,
        allow_tf32          = opts.tf32,
        precision           = precision,
        compile             = opts.compile,
        device              = opts.device,
        nan_policy          = opts.nan_policy,
    )
    return c


def _ema_profiles(text):
    """--ema_profiles=0.05,0.10 → [0.05, 0.1]; None when not given."""
    if text is None or text == '':
        return None
    try:
        stds = [float(item) for item in str(text).split(',')] if not isinstance(text, (list, tuple)) else list(text)
        for std in stds:
            power_ema.check_std(std)
    except ValueError as err:
        raise click.BadParameter(f'{text!r}: {err}', param_hint='--ema_profiles') from None
    if len(set(stds)) != len(stds):
        raise click.BadParameter(f'{text!r} lists a σ_rel twice', param_hint='--ema_profiles')
    return stds


def _metric_kwargs(opts):
    """Options of snapshot_metrics.SnapshotMetrics, or None without --metrics."""
    if opts.metrics is None:
        for name in ('metric_ref', 'metric_num'):
            if opts[name] is not None:
                raise click.UsageError(f'--{name} applies only with --metrics=fid')
        return None
    if opts.metrics != 'fid':
        raise click.BadParameter(f'{opts.metrics!r}: the only metric is fid', param_hint='--metrics')
    if opts.metric_ref is None:
        raise click.UsageError('--metrics=fid needs --metric_ref=NPZ (reference statistics, from fid.py ref)')
    if '://' not in opts.metric_ref and not os.path.isfile(opts.metric_ref):
        raise click.BadParameter(f'{opts.metric_ref}: file not found', param_hint='--metric_ref')
    if opts.metric_profiles and not opts.ema_profiles:
        raise click.UsageError('--metric_profiles=True needs --ema_profiles')
    return dnnlib.EasyDict(metric=opts.metrics, ref=opts.metric_ref, num_images=opts.metric_num,
                           detector=opts.metric_detector, profiles=bool(opts.metric_profiles))


def check_precision(precision, device_type):
    if precision == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise click.BadParameter('this GPU does not support bfloat16; use fp16 or fp32', param_hint='--precision')


def check_network_size(c, dataset):
    """Refuse network options that a snapshot could not hold (checkpoints' limits) before anything is built:
    --blocks=10**30 would otherwise build for ever, --cbase=10**6 allocate terabytes."""
    kwargs = {key: value for key, value in c.network_kwargs.items() if key != 'class_name'}
    kwargs.update(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    try:
        safe_build.check(dnnlib.util.get_obj_by_name(c.network_kwargs.class_name), (), kwargs)
    except ValueError as err:  # UnsafePickleError too
        raise click.ClickException(f'cannot build the network: {err}')


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


def run(opts):
    """Train with the options `opts` (train.py's option names, all given; see DEFAULTS) in this process group."""
    world_size = distributed.get_world_size()
    c = build_config(opts, world_size)
    check_precision(c.precision, opts.device)

    dataset = _open_dataset(c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise click.ClickException(f'--cond=True needs class labels, but {opts.data} has none (dataset.json "labels")')
    c.dataset_kwargs.resolution = dataset.resolution
    if opts.attn:
        resolutions = [dataset.resolution >> level for level in range(len(c.network_kwargs.channel_mult))]
        if any(res not in resolutions for res in opts.attn):
            raise click.BadParameter(f'{",".join(map(str, opts.attn))}: the network has the resolutions '
                                     f'{",".join(map(str, resolutions))} (or give none)', param_hint='--attn')
    check_network_size(c, dataset)
    if c.metric_kwargs is not None and c.metric_kwargs.num_images is None:
        c.metric_kwargs.num_images = snapshot_metrics.default_num_images(len(dataset))

    cond_str = 'cond' if opts.cond else 'uncond'
    desc = f'{dataset.name}-{cond_str}-{opts.arch}-{opts.precond}-gpus{world_size}-batch{c.batch_size}-{c.precision}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'

    resume_path = opts.resume
    if resume_path == 'auto':
        resume_path = _broadcast_from_rank0(resume.find_auto_resume(opts.outdir, desc, opts.nosubdir))
        distributed.print0(f'--resume=auto: {"continuing " + resume_path if resume_path else "no training state yet; starting afresh"}')
    state, resume_changes = resume.read_resume(c, resume_path, opts.resume_force) if resume_path is not None else (None, [])
    if state is not None and state['world_size'] != world_size:
        distributed.print0(f'The state was written by {state["world_size"]} processes, this run has {world_size}: '
                           f'the same global batch of {c.batch_size} images continues')
    if c.seed is None:
        c.seed = _broadcast_from_rank0(secrets.randbelow(2**31))

    net = None
    if opts.dry_run or opts.transfer is not None:
        net = dry_run_build(c, dataset)
    transfer = resume.read_transfer(opts.transfer, net) if opts.transfer is not None else None

    if opts.dry_run:
        c.run_dir = None
        _print_summary(c, opts, dataset, world_size, resume_changes)
        distributed.print0(f'Network parameters:      {sum(p.numel() for p in net.parameters()):,}')
        distributed.print0('Dry run; exiting.')
        return

    run_dir = lock = None
    if distributed.is_main():  # only rank 0 creates, owns and writes the run directory
        try:
            run_dir = make_run_dir(opts.outdir, desc, opts.nosubdir)
            lock = run_dirs.claim(run_dir, resume_state=c.resume_state)
        except (OSError, run_dirs.RunDirError) as err:
            run_dir = err
    run_dir = _broadcast_from_rank0(run_dir)
    if isinstance(run_dir, run_dirs.RunDirError):
        instead = 'use another --outdir' if run_dir.in_use else f'continue it with --resume={run_dir.run_dir} or choose another --outdir'
        raise click.ClickException(f'{run_dir}; {instead}')
    if isinstance(run_dir, OSError):
        raise click.ClickException(f'--outdir={opts.outdir}: {run_dir}')
    c.run_dir = run_dir

    logger = None
    try:
        if distributed.is_main():
            with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
                json.dump(c, f, indent=2)
            logger = dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
        _print_summary(c, opts, dataset, world_size, resume_changes)
        del dataset, net
        summary = training_loop.training_loop(**c, resume=state, transfer=transfer)
        if summary.stopped:
            distributed.print0(f'Resume with --resume={run_dir}')
    except training_state.TrainingStateError as err:
        raise click.ClickException(str(err))
    except snapshot_metrics.MetricSetupError as err:
        raise click.ClickException(f'--metric_ref/--metric_detector: {err}')
    except training_loop.TrainingError as err:
        if logger is not None:  # the console gets one line; the log keeps the traceback for a bug report
            logger.file.write(''.join(traceback.format_exception(err.__cause__ or err)))
        resume_hint = f', resume with --resume={err.saved_in}' if err.saved_in else ''
        raise click.ClickException(f'{err}{resume_hint}')
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()


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
        distributed.print0(f'OpenMP thread waiting:   {cpu_runtime.openmp_wait_policy}')
    distributed.print0(f'Batch size:              {c.batch_size} ({c.batch_gpu} per pass)')
    distributed.print0(f'Precision:               {c.precision}')
    distributed.print0(f'Seed:                    {c.seed}')
    if c.resume_state is not None:
        distributed.print0(f'Resuming from:           {c.resume_state}')
        if resume_changes:
            distributed.print0('Changed since the state (the run will not repeat exactly):')
            for change in resume_changes:
                distributed.print0(f'    {change}')
    distributed.print0()


_FLAG_NAMES = {'batch_gpu': '--batch-gpu', 'dry_run': '--dry-run', 'resume_force': '--resume-force',
               'nan_policy': '--nan-policy'}  # the others are --{name}
_SWITCHES = ('nosubdir', 'dry_run', 'resume_force')                 # given without a value


def command_line(options):
    """The train.py arguments that give `options` (option names → values), for the record of a run."""
    args = []
    for name, value in options.items():
        flag = _FLAG_NAMES.get(name, f'--{name}')
        if name in _SWITCHES:
            args += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            args.append(f'{flag}={",".join(map(str, value))}')
        else:
            args.append(f'{flag}={value}')
    return args
