"""What surrounds the training loop's steps: stop signals, the end of the DataLoader workers and the failure policy.

The loop runs inside `RunControl`: SIGINT/SIGTERM become a request to stop after the current step, and an
exception becomes one `TrainingError` line that says where the run was and whether a training state was written
(one is saved when the failure left the step whole and the run is a single process: other processes would wait
in its collectives); the DataLoader workers end on every way out.
"""

import contextlib
import multiprocessing
import signal
import time

import torch
import torch.distributed as dist

from torch_utils import distributed
from training import divergence

WORKER_EXIT_SEC = 5                     # How long DataLoader workers get to end before they are killed.


class TrainingError(RuntimeError):
    """The run failed; the one-line message says where and what, and whether a training state was written.

    `saved_in` is the run directory when a state was saved on the way out (the run can be resumed from it)."""

    def __init__(self, message, saved_in=None):
        super().__init__(message)
        self.saved_in = saved_in


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; a second signal aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        self.group = None
        if distributed.get_world_size() > 1:  # a CPU side channel, so polling never syncs the GPU stream
            self.group = dist.new_group(backend='gloo')

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        saving = ('saving the training state' if self.group is None else
                  'saving the training state if every process is still running (else the newest state stays)')
        print(f'\n{signal.Signals(signum).name}: finishing this step and {saving} (send again to abort)', flush=True)
        self.uninstall()

    def agreed(self):
        """True on every rank when any rank was signalled."""
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the training process, which stops cleanly and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(iterator):
    """End the DataLoader workers of `iterator` now; they ignore SIGTERM, so those that linger get SIGKILL.

    Left to interpreter exit, multiprocessing would SIGTERM and then wait for them forever.
    """
    workers = list(getattr(iterator, '_workers', []))
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()  # asks them to end (their "done" event) and waits up to torch's status interval
    deadline = time.monotonic() + WORKER_EXIT_SEC
    for worker in workers:
        worker.join(timeout=max(deadline - time.monotonic(), 0))
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=1)
    multiprocessing.active_children()  # reaps them


def one_line(err):
    """The gist of an exception in one line. A DataLoader worker's error comes back with the worker's traceback in
    its message, whose last line is the original error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if 'Original Traceback' in str(err):
        return lines[-1]
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


class RunControl:
    """The context of the loop: `with RunControl(...) as control:` around it, `control.writing(...)` around writes
    and `control.updating()` around the parameter update, the two moments when no state may be saved after a
    failure."""

    def __init__(self,
        run_dir,                        # Where states go; None = nowhere.
        data_iterator,                  # The DataLoader iterator whose workers must end with the run.
        save_state,                     # Writes a training state of the run as it stands.
        check_divergence,               # Raises divergence.DivergenceError when the run diverged: then nothing is saved.
        where,                          # Returns (cur_nimg, cur_step) for the message.
        newest_state,                   # Returns the path of the newest state of run_dir, or None.
    ):
        self.run_dir = run_dir
        self.data_iterator = data_iterator
        self.save_state = save_state
        self.check_divergence = check_divergence
        self.where = where
        self.newest_state = newest_state
        self.stop = StopRequest()
        self.doing = ''                 # while what the failure came, for the message
        self.step_whole = True          # False while the parameters are half-updated
        self.writing_state = False

    def __enter__(self):
        self.stop.install()
        return self

    @contextlib.contextmanager
    def writing(self, what, state=False):
        self.doing, self.writing_state = f' while {what}', state
        yield
        self.doing, self.writing_state = '', False

    @contextlib.contextmanager
    def updating(self):
        self.step_whole = False
        yield
        self.step_whole = True

    def __exit__(self, kind, err, traceback):
        self.stop.uninstall()
        stop_workers(self.data_iterator)  # first: a worker's pending error must not outlive the run
        if err is None or not isinstance(err, Exception):
            return False
        message, saved_in = self._message(err)
        raise TrainingError(message, saved_in) from err

    def _message(self, err):
        """(the one-line message, the run directory when a state was saved now)."""
        cur_nimg, cur_step = self.where()
        doing, saved, saved_in = self.doing, '', None
        if not isinstance(err, divergence.DivergenceError):
            try:
                self.check_divergence()
            except divergence.DivergenceError as diverged:
                err = diverged  # the diverged weights must not be saved whatever failed afterwards
        world_size = distributed.get_world_size()
        if isinstance(err, divergence.DivergenceError):
            doing, saved = '', f'; nothing of it was saved{self._newest_note()}'
        elif self.writing_state:
            saved = '; earlier training states are intact'
        elif world_size > 1:
            saved = (f'; no training state saved (a run of {world_size} processes saves one only when all stop '
                     f'together){self._newest_note()}')
        elif self.step_whole and self.run_dir is not None:
            try:
                self.save_state()
                saved, saved_in = '; training state saved', self.run_dir
            except Exception as save_err:
                saved = f'; no training state saved ({one_line(save_err)})'
        return f'training failed at {cur_nimg / 1000:g} kimg (step {cur_step}){doing}: {one_line(err)}{saved}', saved_in

    def _newest_note(self):
        newest = self.newest_state()
        return f'; the newest training state is {newest}' if newest else '; no training state was written before'
