"""Shared test fixtures: the reference directory and small, fast torch settings."""

import pathlib

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / 'shared' / 'reference'

torch.set_num_threads(2)


@pytest.fixture(scope='session')
def reference_dir():
    """The fixtures produced by the published code; a missing directory is a test failure, not a skip."""
    assert REFERENCE_DIR.is_dir(), f'reference fixtures not found at {REFERENCE_DIR}'
    return REFERENCE_DIR
