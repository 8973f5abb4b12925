"""Side-by-side speed of this code and the published FDM code on one machine, same data, same pickle.

Needs a copy of the published code (sail-sg/FDM, commit 5129e72) patched only to run on a CPU; it never
enters this repository. Runs both `train.py` on one synthetic dataset and both `generate.py` on the
published code's own snapshot, alternating which side goes first, and prints the ratios. Both sides get the
same environment (OMP_NUM_THREADS, nothing else set) and their default options; the images of the two
`generate.py` runs are compared pixel by pixel (identical in fp32). Our side runs in `--precision` (auto: bf16
where the CPU has bf16 matrix units, training/precision.py); the published side always runs in float32. Beside the ratios it prints the
machine's measured fp32 and bf16 matmul and convolution GFLOP/s and the FLOP floor of the training config: its
FLOP per image × 1000 / matmul GFLOP/s, the sec/kimg that the products alone would take (benchmarks/flops.py).

    python benchmarks/compare_published.py --published=/path/to/published-fdm-cpu --repeats=3
    python benchmarks/compare_published.py --floor-only     # the machine's GFLOP/s and the floor, nothing run

Measure on an idle machine: two jobs sharing the cores slow each other down unevenly.
"""

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import PIL.Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402
from benchmarks import flops  # noqa: E402
from training.precision import AUTO, TRAINING_PRECISIONS  # noqa: E402

# The training configuration compared: a 2.7M-parameter DDPM++ on 32×32 RGB, as small CPU studies use.
TRAIN_OPTIONS = ['--precond=fdm_edm', '--arch=ddpmpp', '--cbase=32', '--cres=1,2,2', '--batch=32', '--augment=0', '--seed=0']
# Variables that change OpenMP or thread behaviour; both sides run without them unless the user passes --env.
THREAD_VARIABLES = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS')


def run_timed(command, cwd, env, log_path):
    """Run `command`, fail loudly on a non-zero exit, and return (wall seconds, CPU seconds of the process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall_sec = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise click.ClickException(f'{" ".join(map(str, command))} failed (exit {result.returncode}); see {log_path}')
    return wall_sec, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def sec_per_kimg(run_dir):
    """Mean sec/kimg over the ticks after the first (tick 0 holds start-up), from the run's stats.jsonl."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    values = [tick['Timing/sec_per_kimg']['mean'] for tick in ticks[1:]] or [ticks[-1]['Timing/sec_per_kimg']['mean']]
    return statistics.mean(values)


def read_images(folder):
    """{file name: uint8 array} of the PNGs below `folder`."""
    return {path.name: np.asarray(PIL.Image.open(path)) for path in sorted(pathlib.Path(folder).rglob('*.png'))}


def max_pixel_difference(folder_a, folder_b):
    images_a, images_b = read_images(folder_a), read_images(folder_b)
    if images_a.keys() != images_b.keys() or not images_a:
        raise click.ClickException(f'the two generate.py runs wrote different files ({len(images_a)} vs {len(images_b)})')
    return max(int(np.abs(images_a[name].astype(np.int16) - images_b[name]).max()) for name in images_a)


def summarize(values):
    return dict(median=statistics.median(values), min=min(values), max=max(values), runs=values)


def train_option_values():
    """TRAIN_OPTIONS as train.py option names → values (for benchmarks/flops.py)."""
    values = {}
    for option in TRAIN_OPTIONS:
        name, _, value = option[2:].partition('=')
        values[name] = [int(v) for v in value.split(',')] if name == 'cres' else int(value) if value.isdigit() else value
    return values


def machine_floor(threads):
    """The machine's measured kernel speed in fp32 and bf16 and the training config's FLOP floor in sec/kimg."""
    import torch  # only here: the timed runs are subprocesses, and this process should not hold OpenMP threads before
    torch.set_num_threads(threads)
    kernels = flops.measure_kernels(cases={name: case for name, case in flops.kernel_cases().items() if not name.startswith('group_norm')})
    flop_per_image = flops.training_flop_per_image(train_option_values())
    gflops = {(row['name'].split()[0], row['precision']): row['gflops'] for row in kernels}
    floor = {precision: flops.sec_per_kimg_floor(flop_per_image, gflops['matmul', precision]) for precision in flops.DTYPES}
    return dict(kernels=kernels, train_gflop_per_image=flop_per_image / 1e9, sec_per_kimg_floor=floor)


def print_floor(floor, ours_sec_per_kimg=None):
    rows = [[row['name'], row['precision'], row['gflops']] for row in floor['kernels']]
    print(common.markdown_table(['kernel', 'precision', 'GFLOP/s'], rows, digits=[None, None, 0]))
    print(f'training config: {floor["train_gflop_per_image"]:.2f} GFLOP per image (forward + backward); '
          f'FLOP floor at the matmul speed: fp32 {floor["sec_per_kimg_floor"]["fp32"]:.2f} sec/kimg, '
          f'bf16 {floor["sec_per_kimg_floor"]["bf16"]:.2f} sec/kimg')
    if ours_sec_per_kimg is not None:
        print(f'ours at {ours_sec_per_kimg[1]}: {ours_sec_per_kimg[0]:.2f} sec/kimg = '
              f'{ours_sec_per_kimg[0] / floor["sec_per_kimg_floor"][ours_sec_per_kimg[1]]:.2f}x its floor')


@click.command()
@click.option('--published', 'published_dir', help='The published FDM code patched for CPUs', metavar='DIR', type=str)
@click.option('--precision', help='Our side\'s arithmetic (the published side runs in fp32); auto = what train.py and generate.py choose for this CPU', type=click.Choice(TRAINING_PRECISIONS[:1] + ['bf16', AUTO]), default=AUTO, show_default=True)
@click.option('--floor-only', help='Only measure the kernels\' GFLOP/s and print the FLOP floor', is_flag=True)
@click.option('--threads',   help='OMP_NUM_THREADS of both sides', metavar='INT', type=click.IntRange(min=1), default=os.cpu_count(), show_default=True)
@click.option('--repeats',   help='Runs of each side per task, alternating', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--kimg',      help='Training length of each run', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--seeds',     help='Number of images generated per run', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--batch',     help='generate.py --batch of both sides', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--tasks',     help='What to compare', type=click.Choice(['all', 'train', 'generate']), default='all', show_default=True)
@click.option('--env', 'extra_env', help='NAME=VALUE set for both sides (repeatable)', metavar='NAME=VALUE', multiple=True)
@click.option('--dest',      help='JSON result file  [default: benchmarks/results/compare_published-cpu{threads}.json]', metavar='PATH', type=str)
def main(published_dir, precision, floor_only, threads, repeats, kimg, seeds, batch, tasks, extra_env, dest):
    """Time the published FDM code and this one side by side and print the ratios."""
    if floor_only:
        print_floor(machine_floor(threads))
        return
    if published_dir is None:
        raise click.UsageError('--published is required (or give --floor-only)')
    if not (pathlib.Path(published_dir) / 'train.py').is_file() or not (pathlib.Path(published_dir) / 'generate.py').is_file():
        raise click.BadParameter(f'{published_dir} holds no train.py and generate.py of the published code', param_hint='--published')
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES + ('PYTHONPATH',)}
    env['OMP_NUM_THREADS'] = str(threads)
    for item in extra_env:
        name, _, value = item.partition('=')
        env[name] = value
    sides = {'published': pathlib.Path(published_dir).resolve(), 'ours': REPO_ROOT}
    load_before = os.getloadavg()
    results = dict(machine=common.machine_description(), threads=threads, repeats=repeats, env=list(extra_env), precision=precision,
                   train_options=TRAIN_OPTIONS + [f'--duration={kimg / 1000}'], kimg=kimg, num_images=seeds, batch=batch)
    rows = []
    with tempfile.TemporaryDirectory(prefix='compare_published_') as tmp:
        tmp = pathlib.Path(tmp)
        data = tmp / 'dataset.zip'
        common.write_synthetic_dataset(data, 1000, 32, 3, 0)
        network_pkl = None
        train = {side: dict(sec_per_kimg=[], wall_sec=[], cpu_sec=[]) for side in sides}
        generate = {side: dict(wall_sec=[], cpu_sec=[]) for side in sides}
        # Training: the published run also makes the pickle that both generate.py runs load.
        for repeat in range(repeats):
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
            for side in order if tasks in ('all', 'train') or network_pkl is None else []:
                run_dir = tmp / f'train-{side}-{repeat}'
                command = [sys.executable, 'train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={data}',
                           *TRAIN_OPTIONS, f'--duration={kimg / 1000}', '--tick=1', f'--snap={kimg}', '--dump=1000',
                           *([f'--precision={precision}'] if side == 'ours' else [])]
                print(f'train    {side:9s} run {repeat + 1}/{repeats} ...', end=' ', flush=True)
                wall, cpu = run_timed(command, sides[side], env, tmp / f'train-{side}-{repeat}.log')
                train[side]['wall_sec'].append(wall)
                train[side]['cpu_sec'].append(cpu)
                train[side]['sec_per_kimg'].append(sec_per_kimg(run_dir))
                print(f'{train[side]["sec_per_kimg"][-1]:.1f} sec/kimg, {wall:.1f} s wall')
                if side == 'ours':  # what --precision=auto chose, as the run recorded it
                    results['train_precision'] = json.loads((run_dir / 'training_options.json').read_text())['precision']
                if side == 'published' and network_pkl is None:
                    network_pkl = sorted(run_dir.glob('network-snapshot-*.pkl'))[-1]
        if tasks in ('all', 'generate'):
            for repeat in range(repeats):
                order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
                for side in order:
                    outdir = tmp / f'images-{side}-{repeat}'
                    command = [sys.executable, 'generate.py', f'--network={network_pkl}', f'--outdir={outdir}',
                               f'--seeds=0-{seeds - 1}', f'--batch={batch}', *([f'--precision={precision}'] if side == 'ours' else [])]
                    print(f'generate {side:9s} run {repeat + 1}/{repeats} ...', end=' ', flush=True)
                    wall, cpu = run_timed(command, sides[side], env, tmp / f'generate-{side}-{repeat}.log')
                    generate[side]['wall_sec'].append(wall)
                    generate[side]['cpu_sec'].append(cpu)
                    print(f'{wall:.1f} s wall')
            results['generate_max_pixel_difference'] = max_pixel_difference(tmp / 'images-published-0', tmp / 'images-ours-0')

    def add_row(task, metric, series):
        published, ours = statistics.median(series['published']), statistics.median(series['ours'])
        rows.append([task, metric, published, ours, published / ours])

    if tasks in ('all', 'train'):
        results['train'] = {side: {key: summarize(values) for key, values in train[side].items()} for side in sides}
        add_row('train', 'sec/kimg (ticks >= 1)', {side: train[side]['sec_per_kimg'] for side in sides})
        add_row('train', f'whole {kimg}-kimg command, wall s', {side: train[side]['wall_sec'] for side in sides})
        add_row('train', f'whole {kimg}-kimg command, CPU s', {side: train[side]['cpu_sec'] for side in sides})
    if tasks in ('all', 'generate'):
        results['generate'] = {side: {key: summarize(values) for key, values in generate[side].items()} for side in sides}
        add_row('generate', f'{seeds} images, wall s', {side: generate[side]['wall_sec'] for side in sides})
        add_row('generate', f'{seeds} images, CPU s', {side: generate[side]['cpu_sec'] for side in sides})
    results['load_average_before_after'] = [load_before[0], os.getloadavg()[0]]
    results['table'] = rows
    results['floor'] = machine_floor(threads)

    print()
    print(common.markdown_table(['task', 'metric (median)', 'published', 'ours', 'speed-up'], rows))
    if 'generate_max_pixel_difference' in results:
        print(f'\ngenerate.py images: largest difference between the two sides {results["generate_max_pixel_difference"]} grey levels')
    print(f'load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}')
    print()
    ours = None
    if 'train' in results:
        ours = (results['train']['ours']['sec_per_kimg']['median'], results['train_precision'])
    print_floor(results['floor'], ours)
    dest = dest or str(REPO_ROOT / 'benchmarks' / 'results' / f'compare_published-cpu{threads}.json')
    common.write_json(dest, results)
    print(f'Wrote {dest}')


if __name__ == '__main__':
    main()
