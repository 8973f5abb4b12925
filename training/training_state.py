"""Training states (`training-state-*.pt`): what a bit-exact resume needs, written and read without pickled code.

A state holds the network, EMA, optimizer, loss (warm-up step), augment pipe, counters and every process's RNG as
tensors and numbers: `torch.load(weights_only=True)` reads it, its fields are checked at load, and a resumed run
continues bit for bit (docs/design.md#training-states). Also here: what a run starts from otherwise, a snapshot
checked to fit the network (--transfer).
"""

import math
import os
import pickle
import random

import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from training import checkpoints
from training import safe_pickle

STATE_FORMAT = 'fdm-training-state'
STATE_VERSION = 1
STATE_KEYS = ('format', 'version', 'net', 'ema', 'optimizer', 'loss_fn', 'augment_pipe', 'cur_nimg', 'cur_step',
              'cur_tick', 'tick_start_nimg', 'sampler_nimg', 'total_time_sec', 'rng_states', 'world_size', 'options')


class TrainingStateError(ValueError):
    """A training state or snapshot that cannot be used; the message names the file and what is wrong."""


def resolve_resume_path(path):
    """A state file as given, or the newest `training-state-*.pt` in a run directory."""
    if os.path.isdir(path):
        found = [(int(m.group(1)) * 1000 + int(m.group(2) or 0), name) for name in os.listdir(path)
                 if (m := checkpoints.STATE_FILE_RE.fullmatch(name))]
        if not found:
            raise TrainingStateError(f'{path} contains no training-state-*.pt file')
        return os.path.join(path, max(found)[1])
    if not os.path.isfile(path):
        raise TrainingStateError(f'{path} does not exist')
    return path


def load_training_state(path, mmap=False):
    """Read a training state with `weights_only=True` (no code runs) and check that it is one of ours."""
    try:
        if zipfile.is_zipfile(path):  # torch.load would inflate a deflated record in full before any check
            with open(path, 'rb') as f:
                safe_pickle.check_archive_sizes(f, os.fstat(f.fileno()).st_size, what='training state')
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:  # torch reports truncation, bad zips and foreign pickles with assorted types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingStateError(f'{path} is not a readable training state (truncated or corrupt?): {reason}') from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise TrainingStateError(f'{path} is not a training state written by this train.py')
    if state.get('version') != STATE_VERSION:
        raise TrainingStateError(f'{path} has state format version {state.get("version")}, expected {STATE_VERSION}')
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise TrainingStateError(f'{path} lacks {", ".join(missing)}')
    problem = _state_field_problem(state)
    if problem is not None:
        raise TrainingStateError(f'{path} is damaged or not written by this train.py: {problem}')
    return state


def _is_int(value, minimum=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_tensor_dict(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items())


def _rng_problem(rng):
    """What is wrong with one process's generator states (as `rng_state` writes them), or None."""
    if not isinstance(rng, dict) or not all(isinstance(rng.get(key), dict) for key in ('numpy', 'python')):
        return 'not a dict of torch_cpu, torch_cuda, numpy and python states'
    torch_cpu, np_state, py_state = rng.get('torch_cpu'), rng['numpy'], rng['python']
    if not (isinstance(torch_cpu, torch.Tensor) and torch_cpu.dtype == torch.uint8 and torch_cpu.numel() > 0):
        return 'torch_cpu is not a byte tensor'
    if rng.get('torch_cuda') is not None and not isinstance(rng['torch_cuda'], torch.Tensor):
        return 'torch_cuda is not a tensor'
    keys = np_state.get('keys')
    if not (isinstance(keys, torch.Tensor) and keys.shape == (624,) and _is_int(np_state.get('pos'))
            and np_state['pos'] <= 624 and _is_int(np_state.get('has_gauss')) and isinstance(np_state.get('cached_gaussian'), float)):
        return 'numpy is not an MT19937 state'
    internal = py_state.get('internal')
    if not (isinstance(internal, torch.Tensor) and internal.shape == (625,) and _is_int(py_state.get('version'))
            and (py_state.get('gauss_next') is None or isinstance(py_state['gauss_next'], float))):
        return 'python is not a random.getstate() state'
    return None


def _state_field_problem(state):
    """The first field of a training state whose type or range is wrong, in words, or None; checked at load, so that
    --dry-run and the start of a run refuse what the loop would fail on later."""
    for key in ('cur_nimg', 'cur_step', 'cur_tick', 'tick_start_nimg', 'sampler_nimg'):
        if not _is_int(state[key]):
            return f'{key} is {state[key]!r}, not a non-negative int'
    if state['tick_start_nimg'] > state['cur_nimg']:
        return f'tick_start_nimg {state["tick_start_nimg"]} lies beyond cur_nimg {state["cur_nimg"]}'
    time_sec = state['total_time_sec']
    if not (isinstance(time_sec, (int, float)) and not isinstance(time_sec, bool) and math.isfinite(time_sec) and time_sec >= 0):
        return f'total_time_sec is {time_sec!r}, not a non-negative number'
    if not _is_int(state['world_size'], minimum=1):
        return f'world_size is {state["world_size"]!r}, not a positive int'
    options = state['options']
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        return f'options is a {type(options).__name__}, not a dict of option names'
    if not _is_int(options.get('seed')):
        return f'options.seed is {options.get("seed")!r}, not a non-negative int'
    for key in ('net', 'ema'):
        if not _is_tensor_dict(state[key]) or not state[key]:
            return f'{key} is not a state_dict of tensors'
    optimizer = state['optimizer']
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get('state'), dict) and isinstance(optimizer.get('param_groups'), list)
            and all(isinstance(group, dict) and isinstance(group.get('params'), list) for group in optimizer['param_groups'])):
        return 'optimizer is not an optimizer state_dict (state and param_groups)'
    if not isinstance(state['loss_fn'], dict) or not (state['augment_pipe'] is None or isinstance(state['augment_pipe'], dict)):
        return 'loss_fn or augment_pipe is not a state_dict'
    if not (state.get('power_ema') is None or isinstance(state['power_ema'], dict)):
        return 'power_ema is not a state_dict'
    rng_states = state['rng_states']
    if not isinstance(rng_states, list) or len(rng_states) != state['world_size']:
        return f'rng_states is not a list of {state["world_size"]} (world_size) entries'
    for rank, rng in enumerate(rng_states):
        problem = _rng_problem(rng)
        if problem is not None:
            return f'rng_states[{rank}]: {problem}'
    return None


def save_training_state(path, net, ema, optimizer, loss_fn, augment_pipe, counters, total_time_sec, rng_states,
                        world_size, param_digests, options, power_ema=None):
    """Write a training state atomically; `counters` holds cur_nimg, cur_step, cur_tick, tick_start_nimg.

    `power_ema` (a training.ema.PowerEMA) adds its profiles under the optional key 'power_ema'.
    """
    state = dict(
        format          = STATE_FORMAT,
        version         = STATE_VERSION,
        net             = _cpu_state_dict(net),
        ema             = _cpu_state_dict(ema),
        optimizer       = optimizer.state_dict(),
        loss_fn         = loss_fn.state_dict(),
        augment_pipe    = augment_pipe.state_dict() if hasattr(augment_pipe, 'state_dict') else None,
        cur_nimg        = counters['cur_nimg'],
        cur_step        = counters['cur_step'],
        cur_tick        = counters['cur_tick'],
        tick_start_nimg = counters['tick_start_nimg'],
        sampler_nimg    = counters['cur_nimg'],
        total_time_sec  = total_time_sec,
        rng_states      = rng_states,
        world_size      = world_size,
        param_digests   = param_digests,
        options         = options,
    )
    if power_ema is not None:
        state['power_ema'] = power_ema.state_dict()
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(state, f)


def restore_training_state(state, path, net, ema, optimizer, loss_fn, augment_pipe):
    """Load the modules' and optimizer's part of a training state; raises TrainingStateError naming `path`."""
    try:
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        loss_fn.load_state_dict(state['loss_fn'])
        if augment_pipe is not None and state['augment_pipe'] is not None:
            augment_pipe.load_state_dict(state['augment_pipe'])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:  # a garbage optimizer state raises any
        reason = str(err).strip().splitlines()[0]
        raise TrainingStateError(f'{path} does not fit this network/optimizer: {reason}') from None


def restore_power_ema(state, path, power_ema):
    """Load the power-EMA profiles of a training state; raises TrainingStateError naming `path`."""
    if state.get('power_ema') is None:
        raise TrainingStateError(f'{path} holds no power-EMA profiles (the run had no --ema_profiles); resume '
                                 f'without --ema_profiles, or start a new run with them')
    if state['power_ema']['step'] != state['cur_step']:
        raise TrainingStateError(f'{path}: its power-EMA profiles are at step {state["power_ema"]["step"]}, '
                                 f'the run at step {state["cur_step"]}')
    try:
        power_ema.load_state_dict(state['power_ema'])
    except (RuntimeError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0]
        raise TrainingStateError(f'{path} does not fit this run\'s power-EMA profiles: {reason}') from None


def _cpu_state_dict(module):
    return {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}


def rng_state(device):
    """Every generator of this process as tensors and numbers, loadable with `weights_only=True`."""
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return dict(
        torch_cpu   = torch.get_rng_state(),
        torch_cuda  = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
        numpy       = dict(keys=torch.from_numpy(np_keys.astype(np.int64)), pos=int(np_pos),
                           has_gauss=int(np_has_gauss), cached_gaussian=float(np_cached)),
        python      = dict(version=py_version, internal=torch.tensor(py_internal, dtype=torch.int64), gauss_next=py_gauss),
    )


def set_rng_state(state, device):
    torch.set_rng_state(state['torch_cpu'])
    if device.type == 'cuda' and state['torch_cuda'] is not None:
        torch.cuda.set_rng_state(state['torch_cuda'], device)
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    py_state = state['python']
    random.setstate((py_state['version'], tuple(py_state['internal'].tolist()), py_state['gauss_next']))


def load_transfer(path, net, verbose=True):
    """The snapshot dict at `path` (file or URL; ours or published), checked to fit `net` (--transfer)."""
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            data = checkpoints.load_network(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise TrainingStateError(f'{path}: {err}') from None
    try:
        check_transferable(data, net)
    except TrainingStateError as err:
        raise TrainingStateError(f'{path}: {err}') from None
    return data


def check_transferable(data, net):
    """Check that the snapshot `data['ema']` has exactly the parameter and buffer names and shapes of `net`: a partial
    match would start some layers from the snapshot and the rest from scratch without a word."""
    src = data.get('ema') if isinstance(data, dict) else None
    if not isinstance(src, torch.nn.Module):
        raise TrainingStateError('holds no network under "ema"')
    src_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(src)}
    dst_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(net)}
    problems = [(f'{len(names)} missing from the snapshot', names) for names in [[n for n in dst_shapes if n not in src_shapes]] if names]
    problems += [(f'{len(names)} not in the network', names) for names in [[n for n in src_shapes if n not in dst_shapes]] if names]
    problems += [(f'{len(names)} of another shape', names) for names in [[f'{n} {src_shapes[n]} vs {shape}' for n, shape in dst_shapes.items()
                                                                         if n in src_shapes and src_shapes[n] != shape]] if names]
    if problems:
        described = '; '.join(f'{what}: {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}' for what, names in problems)
        raise TrainingStateError(f'does not fit the network (same options needed, e.g. --arch, --cres, --cbase): {described}')
