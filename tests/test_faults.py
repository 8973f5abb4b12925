"""Fault injection: a failing run ends within seconds with one line, keeps what it had written and leaves no litter;
a run killed with SIGKILL (also mid-write) leaves only whole files under final names and resumes from the newest state."""

import hashlib
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from click.testing import CliRunner

import train
from test_train import write_dataset
from training import checkpoints, training_state

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXIT_TIMEOUT_SEC = 90                   # a failing run must end well within this (it hung forever before)


def options(data, outdir, steps, *extra):
    """The smallest network and a run of `steps` steps of 4 images, one tick per step, a state every tick."""
    return [f'--outdir={outdir}', f'--data={data}', '--nosubdir', '--device=cpu', '--cbase=8', '--cres=1', '--batch=4',
            f'--duration={steps * 4 / 1e6}', '--tick=0.004', '--snap=1', '--dump=1', '--workers=0', '--seed=0',
            '--augment=0', *extra]


def run_subprocess(args, file_size_limit=None):
    """train.py in a child process (bounded in time); `file_size_limit` bytes per written file, as `ulimit -f`."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(REPO_ROOT / 'train.py'), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_SEC,
                          preexec_fn=limit_file_size if file_size_limit else None)


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith('Error:')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'train-8x8.zip', num_images=12, resolution=8, num_classes=0)


@pytest.fixture(scope='module')
def truncated_data(data, tmp_path_factory):
    """The dataset with one PNG cut in half: its header is intact, so the start-up scan passes."""
    path = tmp_path_factory.mktemp('data') / 'truncated-8x8.zip'
    with zipfile.ZipFile(data) as source, zipfile.ZipFile(path, 'w') as target:
        for name in source.namelist():
            content = source.read(name)
            target.writestr(name, content[:len(content) // 2] if name.endswith('img00000003.png') else content)
    return path


def test_a_truncated_image_with_workers_ends_the_run_with_one_line_and_a_state(truncated_data, tmp_path):
    result = run_subprocess(options(truncated_data, tmp_path, 100, '--workers=2'))
    assert result.returncode != 0
    assert 'Traceback' not in result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and 'img00000003.png' in errors[0] and 'truncated' in errors[0], result.stderr
    assert 'training state saved' in errors[0]
    state = training_state.load_training_state(training_state.resolve_resume_path(str(tmp_path)))
    assert state['cur_step'] < 100
    assert 'Traceback' in (tmp_path / 'log.txt').read_text()  # kept for a bug report


def test_a_failing_state_write_ends_the_run_with_one_line_and_keeps_earlier_states(data, tmp_path):
    result = CliRunner().invoke(train.main, options(data, tmp_path, 1))
    assert result.exit_code == 0, result.output
    earlier = training_state.resolve_resume_path(str(tmp_path))
    earlier_digest = hashlib.sha256(pathlib.Path(earlier).read_bytes()).hexdigest()
    snapshot_bytes = (tmp_path / checkpoints.snapshot_name(4, kimg_per_tick=0.004)).stat().st_size
    state_bytes = pathlib.Path(earlier).stat().st_size
    assert snapshot_bytes < state_bytes // 2
    # A full disk for files the size of a state: the snapshot fits, the state does not.
    result = run_subprocess(options(data, tmp_path, 100, '--workers=2', f'--resume={tmp_path}'),
                            file_size_limit=(snapshot_bytes + state_bytes) // 2)
    assert result.returncode != 0
    assert 'Traceback' not in result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and 'while writing a training state' in errors[0], result.stderr
    assert 'File too large' in errors[0] and 'earlier training states are intact' in errors[0]
    assert hashlib.sha256(pathlib.Path(earlier).read_bytes()).hexdigest() == earlier_digest
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


def kill_when(args, run_dir, ready, timeout_sec=EXIT_TIMEOUT_SEC):
    """Start train.py and SIGKILL it as soon as `ready(names in run_dir)`; returns the names seen then."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / 'train.py'), *map(str, args)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_sec
    try:
        while process.poll() is None and time.monotonic() < deadline:
            names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
            if ready(names):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return names
            time.sleep(0.001)
        pytest.fail(f'the moment to kill never came; train.py: {process.stderr.read().decode()[-2000:] if process.poll() is not None else "still running"}')
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


@pytest.mark.parametrize('moment', ['during a state write', 'between state writes'])
def test_sigkill_leaves_no_corrupt_file_and_resume_continues_from_the_newest_state(data, tmp_path, moment):
    def ready(names):  # after two states, so that there is one to resume from
        writing = any(name.startswith('.training-state-') and name.endswith('.tmp') for name in names)
        states = sum(name.startswith('training-state-') for name in names)
        return states >= 2 and writing if moment == 'during a state write' else states >= 3
    seen = kill_when(options(data, tmp_path, 1000), tmp_path, ready)
    finished = [name for name in os.listdir(tmp_path) if name.startswith(('training-state-', 'network-snapshot-'))]
    for name in finished:  # every file under a final name is whole
        if name.endswith('.pt'):
            training_state.load_training_state(tmp_path / name)
        else:
            checkpoints.load_network_pickle(tmp_path / name)
    newest = training_state.load_training_state(training_state.resolve_resume_path(str(tmp_path)))
    steps = newest['cur_nimg'] // 4 + 2
    result = CliRunner().invoke(train.main, options(data, tmp_path, steps, f'--resume={tmp_path}'))
    assert result.exit_code == 0, result.output
    resumed = training_state.load_training_state(training_state.resolve_resume_path(str(tmp_path)))
    assert resumed['cur_nimg'] == steps * 4 and resumed['cur_step'] == newest['cur_step'] + 2
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')], seen  # the kill's leftovers removed


def all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def test_a_diverging_run_stops_with_one_line_and_writes_nothing_non_finite(data, tmp_path):
    # Three good steps (a state at 12 images), then a learning rate that turns the loss into NaN within two steps.
    good = options(data, tmp_path, 3, '--lr_rampup=0', '--tick=0.008')
    assert CliRunner().invoke(train.main, good).exit_code == 0
    good_state = training_state.resolve_resume_path(str(tmp_path))
    result = CliRunner().invoke(train.main, options(data, tmp_path, 12, '--lr_rampup=0', '--tick=0.008', '--lr=1e30',
                                                    f'--resume={tmp_path}'))
    assert result.exit_code != 0 and 'Traceback' not in result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and 'non-finite at step 4 (0.016 kimg)' in errors[0], result.output
    assert 'nothing of it was saved' in errors[0] and good_state in errors[0]
    for name in os.listdir(tmp_path):
        if name.endswith('.pt'):
            state = training_state.load_training_state(tmp_path / name)
            assert all_finite([*state['net'].values(), *state['ema'].values()]), name
        elif name.endswith('.pkl'):
            assert all_finite(checkpoints.load_network_pickle(tmp_path / name)['ema'].state_dict().values()), name
    assert training_state.resolve_resume_path(str(tmp_path)) == good_state  # a requeue resumes the last good state


def test_an_outdir_that_is_not_utf8_trains_and_logs(data, tmp_path):
    """Linux paths are bytes; one that is not UTF-8 reaches Python as surrogates, which the log file could not encode
    (a traceback once the run directory and its lock existed)."""
    outdir = os.fsencode(tmp_path) + b'/run-\xff\xfe'
    env = dict(os.environ, OMP_NUM_THREADS='1', LC_ALL='C.UTF-8')
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'train.py'), *[os.fsencode(str(arg)) for arg in
                             options(data, os.fsdecode(outdir), 1)]], cwd=REPO_ROOT, env=env, capture_output=True,
                            timeout=EXIT_TIMEOUT_SEC)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert b'Traceback' not in result.stderr
    log = (pathlib.Path(os.fsdecode(outdir)) / 'log.txt').read_text(encoding='utf-8')
    assert 'run-\\udcff\\udcfe' in log and 'Exiting...' in log
    assert os.path.exists(os.path.join(outdir, os.fsencode(checkpoints.snapshot_name(4, kimg_per_tick=0.004))))


def test_transfer_from_a_network_holding_nan_is_one_line(data, tmp_path):
    result = CliRunner().invoke(train.main, options(data, tmp_path / 'first', 1))
    assert result.exit_code == 0, result.output
    snapshot = checkpoints.load_network_pickle(tmp_path / 'first' / checkpoints.snapshot_name(4, kimg_per_tick=0.004))
    name, param = next(iter(snapshot['ema'].named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float('nan')
    checkpoints.save_network_pickle(tmp_path / 'nan.pkl', snapshot)
    result = CliRunner().invoke(train.main, options(data, tmp_path / 'second', 1, f'--transfer={tmp_path / "nan.pkl"}',
                                                    '--dry-run'))
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and name in errors[0] and 'NaN or infinite' in errors[0], result.output
