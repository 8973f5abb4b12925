"""Fault injection: a failing run ends within seconds with one line, keeps what it had written and leaves no litter."""

import hashlib
import os
import pathlib
import resource
import subprocess
import sys
import zipfile

import pytest
from click.testing import CliRunner

import train
from test_train import write_dataset
from training import checkpoints

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
    state = checkpoints.load_training_state(checkpoints.resolve_resume_path(str(tmp_path)))
    assert state['cur_step'] < 100
    assert 'Traceback' in (tmp_path / 'log.txt').read_text()  # kept for a bug report


def test_a_failing_state_write_ends_the_run_with_one_line_and_keeps_earlier_states(data, tmp_path):
    result = CliRunner().invoke(train.main, options(data, tmp_path, 1))
    assert result.exit_code == 0, result.output
    earlier = checkpoints.resolve_resume_path(str(tmp_path))
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
