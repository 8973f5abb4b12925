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


@pytest.mark.parametrize('argv', [[], ['--help'], ['--outdir=x', '--dry-run'], ['calc', '--help']])
def test_help_and_dry_runs_take_no_measurement_of_the_cpus(clean_environ, argv):
    def measure(interval):
        raise AssertionError('measured')
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', measure)
    cpu_runtime.prepare_process(argv)
    assert cpu_runtime.openmp_wait_policy.startswith('not chosen') and 'OMP_WAIT_POLICY' not in os.environ


def test_a_training_command_chooses_the_waiting_policy(clean_environ):
    clean_environ.setattr(cpu_runtime, 'busy_percent_per_cpu', lambda interval: [100.0, 100.0])
    cpu_runtime.prepare_process(['--outdir=x', '--data=y'])
    assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'


def _heap_after_a_large_block(keep_freed_memory):
    """(whether a 64 MiB block came from the heap, the heap's size in bytes after the block was freed)."""
    code = (
        'import ctypes, ctypes.util\n'
        'from torch_utils import cpu_runtime\n'
        f'assert {keep_freed_memory} is False or cpu_runtime.keep_freed_memory()\n'
        'libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")\n'
        'libc.malloc.restype = ctypes.c_void_p\n'
        'def heap():\n'
        '    for line in open("/proc/self/maps"):\n'
        '        if line.rstrip().endswith("[heap]"):\n'
        '            start, end = (int(x, 16) for x in line.split()[0].split("-"))\n'
        '            return start, end\n'
        '    return 0, 0\n'
        'block = libc.malloc(64 << 20)\n'
        'start, end = heap()\n'
        'inside = start <= block < end\n'
        'libc.free(ctypes.c_void_p(block))\n'
        'start, end = heap()\n'
        'print(int(inside), end - start)\n'
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    inside, heap_bytes = result.stdout.split()
    return inside == '1', int(heap_bytes)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='mallopt is glibc')
def test_freed_memory_stays_in_the_heap_for_reuse():
    # Without the setting a block this large is mapped on its own and returned to the kernel when freed, so the
    # next step's activations are mapped and zero-filled afresh; with it the block comes from the heap and stays.
    assert _heap_after_a_large_block(False)[0] is False
    inside, heap_bytes = _heap_after_a_large_block(True)
    assert inside and heap_bytes >= 64 << 20
