"""FID against sampling NFE for every solver, for a baseline network and its FDM variant: FDM's "fewer steps" claim.

Trains the pair the way benchmarks/convergence.py does (same options, same run directory layout; a run whose final
snapshot exists is reused) or takes given snapshots; then, for each network, solver and NFE, generates the images of
K disjoint seed blocks in memory and measures the FID of each block against feature statistics of the dataset
(cached in --outdir). Writes a markdown table (mean ± std over blocks, and the minimum), JSON and a PNG plot of
FID vs NFE, and states at which NFE each FDM network reaches its baseline's best FID.

    python benchmarks/steps_study.py                                   # EDM vs EDM-FDM, bundled Fashion-MNIST
    python benchmarks/steps_study.py --network=a.pkl --network=b.pkl --nfe=5,10,20 --device=cuda --block-size=10000

A solver that cannot make exactly N evaluations (Heun: 2·steps − 1, always odd) runs at the largest count below N;
the table marks such cells and the JSON records the NFE actually used. The study is resumable and cumulative: results
are written after every cell, cells already in --outdir's JSON (same settings) are not measured again, and they stay
in the table when a later run asks for other solvers or NFE.
"""

import json
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
from benchmarks import convergence  # noqa: E402
from training import cli  # noqa: E402
from training import dataset  # noqa: E402
from training import metrics  # noqa: E402
from training import sampling  # noqa: E402
from training import schedules  # noqa: E402
from training import solvers  # noqa: E402
from training.checkpoints import load_network_pickle, snapshot_name  # noqa: E402

# --solvers names → (sampler, options). 'heun' is EDM's sampler, the codebase default.
SOLVERS = {
    'heun':  ('edm', {}),
    'dpm':   ('dpm', {}),
    'dpm2m': ('dpm2m', {}),
    'ipndm': ('ipndm', {}),
    'unipc': ('unipc', {}),
    'deis':  ('deis', {}),
    'dpm3m': ('dpm3m', {}),
}
NEW_SOLVERS = ['ipndm', 'unipc', 'deis', 'dpm3m']


def parse_solvers(text):
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in SOLVERS]
    if unknown or not names:
        raise click.BadParameter(f'{text!r}: solvers are {", ".join(SOLVERS)}')
    return list(dict.fromkeys(names))


def parse_nfe_list(text):
    values = cli.parse_int_list(text)
    if not values or min(values) < 1:
        raise click.BadParameter(f'{text!r}: give NFE values >= 1')
    return sorted(set(values))


def solver_steps(solver, nfe, schedule, afs):
    """(sampler, options with num_steps, NFE used): exactly `nfe` evaluations, else the largest count below it;
    None when the solver cannot run with `nfe` or fewer."""
    sampler_name, options = SOLVERS[solver]
    options = dict(options)
    if schedule is not None:
        options['schedule'] = schedule
    if afs and sampler_name in solvers.AFS_SAMPLERS:
        options['afs'] = True
    for used in range(nfe, 0, -1):
        try:
            num_steps = solvers.steps_for_nfe(sampler_name, used, **options)
        except ValueError:
            continue
        return sampler_name, dict(options, num_steps=num_steps), used
    return None


def train_network(opts, precond, run_dir, device):
    """The snapshot of `precond` trained with convergence.py's options in one segment; reused when it exists."""
    nimg = convergence.checkpoint_nimgs(opts.kimg, 1, opts.batch)[-1]
    options = convergence.train_options(opts, precond, run_dir, nimg, device.type)
    options.update(blocks=opts.blocks, attn=opts.attn)
    snapshot = os.path.join(run_dir, snapshot_name(nimg, options['tick']))
    if not os.path.isfile(snapshot):
        print(f'Training {convergence.METHOD_LABELS[precond]} for {opts.kimg:g} kimg in {run_dir}...', flush=True)
        convergence.train_segment(options)
        if not os.path.isfile(snapshot):
            raise click.ClickException(f'{run_dir}: training stopped before {nimg} images; see {run_dir}/log.txt')
    return snapshot


def reference_statistics(data_path, num_images, detector, batch, device, cache_path):
    """FID statistics of `num_images` dataset images (all when None; a seeded subset otherwise), cached."""
    images = dataset.ImageFolderDataset(path=data_path, max_size=num_images, random_seed=0)
    if os.path.isfile(cache_path):
        cached = metrics.load_statistics(cache_path, cache_path)
        if cached['detector'] == detector.identity and cached['num_images'] == len(images):
            return cached
    loader = torch.utils.data.DataLoader(images, batch_size=batch, shuffle=False)
    mu, sigma = metrics.feature_statistics(detector, (batch_images for batch_images, _ in loader), device).mean_cov()
    metrics.save_statistics(cache_path, mu, sigma, detector.identity, len(images))
    return metrics.load_statistics(cache_path, cache_path)


def block_fids(net, sampler_name, options, blocks, batch, detector, reference, device):
    """FID of each seed block's images against the reference."""
    fids = []
    for seeds in blocks:
        image_batches = (sampling.generate_images(net, seeds[start:start + batch], sampler_name, options, device)
                         for start in range(0, len(seeds), batch))
        mu, sigma = metrics.feature_statistics(detector, image_batches, device).mean_cov()
        fids.append(metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma']))
    return fids


def best_cell(cells):
    """The cell with the lowest mean FID, or None."""
    return min(cells, key=lambda cell: cell['fid']['mean'], default=None)


def summarise(study):
    """Per network its best cell; per FDM network the fewest NFE at which any solver's mean FID reaches its
    baseline's best mean FID; at every NFE the best solver of each network."""
    labels = [network['label'] for network in study['networks']]
    cells_of = lambda label: [cell for cell in study['cells'] if cell['network'] == label]
    summary = dict(best={label: best_cell(cells_of(label)) for label in labels}, matches=[])
    for network in study['networks']:
        baseline = network.get('baseline')
        if baseline is None or baseline not in labels or summary['best'][baseline] is None:
            continue
        target = summary['best'][baseline]['fid']['mean']
        reaching = [cell for cell in cells_of(network['label']) if cell['fid']['mean'] <= target]
        first = min(reaching, key=lambda cell: (cell['nfe_used'], cell['fid']['mean']), default=None)
        summary['matches'].append(dict(network=network['label'], baseline=baseline, baseline_best=summary['best'][baseline],
                                       first_match=first))
    return summary


def format_fid(fid):
    return f'{fid["mean"]:.1f} ± {fid["std"]:.1f}'


def report_markdown(study, summary):
    s = study['settings']
    nfes = sorted({cell['nfe'] for cell in study['cells']} | set(s['nfe']))
    solvers = list(dict.fromkeys(s['solvers'] + [cell['solver'] for cell in study['cells']]))
    schedule = s['schedule'] or "each solver's default"
    lines = [
        '# FID vs sampling NFE, per solver',
        '',
        f'Data: {study["dataset"]["path"]} ({study["dataset"]["num_images"]} images). FID of {s["num_blocks"]} disjoint seed '
        f'blocks of {s["block_size"]} images (seeds 0-{s["num_blocks"] * s["block_size"] - 1}), against '
        f'{study["reference"]["num_images"]} dataset images, detector {study["detector"]}. Cells: mean ± sample std over '
        f'the blocks (minimum in the JSON); * = the solver cannot make exactly that NFE and ran with the largest count '
        f'below it (Heun: 2·steps − 1). Step schedule: {schedule}'
        f'{", analytical first step where possible" if s["afs"] else ""}. Device: {study["machine"]["device"]} '
        f'({study["machine"]["threads"]} threads).',
        '',
    ]
    for network in study['networks']:
        lines.append(f'- **{network["label"]}**: {network["snapshot"]}' + (f' ({network["num_params"]:,} parameters)'
                     if network.get('num_params') else ''))
    lines += ['', common.markdown_table(['network', 'solver'] + [f'NFE {nfe}' for nfe in nfes], [
        [network['label'], solver] + [
            (lambda cell: '–' if cell is None else format_fid(cell['fid']) + ('*' if cell['nfe_used'] != nfe else ''))(
                next((c for c in study['cells'] if c['network'] == network['label'] and c['solver'] == solver
                      and c['nfe'] == nfe), None))
            for nfe in nfes]
        for network in study['networks'] for solver in solvers]), '']
    lines += ['## Conclusions', '']
    for label, cell in summary['best'].items():
        if cell is not None:
            lines.append(f'- {label}: best mean FID {format_fid(cell["fid"])} ({cell["solver"]}, NFE {cell["nfe_used"]}).')
    for match in summary['matches']:
        best, first = match['baseline_best'], match['first_match']
        if first is None:
            lines.append(f'- {match["network"]} does not reach {match["baseline"]}\'s best mean FID {best["fid"]["mean"]:.1f} '
                         f'({best["solver"]}, NFE {best["nfe_used"]}) at any NFE measured.')
        else:
            lines.append(f'- {match["network"]} reaches {match["baseline"]}\'s best mean FID {best["fid"]["mean"]:.1f} '
                         f'({best["solver"]}, NFE {best["nfe_used"]}) at NFE {first["nfe_used"]} ({first["solver"]}, '
                         f'{format_fid(first["fid"])}); the baseline used {best["nfe_used"] / first["nfe_used"]:.2g}× as many.')
    for nfe in nfes:
        for network in study['networks']:
            at = {c['solver']: c for c in study['cells'] if c['network'] == network['label'] and c['nfe'] == nfe}
            new = [at[name] for name in NEW_SOLVERS if name in at]
            if new and ('dpm2m' in at or 'heun' in at) and nfe == 10:
                best_new = best_cell(new)
                others = ', '.join(f'{name} {format_fid(at[name]["fid"])}' + (f' (NFE {at[name]["nfe_used"]})'
                                   if at[name]['nfe_used'] != nfe else '') for name in ('dpm2m', 'heun') if name in at)
                lines.append(f'- {network["label"]} at NFE {nfe}: best new solver {best_new["solver"]} '
                             f'{format_fid(best_new["fid"])} (minimum over blocks {best_new["fid"]["min"]:.1f}); {others}.')
    t = study['timing']
    lines += ['', f'Time of the last run: {dnnlib.util.format_time(t["total_sec"])} wall, of it reference statistics '
              f'{t["reference_sec"]:.0f} s, training {t["train_sec"]:.0f} s, sampling + FID {t["eval_sec"]:.0f} s; '
              f'sampling + FID of all {len(study["cells"])} cells, over all runs: {t["cells_sec"]:.0f} s.', '']
    return '\n'.join(lines)


def plot(path, study):
    import matplotlib
    matplotlib.use('Agg')  # files only
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots(figsize=(8, 5))
    styles = ['-', '--', ':', '-.']
    for network_index, network in enumerate(study['networks']):
        for solver_index, solver in enumerate(dict.fromkeys(study['settings']['solvers'] + [c['solver'] for c in study['cells']])):
            cells = sorted((c for c in study['cells'] if c['network'] == network['label'] and c['solver'] == solver),
                           key=lambda c: c['nfe_used'])
            if cells:
                ax.errorbar([c['nfe_used'] for c in cells], [c['fid']['mean'] for c in cells],
                            yerr=[c['fid']['std'] for c in cells], color=f'C{solver_index}', marker='o', markersize=3,
                            capsize=2, linestyle=styles[network_index % len(styles)], label=f'{network["label"]} {solver}')
    ax.set_xlabel('network evaluations (NFE)')
    ax.set_ylabel(f'FID (mean ± std of {study["settings"]["num_blocks"]} blocks of {study["settings"]["block_size"]})')
    ax.set_yscale('log')
    ax.set_title(f'FID vs NFE on {study["dataset"]["name"]}')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='x-small', ncol=2)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        figure.savefig(f, format='png', dpi=100)
    plt.close(figure)


@click.command()
@click.option('--network', 'network_paths', help='Snapshot to study (repeat; baseline first); default: train the pair', metavar='PKL', type=str, multiple=True)
@click.option('--label', 'labels', help='Label of each --network (repeat)', metavar='TEXT', type=str, multiple=True)
@click.option('--pair',         help='Baseline and FDM variant to train', type=click.Choice(list(convergence.PAIRS)), default='edm', show_default=True)
@click.option('--data',         help='Dataset ZIP or folder', metavar='ZIP|DIR', type=str, default=convergence.DEFAULT_DATA, show_default='bundled Fashion-MNIST 5k')
@click.option('--kimg',         help='Training budget per network', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=40, show_default=True)
@click.option('--cbase',        help='Channel multiplier', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--cres',         help='Channels per resolution', metavar='LIST', type=cli.parse_int_list, default='1,2,2', show_default=True)
@click.option('--blocks-per-res', 'blocks', help='Residual blocks per resolution', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--attn',         help='Resolutions with self-attention, or none', metavar='LIST', type=cli.parse_resolution_list, default='none', show_default=True)
@click.option('--batch',        help='Training batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr',           help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--warmup_ite',   help='FDM loss-weight warm-up (optimizer steps)  [default: as convergence.py]', metavar='INT', type=click.IntRange(min=1))
@click.option('--seed',         help='Training seed', metavar='INT', type=click.IntRange(min=0, max=2**31 - 1), default=0, show_default=True)
@click.option('--solvers',      help='Solvers to compare', metavar='LIST', type=parse_solvers, default='heun,dpm2m,ipndm,unipc,deis,dpm3m', show_default=True)
@click.option('--nfe',          help='Network evaluations per image', metavar='LIST', type=parse_nfe_list, default='4,6,8,10,12,16,20,35', show_default=True)
@click.option('--schedule',     help='Step schedule of every solver  [default: each solver\'s own]', type=click.Choice(list(schedules.STEP_SCHEDULES)))
@click.option('--afs',          help='Analytical first step for the solvers that can use it', is_flag=True)
@click.option('--blocks',       'num_blocks', help='Disjoint seed blocks per FID', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--block-size',   help='Images per seed block', metavar='INT', type=click.IntRange(min=2), default=200, show_default=True)
@click.option('--ref-num',      help='Dataset images of the reference statistics  [default: all]', metavar='INT', type=click.IntRange(min=2))
@convergence.evaluation_options
@click.option('--outdir',       help='Study directory (training runs, reference statistics, results)', metavar='DIR', type=str, default='training-runs/steps-study', show_default=True)
def main(**kwargs):
    """FID vs NFE for each solver and network, over disjoint seed blocks.

    \b
    python benchmarks/steps_study.py                     # train EDM and EDM-FDM, then the full study
    python benchmarks/steps_study.py --kimg=1 --nfe=4,10 --solvers=heun,unipc --blocks=2 --block-size=8   # a quick look
    """
    opts = dnnlib.EasyDict(kwargs)
    study_time = convergence.Stopwatch()
    if opts.labels and len(opts.labels) != len(opts.network_paths):
        raise click.BadParameter(f'{len(opts.labels)} labels for {len(opts.network_paths)} networks', param_hint='--label')
    device = convergence.start_on_device(opts.device, opts.threads)
    images, detector = convergence.open_data_and_detector(opts.data, opts.detector, device)
    os.makedirs(opts.outdir, exist_ok=True)
    json_path = os.path.join(opts.outdir, 'steps_study.json')

    train_time = convergence.Stopwatch()
    if opts.network_paths:
        labels = list(opts.labels) or [pathlib.Path(path).stem for path in opts.network_paths]
        study_networks = [dict(label=label, snapshot=path, baseline=None) for label, path in zip(labels, opts.network_paths)]
        if len(study_networks) == 2:
            study_networks[1]['baseline'] = study_networks[0]['label']
    else:
        baseline, fdm, default_warmup_ite = convergence.PAIRS[opts.pair]
        train_opts = dnnlib.EasyDict(opts, cond=False, arch='ddpmpp', dropout=0, augment=0, checkpoints=1,
                                     warmup_ite=opts.warmup_ite or default_warmup_ite)
        desc = f'{opts.pair}-{images.name}-c{opts.cbase}-blocks{opts.blocks}-b{opts.batch}-{opts.kimg:g}kimg'
        study_networks = [dict(label=convergence.METHOD_LABELS[precond], precond=precond,
                               snapshot=train_network(train_opts, precond, os.path.join(opts.outdir, desc, precond), device),
                               baseline=None if precond == baseline else convergence.METHOD_LABELS[baseline])
                          for precond in (baseline, fdm)]
    train_time.stop()

    ref_path = os.path.join(opts.outdir, f'fid-ref-{images.name}-{opts.ref_num or "all"}-{detector.name}.npz')
    with convergence.Stopwatch() as reference_time:
        reference = reference_statistics(opts.data, opts.ref_num, detector, opts.eval_batch, device, ref_path)
    print(f'Reference statistics: {ref_path} ({reference["num_images"]} images)', flush=True)

    blocks = metrics.seed_blocks(list(range(opts.num_blocks * opts.block_size)), opts.num_blocks)
    settings = {key: value for key, value in opts.items() if key not in ('network_paths', 'labels')}
    previous = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if {k: v for k, v in old['settings'].items() if k not in ('solvers', 'nfe')} == \
                {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in ('solvers', 'nfe')}:
            previous = {(c['network'], c['snapshot'], c['solver'], c['nfe']): c for c in old['cells']}
    study = dict(
        settings    = settings,
        dataset     = dict(path=opts.data, name=images.name, num_images=len(images)),
        detector    = detector.identity,
        reference   = dict(path=ref_path, num_images=reference['num_images']),
        machine     = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                           processor=platform.processor() or platform.machine()),
        networks    = study_networks,
        cells       = [],
        timing      = {},
    )
    paths = dict(md=os.path.join(opts.outdir, 'steps_study.md'), json=json_path, png=os.path.join(opts.outdir, 'steps_study.png'))
    nets = {network['label']: load_network_pickle(network['snapshot'])['ema'].to(device).eval() for network in study_networks}
    for network in study_networks:
        network['num_params'] = sum(param.numel() for param in nets[network['label']].parameters())
    eval_sec = 0.0
    study['cells'] = [cell for key, cell in previous.items()
                      if any(key[:2] == (network['label'], network['snapshot']) for network in study_networks)]
    # NFE 10 first, then outwards: a study stopped early still holds the comparisons that matter most.
    for nfe in sorted(opts.nfe, key=lambda nfe: (abs(nfe - 10), nfe)):
        for network in study_networks:
            for solver in opts.solvers:
                key = (network['label'], network['snapshot'], solver, nfe)
                if key in previous:
                    continue
                choice = solver_steps(solver, nfe, opts.schedule, opts.afs)
                if choice is None:
                    continue
                sampler_name, options, nfe_used = choice
                same = next((c for c in study['cells'] if c['network'] == network['label'] and c['solver'] == solver
                             and c['options'] == options), None)  # Heun at NFE 4 is Heun at 3
                with convergence.Stopwatch() as cell_time:
                    fids = same['fid']['values'] if same else block_fids(
                        nets[network['label']], sampler_name, options, blocks, opts.eval_batch, detector, reference, device)
                eval_sec += cell_time.wall_sec
                cell = dict(network=network['label'], snapshot=network['snapshot'], solver=solver, nfe=nfe,
                            nfe_used=nfe_used, sampler=sampler_name, options=options, fid=metrics.block_summary(fids),
                            sec=cell_time.wall_sec)
                study['cells'].append(cell)
                print(f'{network["label"]:<8} {solver:<6} NFE {nfe_used:3d}   FID {format_fid(cell["fid"]):>16}   '
                      f'min {cell["fid"]["min"]:7.2f}   ({cell_time.wall_sec:5.0f} s)', flush=True)
                write_outputs(paths, study, study_time, train_time, reference_time, eval_sec)
    text = write_outputs(paths, study, study_time, train_time, reference_time, eval_sec)
    print()
    print(text)
    for kind, path in paths.items():
        print(f'{kind.upper() + ":":<5} {path}')


def write_outputs(paths, study, study_time, train_time, reference_time, eval_sec):
    """The markdown, JSON and plot of the cells measured so far; returns the markdown."""
    study['timing'] = dict(total_sec=time.perf_counter() - study_time.wall_start, train_sec=train_time.wall_sec,
                           reference_sec=reference_time.wall_sec, eval_sec=eval_sec,
                           cells_sec=sum(cell['sec'] for cell in study['cells']))
    study['summary'] = summarise(study)
    text = report_markdown(study, study['summary'])
    common.write_text(paths['md'], text)
    common.write_json(paths['json'], study)
    plot(paths['png'], study)
    return text

if __name__ == '__main__':
    main()
