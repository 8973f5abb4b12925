"""Process-group set-up and rank helpers for torchrun (single or multi-node) and plain single-process runs.

Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) describes the job
and `init()` joins the process group: nccl when the device is CUDA, gloo on CPU. Without those variables the
run is one process of world size 1 and no process group is created. A CPU run makes no CUDA call.
"""

import datetime
import os
import time

import numpy as np
import torch
import torch.distributed as dist

_device = None

STARTUP_TIMEOUT_SEC = 300               # How long joining the process group may take, retries included.
ATTEMPT_TIMEOUT_SEC = 60                # How long one attempt waits for the other processes.
RETRY_DELAY_SEC = 2                     # Pause between attempts (a port in use, a peer still starting).


class ProcessGroupError(RuntimeError):
    """The process group could not be joined within STARTUP_TIMEOUT_SEC; the message is one line."""


def _is_distributed():
    return dist.is_available() and dist.is_initialized()


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def init(device=None):
    """Choose the device ('cpu', 'cuda' or None for auto) and join the torchrun process group if there is one."""
    global _device
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f'device must be cpu or cuda, got {device}')

    local_rank = get_local_rank()
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError('device cuda requested but CUDA is not available')
        device = torch.device('cuda', local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)

    launched = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if launched and not _is_distributed():
        if not dist.is_available():
            raise RuntimeError('this PyTorch build has no torch.distributed, but RANK/WORLD_SIZE are set')
        _join_process_group(device)
    _device = device
    return device


def _join_process_group(device):
    """Rendezvous through torchrun's environment (its agent's store after an elastic restart) and join the group,
    retrying failed attempts until STARTUP_TIMEOUT_SEC; the group itself keeps torch's default timeout."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    where = f'{os.environ.get("MASTER_ADDR", "?")}:{os.environ.get("MASTER_PORT", "?")}'
    while True:
        attempt_sec = max(min(ATTEMPT_TIMEOUT_SEC, deadline - time.monotonic()), 1)
        try:
            store, rank, world_size = next(dist.rendezvous('env://', timeout=datetime.timedelta(seconds=attempt_sec)))
            store.set_timeout(dist.default_pg_timeout)  # later store waits (new groups) as init_method='env://' has them
            if device.type == 'cuda':
                dist.init_process_group(backend='nccl', store=store, rank=rank, world_size=world_size, device_id=device)
            else:
                dist.init_process_group(backend='gloo', store=store, rank=rank, world_size=world_size)
            return
        except ValueError as err:  # torchrun's variables missing or malformed: no retry mends that
            raise ProcessGroupError(f'cannot join the process group: {_first_line(err)}') from None
        except (RuntimeError, OSError) as err:  # torch's DistNetworkError/DistStoreError are RuntimeErrors
            if time.monotonic() + RETRY_DELAY_SEC >= deadline:
                raise ProcessGroupError(f'could not join the process group at {where} as rank '
                                        f'{os.environ.get("RANK")} of {os.environ.get("WORLD_SIZE")} within '
                                        f'{STARTUP_TIMEOUT_SEC:g} s: {_first_line(err)}') from None
            time.sleep(RETRY_DELAY_SEC)


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def shutdown():
    """Leave the process group (if any); call once at the end of a run so torch does not warn about it."""
    if _is_distributed():
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if _is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if _is_distributed() else 1


def get_local_rank():
    """This process's index on its node (torchrun's LOCAL_RANK), which picks its GPU."""
    return _env_int('LOCAL_RANK', 0)


def get_device():
    """The device chosen by `init()`; before `init()`, CUDA if available else CPU."""
    if _device is not None:
        return _device
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def get_backend():
    """'nccl', 'gloo', or None when there is no process group."""
    return dist.get_backend() if _is_distributed() else None


def get_reduce_device():
    """Where tensors must live for collectives: the CUDA device under nccl, otherwise the CPU."""
    return get_device() if get_backend() == 'nccl' else torch.device('cpu')


def is_main():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, so a multi-GPU run logs each line once."""
    if is_main():
        print(*args, **kwargs)


def barrier():
    """Wait for every rank; a no-op in a single process."""
    if not _is_distributed():
        return
    if get_backend() == 'nccl':
        dist.barrier(device_ids=[get_device().index])
    else:
        dist.barrier()


def all_reduce_sum_(tensor):
    """Sum `tensor` over ranks in place and return it; moves through the backend's device when needed."""
    if not _is_distributed():
        return tensor
    reduce_device = get_reduce_device()
    if tensor.device == reduce_device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(reduce_device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def rank0_first(fn):
    """Run `fn` on rank 0 first (it fills download caches), then on the others; rank 0 releases them even on failure."""
    if not is_main():
        barrier()
    try:
        return fn()
    finally:
        if is_main():
            barrier()


def split_seeds(seeds, max_batch_size, rank, world_size):
    """This rank's batches: the seeds split into a multiple of world_size near-equal batches, dealt round-robin.

    Returns (this rank's batches, all batches); with fewer seeds than ranks some batches are empty.
    """
    num_batches = (max(len(seeds) - 1, 0) // (max_batch_size * world_size) + 1) * world_size
    all_batches = np.array_split(np.array(seeds, dtype=np.int64), num_batches)
    return all_batches[rank::world_size], all_batches
