"""train.py --ema_profiles and reconstruct_ema.py: profiles at snapshots, bit-exact resume, reconstruction, errors."""

import torch
from click.testing import CliRunner

import generate
import reconstruct_ema
from test_fid import assert_one_line_error
from training import checkpoints, training_state


def reconstruct(*args):
    return CliRunner().invoke(reconstruct_ema.main, [str(a) for a in args])


def test_profiles_are_written_at_snapshots_with_their_record(posthoc_runs):
    data = checkpoints.load_network_pickle(posthoc_runs['straight'] / 'power-ema-000000.032-0.050.pkl')
    record = data['power_ema']
    assert record['std'] == 0.05 and record['step'] == 4 and record['nimg'] == 32 and record['gamma'] > 0
    assert isinstance(data['ema'], torch.nn.Module)


def test_resume_keeps_the_profiles_bit_exact(posthoc_runs):
    straight, resumed = (training_state.load_training_state(training_state.resolve_resume_path(str(posthoc_runs[name])))
                         for name in ('straight', 'resumed'))
    assert straight['power_ema']['step'] == resumed['power_ema']['step'] == 4
    for a, b in zip(straight['power_ema']['emas'], resumed['power_ema']['emas']):
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_reconstructing_a_stored_profile_reproduces_its_tensors(posthoc_runs, tmp_path):
    dest = tmp_path / 'ema-0.100.pkl'
    result = reconstruct('--run', posthoc_runs['straight'], '--std', 0.1, '--dest', dest)
    assert result.exit_code == 0, result.output
    stored = checkpoints.load_network_pickle(posthoc_runs['straight'] / 'power-ema-000000.032-0.100.pkl')['ema']
    rebuilt = checkpoints.load_network_pickle(dest)['ema']
    for (name, a), (_, b) in zip(stored.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item()), name


def test_an_in_between_std_gives_a_network_generate_py_samples_from(posthoc_runs, tmp_path):
    dest = tmp_path / 'ema-0.070.pkl'
    result = reconstruct('--run', posthoc_runs['straight'], '--std', 0.07, '--kimg', 0, '--dest', dest)
    assert result.exit_code == 0, result.output
    assert checkpoints.load_network_pickle(dest)['power_ema']['std'] == 0.07
    result = CliRunner().invoke(generate.main, [f'--network={dest}', f'--outdir={tmp_path / "images"}', '--seeds=0-1', '--steps=2'])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / 'images').glob('*.png'))) == 2


def test_bad_std_is_a_one_line_error(posthoc_runs, tmp_path):
    assert_one_line_error(reconstruct('--run', posthoc_runs['straight'], '--std', 0.5, '--dest', tmp_path / 'x.pkl'), 'σ_rel')


def test_run_dir_without_profiles_is_a_one_line_error(tmp_path):
    assert_one_line_error(reconstruct('--run', tmp_path, '--std', 0.05, '--dest', tmp_path / 'x.pkl'), 'no power-ema')


def test_missing_snapshot_kimg_is_a_one_line_error(posthoc_runs, tmp_path):
    assert_one_line_error(reconstruct('--run', posthoc_runs['straight'], '--std', 0.05, '--kimg', 5, '--dest', tmp_path / 'x.pkl'), '--kimg')


def test_safetensors_profiles_reconstruct_what_their_pickles_do(posthoc_runs, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    for path in posthoc_runs['straight'].glob('power-ema-*.pkl'):
        checkpoints.save_network_safetensors(run / (path.stem + '.safetensors'), checkpoints.load_network(path))
    for source, dest in ((posthoc_runs['straight'], tmp_path / 'from-pickles.pkl'), (run, tmp_path / 'from-safetensors.safetensors')):
        result = reconstruct('--run', source, '--std', 0.07, '--dest', dest)
        assert result.exit_code == 0, result.output
    expected = checkpoints.load_network(tmp_path / 'from-pickles.pkl')
    rebuilt = checkpoints.load_network(tmp_path / 'from-safetensors.safetensors')
    assert rebuilt['power_ema'] == dict(expected['power_ema'], sources=[name.replace('.pkl', '.safetensors') for name in expected['power_ema']['sources']])
    for (name, a), (_, b) in zip(expected['ema'].state_dict().items(), rebuilt['ema'].state_dict().items()):
        assert torch.equal(a, b), name


def profile_run(folder, nan_in=None):
    """A run folder of two power-EMA profiles of a small network; `nan_in` names a σ_rel whose profile holds a NaN."""
    from training import ema, networks
    folder.mkdir()
    for std in (0.05, 0.1):
        torch.manual_seed(0)
        net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                                  attn_resolutions=[])
        if std == nan_in:
            with torch.no_grad():
                next(net.parameters()).view(-1)[0] = float('nan')
        record = dict(std=std, gamma=ema.gamma_from_std(std), step=4, nimg=32)
        checkpoints.save_network_pickle(folder / checkpoints.power_ema_name(32, std), dict(ema=net, power_ema=record))
    return folder


def test_a_destination_under_a_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_bytes(b'')
    result = reconstruct('--run', profile_run(tmp_path / 'run'), '--std', 0.07, '--dest', tmp_path / 'file' / 'x.pkl')
    assert_one_line_error(result, f'cannot write to {tmp_path / "file"}')


def test_a_profile_with_a_nan_is_one_line_naming_the_file_and_tensor(tmp_path):
    run = profile_run(tmp_path / 'run', nan_in=0.1)
    result = reconstruct('--run', run, '--std', 0.07, '--dest', tmp_path / 'x.pkl')
    assert_one_line_error(result, f'{run / checkpoints.power_ema_name(32, 0.1)}: the network\'s')
    assert 'NaN or infinite' in result.output and not (tmp_path / 'x.pkl').exists()


def test_a_tiny_std_is_one_line(tmp_path):
    assert_one_line_error(reconstruct('--run', profile_run(tmp_path / 'run'), '--std', 1e-300, '--dest', tmp_path / 'x.pkl'),
                          '--std')
