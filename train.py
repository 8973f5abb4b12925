"""Train a diffusion model (FDM or its EDM/VP/VE baselines) on an image dataset.

Parses the options and hands them to `training.launch.run`, which checks them, builds one plain config
dict in which every pluggable piece is a dotted class name, prints it, saves it as `training_options.json`
in a fresh run directory and hands it to `training.training_loop.training_loop`. `python train.py …` runs as one process; under
`torchrun --nproc_per_node=N [--nnodes=M …] train.py …` every process trains one share of each batch.
"""

import click
from click.core import ParameterSource

import torch_utils.before_torch  # noqa: F401  (first: settings that torch's libraries read when they load)
import dnnlib
from torch_utils import distributed
from training import checkpoints
from training import cli
from training import divergence
from training import launch
from training import networks
from training import recipes
from training.precision import AUTO, TRAINING_PRECISIONS


_FDM_MULTIPLIER_DEFAULTS = ', '.join(f'{recipes.fdm_multiplier_default(precond):g} for {precond}'
                                    for precond in sorted(recipes.RECIPES) if recipes.fdm_multiplier_default(precond))


@click.command()
# Main options.
@click.option('--outdir',       help='Where to save the results', metavar='DIR',                     type=str, required=True)
@click.option('--data',         help='Path to the dataset (ZIP or folder)', metavar='ZIP|DIR',       type=str, required=True)
@click.option('--cond',         help='Train class-conditional model', metavar='BOOL',                type=bool, default=launch.DEFAULTS['cond'], show_default=True)
@click.option('--arch',         help='Network architecture',                                         type=click.Choice(sorted(networks.ARCH_PRESETS)), default=launch.DEFAULTS['arch'], show_default=True)
@click.option('--preset',       help='A published recipe: its options (those given here override them)', type=click.Choice(list(recipes.PRESETS)))
@click.option('--precond',      help='Preconditioning & loss function',                              type=click.Choice(sorted(recipes.RECIPES)), default=launch.DEFAULTS['precond'], show_default=True)
# Hyperparameters.
@click.option('--duration',     help='Training duration', metavar='MIMG',                            type=cli.FiniteFloat(min=0, min_open=True), default=launch.DEFAULTS['duration'], show_default=True)
@click.option('--batch',        help='Total batch size', metavar='INT',                              type=click.IntRange(min=1), default=launch.DEFAULTS['batch'], show_default=True)
@click.option('--batch-gpu',    help='Limit batch size per GPU', metavar='INT',                      type=click.IntRange(min=1))
@click.option('--cbase',        help='Channel multiplier  [default: varies]', metavar='INT',         type=click.IntRange(min=1))
@click.option('--cres',         help='Channels per resolution  [default: varies]', metavar='LIST',   type=cli.parse_int_list)
@click.option('--blocks',       help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn',         help='Resolutions with self-attention, or none  [default: varies]', metavar='LIST', type=cli.parse_resolution_list)
@click.option('--lr',           help='Learning rate', metavar='FLOAT',                               type=cli.FiniteFloat(min=0, min_open=True), default=launch.DEFAULTS['lr'], show_default=True)
@click.option('--lr_rampup',    help='Learning rate ramp-up duration', metavar='MIMG',               type=cli.FiniteFloat(min=0), default=launch.DEFAULTS['lr_rampup'], show_default=True)
@click.option('--ema',          help='EMA half-life', metavar='MIMG',                                type=cli.FiniteFloat(min=0), default=launch.DEFAULTS['ema'], show_default=True)
@click.option('--ema_profiles', help='Power-function EMA profiles for post-hoc EMA (σ_rel list)  [default: none]', metavar='LIST', type=str)
@click.option('--dropout',      help='Dropout probability', metavar='FLOAT',                         type=cli.FiniteFloat(min=0, max=1), default=launch.DEFAULTS['dropout'], show_default=True)
@click.option('--label_dropout', help='Probability of training without the class label (for --guidance)', metavar='FLOAT', type=cli.FiniteFloat(min=0, max=1), default=launch.DEFAULTS['label_dropout'], show_default=True)
@click.option('--augment',      help='Augment probability', metavar='FLOAT',                         type=cli.FiniteFloat(min=0, max=1), default=launch.DEFAULTS['augment'], show_default=True)
@click.option('--xflip',        help='Enable dataset x-flips', metavar='BOOL',                       type=bool, default=launch.DEFAULTS['xflip'], show_default=True)
@click.option('--warmup_ite',   help='FDM loss-weight warm-up length (optimizer steps)', metavar='INT', type=click.IntRange(min=1))
@click.option('--fdm_multiplier', '--fdm_multipler', 'fdm_multiplier',
                                help=f'FDM multiplier m  [default: {_FDM_MULTIPLIER_DEFAULTS}]', metavar='FLOAT', type=cli.FiniteFloat(min=0, min_open=True))
# Performance-related.
@click.option('--fp16',         help='Run the network in float16 on CUDA', metavar='BOOL',           type=bool, default=launch.DEFAULTS['fp16'], show_default=True)
@click.option('--precision',    help='Arithmetic: fp16 = --fp16, bf16 = bfloat16 autocast, auto = bf16 where the device has bf16 matrix units (CPUs: AMX or AVX512-BF16), else fp32  [default: fp32]', type=click.Choice(TRAINING_PRECISIONS + [AUTO]))
@click.option('--ls',           help='Loss scaling', metavar='FLOAT',                                type=cli.FiniteFloat(min=0, min_open=True), default=launch.DEFAULTS['ls'], show_default=True)
@click.option('--bench',        help='Enable cuDNN benchmarking', metavar='BOOL',                    type=bool, default=launch.DEFAULTS['bench'], show_default=True)
@click.option('--tf32',         help='Allow TF32 matmuls/convolutions on CUDA', metavar='BOOL',      type=bool, default=launch.DEFAULTS['tf32'], show_default=True)
@click.option('--compile',      help='torch.compile the network', metavar='BOOL',                    type=bool, default=launch.DEFAULTS['compile'], show_default=True)
@click.option('--cache',        help='Cache dataset in CPU memory', metavar='BOOL',                  type=bool, default=launch.DEFAULTS['cache'], show_default=True)
@click.option('--workers',      help='DataLoader worker processes', metavar='INT',                   type=click.IntRange(min=0, max=cli.MAX_WORKERS), default=launch.DEFAULTS['workers'], show_default=True)
@click.option('--device',       help='Where to train (auto: cuda if present)',                       type=click.Choice(['auto', 'cpu', 'cuda']), default=launch.DEFAULTS['device'], show_default=True)
# I/O-related.
@click.option('--desc',         help='String to include in result dir name', metavar='STR',          type=str)
@click.option('--nosubdir',     help='Do not create a subdirectory for results',                     is_flag=True)
@click.option('--tick',         help='How often to print progress', metavar='KIMG',                  type=cli.FiniteFloat(min=0, min_open=True), default=launch.DEFAULTS['tick'], show_default=True)
@click.option('--snap',         help='How often to save snapshots (0 = only at the end)', metavar='TICKS', type=click.IntRange(min=0), default=launch.DEFAULTS['snap'], show_default=True)
@click.option('--format',       help='Files of snapshots and power-EMA profiles', type=click.Choice(checkpoints.FORMATS), default=launch.DEFAULTS['format'], show_default=True)
@click.option('--dump',         help='How often to dump training state (0 = only at the end)', metavar='TICKS', type=click.IntRange(min=0), default=launch.DEFAULTS['dump'], show_default=True)
@click.option('--metrics',      help='Measure at every snapshot  [default: none]',                  type=click.Choice(['fid']))
@click.option('--metric_ref',   help='Reference statistics of --metrics (fid.py ref)', metavar='NPZ|URL', type=str)
@click.option('--metric_num',   help='Images per measurement  [default: dataset size, at most 50000]', metavar='INT', type=click.IntRange(min=2))
@click.option('--metric_detector', help='FID detector, as fid.py --detector', metavar='nvidia|offline|PATH', type=str, default=launch.DEFAULTS['metric_detector'], show_default=True)
@click.option('--metric_profiles', help='Also measure each --ema_profiles network', metavar='BOOL', type=bool, default=launch.DEFAULTS['metric_profiles'], show_default=True)
@click.option('--tensorboard',  help='Also write tick stats as TensorBoard events (pip install tensorboard)', metavar='BOOL', type=bool, default=launch.DEFAULTS['tensorboard'], show_default=True)
@click.option('--nan-policy', 'nan_policy', help=f'On a non-finite loss or gradient: stop the run, or drop the step (stops after {divergence.MAX_SKIPPED_IN_A_ROW} in a row)', type=click.Choice(divergence.POLICIES), default=launch.DEFAULTS['nan_policy'], show_default=True)
@click.option('--seed',         help='Random seed  [default: random]', metavar='INT',                type=click.IntRange(min=0, max=2**31 - 1))
@click.option('--transfer',     help='Transfer learning from network file (pickle or safetensors)', metavar='PKL|URL',     type=str)
@click.option('--resume',       help='Resume from training state (file, run directory, or auto: the newest run of this command)', metavar='PT|DIR|auto', type=str)
@click.option('--resume-force', help='Resume even with another dataset or network options than the state\'s', is_flag=True)
@click.option('-n', '--dry-run', help='Print training options and exit',                             is_flag=True)
def main(**kwargs):
    """Train a diffusion model (FDM by default) as in "Fast Diffusion Model" and "Elucidating the Design Space
    of Diffusion-Based Generative Models".

    \b
    # CIFAR-10 EDM-FDM, class-conditional, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --precond=fdm_edm --warmup_ite=200
    """
    dnnlib.util.tolerate_undecodable_output()
    if kwargs['preset'] is not None:
        ctx = click.get_current_context()
        given = {name for name in kwargs if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
        kwargs = recipes.with_preset(kwargs, kwargs['preset'], given)
    opts = dnnlib.EasyDict(kwargs)
    try:
        device = distributed.init(None if opts.device == 'auto' else opts.device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    except distributed.ProcessGroupError as err:
        raise click.ClickException(str(err))
    opts.device = device.type
    try:
        launch.run(opts)
    finally:
        distributed.shutdown()


if __name__ == '__main__':
    main()
