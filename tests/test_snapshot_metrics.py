"""training/snapshot_metrics.py through train.py --metrics=fid: one line per snapshot and network, the value of
fid.py calc for that snapshot, and resume without duplicates."""

import json

import pytest
from click.testing import CliRunner

import fid
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
