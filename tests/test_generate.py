"""generate.py: per-seed PNGs independent of batching and process count, grids, option handling, errors."""

import io
import os
import pickle
import resource

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from training import cli, networks, sampling
from training import precision as precision_lib
from conftest import run_torchrun

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = '0-3,1000'


def tiny_net(label_dim, label_dropout=0, img_resolution=8):
    """A small EDM net whose weights are perturbed, so that the images depend on every input (labels too)."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=img_resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
        label_dropout=label_dropout).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return net


@pytest.fixture(scope='module')
def network_pickles(tmp_path_factory):
    """Snapshots in this project's format: conditional (4 classes; trained with label dropout or not), unconditional,
    and a conditional one of another resolution."""
    folder = tmp_path_factory.mktemp('networks')
    paths = {}
    for name, kwargs in (('cond', dict(label_dim=4)), ('uncond', dict(label_dim=0)),
                         ('cfg', dict(label_dim=4, label_dropout=0.1)), ('cond16', dict(label_dim=4, img_resolution=16))):
        paths[name] = folder / f'{name}.pkl'
        paths[name].write_bytes(pickle.dumps({'ema': tiny_net(**kwargs)}))
    return paths


def run_generate(*args):
    """generate.py in this process, on the CPU."""
    return CliRunner().invoke(generate.main, ['--device', 'cpu'] + [str(arg) for arg in args], catch_exceptions=False)


def generate_files(network, outdir, *extra):
    result = run_generate('--network', network, '--outdir', outdir, '--seeds', SEEDS, '--steps', 3, *extra)
    assert result.exit_code == 0, result.output
    return read_tree(outdir)


def read_tree(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), 'rb').read()
        for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope='module')
def batch3_run(network_pickles, tmp_path_factory):
    """PNG files (name → bytes) and the grid of a run with --batch 3 --grid."""
    folder = tmp_path_factory.mktemp('batch3')
    files = generate_files(network_pickles['cond'], folder / 'out', '--batch', 3, '--grid', folder / 'grid.png')
    return files, np.asarray(PIL.Image.open(folder / 'grid.png'))


@pytest.fixture(scope='module')
def batch3_files(batch3_run):
    return batch3_run[0]


@pytest.fixture(scope='module')
def batch1_subdirs_files(network_pickles, tmp_path_factory):
    return generate_files(network_pickles['cond'], tmp_path_factory.mktemp('batch1'), '--batch', 1, '--subdirs')


# Same files whatever the batching.


def test_one_png_per_seed_named_by_seed(batch3_files):
    assert sorted(batch3_files) == ['000000.png', '000001.png', '000002.png', '000003.png', '001000.png']


def test_batch_size_does_not_change_the_files(batch1_subdirs_files, batch3_files):
    assert {os.path.basename(name): data for name, data in batch1_subdirs_files.items()} == batch3_files


def test_auto_precision_prints_its_choice_and_draws_what_that_precision_draws(network_pickles, tmp_path):
    chosen, line = precision_lib.describe_choice('auto', 'cpu')
    # Unconditional: bf16 on CPUs keeps such images bit-identical across batches (docs/compatibility.md#batch-invariance).
    result = run_generate('--network', network_pickles['uncond'], '--outdir', tmp_path / 'auto', '--seeds', SEEDS,
                          '--steps', 3, '--batch', 3, '--precision', 'auto')
    assert result.exit_code == 0, result.output
    assert result.output.count('Precision auto: ') == 1 and line in result.output
    assert read_tree(tmp_path / 'auto') == generate_files(network_pickles['uncond'], tmp_path / chosen, '--batch', 2,
                                                          '--precision', chosen)


def test_two_processes_write_the_same_files(network_pickles, batch3_files, tmp_path):
    # CPU convolutions may round differently with another thread count: match the in-process runs'.
    run_torchrun(['generate.py', '--network', network_pickles['cond'], '--outdir', tmp_path, '--seeds', SEEDS,
                  '--steps', '3', '--batch', '2', '--device', 'cpu'], threads=torch.get_num_threads())
    assert read_tree(tmp_path) == batch3_files


FEW_STEPS = ['--solver', 'unipc', '--nfe', '4', '--schedule', 'logsnr', '--afs']  # a multistep solver, its options


def few_step_files(network, outdir, *extra):
    result = run_generate('--network', network, '--outdir', outdir, '--seeds', SEEDS, *FEW_STEPS, *extra)
    assert result.exit_code == 0, result.output
    assert '(4 network evaluations per image)' in result.output
    return read_tree(outdir)


def test_few_step_solver_files_do_not_depend_on_the_batch_or_the_processes(network_pickles, tmp_path):
    batch3 = few_step_files(network_pickles['cond'], tmp_path / 'b3', '--batch', 3)
    assert few_step_files(network_pickles['cond'], tmp_path / 'b1', '--batch', 1) == batch3
    run_torchrun(['generate.py', '--network', network_pickles['cond'], '--outdir', tmp_path / 'p2', '--seeds', SEEDS,
                  *FEW_STEPS, '--batch', '2', '--device', 'cpu'], threads=torch.get_num_threads())
    assert read_tree(tmp_path / 'p2') == batch3
    net = pickle.loads(network_pickles['cond'].read_bytes())['ema']
    expected = sampling.generate_images(net, [1000], 'unipc', dict(num_steps=5, schedule='logsnr', afs=True), 'cpu')
    assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(batch3['001000.png']))), expected[0].permute(1, 2, 0).numpy())


def test_png_holds_the_library_images(network_pickles, batch3_files):
    net = pickle.loads(network_pickles['cond'].read_bytes())['ema']
    expected = sampling.generate_images(net, [0, 1000], 'edm', dict(num_steps=3), 'cpu')
    for seed, image in zip([0, 1000], expected):
        png = np.asarray(PIL.Image.open(io.BytesIO(batch3_files[f'{seed:06d}.png'])))
        assert np.array_equal(png, image.permute(1, 2, 0).numpy())


def test_subdirs_group_seeds_by_thousand(batch1_subdirs_files):
    expected = [os.path.join('000000', f'{seed:06d}.png') for seed in range(4)] + [os.path.join('001000', '001000.png')]
    assert sorted(batch1_subdirs_files) == expected


def test_grid_tiles_every_image_in_seed_order(batch3_run):
    batch3_files, grid = batch3_run
    assert grid.shape == (16, 24, 3)  # 5 images in 3 columns, 2 rows
    cells = [grid[:8, :8], grid[:8, 8:16], grid[:8, 16:], grid[8:, :8], grid[8:, 8:16]]
    for cell, name in zip(cells, sorted(batch3_files)):
        assert np.array_equal(cell, np.asarray(PIL.Image.open(io.BytesIO(batch3_files[name]))))
    assert not grid[8:, 16:].any()


def test_fixed_class_changes_the_images(network_pickles, batch3_files, tmp_path):
    drawn_class = sampling.draw_latents_and_labels(tiny_net(4), [0], 'cpu')[1].argmax().item()
    other_class = (drawn_class + 1) % 4
    result = run_generate('--network', network_pickles['cond'], '--outdir', tmp_path, '--seeds', 0, '--steps', 3, '--class', other_class)
    assert result.exit_code == 0, result.output
    assert (tmp_path / '000000.png').read_bytes() != batch3_files['000000.png']


def test_guidance_one_gives_the_same_files(network_pickles, batch3_files, tmp_path):
    assert generate_files(network_pickles['cond'], tmp_path, '--batch', 3, '--guidance', 1) == batch3_files


def test_autoguidance_by_the_network_itself_gives_the_same_files(network_pickles, batch3_files, tmp_path):
    assert generate_files(network_pickles['cond'], tmp_path, '--gnet', network_pickles['cond'], '--guidance', 2.5) == batch3_files


def test_classifier_free_guidance_changes_the_images(network_pickles, tmp_path):
    unguided = generate_files(network_pickles['cfg'], tmp_path / 'unguided', '--seeds', 0)
    guided = generate_files(network_pickles['cfg'], tmp_path / 'guided', '--seeds', 0, '--guidance', 3)
    assert guided != unguided


def test_gray_images_are_saved_as_single_channel_png(tmp_path):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    generate.save_png(tmp_path / 'gray.png', image)
    loaded = PIL.Image.open(tmp_path / 'gray.png')
    assert loaded.mode == 'L' and np.array_equal(np.asarray(loaded), image[:, :, 0])


# Option handling.


def test_seed_list_parses_ranges_and_drops_duplicates():
    assert cli.SeedList().convert('0-3,10,2, 7 - 8', None, None) == [0, 1, 2, 3, 10, 7, 8]


@pytest.mark.parametrize('options, expected', [
    ({}, 'edm'),
    (dict(solver='heun'), 'ablation'),
    (dict(solver='euler'), 'ablation'),
    (dict(discretization='vp'), 'ablation'),
    (dict(scaling='none'), 'ablation'),
    (dict(solver='dpm'), 'dpm'),
    (dict(solver='dpm2m'), 'dpm2m'),
])
def test_sampler_choice_follows_the_options(options, expected):
    args = [options.get(key) for key in ('solver', 'discretization', 'schedule', 'scaling')]
    assert cli.choose_sampler(*args) == expected


@pytest.mark.parametrize('num_seeds, max_batch_size, world_size', [(5, 3, 1), (5, 2, 2), (1, 4, 2), (17, 4, 3)])
def test_every_seed_goes_to_exactly_one_rank(num_seeds, max_batch_size, world_size):
    seeds = list(range(100, 100 + num_seeds))
    per_rank = [cli.split_seeds(seeds, max_batch_size, rank, world_size)[0] for rank in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank runs the same number of rounds
    assert all(len(batch) <= max_batch_size for batches in per_rank for batch in batches)
    assert sorted(seed for batches in per_rank for batch in batches for seed in batch.tolist()) == seeds


# Bad input: one line, no traceback.


@pytest.mark.parametrize('solver', ['heun', 'dpm'])
def test_afs_with_a_solver_that_cannot_use_it_is_a_one_line_error(network_pickles, tmp_path, solver):
    result = CliRunner().invoke(generate.main, ['--network', str(network_pickles['cond']), '--outdir', str(tmp_path / 'out'),
                                                '--steps', '3', '--solver', solver, '--afs', '--device', 'cpu'])
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(error_lines) == 1 and '--afs' in error_lines[0], result.output
    assert 'analytical first step needs a multistep solver' in error_lines[0]


@pytest.mark.parametrize('args, message', [
    (['--network', '{missing}'], '--network'),
    (['--network', '{garbage}'], '--network'),
    (['--seeds', '3-x'], "'--seeds'"),
    (['--seeds', '5-2'], "'--seeds'"),
    (['--seeds', ''], "'--seeds'"),
    (['--class', '4'], '--class 4'),
    (['--class', '-1'], "'--class'"),
    (['--network', '{uncond}', '--class', '0'], 'unconditional'),
    (['--solver', 'rk4'], "'--solver'"),
    (['--steps', '0'], '--steps'),
    (['--solver', 'dpm', '--steps', '1'], '--steps'),
    (['--solver', 'dpm', '--disc', 'vp'], '--disc'),
    (['--solver', 'dpm2m', '--S_churn', '10'], '--S_churn'),
    (['--outdir', None], '--outdir'),
    (['--precision', 'tf32'], '--precision'),
    (['--precision', 'fp16'], '--precision'),
    (['--guidance', '2'], '--guidance'),
    (['--network', '{uncond}', '--guidance', '2'], '--guidance'),
    (['--gnet', '{cond16}'], '--gnet'),
    (['--gnet', '{uncond}', '--guidance', '2'], '--gnet'),
    (['--gnet', '{missing}'], '--gnet'),
    (['--schedule', 'cosine'], "'--schedule'"),
    (['--solver', 'ipndm', '--steps', None, '--nfe', '3', '--order', '4'], '--order: order 4 needs at least 4 steps'),
    (['--solver', 'unipc', '--order', '4'], '--order'),
    (['--steps', None, '--nfe', '10'], '--nfe: the edm sampler cannot make exactly 10 network evaluations; possible: 3, 5, 7'),
    (['--nfe', '5'], '--steps or --nfe, not both'),
    (['--solver', 'euler', '--schedule', 'logsnr'], 'step schedule'),
    (['--solver', 'dpm3m', '--disc', 'vp'], '--disc'),
    (['--sigma_min', '10', '--sigma_max', '1'], '--sigma_min: sigma_min 10.0 is not below sigma_max 1.0'),
    (['--outdir', '{garbage}'], 'not a folder'),
    (['--outdir', None, '--grid', '{folder}'], 'is a folder'),
    (['--network', '{ema_tuple}'], "'ema' is a tuple, not a network"),
    (['--network', '{ema_tensor}'], "'ema' is a Tensor, not a network"),
    (['--network', '{ema_list}'], "'ema' is a list, not a network"),
    (['--network', '{ema_none}'], "'ema' is a NoneType, not a network"),
])
def test_bad_input_is_a_one_line_error(network_pickles, tmp_path, args, message):
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'not a pickle')
    paths = dict(missing=tmp_path / 'missing.pkl', garbage=garbage, uncond=network_pickles['uncond'], cond16=network_pickles['cond16'],
                 folder=tmp_path)
    for name, ema in (('tuple', (1, 2)), ('tensor', torch.zeros(2)), ('list', []), ('none', None)):
        paths[f'ema_{name}'] = tmp_path / f'ema-{name}.pkl'
        paths[f'ema_{name}'].write_bytes(pickle.dumps({'ema': ema}))
    defaults = {'--network': str(network_pickles['cond']), '--outdir': str(tmp_path / 'out'), '--steps': '3', '--seeds': '0',
        '--device': 'cpu'}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value.format(**paths) if value is not None else None
    argv = [item for flag, value in defaults.items() if value is not None for item in (flag, value)]
    result = CliRunner().invoke(generate.main, argv)
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert 'Traceback' not in result.output
    assert not os.path.exists(tmp_path / 'out')


# Non-finite values, outputs that cannot be written (issue 22).


def assert_one_error_line(result, fragment):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert 'Traceback' not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and fragment in errors[0], result.output
    return errors[0]


@pytest.mark.parametrize('flag', ['--rho', '--sigma_min', '--sigma_max', '--S_churn', '--S_noise', '--guidance'])
@pytest.mark.parametrize('value', ['nan', 'inf', '1e999'])
def test_non_finite_sampler_options_are_refused(network_pickles, tmp_path, flag, value):
    result = run_generate_unchecked('--network', network_pickles['cfg'], '--outdir', tmp_path / 'out', '--seeds', 0,
                                    '--steps', 2, f'{flag}={value}')
    assert 'not a finite number' in assert_one_error_line(result, flag)
    assert not (tmp_path / 'out').exists()


def run_generate_unchecked(*args):
    """generate.py in this process; exceptions are kept in the result (a traceback is a failure of the test)."""
    return CliRunner().invoke(generate.main, ['--device', 'cpu'] + [str(arg) for arg in args])


@pytest.mark.parametrize('option', ['--network', '--gnet'])
def test_a_network_with_a_non_finite_weight_is_refused_naming_the_tensor(network_pickles, tmp_path, option):
    net = tiny_net(label_dim=4)
    name = list(dict(net.named_parameters()))[5]
    with torch.no_grad():
        dict(net.named_parameters())[name].view(-1)[0] = float('inf')
    broken = tmp_path / 'broken.pkl'
    broken.write_bytes(pickle.dumps({'ema': net}))
    networks_given = dict(network=network_pickles['cond'], gnet=network_pickles['cond'])
    networks_given[option[2:]] = broken
    result = run_generate_unchecked('--network', networks_given['network'], '--gnet', networks_given['gnet'],
                                    '--guidance', 2, '--outdir', tmp_path / 'out', '--seeds', 0, '--steps', 2)
    line = assert_one_error_line(result, f'{option} {broken}')
    assert name in line and 'NaN or infinite' in line
    assert not list((tmp_path / 'out').glob('*.png'))


def test_a_sampler_that_overflows_stops_with_one_line_and_writes_nothing(network_pickles, tmp_path):
    result = run_generate_unchecked('--network', network_pickles['cond'], '--outdir', tmp_path / 'out', '--seeds', '0-1',
                                    '--steps', 2, '--sigma_max', 1e30, '--grid', tmp_path / 'grid.png')
    assert 'seeds 0, 1' in assert_one_error_line(result, 'NaN or infinite values for 2 of 2 images')
    assert not list((tmp_path / 'out').glob('*.png')) and not (tmp_path / 'grid.png').exists()


@pytest.mark.parametrize('option', ['--outdir', '--grid'])
def test_an_output_under_a_file_fails_before_sampling(network_pickles, tmp_path, option):
    (tmp_path / 'file').write_bytes(b'')
    outputs = {'--outdir': str(tmp_path / 'out'), option: str(tmp_path / 'file' / 'x' / ('grid.png' if option == '--grid' else ''))}
    result = run_generate_unchecked('--network', network_pickles['cond'], '--seeds', 0, '--steps', 2,
                                    *[item for pair in outputs.items() for item in pair])
    line = assert_one_error_line(result, 'cannot write to')
    assert str(tmp_path / 'file') in line and 'Generating' not in result.output


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(network_pickles, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # a PNG of 8x8 noise takes ~200 bytes
    try:
        result = run_generate_unchecked('--network', network_pickles['cond'], '--outdir', tmp_path / 'out', '--seeds', 0,
                                        '--steps', 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert 'File too large' in assert_one_error_line(result, f'cannot write {tmp_path / "out" / "000000.png"}')
    assert os.listdir(tmp_path / 'out') == []


def test_a_rerun_removes_the_temporaries_a_killed_run_left(network_pickles, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / '.000000.png.k1ll3d_x.tmp').write_bytes(b'half a png')
    (out / '.notes.txt.abcdefgh.tmp').write_bytes(b'someone else\'s')
    result = run_generate_unchecked('--network', network_pickles['cond'], '--outdir', out, '--seeds', 0, '--steps', 2)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['.notes.txt.abcdefgh.tmp', '000000.png']
