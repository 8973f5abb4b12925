"""torch_utils.misc: InfiniteSampler determinism/shares/resume, parameter copies, module summary, DDP helpers."""

import contextlib
import itertools
import json
import pathlib
import textwrap

import pytest
import torch

from torch_utils import misc
from conftest import run_torchrun

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_sampler_is_deterministic_from_seed():
    assert take(misc.InfiniteSampler(range(50), seed=3), 120) == take(misc.InfiniteSampler(range(50), seed=3), 120)
    assert take(misc.InfiniteSampler(range(50), seed=3), 120) != take(misc.InfiniteSampler(range(50), seed=4), 120)


def test_sampler_visits_every_item_once_per_epoch():
    indices = take(misc.InfiniteSampler(range(20), seed=0), 60)
    for epoch in range(3):
        assert sorted(indices[epoch * 20:(epoch + 1) * 20]) == list(range(20))
    assert indices[:20] != indices[20:40]


def test_sampler_without_shuffle_walks_in_order():
    assert take(misc.InfiniteSampler(range(4), shuffle=False), 6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize('num_items', [12, 10])
def test_sampler_ranks_get_disjoint_shares_covering_the_dataset(num_items):
    num_replicas = 3
    shares = []
    for rank in range(num_replicas):
        # Rank r holds the global positions r, r+3, ... of the first epoch.
        share_size = len(range(rank, num_items, num_replicas))
        shares.append(set(take(misc.InfiniteSampler(range(num_items), rank=rank, num_replicas=num_replicas,
                                                    seed=7), share_size)))
    assert sum(len(share) for share in shares) == num_items
    assert set().union(*shares) == set(range(num_items))


def test_sampler_ranks_interleave_the_single_process_sequence():
    single = take(misc.InfiniteSampler(range(10), seed=5), 40)
    for rank in range(4):
        assert take(misc.InfiniteSampler(range(10), rank=rank, num_replicas=4, seed=5), 10) == single[rank::4]


@pytest.mark.parametrize('start_index', [0, 1, 7, 13, 31])
def test_sampler_resume_drops_exactly_the_items_already_yielded(start_index):
    kwargs = dict(rank=1, num_replicas=3, seed=11)
    original = take(misc.InfiniteSampler(range(13), **kwargs), start_index + 25)
    resumed = take(misc.InfiniteSampler(range(13), start_index=start_index, **kwargs), 25)
    assert resumed == original[start_index:]


@pytest.mark.parametrize('kwargs, message', [
    (dict(rank=2, num_replicas=2), 'rank'),
    (dict(start_index=-1), 'start_index'),
    (dict(seed=-1), 'seed'),
    (dict(window_size=0), 'window_size'),
])
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        misc.InfiniteSampler(range(5), **kwargs)


def test_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match='empty'):
        misc.InfiniteSampler([])


def make_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def test_copy_params_and_buffers_makes_outputs_identical():
    src, dst = make_net(0), make_net(1)
    src.train()(torch.randn(8, 4))  # moves BatchNorm's running statistics away from their initial values
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b), name
    x = torch.randn(5, 4)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_copy_params_and_buffers_keeps_destination_tensors_and_grad_flags():
    src, dst = make_net(0), make_net(1)
    weight = dst[0].weight
    misc.copy_params_and_buffers(src, dst)
    assert dst[0].weight is weight and weight.requires_grad


def test_copy_params_and_buffers_skips_or_requires_missing_names():
    src = torch.nn.Sequential(torch.nn.Linear(4, 3))
    dst = make_net(1)
    bias_before = dst[2].bias.clone()
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[2].bias, bias_before)
    with pytest.raises(ValueError, match="'1.weight'"):
        misc.copy_params_and_buffers(src, dst, require_all=True)


def test_copy_params_and_buffers_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="'weight'.*shape"):
        misc.copy_params_and_buffers(torch.nn.Linear(4, 3), torch.nn.Linear(4, 2))


def test_named_params_and_buffers_lists_both():
    names = [name for name, _ in misc.named_params_and_buffers(make_net(0))]
    assert names[:6] == ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
    assert set(names[6:]) == {'1.running_mean', '1.running_var', '1.num_batches_tracked'}


def test_print_module_summary_prints_table_and_returns_outputs(capsys):
    net = make_net(0).eval()
    x = torch.randn(2, 4)
    outputs = misc.print_module_summary(net, [x], max_nesting=1)
    assert torch.equal(outputs, net(x))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['Module', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    rows = {line.split()[0]: line.split() for line in lines if line and not line.startswith('-')}
    assert rows['0'] == ['0', '15', '0', '[2,', '3]', 'float32']
    assert rows['1'] == ['1', '6', '7', '[2,', '3]', 'float32']
    assert rows['Total'] == ['Total', '29', '7']


def test_print_module_summary_stops_at_max_nesting(capsys):
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    misc.print_module_summary(net, torch.zeros(1, 2), max_nesting=1)
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if not line.startswith('-')]
    assert names == ['<top-level', '0', 'Total']


def test_check_ddp_consistency_is_a_no_op_in_a_single_process():
    misc.check_ddp_consistency(make_net(0))


@pytest.mark.parametrize('sync, expect_no_sync', [(False, True), (True, False)])
def test_ddp_sync_enters_no_sync_only_when_not_syncing(monkeypatch, sync, expect_no_sync):
    DDP = torch.nn.parallel.DistributedDataParallel
    entered = []

    @contextlib.contextmanager
    def no_sync(self):
        entered.append(True)
        yield

    monkeypatch.setattr(DDP, 'no_sync', no_sync)
    ddp = DDP.__new__(DDP)  # constructing a real DDP needs a process group; only the type matters here
    with misc.ddp_sync(ddp, sync):
        pass
    assert entered == ([True] if expect_no_sync else [])


def test_ddp_sync_passes_plain_modules_through():
    net = make_net(0)
    with misc.ddp_sync(net, sync=False):
        net(torch.randn(3, 4)).sum().backward()
    assert net[0].weight.grad is not None


CONSISTENCY_SCRIPT = """
    import json, sys
    import torch
    from torch_utils import distributed, misc

    distributed.init('cpu')
    rank = distributed.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    net.weight.data[0, 0] = float('nan')  # NaN on every rank counts as equal
    result = dict()
    misc.check_ddp_consistency(net)
    if rank == 1:
        with torch.no_grad():
            net.bias += 1
    try:
        misc.check_ddp_consistency(net)
    except ValueError as err:
        result['error'] = str(err)
    misc.check_ddp_consistency(net, ignore_regex=r'.*\\.bias')
    with open(sys.argv[1] + f'/rank{rank}.json', 'w') as f:
        json.dump(result, f)
    distributed.shutdown()
"""


def test_check_ddp_consistency_names_the_differing_tensor_on_every_rank(tmp_path):
    script = tmp_path / 'consistency.py'
    script.write_text(textwrap.dedent(CONSISTENCY_SCRIPT))
    run_torchrun([script, tmp_path], cwd=tmp_path, timeout=120)
    for rank in range(2):
        output = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert output == dict(error='check_ddp_consistency: Linear.bias differs from rank 0 on 1 rank(s)')
