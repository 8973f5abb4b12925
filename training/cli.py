"""What the command-line tools share: the finite-float option type, seed lists and their sharding over ranks,
rank-0-first loading, the device and precision choice, the sampler options as one click decorator, and reading a
network for sampling (refusing non-finite weights) and sampling it (refusing non-finite images)."""

import math
import re

import click
import torch

import dnnlib
from torch_utils import distributed
from torch_utils import misc
from training import checkpoints
from training import sampling
from training import solvers
from training import schedules
from training.precision import AUTO, PRECISIONS, default_sampling_precision, describe_choice


def parse_resolution_list(text):
    """'16' or '32,16' → [16] / [32, 16]; 'none' → [] (e.g. resolutions with self-attention)."""
    if isinstance(text, list):
        return text
    if text.strip().lower() == 'none':
        return []
    return parse_int_list(text)


def parse_int_list(text):
    """'1,2,2' or '0-3' ranges → [1, 2, 2] / [0, 1, 2, 3]."""
    if isinstance(text, list):
        return text
    values = []
    for part in text.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', part)
        if match:
            if int(match.group(1)) > int(match.group(2)):
                raise click.BadParameter(f'{text!r}: the range {part.strip()} is empty')
            values.extend(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            try:
                values.append(int(part))
            except ValueError:
                raise click.BadParameter(f'{text!r} is not a comma-separated list of integers') from None
    return values


class FiniteFloat(click.FloatRange):
    """A float option within [min, max] that is a number: nan is refused, and so are inf and values that overflow to it
    (1e999) unless `allow_inf` (where inf means "no bound"). Every float option of the scripts is of this type."""

    name = 'float'

    def __init__(self, min=None, max=None, min_open=False, max_open=False, allow_inf=False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value


MAX_WORKERS = 1024  # DataLoader worker processes: more is a typo that would fork until the machine gives out

# Seeds index the int64 arrays of `split_seeds`; a list longer than this is a typo, not a run (it would take gigabytes).
MAX_SEED = 2**63 - 1
MAX_NUM_SEEDS = 10**7


class SeedList(click.ParamType):
    """Comma-separated seeds and inclusive ranges, e.g. '0-63,100'; duplicates are dropped, order is kept."""

    name = 'seeds'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        ranges = []
        for item in str(value).split(','):
            match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', item)
            if match is None:
                self.fail(f'{item!r} is not a non-negative integer or a range a-b (e.g. 0-63,100)', param, ctx)
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                self.fail(f'range {item!r} is empty: its end is below its start', param, ctx)
            if last > MAX_SEED:
                self.fail(f'{item!r}: seeds are at most {MAX_SEED}', param, ctx)
            ranges.append((first, last))
        if sum(last - first + 1 for first, last in ranges) > MAX_NUM_SEEDS:
            self.fail(f'{value!r} lists more than {MAX_NUM_SEEDS:,} seeds', param, ctx)
        return list(dict.fromkeys(seed for first, last in ranges for seed in range(first, last + 1)))


split_seeds = distributed.split_seeds      # shared with training/snapshot_metrics.py, which must not import the CLI
rank0_first = distributed.rank0_first


def init_device(device, precision=None):
    """Join the process group on `device` (None = cuda if available) and check the sampling precision for it.

    Returns (device, precision) with the precision's default filled in and 'auto' resolved (and its choice printed).
    """
    try:
        device = distributed.init(device)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint='--device') from None
    precision, choice = describe_choice(precision or default_sampling_precision(device), device)
    if choice is not None:
        distributed.print0(choice)
    if device.type != 'cuda' and not PRECISIONS[precision].on_cpu:
        raise click.BadParameter(f'{precision} needs a CUDA device; this run uses {device.type} (fp32, bf16 or auto run '
                                 f'there)', param_hint='--precision')
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise click.BadParameter('this GPU does not support bfloat16; use fp16, tf32 or fp32', param_hint='--precision')
    return device, precision


def load_network(network_url, device, option='--network'):
    """The EMA network of a snapshot (ours or a published FDM/EDM pickle), read without running code from it."""
    try:
        with dnnlib.util.open_url(network_url, verbose=distributed.is_main()) as f:
            snapshot = checkpoints.load_network(f)
    except Exception as error:  # a file we cannot read or refuse to read is the user's input, not a bug
        raise click.ClickException(f'{option} {network_url}: {type(error).__name__}: {error}'.replace('\n', ' '))
    if not isinstance(snapshot, dict) or 'ema' not in snapshot:
        raise click.ClickException(f'{option} {network_url}: the file holds no \'ema\' network')
    ema = snapshot['ema']
    if not isinstance(ema, torch.nn.Module) or not all(hasattr(ema, name) for name in ('img_resolution', 'img_channels', 'label_dim')):
        raise click.ClickException(f'{option} {network_url}: \'ema\' is a {type(ema).__name__}, not a network')
    if problem := misc.nonfinite_problem(ema):
        raise click.ClickException(f'{option} {network_url}: {problem}')
    return ema.eval().requires_grad_(False).to(device)


def guided_network(net, guidance, gnet_url, device):
    """`net` as the samplers should call it under --guidance (None = 1) and --gnet (loaded like --network)."""
    gnet = None
    if gnet_url is not None:
        distributed.print0(f'Loading guiding network from "{gnet_url}"...')
        gnet = rank0_first(lambda: load_network(gnet_url, device, option='--gnet'))
    try:
        return sampling.guided_denoiser(net, 1 if guidance is None else guidance, gnet)
    except sampling.GuidanceError as error:
        raise click.BadParameter(str(error), param_hint=error.option) from None


def generate_images(net, seeds, sampler_name, sampler_kwargs, device, class_idx=None, precision=None):
    """sampling.generate_images for one batch of seeds, with what extreme sampler options make it raise as one-line
    errors: non-finite images, and an overflowing σ schedule (e.g. --rho 1e-300)."""
    try:
        return sampling.generate_images(net, seeds, sampler_name, sampler_kwargs, device, class_idx, precision)
    except sampling.NonFiniteImagesError as error:
        raise click.ClickException(str(error)) from None
    except ArithmeticError as error:
        raise click.ClickException(f'the sampler options {sampler_kwargs} overflow ({error})') from None


MAX_NUM_STEPS = 100_000  # more is a typo, not a sampler setting: each step is a network evaluation per image

# The sampler options: (sampler keyword, command-line flag, click option settings), in --help order.
_SOLVERS = ['euler', 'heun', 'dpm', 'dpm2m', 'ipndm', 'unipc', 'deis', 'dpm3m']
_ABLATION_SCHEDULES = ['vp', 've', 'linear']  # the ablation sampler's noise schedules σ(t); the others are step schedules
SAMPLER_OPTIONS = [
    ('class_idx',      '--class',     dict(help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))),
    ('num_steps',      '--steps',     dict(help='Number of sampling steps  [default: 18]', metavar='INT', type=click.IntRange(max=MAX_NUM_STEPS))),
    ('nfe',            '--nfe',       dict(help='Network evaluations per image: sets --steps so the solver makes exactly this many', metavar='INT', type=click.IntRange(min=1, max=MAX_NUM_STEPS))),
    ('sigma_min',      '--sigma_min', dict(help='Lowest noise level  [default: varies]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True))),
    ('sigma_max',      '--sigma_max', dict(help='Highest noise level  [default: varies]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True))),
    ('rho',            '--rho',       dict(help='Time step exponent of the edm step schedule  [default: 7]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True))),
    ('S_churn',        '--S_churn',   dict(help='Stochasticity strength  [default: 0]', metavar='FLOAT', type=FiniteFloat(min=0))),
    ('S_min',          '--S_min',     dict(help='Stochastic min noise level  [default: 0]', metavar='FLOAT', type=FiniteFloat(min=0))),
    ('S_max',          '--S_max',     dict(help='Stochastic max noise level  [default: inf]', metavar='FLOAT', type=FiniteFloat(min=0, allow_inf=True))),
    ('S_noise',        '--S_noise',   dict(help='Stochastic noise inflation  [default: 1]', metavar='FLOAT', type=FiniteFloat())),
    ('solver',         '--solver',    dict(help='Solver  [default: heun (EDM sampler)]', type=click.Choice(_SOLVERS))),
    ('order',          '--order',     dict(help='Highest order of ipndm (1-4), unipc and deis (1-3)  [default: 4, 3, 3]', metavar='INT', type=click.IntRange(max=MAX_NUM_STEPS))),
    ('afs',            '--afs',       dict(help='Analytical first step (multistep solvers dpm2m, ipndm, unipc, deis, dpm3m): one evaluation fewer', is_flag=True, default=None)),
    ('discretization', '--disc',      dict(help='Time step discretization (ablation sampler)', type=click.Choice(['vp', 've', 'iddpm', 'edm']))),
    ('schedule',       '--schedule',  dict(help='Step schedule edm|time|logsnr|polylog  [default: edm; logsnr for dpm, dpm2m]; '
                                            'or the ablation sampler\'s noise schedule vp|ve|linear',
                                            type=click.Choice(list(schedules.STEP_SCHEDULES) + _ABLATION_SCHEDULES))),
    ('scaling',        '--scaling',   dict(help='Signal scaling s(t) (ablation sampler)', type=click.Choice(['vp', 'none']))),
    ('guidance',       '--guidance',  dict(help='Guidance weight w: D_uncond + w·(D − D_uncond), or with --gnet D_gnet + w·(D − D_gnet)  [default: 1 = none]', metavar='FLOAT', type=FiniteFloat())),
    ('gnet_url',       '--gnet',      dict(help='Guiding network for autoguidance (same resolution, channels, labels)', metavar='PKL|URL', type=str)),
    ('precision',      '--precision', dict(help='Network arithmetic; fp32 = bit-exact whatever the batch; auto = bf16 where the device has bf16 matrix units, else fp32  [default: tf32 on CUDA, else fp32]', type=click.Choice(list(PRECISIONS) + [AUTO]))),
]
FLAGS = {keyword: flag for keyword, flag, _ in SAMPLER_OPTIONS}


def sampler_options(fn):
    """Click decorator adding the sampler options (--class, --steps, …, --precision), all unset by default."""
    for keyword, flag, settings in reversed(SAMPLER_OPTIONS):
        fn = click.option(flag, keyword, **settings)(fn)
    return fn


def choose_sampler(solver, discretization, schedule, scaling):
    """EDM's rule: any ablation option (--disc, --scaling, a noise --schedule, --solver euler|heun) selects the
    ablation sampler; the other solvers select their own; a step --schedule alone keeps the EDM sampler."""
    ablation_schedule = schedule in _ABLATION_SCHEDULES
    if solver not in (None, 'euler', 'heun'):
        for flag, value in (('--disc', discretization), ('--schedule', schedule if ablation_schedule else None), ('--scaling', scaling)):
            if value is not None:
                raise click.ClickException(f'{flag} {value} applies to the ablation sampler (--solver euler|heun), not to --solver {solver}')
        return solver
    if solver == 'heun' and schedule is not None and not ablation_schedule and discretization is None and scaling is None:
        return 'edm'
    if any(value is not None for value in (solver, discretization, scaling)) or ablation_schedule:
        if schedule is not None and not ablation_schedule:
            raise click.ClickException(f'--schedule {schedule} is a step schedule; the ablation sampler (--solver euler, '
                                       f'--disc, --scaling) takes its steps from --disc')
        return 'ablation'
    return 'edm'


def sampler_from_options(options):
    """(sampler name, its keyword arguments) from the sampler options' values; unset ones are left out, --nfe becomes
    the num_steps that makes exactly that many evaluations. The values are checked by solvers.check_options; its
    errors become one-line errors naming the flag.

    `options` holds the sampler keywords only (not --class, --guidance, --gnet or --precision).
    """
    options = {key: value for key, value in options.items() if value is not None and value is not False}
    nfe = options.pop('nfe', None)
    sampler_name = choose_sampler(*(options.get(key) for key in ('solver', 'discretization', 'schedule', 'scaling')))
    if sampler_name != 'ablation':
        options.pop('solver', None)
    try:
        if nfe is not None:
            if 'num_steps' in options:
                raise click.UsageError('give --steps or --nfe, not both')
            options['num_steps'] = solvers.steps_for_nfe(sampler_name, nfe, **options)
        solvers.check_options(sampler_name, **options)
    except solvers.SamplerOptionError as error:
        raise click.BadParameter(str(error), param_hint=FLAGS.get(error.keyword, error.keyword)) from None
    except ValueError as error:  # from steps_for_nfe: no step count makes exactly that many evaluations
        raise click.BadParameter(str(error), param_hint='--nfe') from None
    return sampler_name, options


def check_class_idx(class_idx, net):
    if class_idx is not None and not net.label_dim:
        raise click.ClickException(f'--class {class_idx}: the network is unconditional (label_dim 0)')
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class {class_idx}: out of range, the network has classes 0-{net.label_dim - 1}')

