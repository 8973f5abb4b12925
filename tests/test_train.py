"""train.py: options → config (the published recipes), run directories, and one-line errors for bad input."""

import importlib.util
import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import train
from training import launch
from training import precision as precision_lib
from training import recipes
from training import resume

# The nine published training recipes of the README (options after --outdir/--data).
RECIPES = {
    'cifar10-edm-fdm':  '--cond=1 --arch=ddpmpp --precond=fdm_edm --warmup_ite=200',
    'cifar10-vp-fdm':   '--cond=1 --arch=ddpmpp --cres=1,2,2,2 --precond=fdm_vp --warmup_ite=400',
    'cifar10-ve-fdm':   '--cond=1 --arch=ncsnpp --cres=1,2,2,2 --precond=fdm_ve --warmup_ite=400',
    'ffhq-edm-fdm':     '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15 '
                        '--precond=fdm_edm --warmup_ite=800 --fdm_multipler=1',
    'ffhq-vp-fdm':      '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15 '
                        '--precond=fdm_vp --warmup_ite=400 --fdm_multipler=1',
    'ffhq-ve-fdm':      '--cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15 '
                        '--precond=fdm_ve --warmup_ite=400',
    'afhqv2-edm-fdm':   '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15 '
                        '--precond=fdm_edm --warmup_ite=400',
    'afhqv2-vp-fdm':    '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15 '
                        '--precond=fdm_vp --warmup_ite=400',
    'afhqv2-ve-fdm':    '--cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15 '
                        '--precond=fdm_ve --warmup_ite=400',
}

# What each recipe must produce: (precond class, loss class, warmup_ite, fdm_multiplier, cres, lr, dropout, augment).
EXPECTED = {
    'cifar10-edm-fdm':  ('FDM_EDMPrecond', 'EDMLoss', 200, 2.0, [2, 2, 2],    1e-3, 0.13, 0.12),
    'cifar10-vp-fdm':   ('FDM_VPPrecond',  'VPLoss',  400, 2.0, [1, 2, 2, 2], 1e-3, 0.13, 0.12),
    'cifar10-ve-fdm':   ('FDM_VEPrecond',  'VELoss',  400, 1.0, [1, 2, 2, 2], 1e-3, 0.13, 0.12),
    'ffhq-edm-fdm':     ('FDM_EDMPrecond', 'EDMLoss', 800, 1.0, [1, 2, 2, 2], 2e-4, 0.05, 0.15),
    'ffhq-vp-fdm':      ('FDM_VPPrecond',  'VPLoss',  400, 1.0, [1, 2, 2, 2], 2e-4, 0.05, 0.15),
    'ffhq-ve-fdm':      ('FDM_VEPrecond',  'VELoss',  400, 1.0, [1, 2, 2, 2], 2e-4, 0.05, 0.15),
    'afhqv2-edm-fdm':   ('FDM_EDMPrecond', 'EDMLoss', 400, 2.0, [1, 2, 2, 2], 2e-4, 0.25, 0.15),
    'afhqv2-vp-fdm':    ('FDM_VPPrecond',  'VPLoss',  400, 2.0, [1, 2, 2, 2], 2e-4, 0.25, 0.15),
    'afhqv2-ve-fdm':    ('FDM_VEPrecond',  'VELoss',  400, 1.0, [1, 2, 2, 2], 2e-4, 0.25, 0.15),
}


def write_dataset(path, num_images=8, resolution=16, num_classes=3, seed=0, same_image=False):
    """A dataset ZIP of random RGB images (or one smooth image repeated); labels if classes > 0."""
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, resolution * resolution * 3).reshape(resolution, resolution, 3).astype(np.uint8)
    labels = []
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(num_images):
            buffer = io.BytesIO()
            pixels = smooth if same_image else rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(buffer, 'png')
            name = f'{i // 1000:05d}/img{i:08d}.png'
            archive.writestr(name, buffer.getvalue())
            labels.append([name, i % max(num_classes, 1)])
        archive.writestr('dataset.json', json.dumps({'labels': labels if num_classes else None}))
    return str(path)


@pytest.fixture(scope='module')
def labeled_zip(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'labeled-16x16.zip')


@pytest.fixture(scope='module')
def unlabeled_zip(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'unlabeled-16x16.zip', num_classes=0)


def run_cli(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def printed_config(output):
    """The config dict train.py prints after 'Training options:'."""
    start = output.index('{', output.index('Training options:'))
    return json.JSONDecoder().raw_decode(output[start:])[0]


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert 'Traceback' not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_published_recipe_passes_dry_run_with_its_config(recipe, tmp_path, labeled_zip):
    result = run_cli(f'--outdir={tmp_path}/out', f'--data={labeled_zip}', *RECIPES[recipe].split(), '--dry-run')
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    assert not (tmp_path / 'out').exists()
    c = printed_config(result.output)
    precond, loss, warmup_ite, multiplier, cres, lr, dropout, augment = EXPECTED[recipe]
    net = c['network_kwargs']
    assert net['class_name'] == f'training.networks.{precond}'
    assert c['loss_kwargs'] == {'class_name': f'training.loss.{loss}', 'warmup_ite': warmup_ite}
    assert net['fdm_multiplier'] == multiplier
    assert net['channel_mult'] == cres and net['model_channels'] == 128
    assert net['dropout'] == dropout and net['augment_dim'] == 9 and net['use_fp16'] is False
    assert c['augment_kwargs']['p'] == augment
    assert c['optimizer_kwargs']['lr'] == pytest.approx(lr)
    assert c['batch_size'] == (512 if recipe.startswith('cifar10') else 256)
    assert c['dataset_kwargs']['use_labels'] == recipe.startswith('cifar10')
    arch = 'ncsnpp' if recipe.endswith('ve-fdm') else 'ddpmpp'
    expected_embedding = {'ddpmpp': ('positional', 'standard', 1), 'ncsnpp': ('fourier', 'residual', 2)}[arch]
    assert (net['embedding_type'], net['encoder_type'], net['channel_mult_noise']) == expected_embedding
    assert c['total_kimg'] == 200000 and c['ema_halflife_kimg'] == 500 and c['lr_rampup_kimg'] == 10000


def test_baseline_precond_has_no_fdm_options(tmp_path, unlabeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--precond=edm', '--cbase=16', '--cres=1,2', '-n')
    assert result.exit_code == 0, result.output
    c = printed_config(result.output)
    assert c['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert 'fdm_multiplier' not in c['network_kwargs']
    assert c['loss_kwargs'] == {'class_name': 'training.loss.EDMLoss'}


def test_seed_is_drawn_and_recorded_when_not_given(tmp_path, unlabeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', '-n')
    assert result.exit_code == 0, result.output
    assert isinstance(printed_config(result.output)['seed'], int)


def test_fp16_and_bf16_precision_options(tmp_path, unlabeled_zip):
    common = [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', '-n']
    fp16 = printed_config(run_cli(*common, '--fp16=1').output)
    assert fp16['precision'] == 'fp16' and fp16['network_kwargs']['use_fp16'] is True
    bf16 = printed_config(run_cli(*common, '--precision=bf16').output)
    assert bf16['precision'] == 'bf16' and bf16['network_kwargs']['use_fp16'] is False


@pytest.mark.parametrize('flags, expected', [({'avx512_bf16', 'amx_bf16', 'amx_tile'}, 'bf16'), ({'avx512f', 'avx512_bf16'}, 'bf16'), ({'avx512f', 'avx2'}, 'fp32')])
def test_auto_precision_records_and_prints_what_it_chose(tmp_path, unlabeled_zip, monkeypatch, flags, expected):
    monkeypatch.setattr(precision_lib, 'cpu_flags', lambda: flags)
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', '--device=cpu',
                     '--precision=auto', '-n')
    assert result.exit_code == 0, result.output
    assert printed_config(result.output)['precision'] == expected
    assert len([line for line in result.output.splitlines() if line.startswith(f'Precision auto: {expected} (')]) == 1


def test_label_dropout_is_recorded_in_the_network_options(tmp_path, labeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={labeled_zip}', '--cond=1', '--label_dropout=0.1', '--cbase=16',
                     '--cres=1,2', '-n')
    assert result.exit_code == 0, result.output
    assert printed_config(result.output)['network_kwargs']['label_dropout'] == 0.1


@pytest.mark.parametrize('attn, expected', [('none', []), ('8', [8]), ('16,8', [16, 8])])
def test_blocks_and_attention_resolutions_reach_the_network(tmp_path, unlabeled_zip, attn, expected):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=8', '--cres=1,2', '--blocks=1',
                     f'--attn={attn}', '-n')
    assert result.exit_code == 0, result.output
    network_kwargs = printed_config(result.output)['network_kwargs']
    assert network_kwargs['num_blocks'] == 1 and network_kwargs['attn_resolutions'] == expected


def test_run_directories_are_numbered_and_hold_options(tmp_path):
    first = launch.make_run_dir(str(tmp_path), 'desc', nosubdir=False)
    second = launch.make_run_dir(str(tmp_path), 'desc', nosubdir=False)
    assert first.endswith('00000-desc') and second.endswith('00001-desc')
    assert launch.make_run_dir(str(tmp_path), 'desc', nosubdir=True) == str(tmp_path)


@pytest.mark.parametrize('args, fragments', [
    (['--precond=edm', '--warmup_ite=200'], ['--warmup_ite', 'FDM']),
    (['--precond=vp', '--fdm_multiplier=2'], ['--fdm_multiplier', 'FDM']),
    (['--batch=6', '--batch-gpu=4'], ['--batch-gpu']),
    (['--cres=1,x'], ['--cres']),
    (['--arch=unet'], ['--arch']),
    (['--precision=fp32', '--fp16=1'], ['--fp16']),
    (['--resume=x.pt', '--transfer=y.pkl'], ['--transfer', '--resume']),
    (['--label_dropout=0.1'], ['--label_dropout', '--cond=1']),
    (['--attn=4'], ['--attn', '16,8']),
    (['--attn=x'], ['--attn']),
    (['--blocks=0'], ['--blocks']),
])
def test_inconsistent_options_give_one_line_errors(tmp_path, unlabeled_zip, args, fragments):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', *args, '-n')
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize('cres', ['0', '1,0', '-1', '2-1'])
def test_bad_channel_multipliers_are_one_line_errors_before_any_directory(tmp_path, unlabeled_zip, cres):
    result = run_cli(f'--outdir={tmp_path}/out', f'--data={unlabeled_zip}', '--cbase=8', f'--cres={cres}', '--device=cpu')
    assert_one_line_error(result, '--cres')
    assert not (tmp_path / 'out').exists()


def test_missing_data_option_is_an_error(tmp_path):
    assert_one_line_error(run_cli(f'--outdir={tmp_path}'), '--data')


def test_missing_dataset_file_is_named(tmp_path):
    assert_one_line_error(run_cli(f'--outdir={tmp_path}', f'--data={tmp_path}/none.zip', '-n'), 'none.zip')


def test_cond_without_labels_is_an_error(tmp_path, unlabeled_zip):
    assert_one_line_error(run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cond=1', '-n'), 'label')


def test_cuda_device_without_cuda_is_an_error(tmp_path, unlabeled_zip):
    pytest.importorskip('torch')
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    assert_one_line_error(run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--device=cuda', '-n'), '--device')


def test_transfer_from_a_file_that_is_not_a_snapshot_is_an_error(tmp_path, unlabeled_zip):
    bogus = tmp_path / 'bogus.pkl'
    bogus.write_bytes(b'not a pickle at all')
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2',
                     f'--transfer={bogus}', '-n')
    assert_one_line_error(result, '--transfer', 'bogus.pkl')


@pytest.mark.parametrize('content', [b'', b'garbage' * 100])
def test_resume_from_a_corrupt_state_is_an_error(tmp_path, unlabeled_zip, content):
    state = tmp_path / 'training-state-000001.pt'
    state.write_bytes(content)
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', f'--resume={state}', '-n')
    assert_one_line_error(result, '--resume', 'training-state-000001.pt')


def test_resume_from_a_directory_without_states_is_an_error(tmp_path, unlabeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', f'--resume={tmp_path}', '-n')
    assert_one_line_error(result, '--resume', 'no training-state')


def test_resume_from_a_state_with_a_wrong_typed_field_is_an_error_under_dry_run(tmp_path, unlabeled_zip):
    from test_training_state import write_state
    state = write_state(tmp_path / 'training-state-000000.pt', options=dict(seed='abc'))
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', f'--resume={state}', '-n')
    assert_one_line_error(result, '--resume', "options.seed is 'abc'")


def test_transfer_from_a_snapshot_of_another_architecture_names_the_mismatch(tmp_path, unlabeled_zip):
    from test_checkpoints import SMALL_SONG, save, small_net
    snapshot = save(tmp_path / 'other.pkl', dict(ema=small_net(arch=dict(SMALL_SONG, channel_mult=[1, 2]))))
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2,2', f'--transfer={snapshot}', '-n')
    assert_one_line_error(result, '--transfer', 'other.pkl', 'does not fit the network', 'missing from the snapshot')


def test_resume_auto_finds_the_newest_state_of_the_newest_matching_run(tmp_path):
    assert resume.find_auto_resume(str(tmp_path / 'missing'), 'data-uncond', False) is None
    for name, states in (('00000-data-uncond', [0, 5]), ('00001-data-uncond', [2]), ('00002-data-uncond', []),
                         ('00003-other-uncond', [9])):
        (tmp_path / name).mkdir()
        for kimg in states:
            (tmp_path / name / f'training-state-{kimg:06d}.pt').write_bytes(b'')
    found = resume.find_auto_resume(str(tmp_path), 'data-uncond', False)
    assert found == str(tmp_path / '00001-data-uncond' / 'training-state-000002.pt')
    assert resume.find_auto_resume(str(tmp_path / '00002-data-uncond'), 'data-uncond', True) is None


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, unlabeled_zip, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: None if name == 'tensorboard' else real_find_spec(name, *args))
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', '--tensorboard=1', '-n')
    assert_one_line_error(result, '--tensorboard', 'pip install tensorboard')


def test_tensorboard_is_recorded_in_the_training_options(tmp_path, unlabeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--cbase=16', '--cres=1,2', '-n')
    assert result.exit_code == 0, result.output
    assert printed_config(result.output)['tensorboard'] is False


def test_resume_auto_finds_the_run_of_the_same_command_whatever_its_process_count(tmp_path):
    (tmp_path / '00000-data-uncond-ddpmpp-edm-gpus2-batch8-fp32').mkdir()
    (tmp_path / '00000-data-uncond-ddpmpp-edm-gpus2-batch8-fp32' / 'training-state-000001.pt').write_bytes(b'')
    (tmp_path / '00001-data-uncond-ddpmpp-edm-gpus2-batch16-fp32').mkdir()  # another global batch: another run
    (tmp_path / '00001-data-uncond-ddpmpp-edm-gpus2-batch16-fp32' / 'training-state-000002.pt').write_bytes(b'')
    found = resume.find_auto_resume(str(tmp_path), 'data-uncond-ddpmpp-edm-gpus1-batch8-fp32', False)
    assert found == str(tmp_path / '00000-data-uncond-ddpmpp-edm-gpus2-batch8-fp32' / 'training-state-000001.pt')


PRESET_OF_RECIPE = {name: f'{name.split("-")[0]}-fdm_{name.split("-")[1]}' for name in RECIPES}
QUICKSTART_OPTIONS = ('--cond=1 --arch=ddpmpp --cbase=16 --cres=1,2,2 --blocks=1 --attn=none --precond=fdm_edm '
                      '--warmup_ite=200 --batch=32 --lr=2e-3 --lr_rampup=0.001 --dropout=0 --augment=0')


def test_every_preset_is_a_published_recipe_or_the_quickstart():
    assert sorted(recipes.PRESETS) == sorted([*PRESET_OF_RECIPE.values(), 'quickstart'])


@pytest.mark.parametrize('preset, options', [*((PRESET_OF_RECIPE[name], RECIPES[name]) for name in sorted(RECIPES)),
                                             ('quickstart', QUICKSTART_OPTIONS)])
def test_a_preset_gives_the_configuration_of_its_long_command(preset, options, tmp_path, labeled_zip):
    common = [f'--outdir={tmp_path}', f'--data={labeled_zip}', '--seed=1', '-n']
    long = run_cli(*common, *options.split())
    short = run_cli(*common, f'--preset={preset}')
    assert long.exit_code == 0 and short.exit_code == 0, long.output + short.output
    assert printed_config(short.output) == printed_config(long.output)


def test_options_given_beside_a_preset_override_it(tmp_path, labeled_zip):
    result = run_cli(f'--outdir={tmp_path}', f'--data={labeled_zip}', '--preset=ffhq-fdm_edm', '--lr=1e-4', '--dropout=0.13', '-n')
    assert result.exit_code == 0, result.output
    c = printed_config(result.output)
    assert c['optimizer_kwargs']['lr'] == 1e-4 and c['network_kwargs']['dropout'] == 0.13  # 0.13: also the default
    assert c['loss_kwargs']['warmup_ite'] == 800 and c['batch_size'] == 256
