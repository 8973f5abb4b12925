"""Everything about files: network pickles (ours and the published FDM/EDM ones) and training states.

`load_network_pickle` reads our snapshots and the pickles published with FDM and EDM through an unpickler
that only knows an explicit list of harmless callables, so that a file cannot run code. Published pickles
embed the source of their classes (`module_src`); it is never executed: each class name is mapped onto this
project's class of the same name and the parameters are restored by name (docs/compatibility.md#pickles).

A training state (`training-state-*.pt`) holds the network, EMA, optimizer, loss (warm-up step), augment
pipe, counters and every RNG as tensors and numbers: `torch.load(weights_only=True)` reads it, and a resumed
run continues bit for bit (docs/design.md#training-states).
"""

import collections
import io
import os
import pickle
import random
import re
import warnings

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence
from training import augment
from training import loss
from training import networks

UnsafePickleError = persistence.UnsafePickleError
_PERSISTENT_MODULES = ('training.networks', 'training.loss', 'training.augment')  # whose classes pickles may name


class _Record:
    """Inert stand-in for a pickled module: a class name and the object's `__dict__`, nothing callable."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f'{self.class_name}: pickled state is a {type(state).__name__}, not a dict')
        self.state = state


def _published_record(meta):
    """Check the `meta` of `_reconstruct_persistent_obj(meta)` and keep it as a record; module_src is dropped."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        raise ValueError('published persistent object is not of type "class", version 6')
    if not isinstance(meta.get('class_name'), str) or not isinstance(meta.get('state'), dict):
        raise ValueError('published persistent object lacks a class_name or a state dict')
    return _Record(meta['class_name'], meta['state'])


def _torch_module_record(class_name):
    """A record class standing in for the torch.nn container `class_name` (pickled as NEWOBJ + BUILD)."""
    def __new__(cls, *args):
        return _Record.__new__(cls)
    def __init__(self, *args):
        raise UnsafePickleError(f'torch.nn.{class_name} may only appear as a pickled module')
    return type(f'_{class_name}Record', (_Record,), dict(__new__=__new__, __init__=__init__, class_name=class_name))


_TORCH_MODULE_RECORDS = {name: _torch_module_record(name) for name in ('ModuleDict', 'ModuleList', 'Sequential', 'Identity', 'Dropout', 'SiLU')}


def _module_state(node, where):
    """The `__dict__` of a pickled module: a record's state, or a real module's attributes (plain pickle.load)."""
    if isinstance(node, _Record):
        return node.state
    if isinstance(node, torch.nn.Module):
        return vars(node)
    raise ValueError(f'{where}: expected a module, found {type(node).__name__}')


def _record_tensors(node, prefix=''):
    """Parameters and persistent buffers of a pickled module tree by dotted name, as state_dict() names them."""
    state = _module_state(node, prefix.rstrip('.') or 'network')
    tensors = {}
    non_persistent = state.get('_non_persistent_buffers_set') or ()
    for group in ('_parameters', '_buffers'):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in (non_persistent if group == '_buffers' else ()):
                tensors[prefix + name] = tensor
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            tensors.update(_record_tensors(child, f'{prefix}{name}.'))
    return tensors


def _published_class(class_name):
    found = persistence.registered_classes_named(class_name)
    if not found:
        raise UnsafePickleError(f'refusing class {class_name!r}: this project has no such class in {", ".join(_PERSISTENT_MODULES)}')
    return found[0]


def _build_published(record):
    """This project's object for a published record: constructed from its stored arguments, then its tensors."""
    cls = _published_class(record.class_name)
    state = record.state
    init_args = state.get('_init_args', state.get('init_args', ()))
    init_kwargs = dict(state.get('_init_kwargs', state.get('init_kwargs', {})))
    if cls is networks.FDM_VEPrecond:  # its published weights were trained for m = 1 whatever the arguments say
        init_kwargs['fdm_multiplier'] = networks.PUBLISHED_VE_FDM_MULTIPLIER
    elif issubclass(cls, networks.FDMInputScaling) and 'fdm_multiplier' not in init_kwargs:
        init_kwargs['fdm_multiplier'] = networks.PUBLISHED_FDM_MULTIPLIER_DEFAULT  # upstream's default, not ours
    inner = (state.get('_modules') or {}).get('model')
    if 'model_type' not in init_kwargs and isinstance(inner, _Record):
        init_kwargs['model_type'] = inner.class_name  # upstream defaults differ from ours; the pickle says which
    obj = persistence.construct(cls, init_args, init_kwargs)
    if isinstance(obj, torch.nn.Module):
        persistence.restore_module(obj, _record_tensors(record), state.get('training', False))
    return obj


def _published_root_names():
    """Classes that a published pickle holds at its top level: preconditioners, losses, augment pipes."""
    names = {path.rsplit('.', 1)[1] for path in networks.PRECONDITIONERS.values()}
    for module in (loss, augment):
        names.update(name for name, value in vars(module).items() if getattr(value, '_persistent', False) is True)
    return names


def _read_published(meta):
    """`_reconstruct_persistent_obj(meta)` under plain `pickle.load`, without executing `module_src`.

    Building blocks stay inert records and each top-level object (preconditioner, loss, augment pipe) is
    rebuilt from this project's class; `load_network_pickle` is the safe way to read.
    """
    record = _published_record(meta)
    return _build_published(record) if record.class_name in _published_root_names() else record


persistence.set_published_reader(_read_published)


def _load_storage_bytes(data):
    """Tensor storage as torch pickles it; the stock `_load_from_bytes` would unpickle with weights_only=False."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f'tensor storage data is a {type(data).__name__}, not bytes')
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'tensor storage holds a pickle that is not plain tensor data: {_weights_only_reason(e)}') from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'tensor storage data holds a {type(storage).__name__}, not a storage')
    return storage


def _weights_only_reason(error):
    """The informative line of torch's long weights_only error message (the rest is generic advice)."""
    generic = ('Weights only load failed', 'Please file an issue', 'WeightsUnpickler error', 'Check the documentation')
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(generic)]
    return (specific or lines or [type(error).__name__])[0]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'tensor built on a {type(storage).__name__}, not a storage')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, collections.OrderedDict(),
                                           metadata if isinstance(metadata, dict) else None)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """A parameter; hooks and Python attributes of the pickled Parameter object are not part of a network."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f'parameter built on a {type(data).__name__}, not a tensor')
    return torch.nn.Parameter(data, bool(requires_grad))


def _copyreg_reconstructor(cls, base, state):
    """Protocol 0/1 form of object creation; only records may be created this way."""
    if not (isinstance(cls, type) and issubclass(cls, _Record)) or base is not object or state is not None:
        raise UnsafePickleError('copyreg._reconstructor may only create pickled torch.nn containers')
    return cls.__new__(cls)


def _codecs_encode(text, encoding):
    """Protocol 2 writes bytes as latin-1 text."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise UnsafePickleError('_codecs.encode is only accepted for latin1 text')
    return text.encode('latin1')


def _numpy_dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in 'biufc':
        raise UnsafePickleError(f'numpy dtype {dtype} is not numeric')
    return dtype


def _numpy_scalar(dtype, data):
    """A numpy number (upstream losses store some, e.g. the warm-up step factor)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError('numpy scalar is not a plain number')
    return np.frombuffer(data, dtype=dtype)[0]


class _EasyDict:
    """Creates a dnnlib.EasyDict when the pickle asks for one, so that the real class is never handed out."""

    def __new__(cls, *args):
        return dnnlib.EasyDict(*args)

    def __setstate__(self, state):
        """Present so that a pickle cannot set attributes on this class itself (BUILD calls this instead)."""
        raise UnsafePickleError('dnnlib.util.EasyDict cannot take pickled state')


def _reconstruct_ours(module_name, class_name, *args):
    """`persistence._reconstruct` limited to the modules whose classes snapshots hold (no other module is imported)."""
    if module_name not in _PERSISTENT_MODULES:
        raise UnsafePickleError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class of {_PERSISTENT_MODULES}')
    return persistence._reconstruct(module_name, class_name, *args)


# Everything a network pickle may refer to, as (module, name) → what the unpickler gets instead.
_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct'): _reconstruct_ours,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _published_record,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('torch', 'device'): torch.device,
    ('torch', 'Size'): torch.Size,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytearray'): bytearray,
    ('builtins', 'complex'): complex,
    ('builtins', 'object'): object,
    ('copyreg', '_reconstructor'): _copyreg_reconstructor,
    ('_codecs', 'encode'): _codecs_encode,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    **{('torch', name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{('torch.nn.modules.container', name): _TORCH_MODULE_RECORDS[name] for name in ('ModuleDict', 'ModuleList', 'Sequential')},
    ('torch.nn.modules.linear', 'Identity'): _TORCH_MODULE_RECORDS['Identity'],
    ('torch.nn.modules.dropout', 'Dropout'): _TORCH_MODULE_RECORDS['Dropout'],
    ('torch.nn.modules.activation', 'SiLU'): _TORCH_MODULE_RECORDS['SiLU'],
}

# Protocols 0-2 name these modules as Python 2 did.
_PYTHON2_MODULE_NAMES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names in `_ALLOWED_GLOBALS`; any other name stops the load before it can be called."""

    def find_class(self, module, name):
        module = _PYTHON2_MODULE_NAMES.get(module, module)
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f'refusing {module}.{name}: not an allowed type in a network pickle')
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError('refusing a persistent id: network pickles have none')


def load_network_pickle(f_or_path):
    """Read a network pickle (path or open binary file) without running code from it.

    Returns its dict: 'ema' (the network) and whatever else it holds ('loss_fn', 'augment_pipe',
    'dataset_kwargs'). Accepts this project's snapshots and published FDM/EDM pickles (docs/design.md#snapshots).
    Raises UnsafePickleError when the file refers to anything else, ValueError when it is unreadable.
    """
    if isinstance(f_or_path, (str, os.PathLike)):
        path = os.fspath(f_or_path)
        try:
            f = open(path, 'rb')
        except FileNotFoundError:
            raise FileNotFoundError(f'network pickle not found: {path}') from None
        with f:
            return _load(f, path)
    return _load(f_or_path, getattr(f_or_path, 'name', None) or '<network pickle stream>')


def _load(f, name):
    try:
        payload = _RestrictedUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{name}: {e}') from None
    except ValueError as e:
        raise ValueError(f'{name}: {persistence.one_line(e)}') from None
    except Exception as e:  # nothing from the file can run here, so any failure means a damaged file
        raise ValueError(f'{name}: not a readable network pickle (truncated or corrupt?): {type(e).__name__}: {persistence.one_line(e)}') from None
    if not isinstance(payload, dict):
        raise ValueError(f'{name}: expected a dict with key "ema", found a {type(payload).__name__}')
    if 'ema' not in payload:
        raise ValueError(f'{name}: no "ema" network in this pickle; it holds keys {sorted(map(str, payload))}')
    return {key: value for key, value in ((key, _resolve(key, value, name)) for key, value in payload.items()) if value is not _OMITTED}


_OMITTED = object()


def _resolve(key, value, name):
    """Replace a published record at the top level with our object; only 'ema' must succeed."""
    if not isinstance(value, _Record):
        return value
    try:
        if type(value) is not _Record:
            raise ValueError(f'a bare torch.nn.{value.class_name} is not a network')
        return _build_published(value)
    except ValueError as e:
        if key == 'ema':
            raise type(e)(f'{name}: "ema": {e}') from None
        warnings.warn(f'{name}: leaving out {key!r}: {e}', stacklevel=3)
        return _OMITTED


def save_network_pickle(path, data):
    """Write a network snapshot dict (with 'ema') atomically, as a plain pickle without embedded source."""
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'{path}: a network snapshot must be a dict with an "ema" network')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(data, f)


def load_transfer(path, net, verbose=True):
    """The snapshot dict at `path` (file or URL; ours or published), checked to fit `net` (--transfer)."""
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            data = load_network_pickle(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise TrainingStateError(f'{path}: {err}') from None
    try:
        check_transferable(data, net)
    except TrainingStateError as err:
        raise TrainingStateError(f'{path}: {err}') from None
    return data


def check_transferable(data, net):
    """Check that the snapshot `data['ema']` has parameters of the same names and shapes as `net`."""
    src = data.get('ema') if isinstance(data, dict) else None
    if not isinstance(src, torch.nn.Module):
        raise TrainingStateError('holds no network under "ema"')
    src_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(src)}
    dst_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(net)}
    wrong = [f'{name} {src_shapes[name]} vs {shape}' for name, shape in dst_shapes.items()
             if name in src_shapes and src_shapes[name] != shape]
    if wrong:
        raise TrainingStateError(f'{len(wrong)} tensors differ in shape from the network, e.g. {wrong[0]}')
    if not any(name in src_shapes for name in dst_shapes):
        raise TrainingStateError('shares no parameter names with the network')


STATE_FORMAT = 'fdm-training-state'
STATE_VERSION = 1
STATE_FILE_RE = re.compile(r'training-state-(\d+)(?:\.(\d{3}))?\.pt')  # kimg, images beyond it when ticks < 1 kimg
STATE_KEYS = ('format', 'version', 'net', 'ema', 'optimizer', 'loss_fn', 'augment_pipe', 'cur_nimg', 'cur_step',
              'cur_tick', 'tick_start_nimg', 'sampler_nimg', 'total_time_sec', 'rng_states', 'world_size', 'options')


class TrainingStateError(ValueError):
    """A training state or snapshot that cannot be used; the message names the file and what is wrong."""


def _nimg_label(cur_nimg, kimg_per_tick):
    """'{kimg:06d}' as published; with ticks under 1 kimg ('.{images beyond it:03d}' added) several fall in one kimg."""
    label = f'{cur_nimg // 1000:06d}'
    return label + f'.{cur_nimg % 1000:03d}' if kimg_per_tick < 1 else label


def snapshot_name(cur_nimg, kimg_per_tick=1):
    return f'network-snapshot-{_nimg_label(cur_nimg, kimg_per_tick)}.pkl'


POWER_EMA_FILE_RE = re.compile(r'power-ema-(\d+)(?:\.(\d{3}))?-(\d+\.\d+)\.pkl')  # kimg, images beyond it, σ_rel


def power_ema_name(cur_nimg, std, kimg_per_tick=1):
    """The pickle of the power-EMA profile of σ_rel `std` at a snapshot (training.ema)."""
    return f'power-ema-{_nimg_label(cur_nimg, kimg_per_tick)}-{std:.3f}.pkl'


def state_name(cur_nimg, kimg_per_tick=1):
    return f'training-state-{_nimg_label(cur_nimg, kimg_per_tick)}.pt'


def resolve_resume_path(path):
    """A state file as given, or the newest `training-state-*.pt` in a run directory."""
    if os.path.isdir(path):
        found = [(int(m.group(1)) * 1000 + int(m.group(2) or 0), name) for name in os.listdir(path)
                 if (m := STATE_FILE_RE.fullmatch(name))]
        if not found:
            raise TrainingStateError(f'{path} contains no training-state-*.pt file')
        return os.path.join(path, max(found)[1])
    if not os.path.isfile(path):
        raise TrainingStateError(f'{path} does not exist')
    return path


def load_training_state(path, mmap=False):
    """Read a training state with `weights_only=True` (no code runs) and check that it is one of ours."""
    try:
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
    return state


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
    except (RuntimeError, ValueError, KeyError) as err:
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
