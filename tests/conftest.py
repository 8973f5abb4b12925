"""Shared test fixtures: the reference directory and small, fast torch settings."""

import os
import pathlib

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
