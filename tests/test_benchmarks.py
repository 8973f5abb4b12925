"""Smoke tests of every benchmark entry point on tiny settings, and of the convergence study's arithmetic."""

import json
import os
import pathlib
import re
import subprocess
import warnings
import sys

import numpy as np
import PIL.Image
import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402
from benchmarks import convergence  # noqa: E402


def run_script(script, *args, cwd=None):
    """Run a repository script in a fresh interpreter on one CPU thread; return its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd or REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f'{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result.stdout


class TinyDetector(torch.nn.Module):
    """A stand-in for Inception: 4x4 average-pooled RGB, 48 features, same float299 calling convention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope='module')
def tiny_detector(tmp_path_factory):
    path = tmp_path_factory.mktemp('detector') / 'tiny-detector.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is the detectors' file format
        torch.jit.save(torch.jit.script(TinyDetector()), str(path))
    return path


@pytest.fixture(scope='module')
def tiny_dataset(tmp_path_factory):
    """32 random 8x8 grayscale images in the dataset folder layout."""
    root = tmp_path_factory.mktemp('dataset') / 'tiny'
    (root / '00000').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(32):
        PIL.Image.fromarray(rng.integers(0, 256, [8, 8], dtype=np.uint8)).save(root / '00000' / f'img{index:08d}.png')
    return root


@pytest.fixture(scope='module')
def convergence_study(tmp_path_factory, tiny_dataset, tiny_detector):
    """One tiny study: 2 checkpoints of 1 and 2 steps at batch 4, FID of 4 images, NFE table at 2 and 3 steps."""
    outdir = tmp_path_factory.mktemp('convergence')
    stdout = run_script('benchmarks/convergence.py', f'--data={tiny_dataset}', f'--detector={tiny_detector}',
                        '--cbase=4', '--cres=1', '--batch=4', '--kimg=0.008', '--checkpoints=2', '--num-fid=4',
                        '--steps=2', '--nfe-steps=2,3', '--eval-batch=4', '--device=cpu', '--threads=1',
                        f'--outdir={outdir}')
    [study_dir] = [path for path in outdir.iterdir() if path.is_dir()]
    with open(study_dir / 'convergence.json') as f:
        study = json.load(f)
    return dict(stdout=stdout, outdir=outdir, study_dir=study_dir, study=study)


# Speed benchmarks.


def test_train_speed_prints_table_and_json(tmp_path):
    json_path = tmp_path / 'train_speed.json'
    stdout = run_script('benchmarks/train_speed.py', '--config=small', '--steps=1', '--batch=2', '--device=cpu',
                        '--workers=0', f'--json={json_path}')
    result = json.loads(json_path.read_text())
    assert result['device'] == 'cpu' and result['batch'] == 2 and result['timed_steps'] == 1
    assert result['sec_per_kimg'] > 0 and result['peak_cpu_mem_gb'] > 0
    assert result['sec_per_step'] == pytest.approx(result['sec_per_kimg'] * 2 / 1000)
    table_rows = [line.split()[0] for line in stdout.splitlines() if line.split()]
    assert 'sec_per_kimg' in table_rows and 'peak_cpu_mem_gb' in table_rows


def test_cpu_precision_prints_fp32_and_bf16_of_every_kernel(tmp_path):
    json_path = tmp_path / 'cpu_precision.json'
    stdout = run_script('benchmarks/cpu_precision.py', '--repeats=1', '--train-steps=0', '--matmul-size=128',
                        '--channels=32', f'--json={json_path}')
    result = json.loads(json_path.read_text())
    assert result['cpu']['auto'] in ('fp32', 'bf16') and f"auto{' ' * 19}{result['cpu']['auto']}" in stdout
    kernels = {(row['name'].split()[0], row['precision']): row for row in result['kernels']}
    assert set(kernels) == {(kind, precision) for kind in ('matmul', 'conv', 'group_norm') for precision in ('fp32', 'bf16')}
    assert all(row['ms'] > 0 for row in kernels.values()) and kernels['matmul', 'bf16']['gflops'] > 0
    assert kernels['matmul', 'fp32']['gflops'] == pytest.approx(2 * 128 ** 3 / kernels['matmul', 'fp32']['ms'] / 1e6)
    assert 'bf16 speed-up' in stdout


def test_training_flop_count_is_per_image_and_grows_with_the_channels_squared():
    from benchmarks import compare_published, flops
    options = dict(compare_published.train_option_values(), cbase=8)
    assert options['cres'] == [1, 2, 2] and options['augment'] == 0
    per_image = flops.training_flop_per_image(options, batch=2)
    assert flops.training_flop_per_image(options, batch=3) == pytest.approx(per_image)
    doubled = flops.training_flop_per_image(dict(options, cbase=16), batch=2)
    assert 3.5 < doubled / per_image <= 4  # convolutions ∝ channels², attention's products ∝ channels
    assert flops.sec_per_kimg_floor(4e9, 400) == pytest.approx(10)


def test_compare_published_needs_the_published_code_unless_floor_only():
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks/compare_published.py')], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and 'Error: --published is required (or give --floor-only)' in result.stderr
    assert '--precision [fp32|bf16|auto]' in run_script('benchmarks/compare_published.py', '--help')


def test_sample_speed_prints_table_and_json(tmp_path):
    json_path = tmp_path / 'sample_speed.json'
    stdout = run_script('benchmarks/sample_speed.py', '--solvers=edm,dpm', '--steps=2', '--batch=2', '--batches=1',
                        '--device=cpu', f'--out={json_path}')
    report = json.loads(json_path.read_text())
    assert [row['solver'] for row in report['results']] == ['edm', 'dpm']
    assert {row['solver']: row['nfe'] for row in report['results']} == {'edm': 3, 'dpm': 2}  # Heun 2N-1, DPM-Solver++ N
    assert all(row['images_per_s'] > 0 for row in report['results'])
    table = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()}
    assert table['edm'][0] == '3' and table['dpm'][0] == '2'


def test_fid_speed_prints_table_and_json(tmp_path, tiny_detector):
    json_path = tmp_path / 'fid_speed.json'
    stdout = run_script('benchmarks/fid_speed.py', f'--detector={tiny_detector}', '--resolution=8', '--batch=2',
                        '--batches=1', '--repeats=1', '--device=cpu', f'--out={json_path}')
    report = json.loads(json_path.read_text())
    assert report['detector'].startswith('tiny-detector.pt sha256:')
    assert report['images_per_s'] > 0 and report['bare_module_images_per_s'] > 0 and report['fid_seconds'] > 0
    table_rows = [line for line in stdout.splitlines() if line.startswith('| ')]
    assert len(table_rows) == 5  # header, our extraction, the bare module, their ratio, one FID
    assert 'images/s' in table_rows[1] and 'bare TorchScript' in table_rows[2] and 'one FID' in table_rows[4]



def test_gpu_bench_smoke_on_cpu_prints_one_table_and_writes_every_row(tmp_path, tiny_detector):
    json_path = tmp_path / 'x.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run(['bash', str(REPO_ROOT / 'benchmarks/gpu_bench.sh'), '--smoke', '--device=cpu',
                             f'--detector={tiny_detector}', f'--out={json_path}'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    report = json.loads(json_path.read_text())
    assert report['date'] == report['machine']['date'] and report['device'] == 'cpu'
    rows = {(row['kind'], row['precision'], row['channels_last'], row['compile'], row.get('solver')): row
            for row in report['rows']}
    assert len(rows) == len(report['rows']) == 9 + 8 + 1  # training, two precisions x four solvers, detector
    baseline = rows['train', 'fp32', False, False, None]
    assert baseline['images_per_s'] > 0 and baseline['ratio_to_fp32'] == 1
    assert rows['train', 'bf16', True, True, None]['status'] == 'n/a (needs CUDA)'
    assert {solver: rows['sample', 'fp32', True, False, solver]['nfe'] for solver in ('edm', 'euler', 'dpm', 'dpm2m')} \
        == {'edm': 3, 'euler': 2, 'dpm': 2, 'dpm2m': 2}
    assert rows['sample', 'bf16', True, False, 'edm']['status'] == 'n/a (needs CUDA)'
    assert rows['features', 'fp32', False, False, None]['images_per_s'] > 0
    table_lines = [line for line in result.stdout.splitlines() if line.startswith('|')]
    assert len(table_lines) == 2 + len(rows)
    assert table_lines[0].split('|')[1].strip() == 'measure' and 'img/s' in table_lines[0]


# Convergence study.


def test_convergence_measures_both_methods_at_every_checkpoint(convergence_study):
    study = convergence_study['study']
    assert list(study['methods']) == ['edm', 'fdm_edm']
    for result in study['methods'].values():
        assert [checkpoint['kimg'] for checkpoint in result['checkpoints']] == [0.004, 0.008]
        assert all(np.isfinite(checkpoint['fid']) and checkpoint['fid'] >= 0 for checkpoint in result['checkpoints'])
        assert all(os.path.isfile(checkpoint['snapshot']) for checkpoint in result['checkpoints'])


def test_convergence_nfe_table_reuses_the_curve_sampler_at_its_step_count(convergence_study):
    for result in convergence_study['study']['methods'].values():
        assert [(row['steps'], row['nfe']) for row in result['nfe']] == [(2, 3), (3, 5)]
        assert result['nfe'][0]['fid'] == result['checkpoints'][-1]['fid']


def test_convergence_summary_matches_the_curves(convergence_study):
    study = convergence_study['study']
    summary = study['summary']
    baseline_final = study['methods']['edm']['checkpoints'][-1]
    fdm_curve = [(c['kimg'], c['fid']) for c in study['methods']['fdm_edm']['checkpoints']]
    assert summary['baseline_final_fid'] == baseline_final['fid']
    kimg, how = convergence.kimg_to_reach(fdm_curve, baseline_final['fid'])
    assert (summary['fdm_kimg_to_baseline_final_fid'], summary['fdm_kimg_how']) == (kimg, how)


def test_convergence_writes_table_plot_and_reference_statistics(convergence_study):
    study_dir, outdir = convergence_study['study_dir'], convergence_study['outdir']
    markdown = (study_dir / 'convergence.md').read_text()
    assert re.search(r'^\| +kimg \| +EDM \| EDM-FDM \|$', markdown, re.MULTILINE)
    assert re.search(r'^\| steps \| NFE \| +EDM \| EDM-FDM \|$', markdown, re.MULTILINE)
    assert markdown in convergence_study['stdout']
    kimg_rows = [line for line in markdown.splitlines() if line.startswith('| 0.00')]
    assert len(kimg_rows) == 2
    with PIL.Image.open(study_dir / 'convergence.png') as image:
        assert image.format == 'PNG' and image.size == (600, 400)
    assert [path.name for path in outdir.glob('fid-ref-*.npz')] == ['fid-ref-tiny-tiny-detector.pt.npz']
    assert str(study_dir / 'convergence.png') in convergence_study['stdout']


def test_convergence_segments_equal_one_train_py_run(convergence_study, tmp_path):
    """The study trains in resumed segments; the recorded train.py command, run once, gives the same EMA."""
    result = convergence_study['study']['methods']['fdm_edm']
    args = [arg for arg in result['train_args'] if not arg.startswith('--outdir=')] + [f'--outdir={tmp_path}']
    run_script('train.py', *args)
    from training import checkpoints
    segmented = checkpoints.load_network_pickle(result['checkpoints'][-1]['snapshot'])['ema'].state_dict()
    [snapshot] = tmp_path.glob('network-snapshot-*.pkl')
    single = checkpoints.load_network_pickle(snapshot)['ema'].state_dict()
    assert segmented.keys() == single.keys()
    assert all(torch.equal(segmented[name], single[name]) for name in segmented)


def test_convergence_rejects_a_missing_dataset_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks/convergence.py'), f'--data={tmp_path}/none.zip',
                             f'--outdir={tmp_path}'], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    assert '--data' in result.stderr and 'none.zip' in result.stderr


def test_kimg_to_reach_interpolates_between_the_checkpoints_around_the_first_crossing():
    curve = [(10, 100.0), (20, 60.0), (30, 40.0), (40, 20.0)]
    assert convergence.kimg_to_reach(curve, 50.0) == (25.0, 'interpolated')
    assert convergence.kimg_to_reach(curve, 60.0) == (20.0, 'interpolated')


def test_kimg_to_reach_is_an_upper_bound_at_the_first_checkpoint_and_none_when_never_reached():
    curve = [(10, 30.0), (20, 25.0)]
    assert convergence.kimg_to_reach(curve, 35.0) == (10, 'upper bound')
    assert convergence.kimg_to_reach(curve, 20.0) == (None, 'not reached')


def test_kimg_to_reach_uses_the_first_crossing_of_a_noisy_curve():
    curve = [(10, 50.0), (20, 29.0), (30, 35.0), (40, 28.0)]
    assert convergence.kimg_to_reach(curve, 30.0) == (pytest.approx(10 + 20 / 21 * 10), 'interpolated')


def test_checkpoints_are_evenly_spaced_whole_steps():
    assert convergence.checkpoint_nimgs(1, 4, 64) == [256, 512, 768, 1024]
    assert convergence.checkpoint_nimgs(0.1, 2, 64) == [64, 128]


def test_checkpoints_that_collapse_onto_one_step_are_refused():
    with pytest.raises(Exception, match='--checkpoints|checkpoints do not fit'):
        convergence.checkpoint_nimgs(0.064, 3, 64)


# Shared output helpers.


def test_markdown_table_right_aligns_numbers_and_formats_floats():
    table = common.markdown_table(['name', 'fid'], [['EDM', 12.345], ['EDM-FDM', None]])
    assert table.splitlines() == [
        '| name    |   fid |',
        '|---------|------:|',
        '| EDM     | 12.35 |',
        '| EDM-FDM |     – |',
    ]


# Steps study.


@pytest.fixture(scope='module')
def steps_study(tmp_path_factory, tiny_dataset, tiny_detector):
    """A tiny steps study: the EDM pair trained for 2 steps of 4 images, 2 solvers at NFE 3 and 4, 2 blocks of 4."""
    outdir = tmp_path_factory.mktemp('steps')
    stdout = run_script('benchmarks/steps_study.py', f'--data={tiny_dataset}', f'--detector={tiny_detector}',
                        '--cbase=4', '--cres=1', '--batch=4', '--kimg=0.008', '--solvers=heun,unipc', '--nfe=3,4',
                        '--blocks=2', '--block-size=4', '--eval-batch=4', '--device=cpu', '--threads=1', f'--outdir={outdir}')
    with open(outdir / 'steps_study.json') as f:
        study = json.load(f)
    return dict(stdout=stdout, outdir=outdir, study=study)


def test_steps_study_measures_every_network_solver_and_nfe_over_the_blocks(steps_study):
    study = steps_study['study']
    assert [network['label'] for network in study['networks']] == ['EDM', 'EDM-FDM']
    cells = {(c['network'], c['solver'], c['nfe']): c for c in study['cells']}
    assert sorted(cells) == sorted((n, s, nfe) for n in ('EDM', 'EDM-FDM') for s in ('heun', 'unipc') for nfe in (3, 4))
    for cell in cells.values():
        assert len(cell['fid']['values']) == 2 and cell['fid']['min'] == min(cell['fid']['values'])
        assert cell['fid']['mean'] == pytest.approx(np.mean(cell['fid']['values']))
    assert cells['EDM', 'heun', 4]['nfe_used'] == 3 and cells['EDM', 'heun', 4]['options']['num_steps'] == 2  # Heun's NFE is odd
    assert cells['EDM', 'unipc', 4]['nfe_used'] == 4 and cells['EDM', 'unipc', 4]['options']['num_steps'] == 4
    assert cells['EDM', 'heun', 3]['fid'] == cells['EDM', 'heun', 4]['fid']  # the same images


def test_steps_study_writes_table_plot_and_the_match_statement(steps_study):
    outdir, study = steps_study['outdir'], steps_study['study']
    markdown = (outdir / 'steps_study.md').read_text()
    assert re.search(r'^\| network +\| solver \| NFE 3 +\| NFE 4 +\|', markdown, re.MULTILINE)  # (NFE 5 once the next test ran)
    assert markdown in steps_study['stdout']
    [match] = study['summary']['matches']
    assert match['network'] == 'EDM-FDM' and match['baseline'] == 'EDM'
    assert ('EDM-FDM reaches' in markdown) == (match['first_match'] is not None)
    with PIL.Image.open(outdir / 'steps_study.png') as image:
        assert image.format == 'PNG'


def test_steps_study_keeps_earlier_cells_and_measures_only_new_ones(steps_study, tiny_dataset, tiny_detector):
    outdir = steps_study['outdir']
    stdout = run_script('benchmarks/steps_study.py', f'--data={tiny_dataset}', f'--detector={tiny_detector}',
                        '--cbase=4', '--cres=1', '--batch=4', '--kimg=0.008', '--solvers=unipc', '--nfe=3,5',
                        '--blocks=2', '--block-size=4', '--eval-batch=4', '--device=cpu', '--threads=1', f'--outdir={outdir}')
    assert 'Training ' not in stdout and stdout.count('NFE   5') == 2 and 'NFE   3' not in stdout  # only the new cells
    with open(outdir / 'steps_study.json') as f:
        cells = {(c['network'], c['solver'], c['nfe']): c for c in json.load(f)['cells']}
    assert ('EDM', 'heun', 4) in cells and ('EDM-FDM', 'unipc', 5) in cells
    assert cells['EDM', 'unipc', 3] == steps_study['study']['cells'][[(c['network'], c['solver'], c['nfe'])
                                                                       for c in steps_study['study']['cells']].index(('EDM', 'unipc', 3))]
    assert re.search(r'^\| network +\| solver \| NFE 3 +\| NFE 4 +\| NFE 5 +\|$', (outdir / 'steps_study.md').read_text(), re.MULTILINE)
