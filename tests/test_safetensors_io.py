"""training/safetensors_io.py, the format dispatch of training/checkpoints.py and training/convert.py: a snapshot in
safetensors samples what its pickle samples, published pickles convert, hostile metadata is one line, and reading a
safetensors file unpickles nothing."""

import json
import pickle
import struct
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import generate
import train
from test_checkpoints import SMALL_ADM, net_output, small_net, write_published
from test_generate import read_tree
from test_train import write_dataset
from training import augment, checkpoints, convert, loss, training_state

REPO_ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[1])


def snapshot(net=None):
    loss_fn = loss.EDMLoss(P_mean=-1.0, warmup_ite=100)
    for _ in range(3):
        loss_fn.advance()
    return dict(ema=net or small_net(), loss_fn=loss_fn, augment_pipe=augment.AugmentPipe(p=0.12, xflip=1),
                dataset_kwargs=dict(path='data.zip', resolution=16), power_ema=dict(std=0.05, step=4))


def generate_pngs(network, outdir):
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={network}', f'--outdir={outdir}', '--seeds=0-2',
                                                '--steps=3', '--class=1'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return read_tree(outdir)


def test_snapshot_round_trips_with_its_loss_augment_pipe_and_records(tmp_path):
    data = snapshot()
    path = tmp_path / 'network-snapshot-000000.safetensors'
    checkpoints.save_network_safetensors(path, data)
    loaded = checkpoints.load_network(path)
    assert type(loaded['ema']) is type(data['ema']) and not loaded['ema'].training
    assert torch.equal(net_output(loaded['ema']), net_output(data['ema']))
    assert type(loaded['loss_fn']) is loss.EDMLoss and loaded['loss_fn'].P_mean == -1.0 and loaded['loss_fn'].step == 3
    assert type(loaded['augment_pipe']) is augment.AugmentPipe and loaded['augment_pipe'].init_kwargs == dict(p=0.12, xflip=1)
    assert loaded['dataset_kwargs'] == data['dataset_kwargs'] and loaded['power_ema'] == data['power_ema']


def test_the_file_is_a_plain_state_dict_with_the_class_and_arguments_in_its_metadata(tmp_path):
    net = small_net('FDM_EDMPrecond')
    path = tmp_path / 'net.safetensors'
    checkpoints.save_network_safetensors(path, dict(ema=net))
    with safetensors.safe_open(str(path), 'pt') as f:
        metadata = f.metadata()
    assert json.loads(metadata['ema']) == dict(class_name='training.networks.FDM_EDMPrecond', init_kwargs=json.loads(json.dumps(net.init_kwargs)))
    assert safetensors.torch.load_file(str(path)).keys() == net.state_dict().keys()


def test_the_format_is_told_by_content_not_by_name(tmp_path):
    net = small_net()
    checkpoints.save_network_safetensors(tmp_path / 'looks-like.pkl', dict(ema=net))
    checkpoints.save_network_pickle(tmp_path / 'looks-like.safetensors', dict(ema=net))
    for name in ('looks-like.pkl', 'looks-like.safetensors'):
        assert torch.equal(net_output(checkpoints.load_network(tmp_path / name)['ema']), net_output(net))


def test_reading_a_safetensors_file_unpickles_nothing(tmp_path, monkeypatch):
    path = tmp_path / 'net.safetensors'
    checkpoints.save_network_safetensors(path, snapshot())

    def refuse(*args, **kwargs):
        raise AssertionError('unpickling')
    for module, name in ((pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'), (pickle, '_Unpickler'), (torch, 'load')):
        monkeypatch.setattr(module, name, refuse)
    assert isinstance(checkpoints.load_network(path)['ema'], torch.nn.Module)


def test_a_safetensors_snapshot_samples_the_same_pngs_as_its_pickle(tmp_path):
    data = snapshot()
    written = checkpoints.save_network(tmp_path / 'network-snapshot-000000.pkl', data, 'both')
    assert written == [str(tmp_path / 'network-snapshot-000000.pkl'), str(tmp_path / 'network-snapshot-000000.safetensors')]
    from_pickle = generate_pngs(written[0], tmp_path / 'pickle')
    assert len(from_pickle) == 3 and generate_pngs(written[1], tmp_path / 'safetensors') == from_pickle


def test_a_published_pickle_converts_and_samples_identically(tmp_path):
    net = small_net('FDM_VEPrecond', SMALL_ADM, fdm_multiplier=2.0)  # loaded with the published m = 1, which must carry over
    published = write_published(tmp_path / 'published.pkl', dict(ema=net, dataset_kwargs=dict(resolution=16)), tmp_path / 'marker')
    result = subprocess.run([sys.executable, '-m', 'training.convert', str(published), str(tmp_path / 'converted.safetensors')],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    converted = checkpoints.load_network(tmp_path / 'converted.safetensors')
    assert converted['ema'].fdm_multiplier == 1 and converted['dataset_kwargs'] == dict(resolution=16)
    assert generate_pngs(tmp_path / 'converted.safetensors', tmp_path / 'b') == generate_pngs(published, tmp_path / 'a')
    assert not (tmp_path / 'marker').exists()


def test_convert_refuses_an_unreadable_source_with_one_line(tmp_path):
    (tmp_path / 'noise.pkl').write_bytes(b'not a network')
    result = CliRunner().invoke(convert.main, [str(tmp_path / 'noise.pkl'), str(tmp_path / 'out.safetensors')])
    assert result.exit_code == 1 and result.output.count('\n') == 1 and 'noise.pkl' in result.output, result.output
    assert not (tmp_path / 'out.safetensors').exists()


def test_transfer_reads_a_safetensors_snapshot(tmp_path):
    path = tmp_path / 'net.safetensors'
    checkpoints.save_network_safetensors(path, dict(ema=small_net()))
    assert isinstance(training_state.load_transfer(str(path), small_net(), verbose=False)['ema'], torch.nn.Module)


def test_a_training_run_writes_snapshots_and_profiles_in_both_formats(tmp_path):
    data = write_dataset(tmp_path / 'data.zip', num_images=8, resolution=8, num_classes=0)
    args = [f'--outdir={tmp_path / "run"}', f'--data={data}', '--nosubdir', '--device=cpu', '--cbase=8', '--cres=1',
            '--batch=4', '--duration=0.000008', '--tick=0.004', '--workers=0', '--seed=0', '--augment=0',
            '--ema_profiles=0.1', '--format=both']
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / 'run').iterdir() if p.name.startswith(('network-', 'power-ema')))
    stems = {name.rsplit('.', 1)[0] for name in names}
    assert {stem.split('-0')[0] for stem in stems} == {'network-snapshot', 'power-ema'}
    assert names == sorted(f'{stem}.{ext}' for stem in stems for ext in ('pkl', 'safetensors'))
    for stem in stems:
        from_pickle = checkpoints.load_network(tmp_path / 'run' / f'{stem}.pkl')['ema']
        from_safetensors = checkpoints.load_network(tmp_path / 'run' / f'{stem}.safetensors')['ema']
        assert torch.equal(net_output(from_pickle), net_output(from_safetensors))


def rewrite(path, tensors=None, metadata=None, header_bytes=None):
    """The safetensors file at `path` with its tensors or metadata replaced, or its raw header."""
    data = path.read_bytes()
    length = struct.unpack('<Q', data[:8])[0]
    if header_bytes is None:
        with safetensors.safe_open(str(path), 'pt') as f:
            old_metadata = f.metadata()
        stored = safetensors.torch.load(data)
        new = safetensors.torch.save(tensors(stored) if tensors else stored, metadata(old_metadata) if metadata else old_metadata)
        path.write_bytes(new)
    else:
        path.write_bytes(struct.pack('<Q', len(header_bytes)) + header_bytes + data[8 + length:])
    return path


def with_ema(edit):
    def change(metadata):
        entry = json.loads(metadata['ema'])
        edit(entry)
        return dict(metadata, ema=json.dumps(entry))
    return change


HOSTILE_METADATA = {
    'unknown class': (dict(metadata=with_ema(lambda e: e.update(class_name='os.system'))), 'refusing to rebuild os.system'),
    'unknown argument': (dict(metadata=with_ema(lambda e: e['init_kwargs'].update(evil=1))), "unexpected keyword argument 'evil'"),
    'float channels': (dict(metadata=with_ema(lambda e: e['init_kwargs'].update(model_channels=16.5))), 'cannot build EDMPrecond'),
    'huge network': (dict(metadata=with_ema(lambda e: e['init_kwargs'].update(model_channels=1024, channel_mult=[16]))), 'more than the limit'),
    'endless blocks': (dict(metadata=with_ema(lambda e: e['init_kwargs'].update(num_blocks=10**6))), 'torch operations and modules'),
    'non-JSON': (dict(metadata=lambda m: dict(m, ema='{"class_name": ')), "metadata 'ema' is not JSON"),
    'no class': (dict(metadata=lambda m: dict(m, ema='[1, 2]')), 'no class_name and init_kwargs'),
    'not ours': (dict(metadata=lambda m: {'format': 'pt'}), 'not a network file of this project'),
    'loss as network': (dict(metadata=with_ema(lambda e: e.update(class_name='training.loss.EDMLoss', init_kwargs={}))), 'not a network'),
    'missing tensor': (dict(tensors=lambda t: {k: v for k, v in t.items() if 'map_layer0.bias' not in k}), '1 missing: model.map_layer0.bias'),
    'extra tensor': (dict(tensors=lambda t: dict(t, evil=torch.zeros(3))), '1 unexpected: evil'),
    'reshaped tensor': (dict(tensors=lambda t: {k: v.reshape(-1) if k == 'model.map_layer0.weight' else v for k, v in t.items()}),
                        'of another shape: model.map_layer0.weight'),
    'integer tensor': (dict(tensors=lambda t: dict(t, **{'model.map_layer0.bias': t['model.map_layer0.bias'].long()})), 'not a floating-point'),
    'header not JSON': (dict(header_bytes=b'{"__metadata__": nonsense}'), 'header is not JSON'),
    'header without our metadata': (dict(header_bytes=b'{"__metadata__": {}, "w": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 4000000000]}}'),
                                    'not a network file of this project'),
}


@pytest.mark.parametrize('case', sorted(HOSTILE_METADATA))
def test_hostile_metadata_is_a_one_line_error_naming_the_file(tmp_path, case):
    path = tmp_path / 'hostile.safetensors'
    checkpoints.save_network_safetensors(path, dict(ema=small_net()))
    changes, fragment = HOSTILE_METADATA[case]
    rewrite(path, **changes)
    with pytest.raises(ValueError) as info:
        checkpoints.load_network(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and '\n' not in message, message


def test_a_truncated_safetensors_file_is_refused_before_reading_its_data(tmp_path):
    path = tmp_path / 'cut.safetensors'
    checkpoints.save_network_safetensors(path, dict(ema=small_net()))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match='truncated'):
        checkpoints.load_network(path)


def test_generate_refuses_hostile_metadata_with_one_line(tmp_path):
    path = tmp_path / 'hostile.safetensors'
    checkpoints.save_network_safetensors(path, dict(ema=small_net()))
    rewrite(path, metadata=with_ema(lambda e: e.update(class_name='builtins.eval')))
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={path}', f'--outdir={tmp_path / "out"}', '--seeds=0'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 1 and len(errors) == 1 and 'refusing to rebuild builtins.eval' in errors[0], result.output
    assert 'Traceback' not in result.output
