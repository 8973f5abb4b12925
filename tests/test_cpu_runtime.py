"""torch_utils/cpu_runtime.py: OpenMP waiting chosen by the measured CPU use of other work, freed memory kept for reuse."""

import collections
import os
import subprocess
import sys

import psutil
import pytest

from conftest import REPO_ROOT
from torch_utils import cpu_runtime


@pytest.fixture
def clean_environ(monkeypatch):
    for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_NUM_THREADS'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    return monkeypatch


def test_idle_cpus_keep_the_openmp_default(clean_environ):
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [5.0, 10.0])
    assert 'idle' in cpu_runtime.choose_openmp_wait_policy()
    assert 'OMP_WAIT_POLICY' not in os.environ


def test_busy_cpus_make_idle_threads_sleep(clean_environ):
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [100.0, 20.0])
    assert cpu_runtime.choose_openmp_wait_policy().startswith('PASSIVE')
    assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'


def test_cores_busy_only_on_cpus_outside_the_affinity_do_not_count(clean_environ):
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [0.0, 0.0, 100.0, 100.0])
    assert cpu_runtime.busy_cores() == 0


def test_a_single_thread_never_counts_as_contention(clean_environ):
    clean_environ.setenv('OMP_NUM_THREADS', '1')
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [100.0, 100.0])
    assert not cpu_runtime.cpus_busy()


@pytest.mark.parametrize('name, value', [('OMP_WAIT_POLICY', 'ACTIVE'), ('GOMP_SPINCOUNT', '1000')])
def test_a_users_setting_is_kept(clean_environ, name, value):
    clean_environ.setenv(name, value)
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [100.0, 100.0])
    assert 'set by the user' in cpu_runtime.choose_openmp_wait_policy()
    assert os.environ[name] == value and os.environ.get('OMP_WAIT_POLICY', value) == value


CPU_TIMES = collections.namedtuple('scputimes', ['user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal'])


def _cpu_times(**fields):
    return CPU_TIMES(**{name: fields.get(name, 0.0) for name in CPU_TIMES._fields})


def test_stolen_time_and_io_wait_are_not_other_work(clean_environ):
    # Each CPU over the interval: 0.1 s of user work, 0.6 s stolen by the hypervisor, 0.1 s I/O wait, 0.2 s idle.
    samples = iter([[_cpu_times(user=10, idle=10, steal=10, iowait=1)] * 2,
                    [_cpu_times(user=10.1, idle=10.2, steal=10.6, iowait=1.1)] * 2])
    clean_environ.setattr(psutil, 'cpu_times', lambda percpu: next(samples))
    clean_environ.setattr(cpu_runtime.time, 'sleep', lambda seconds: None)
    assert cpu_runtime.busy_cores() == pytest.approx(0.2)


def test_a_burst_of_other_work_is_not_contention(clean_environ):
    measured = iter([[100.0, 100.0], [0.0, 5.0]])  # the first sample busy, the second idle
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: next(measured))
    assert not cpu_runtime.cpus_busy()


def _page_faults_of_training_steps(keep_freed_memory):
    """Minor page faults of 3 forward+backward passes of a small U-Net at batch 16 (after two warm-up passes)."""
    code = (
        'import resource\n'
        'from torch_utils import cpu_runtime\n'
        f'assert {keep_freed_memory} is False or cpu_runtime.keep_freed_memory()\n'  # before torch, as the scripts do
        'import torch\n'
        'from training import networks\n'
        'torch.manual_seed(0)\n'
        'net = networks.EDMPrecond(img_resolution=32, img_channels=3, model_channels=16, channel_mult=[1, 2],\n'
        '                          num_blocks=1, attn_resolutions=[16], dropout=0.1)\n'
        'x, sigma = torch.randn(16, 3, 32, 32), torch.rand(16) + 0.5\n'
        'def step():\n'
        '    net(x, sigma).square().sum().backward()\n'
        'step(); step()\n'  # the heap reaches its working size in the first passes
        'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        'for _ in range(3):\n'
        '    step()\n'
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n'
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='mallopt is glibc')
def test_freed_memory_is_reused_without_fresh_page_faults():
    default_faults = _page_faults_of_training_steps(False)
    kept_faults = _page_faults_of_training_steps(True)
    assert default_faults > 1000  # freed activations went back to the kernel and faulted in again
    # Kept memory still faults now and then in whole megabytes (0-2,000 faults against ~20,000 in repeated runs,
    # glibc's per-thread arenas); without the setting the two counts would be about equal.
    assert kept_faults < default_faults / 5, (kept_faults, default_faults)
