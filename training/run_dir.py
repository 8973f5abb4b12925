"""Ownership of a run directory: one writer at a time, no new run over an old one, no litter of interrupted writes.

A run holds an exclusive `flock` on `run.lock` for its whole life; the file names the owner (pid, host, start
time) for the message that refuses a second writer. The kernel drops the lock when its process dies, however
it dies, so a lock left by a dead run is taken over without a check.
"""

import datetime
import fcntl
import json
import os
import re
import socket

LOCK_NAME = 'run.lock'
RUN_FILE_RE = re.compile(r'(network-snapshot-.+\.pkl|training-state-.+\.pt)')
# dnnlib.util.atomic_write's temporary files ('.' + final name + '.' + mkstemp's 8 characters + '.tmp').
TEMP_FILE_RE = re.compile(r'\.(network-snapshot-.+\.pkl|training-state-.+\.pt|training_options\.json)\.[A-Za-z0-9_]{8}\.tmp')


class RunDirError(ValueError):
    """The run directory cannot be used by this run; the message says why and what to do instead."""

    def __init__(self, message, run_dir, in_use):
        super().__init__(message)
        self.run_dir = run_dir          # the directory refused
        self.in_use = in_use            # True: another live run holds it; False: it holds a finished run's files

    def __reduce__(self):  # rank 0 broadcasts it to the other processes
        return type(self), (str(self), self.run_dir, self.in_use)


class RunLock:
    """The claim of this process on a run directory; `release()` (or process exit) gives it up."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(self.fd)
            os.close(self.fd)
            raise RunDirError(f'{run_dir} is in use by another run ({owner}); wait for it to end', run_dir, True) from None
        identity = dict(pid=os.getpid(), host=socket.gethostname(),
                        start_time=datetime.datetime.now().astimezone().isoformat(timespec='seconds'))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(identity) + '\n').encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays, naming the last owner
            self.fd = None


def _read_owner(fd):
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        return f'pid {owner["pid"]} on {owner["host"]}, started {owner["start_time"]}'
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return 'owner unknown'


def run_files(run_dir):
    """The snapshots and training states in `run_dir`."""
    return sorted(name for name in os.listdir(run_dir) if RUN_FILE_RE.fullmatch(name))


def claim(run_dir, resume_state=None):
    """Lock `run_dir` for this run and remove temporary files of interrupted writes; returns the RunLock.

    Refuses a directory that another live run holds, and one that holds a run's snapshots or states unless this
    run resumes from a state in it (`resume_state`).
    """
    lock = RunLock(run_dir)
    try:
        found = run_files(run_dir)
        resumes_here = resume_state is not None and os.path.samefile(os.path.dirname(os.path.abspath(resume_state)), run_dir)
        if found and not resumes_here:
            raise RunDirError(f'{run_dir} already holds the snapshots or training states of a run', run_dir, False)
        for name in os.listdir(run_dir):
            if TEMP_FILE_RE.fullmatch(name):
                os.remove(os.path.join(run_dir, name))
    except BaseException:
        lock.release()
        raise
    return lock
