"""training/training_state.py: states round-trip and are checked at load, --resume finds the newest, --transfer
checks that a snapshot fits the network."""

import copy
import zipfile

import pytest
import torch

from test_checkpoints import SMALL_SONG, deflated_zeros, small_net, zip_archive
from training import loss, training_state


def test_resume_from_a_directory_takes_the_newest_state_of_either_naming(tmp_path):
    for name in ('training-state-000000.999.pt', 'training-state-000001.pt', 'training-state-000001.016.pt',
                 'training-state-000000.pt'):
        (tmp_path / name).write_bytes(b'')
    assert training_state.resolve_resume_path(str(tmp_path)) == str(tmp_path / 'training-state-000001.016.pt')


def write_state(path, **changes):
    """A training state of a small network after one Adam step, with the fields in `changes` replaced."""
    net = small_net().train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.zeros([1, 3, 16, 16]), torch.ones([1]), torch.zeros([1, 10])).sum().backward()
    optimizer.step()
    training_state.save_training_state(path, net, copy.deepcopy(net), optimizer, loss.EDMLoss(), None,
                                    dict(cur_nimg=64, cur_step=1, cur_tick=1, tick_start_nimg=32), 1.5,
                                    [training_state.rng_state(torch.device('cpu'))], 1, None, dict(seed=7))
    if changes:
        state = torch.load(path, weights_only=True)
        for dotted, value in changes.items():
            *parents, key = dotted.split('.')
            target = state
            for parent in parents:
                target = target[int(parent)] if isinstance(target, list) else target[parent]
            target[int(key) if isinstance(target, list) else key] = value
        torch.save(state, path)
    return path


def test_a_written_training_state_loads(tmp_path):
    state = training_state.load_training_state(write_state(tmp_path / 'training-state-000000.pt'))
    assert state['cur_nimg'] == 64 and state['options'] == dict(seed=7)


@pytest.mark.parametrize('changes, fragment', [
    (dict(options=[1, 2]), 'options is a list'),
    (dict(**{'options.seed': 'abc'}), "options.seed is 'abc'"),
    (dict(rng_states=[]), 'rng_states is not a list of 1'),
    (dict(**{'rng_states.0': {}}), 'rng_states[0]'),
    (dict(**{'rng_states.0.torch_cpu': torch.zeros(0, dtype=torch.uint8)}), 'torch_cpu'),
    (dict(cur_nimg=-1000), 'cur_nimg is -1000'),
    (dict(optimizer='garbage'), 'optimizer is not'),
    (dict(optimizer=dict(state=[], param_groups=7)), 'optimizer is not'),
    (dict(net={'w': 3}), 'net is not'),
    (dict(total_time_sec=float('nan')), 'total_time_sec'),
    (dict(world_size=0), 'world_size'),
])
def test_training_state_with_a_wrong_typed_field_is_refused_at_load(tmp_path, changes, fragment):
    path = write_state(tmp_path / 'training-state-000000.pt', **changes)
    with pytest.raises(training_state.TrainingStateError, match='damaged') as info:
        training_state.load_training_state(path)
    assert fragment in str(info.value) and str(path) in str(info.value) and '\n' not in str(info.value)


def test_transfer_into_a_network_with_more_levels_names_the_missing_tensors():
    source = small_net(arch=dict(SMALL_SONG, channel_mult=[1, 2]))
    target = small_net(arch=dict(SMALL_SONG, channel_mult=[1, 2, 2]))
    with pytest.raises(training_state.TrainingStateError, match='88 missing from the snapshot: model.enc.4x4_down') as info:
        training_state.check_transferable(dict(ema=source), target)
    assert '\n' not in str(info.value)


def test_transfer_of_a_network_with_more_tensors_is_refused():
    source = small_net(arch=dict(SMALL_SONG, channel_mult=[1, 2, 2]))
    with pytest.raises(training_state.TrainingStateError, match='not in the network'):
        training_state.check_transferable(dict(ema=source), small_net())


def test_transfer_of_the_same_architecture_is_accepted():
    training_state.check_transferable(dict(ema=small_net()), small_net())


def test_a_state_with_a_deflated_record_is_refused_before_inflating(tmp_path):
    path = write_state(tmp_path / 'training-state-000000.pt')
    source = zipfile.ZipFile(path)
    members = [(info.filename, deflated_zeros(1 << 26), zipfile.ZIP_DEFLATED, 1 << 26, 0) if info.filename.endswith('/data/0')
               else (info.filename, source.read(info), zipfile.ZIP_STORED, info.file_size, info.CRC) for info in source.infolist()]
    path.write_bytes(zip_archive(members))
    with pytest.raises(training_state.TrainingStateError, match="record 'archive/data/0' would inflate to 67108864"):
        training_state.load_training_state(path)
