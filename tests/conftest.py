"""Shared test fixtures: the reference directory and small, fast torch settings."""

import os
import pathlib
import subprocess
import sys

# Idle OpenMP threads yield instead of spinning: the suite runs several processes (torchrun tests) on 2 cores.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / 'shared' / 'reference'

torch.set_num_threads(2)


@pytest.fixture(scope='session')
def reference_dir():
    """The fixtures produced by the published code; a missing directory is a test failure, not a skip."""
    assert REFERENCE_DIR.is_dir(), f'reference fixtures not found at {REFERENCE_DIR}'
    return REFERENCE_DIR


TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def run_torchrun(script_and_args, nproc=2, cwd=REPO_ROOT, threads=1, timeout=300):
    """Run a script under `torchrun --standalone` on the CPU (gloo), assert that it succeeded, return the result."""
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '--',
               *map(str, script_and_args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
