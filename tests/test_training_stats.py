"""torch_utils.training_stats: moments of reported samples, collection intervals, reduction over 2 gloo ranks."""

import json
import math
import pathlib
import textwrap

import numpy as np
import pytest
import torch

from torch_utils import training_stats
from conftest import run_torchrun

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch):
    """Each test starts with no reported statistics."""
    monkeypatch.setattr(training_stats, '_moments', dict())


def test_report_counts_every_tensor_element_as_a_sample():
    values = [0.5, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0], [5.0]], dtype=torch.float16), 6]
    for value in values:
        training_stats.report('Loss/loss', value)
    collector = training_stats.Collector()
    collector.update()
    samples = np.array([0.5, 1, 2, 3, 4, 5, 6], dtype=np.float64)
    assert collector.num('Loss/loss') == 7
    assert collector.mean('Loss/loss') == pytest.approx(samples.mean(), rel=1e-12)
    assert collector.std('Loss/loss') == pytest.approx(samples.std(), rel=1e-12)


def test_report_returns_its_value():
    value = torch.tensor([1.0, 2.0])
    assert training_stats.report('x', value) is value


def test_moments_accumulate_in_float64():
    # In float32 the tiny samples would vanish next to the first one: 1 + 1e-9 rounds to 1.
    training_stats.report('x', 1.0)
    for _ in range(1000):
        training_stats.report('x', torch.tensor(1e-9, dtype=torch.float64))
    collector = training_stats.Collector()
    collector.update()
    assert collector.mean('x') == pytest.approx((1.0 + 1000 * 1e-9) / 1001, rel=1e-12)


def test_collector_sees_only_samples_since_its_last_update():
    collector = training_stats.Collector()
    training_stats.report('x', [1.0, 3.0])
    collector.update()
    training_stats.report('x', [10.0])
    collector.update()
    assert collector.num('x') == 1 and collector.mean('x') == 10.0 and collector.std('x') == 0.0


def test_non_finite_samples_are_left_out_and_spoil_no_later_interval():
    collector = training_stats.Collector(keep_previous=False)
    training_stats.report('Loss/loss', torch.tensor([1.0, float('nan'), float('inf')]))
    collector.update()
    assert collector.num('Loss/loss') == 1 and collector.mean('Loss/loss') == 1.0
    training_stats.report('Loss/loss', torch.tensor([float('nan')]))
    collector.update()
    assert collector.num('Loss/loss') == 0
    training_stats.report('Loss/loss', [2.0, 4.0])
    collector.update()
    assert collector.num('Loss/loss') == 2 and collector.mean('Loss/loss') == 3.0


def test_collectors_are_independent():
    early, late = training_stats.Collector(), training_stats.Collector()
    training_stats.report('x', 1.0)
    early.update()
    training_stats.report('x', 3.0)
    late.update()
    assert early.mean('x') == 1.0
    assert late.mean('x') == 2.0 and late.num('x') == 2


def test_keep_previous_controls_statistics_without_new_samples():
    keeping, dropping = training_stats.Collector(keep_previous=True), training_stats.Collector(keep_previous=False)
    training_stats.report('x', 2.0)
    for collector in (keeping, dropping):
        collector.update()
        collector.update()
    assert keeping.mean('x') == 2.0
    assert dropping.num('x') == 0 and math.isnan(dropping.mean('x'))


def test_regex_selects_statistics():
    training_stats.report('Loss/loss', 1.0)
    training_stats.report('Timing/sec_per_tick', 2.0)
    collector = training_stats.Collector(regex='Loss/.*')
    collector.update()
    assert collector.names() == ['Loss/loss']


def test_as_dict_lists_num_mean_std():
    training_stats.report('x', [1.0, 3.0])
    training_stats.report0('y', 5.0)
    collector = training_stats.Collector()
    collector.update()
    assert collector.as_dict() == {'x': dict(num=2, mean=2.0, std=1.0), 'y': dict(num=1, mean=5.0, std=0.0)}
    assert json.loads(json.dumps(collector.as_dict()))['x']['mean'] == 2.0


def test_unknown_statistic_has_no_samples():
    collector = training_stats.Collector()
    collector.update()
    assert collector.num('never') == 0 and math.isnan(collector.mean('never')) and math.isnan(collector.std('never'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_samples_on_cuda_and_cpu_are_collected_together():
    training_stats.report('x', torch.tensor([1.0, 2.0], device='cuda'))
    training_stats.report('x', torch.tensor([3.0]))
    collector = training_stats.Collector()
    collector.update()
    assert collector.num('x') == 3 and collector.mean('x') == 2.0


REDUCE_SCRIPT = """
    import json, sys
    import torch
    from torch_utils import distributed, training_stats

    device = distributed.init('cpu')
    rank = distributed.get_rank()
    training_stats.report('Loss/loss', torch.arange(1, 4 + rank * 2, dtype=torch.float32) * (rank + 1))
    if rank == 1:
        training_stats.report('Only/rank1', [7.0, 9.0])
    training_stats.report0('Progress/kimg', 12.5)
    collector = training_stats.Collector()
    collector.update()
    with open(sys.argv[1] + f'/rank{rank}.json', 'w') as f:
        json.dump(dict(stats=collector.as_dict(), world=distributed.get_world_size(), backend=distributed.get_backend()), f)
    distributed.shutdown()
"""


def test_collector_reduces_across_two_gloo_ranks(tmp_path):
    script = tmp_path / 'reduce.py'
    script.write_text(textwrap.dedent(REDUCE_SCRIPT))
    run_torchrun([script, tmp_path], cwd=tmp_path, timeout=120)

    loss_samples = np.concatenate([np.arange(1, 4) * 1.0, np.arange(1, 6) * 2.0])
    expected = {
        'Loss/loss': dict(num=len(loss_samples), mean=loss_samples.mean(), std=loss_samples.std()),
        'Only/rank1': dict(num=2, mean=8.0, std=1.0),
        'Progress/kimg': dict(num=1, mean=12.5, std=0.0),
    }
    for rank in range(2):
        output = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert output['world'] == 2 and output['backend'] == 'gloo'
        assert output['stats'].keys() == expected.keys()
        for name, stats in expected.items():
            assert output['stats'][name]['num'] == stats['num']
            assert output['stats'][name]['mean'] == pytest.approx(stats['mean'], rel=1e-12)
            assert output['stats'][name]['std'] == pytest.approx(stats['std'], rel=1e-12)
