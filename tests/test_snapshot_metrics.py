"""training/snapshot_metrics.py through train.py --metrics=fid: one line per snapshot and network, the value of
fid.py calc for that snapshot, and resume without duplicates."""

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

import fid
from training import metrics, snapshot_metrics
from conftest import run_torchrun
from test_fid import fid_of


def lines(run_dir):
    return [json.loads(text) for text in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_one_line_per_snapshot_and_network(posthoc_runs):
    found = [(line['nimg'], line['network']) for line in lines(posthoc_runs['straight'])]
    networks = ['ema', 'power-ema-0.050', 'power-ema-0.100']
    assert found == [(nimg, name) for nimg in (8, 24, 32) for name in networks]
    line = lines(posthoc_runs['straight'])[-1]
    assert line['metric'] == 'fid' and line['num_images'] == 4 and line['detector'].startswith('pooled.pt sha256:')
    assert line['kimg'] == 0.032 and line['seconds'] >= 0


def test_value_equals_fid_py_calc_of_the_snapshot(posthoc_runs):
    ema_line = [line for line in lines(posthoc_runs['straight']) if line['network'] == 'ema'][-1]
    result = CliRunner().invoke(fid.main, [str(a) for a in [
        'calc', '--network', posthoc_runs['straight'] / 'network-snapshot-000000.032.pkl', '--ref', posthoc_runs['ref'],
        '--num', 4, '--detector', posthoc_runs['detector'], '--device', 'cpu', '--precision', 'fp32']])
    assert ema_line['value'] == pytest.approx(fid_of(result), rel=1e-4)


def test_resume_continues_the_file_without_duplicates(posthoc_runs):
    resumed = lines(posthoc_runs['resumed'])
    keys = [(line['nimg'], line['network']) for line in resumed]
    assert len(keys) == len(set(keys))
    assert sorted({line['nimg'] for line in resumed}) == [8, 16, 32]  # 8 and 16 from the resumed run's file
    straight_last = {line['network']: line['value'] for line in lines(posthoc_runs['straight']) if line['nimg'] == 32}
    resumed_last = {line['network']: line['value'] for line in resumed if line['nimg'] == 32}
    assert resumed_last == straight_last


def test_two_processes_measure_the_same_fid_as_one(posthoc_runs, tmp_path):
    """Under torchrun the seeds are split and the feature statistics summed across ranks: the values agree with a
    single process where the two runs' weights still agree (the first snapshot)."""
    outdir = tmp_path / 'two'
    options = json.loads((posthoc_runs['straight'] / 'training_options.json').read_text())
    metric = options['metric_kwargs']
    run_torchrun(['train.py', f'--outdir={outdir}', f'--data={posthoc_runs["data"]}', '--nosubdir', '--device=cpu',
                  '--cbase=16', '--cres=1,2', '--batch=8', f'--duration={4 * 8 / 1e6}', '--tick=0.016', '--snap=1',
                  '--dump=1', '--workers=0', '--seed=7', '--lr=2e-3', '--lr_rampup=0.00002', '--ema=0.00002', '--augment=0',
                  '--ema_profiles=0.05,0.1', '--metrics=fid', f'--metric_ref={posthoc_runs["ref"]}', '--metric_num=4',
                  f'--metric_detector={posthoc_runs["detector"]}', '--metric_profiles=True'])
    assert metric['num_images'] == 4
    one = {(line['nimg'], line['network']): line['value'] for line in lines(posthoc_runs['straight'])}
    two = {(line['nimg'], line['network']): line['value'] for line in lines(outdir)}
    assert two.keys() == one.keys()
    first_nimg = min(nimg for nimg, _ in one)  # one step in: the weights differ only by the rounding of the gradient sum
    for (nimg, network), value in one.items():
        if nimg == first_nimg:  # later, that rounding grows through training, and a 4-image FID magnifies it
            assert two[nimg, network] == pytest.approx(value, rel=1e-4), network


def test_any_sampler_measures_what_fid_py_calc_measures_with_its_options(posthoc_runs):
    snapshot = posthoc_runs['straight'] / 'network-snapshot-000000.032.pkl'
    measure = snapshot_metrics.SnapshotMetrics(None, torch.device('cpu'), ref=str(posthoc_runs['ref']), num_images=4,
                                               detector=str(posthoc_runs['detector']), sampler_name='unipc',
                                               sampler_kwargs=dict(num_steps=4, afs=True))
    net = pickle.loads(snapshot.read_bytes())['ema']
    stats = measure.feature_statistics(net)
    value = metrics.frechet_distance(*stats.mean_cov(), measure.reference['mu'], measure.reference['sigma'])
    result = CliRunner().invoke(fid.main, [str(a) for a in [
        'calc', '--network', snapshot, '--ref', posthoc_runs['ref'], '--num', 4, '--detector', posthoc_runs['detector'],
        '--device', 'cpu', '--precision', 'fp32', '--solver', 'unipc', '--nfe', 3, '--afs']])
    assert value == pytest.approx(fid_of(result), rel=1e-4)


def test_sampler_options_that_cannot_work_are_a_setup_error():
    with pytest.raises(snapshot_metrics.MetricSetupError, match='order 4 needs at least 4 steps'):
        snapshot_metrics.SnapshotMetrics(None, torch.device('cpu'), ref='unused.npz', sampler_name='ipndm',
                                         sampler_kwargs=dict(num_steps=3, order=4))
