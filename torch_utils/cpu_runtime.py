"""Process-wide CPU settings that the libraries under PyTorch read once: OpenMP's waiting policy (read when
torch loads, so this module must not import torch) and glibc's handling of freed memory."""

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1      # value -1: never give the top of the heap back (mallopt(3))
_M_MMAP_THRESHOLD = -3

openmp_wait_policy = 'not chosen'   # What choose_openmp_wait_policy() decided, for the start-up report.


def choose_openmp_wait_policy():
    """Call before `import torch`. Returns the policy in force ('default', 'PASSIVE' or the user's).

    Idle OpenMP threads spin for a while before they sleep (libgomp's default), which is the fastest on free
    cores. When other work already holds the CPUs, a thread spinning for a preempted sibling burns its time
    slice instead (a 2-thread training step took 21.7 s instead of 2.0 s at load 3), so then they sleep
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


def cpus_busy():
    """True when the running load plus this process's threads exceed the CPUs it may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no affinity or load average on this platform: assume free cores
        return False
    try:
        threads = min(int(os.environ.get('OMP_NUM_THREADS', cpus)), cpus)
    except ValueError:
        threads = cpus
    return load + threads > cpus + 0.5


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
