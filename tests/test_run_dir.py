"""training/run_dir.py: one writer per run directory, no new run over an old one, leftovers of interrupted writes removed."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import train
from test_train import assert_one_line_error
from test_train import write_dataset
from training import run_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'train-8x8.zip', num_images=4, resolution=8, num_classes=0)


def train_into(outdir, data, *extra):
    args = [f'--outdir={outdir}', f'--data={data}', '--nosubdir', '--device=cpu', '--cbase=8', '--cres=1', '--batch=4',
            '--duration=0.000004', '--workers=0', '--seed=0', *extra]
    return CliRunner().invoke(train.main, args)


def test_a_second_writer_into_a_directory_in_use_is_refused(tmp_path, data):
    lock = run_dir.claim(str(tmp_path))
    try:
        result = train_into(tmp_path, data)
    finally:
        lock.release()
    assert_one_line_error(result, str(tmp_path), 'in use by another run', f'pid {os.getpid()}')
    assert sorted(os.listdir(tmp_path)) == ['run.lock']


def test_the_lock_file_names_the_owner_and_is_free_after_release(tmp_path):
    lock = run_dir.claim(str(tmp_path))
    owner = json.loads((tmp_path / 'run.lock').read_text())
    assert owner['pid'] == os.getpid() and owner['host'] and owner['start_time']
    lock.release()
    run_dir.claim(str(tmp_path)).release()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    code = f'import os, signal; from training import run_dir; run_dir.claim({str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)'
    subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, timeout=60)
    assert json.loads((tmp_path / 'run.lock').read_text())['pid'] != os.getpid()
    lock = run_dir.claim(str(tmp_path))
    assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
    lock.release()


def test_a_new_run_over_a_finished_one_is_refused(tmp_path, data):
    state = tmp_path / 'training-state-000000.pt'
    state.write_bytes(b'an earlier run')
    result = train_into(tmp_path, data)
    assert_one_line_error(result, str(tmp_path), 'already holds', f'--resume={tmp_path}', '--outdir')
    assert state.read_bytes() == b'an earlier run'
    assert not (tmp_path / 'training_options.json').exists()


def test_a_run_resuming_from_its_own_directory_may_write_there(tmp_path):
    (tmp_path / 'network-snapshot-000000.pkl').write_bytes(b'')
    (tmp_path / 'training-state-000000.pt').write_bytes(b'')
    run_dir.claim(str(tmp_path), resume_state=str(tmp_path / 'training-state-000000.pt')).release()
    other = tmp_path / 'other'
    other.mkdir()
    with pytest.raises(run_dir.RunDirError, match='already holds'):
        run_dir.claim(str(tmp_path), resume_state=str(other / 'training-state-000000.pt'))


def test_leftovers_of_interrupted_writes_are_removed_by_the_next_run(tmp_path):
    leftovers = ['.training-state-000004.pt.k2j_9x0a.tmp', '.network-snapshot-000004.pkl.abcd1234.tmp',
                 '.training_options.json.zz00yy11.tmp']
    kept = ['.notes.txt.abcd1234.tmp', 'training-state-000004.pt.abcd1234.tmp', 'log.txt']
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b'x')
    run_dir.claim(str(tmp_path), resume_state=str(tmp_path / 'training-state-000004.pt')).release()
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ['run.lock'])
