"""Pickling of this project's networks and training objects, and safe loading of network pickles.

A class decorated with `persistent_class` remembers its constructor arguments and pickles as
`_reconstruct(module, class_name, init_args, init_kwargs, state, training)`: plain `pickle.load` rebuilds
it from this repository's own classes, with no source code in the file.

`load_network_pickle` reads such snapshots and the pickles published with FDM and EDM through an unpickler
that only knows an explicit list of harmless callables, so that a file cannot run code. Published pickles
embed the source of their classes (`module_src`); it is never executed: each class name is mapped onto this
project's class of the same name and the parameters are restored by name (docs/compatibility.md#pickles).
"""

import collections
import copy
import functools
import importlib
import io
import os
import pickle
import warnings

import numpy as np
import torch

import dnnlib

# Modules whose persistent classes may be rebuilt from a pickle.
TRUSTED_MODULES = ('training.networks', 'training.loss', 'training.augment')


class UnsafePickleError(ValueError):
    """A pickle refers to something that is not a known, safe type; it was refused before that could run."""


def persistent_class(cls):
    """Record `init_args`/`init_kwargs` of each instance and pickle it by class name, arguments and state."""
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if type(self) is cls:  # the outermost decorated class records the arguments
            object.__setattr__(self, '_init_args', copy.deepcopy(args))
            object.__setattr__(self, '_init_kwargs', copy.deepcopy(kwargs))

    def __reduce__(self):
        if isinstance(self, torch.nn.Module):
            state = self.state_dict(keep_vars=True)  # parameters keep their requires_grad flag
        else:
            state = self.state_dict() if hasattr(self, 'state_dict') else None
        training = getattr(self, 'training', None)
        args = (type(self).__module__, type(self).__qualname__, self._init_args, self._init_kwargs, state, training)
        return (_reconstruct, args)

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    cls._persistent = True
    cls.init_args = property(lambda self: copy.deepcopy(self._init_args))
    cls.init_kwargs = property(lambda self: copy.deepcopy(self._init_kwargs))
    return cls


def _trusted_class(module_name, class_name):
    """The persistent class `module_name.class_name`, or None when it is not one this project may rebuild."""
    if module_name not in TRUSTED_MODULES or not isinstance(class_name, str):
        return None
    cls = getattr(importlib.import_module(module_name), class_name, None)
    return cls if isinstance(cls, type) and getattr(cls, '_persistent', False) is True else None


def _restore_module(module, tensors, training):
    """Load `tensors` (dotted name → tensor) into `module` with strict names, keeping requires_grad flags."""
    if not isinstance(tensors, dict):
        raise ValueError(f'cannot restore {type(module).__name__}: its state is a {type(tensors).__name__}, not a dict')
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    if device is not None:
        module.to(device)  # so that copy.deepcopy of a CUDA network stays on CUDA
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f'cannot restore {type(module).__name__}: {_one_line(e)}') from None
    for name, param in module.named_parameters():
        if isinstance(tensors.get(name), torch.Tensor):
            param.requires_grad_(tensors[name].requires_grad)
    if training is not None:
        module.train(bool(training))


def _reconstruct(module_name, class_name, init_args, init_kwargs, state, training=None):
    """Rebuild a persistent object from a trusted module; the inverse of `persistent_class.__reduce__`."""
    cls = _trusted_class(module_name, class_name)
    if cls is None:
        raise UnsafePickleError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class of {TRUSTED_MODULES}')
    obj = _construct(cls, init_args, init_kwargs)
    if isinstance(obj, torch.nn.Module):
        _restore_module(obj, state, training)
    elif state is not None:
        obj.load_state_dict(state)
    return obj


def _construct(cls, init_args, init_kwargs):
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise ValueError(f'cannot build {cls.__name__}: stored constructor arguments are not a tuple and a dict')
    try:
        return cls(*init_args, **init_kwargs)
    except TypeError as e:
        raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {e}') from None


def _one_line(error):
    text = ' '.join(str(error).split())
    return text if len(text) <= 500 else text[:500] + ' ...'


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
    for module_name in TRUSTED_MODULES:
        cls = _trusted_class(module_name, class_name)
        if cls is not None:
            return cls
    raise UnsafePickleError(f'refusing class {class_name!r}: this project has no such class in {", ".join(TRUSTED_MODULES)}')


def _build_published(record):
    """This project's object for a published record: constructed from its stored arguments, then its tensors."""
    cls = _published_class(record.class_name)
    state = record.state
    init_args = state.get('_init_args', state.get('init_args', ()))
    init_kwargs = dict(state.get('_init_kwargs', state.get('init_kwargs', {})))
    if record.class_name == 'FDM_VEPrecond':
        # Published VE-FDM scaled with m = 1 whatever fdm_multiplier said (docs/compatibility.md#ve-fdm-multiplier).
        init_kwargs['fdm_multiplier'] = 1
    inner = (state.get('_modules') or {}).get('model')
    if 'model_type' not in init_kwargs and isinstance(inner, _Record):
        init_kwargs['model_type'] = inner.class_name  # upstream defaults differ from ours; the pickle says which
    obj = _construct(cls, init_args, init_kwargs)
    if isinstance(obj, torch.nn.Module):
        _restore_module(obj, _record_tensors(record), state.get('training', False))
    return obj


@functools.lru_cache(maxsize=None)
def _published_root_names():
    """Classes that a published pickle holds at its top level: preconditioners, losses, augment pipes."""
    networks = importlib.import_module('training.networks')
    names = {path.rsplit('.', 1)[1] for path in networks.PRECONDITIONERS.values()}
    for module_name in ('training.loss', 'training.augment'):
        module = importlib.import_module(module_name)
        names.update(name for name in dir(module) if _trusted_class(module_name, name) is not None)
    return names


def _reconstruct_persistent_obj(meta):
    """Read a published persistent object without executing its `module_src` (the name upstream pickles call).

    Under plain `pickle.load`, building blocks stay inert records and each top-level object (preconditioner,
    loss, augment pipe) is rebuilt from this project's class; `load_network_pickle` is the safe way to read.
    """
    record = _published_record(meta)
    return _build_published(record) if record.class_name in _published_root_names() else record


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


# Everything a network pickle may refer to, as (module, name) → what the unpickler gets instead.
_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct'): _reconstruct,
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
        raise ValueError(f'{name}: {_one_line(e)}') from None
    except Exception as e:  # nothing from the file can run here, so any failure means a damaged file
        raise ValueError(f'{name}: not a readable network pickle (truncated or corrupt?): {type(e).__name__}: {_one_line(e)}') from None
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
