"""Process-wide CPU settings that the libraries under PyTorch read once: OpenMP's waiting policy (read when
torch loads, so this module must not import torch) and glibc's handling of freed memory."""

import ctypes
import ctypes.util
import os
import sys
import time

import psutil

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1      # value -1: never give the top of the heap back (mallopt(3))
_M_MMAP_THRESHOLD = -3

openmp_wait_policy = 'not chosen'   # What choose_openmp_wait_policy() decided, for the start-up report.


# Arguments that end a script before it computes anything: no need to measure the CPUs for them.
_NO_WORK_ARGS = ('--help', '--dry-run', '-n')


def prepare_process(argv=None):
    """What every entry point does before `import torch` (torch_utils/before_torch.py): the OpenMP waiting policy
    and the heap setting. The policy takes a measurement of the CPUs (about a second): skipped when `argv` (a
    script's arguments; None = always measure) asks for help or a dry run, or is empty (click prints the usage)."""
    global openmp_wait_policy
    if argv is not None and (not argv or any(arg in _NO_WORK_ARGS for arg in argv)):
        openmp_wait_policy = 'not chosen (nothing to compute)'
    else:
        choose_openmp_wait_policy()
    keep_freed_memory()


def choose_openmp_wait_policy():
    """Call before `import torch`. Returns a description of the policy in force (also kept in
    `openmp_wait_policy` for the start-up report).

    Idle OpenMP threads spin for a while before they sleep (libgomp's default), which is the fastest on free
    cores. When other work already holds the CPUs, a thread spinning for a preempted sibling burns its time
    slice instead (a 2-thread training step took 21.7 s instead of 2.0 s beside other jobs), so then they sleep
    (PASSIVE). A policy set by the user (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
    """
    global openmp_wait_policy
    user_settings = [f'{name}={os.environ[name]}' for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT') if name in os.environ]
    if user_settings:
        openmp_wait_policy = ' '.join(user_settings) + ' (set by the user)'
    elif cpus_busy():
        os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'
        openmp_wait_policy = 'PASSIVE (the CPUs were busy at start-up)'
    else:
        openmp_wait_policy = 'spin, then sleep (the CPUs were idle at start-up)'
    return openmp_wait_policy


# Time that other work on this machine spends on a CPU. Not idle or I/O wait, and not steal: time the
# hypervisor gave to other machines, which sleeping threads do not get back. (On an idle virtual machine every
# run of a benchmark once chose PASSIVE, and training fell from 1.2x the published code's speed to about its
# speed; the cause was not pinned down, so steal and short bursts are both left out.)
_BUSY_FIELDS = ('user', 'nice', 'system', 'irq', 'softirq')
_ACCOUNTED_FIELDS = _BUSY_FIELDS + ('idle', 'iowait', 'steal')  # guest time is already inside user and nice


def busy_percent_per_cpu(interval_sec):
    """Per CPU, the percentage of the next `interval_sec` seconds spent on work (see _BUSY_FIELDS)."""
    before = psutil.cpu_times(percpu=True)
    time.sleep(interval_sec)
    after = psutil.cpu_times(percpu=True)
    percents = []
    for start, end in zip(before, after):
        delta = {field: getattr(end, field, 0) - getattr(start, field, 0) for field in _ACCOUNTED_FIELDS}
        total = sum(delta.values())
        busy = sum(delta[field] for field in _BUSY_FIELDS)
        percents.append(100 * busy / total if total > 0 else 0.0)
    return percents


def busy_cores(interval_sec=0.3):
    """How many of the CPUs this process may use are busy with other work, measured over `interval_sec`.

    Measured rather than read from the load average: that one decays over a minute, so a job that has just
    ended (the previous run of a benchmark, a preceding test) would still count as contention.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
        per_cpu = busy_percent_per_cpu(interval_sec)
    except (OSError, RuntimeError, AttributeError):  # no CPU statistics on this platform: assume free cores
        return 0.0
    if allowed is not None and all(index < len(per_cpu) for index in allowed):
        per_cpu = [per_cpu[index] for index in allowed]
    return sum(per_cpu) / 100


def cpus_busy():
    """True when the busy cores plus this process's threads exceed the CPUs it may use (by half a core), in two
    measurements: a burst (a process that has just ended being torn down, a short command) is not contention."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    try:
        threads = min(int(os.environ.get('OMP_NUM_THREADS', cpus)), cpus)
    except ValueError:
        threads = cpus
    if threads <= 1:  # a single thread never waits for a sibling
        return False
    return all(busy_cores(interval) + threads > cpus + 0.5 for interval in (0.3, 0.5))


def keep_freed_memory():
    """Let glibc keep freed blocks for reuse instead of returning each large one to the kernel.

    By default every activation tensor above the mmap threshold is mapped fresh and zero-filled by the kernel on
    each step (~40k page faults per CPU training step of a small U-Net, ~7% of its time). Returns whether the
    setting took effect (False off glibc).
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator as it is
        return False
