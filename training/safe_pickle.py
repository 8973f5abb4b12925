"""Reading network pickles (ours and the published FDM/EDM ones) without running code from them.

An unpickler that resolves only an explicit list of harmless callables: a name outside it stops the load before it
can be called. Published pickles embed the source of their classes (`module_src`); it is never executed: each class
name is mapped onto this project's class of the same name, built from the stored constructor arguments by
`training.safe_build` (bounded by the real constructor) and its tensors restored by name
(docs/compatibility.md#pickles). Our own snapshots name this project's classes and are built the same way.
"""

import collections
import io
import pickle
import warnings
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from training import augment
from training import loss
from training import networks
from training import safe_build

UnsafePickleError = persistence.UnsafePickleError
MAX_PICKLE_DEPTH = 64            # containers within containers, and modules within modules
MAX_PICKLE_NODES = 1_000_000     # values of a pickle, counting shared ones at each place they occur


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


def check_pickle_size(payload):
    """Refuse a loaded pickle nested deeper than MAX_PICKLE_DEPTH or of more than MAX_PICKLE_NODES values (shared
    values counted where they occur, so that a small file of shared tuples cannot stand for an exponential tree)."""
    stack, nodes = [(payload, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > MAX_PICKLE_DEPTH:
            raise UnsafePickleError(f'nested deeper than {MAX_PICKLE_DEPTH} levels')
        if nodes > MAX_PICKLE_NODES:
            raise UnsafePickleError(f'holds more than {MAX_PICKLE_NODES} values (counting shared ones where they occur)')
        if isinstance(item, _Record):
            stack.append((item.state, depth + 1))
        elif isinstance(item, dict):
            stack.extend((value, depth + 1) for pair in item.items() for value in pair)
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((value, depth + 1) for value in item)


def _module_state(node, where):
    """The `__dict__` of a pickled module: a record's state, or a real module's attributes (plain pickle.load)."""
    if isinstance(node, _Record):
        return node.state
    if isinstance(node, torch.nn.Module):
        return vars(node)
    raise ValueError(f'{where}: expected a module, found {type(node).__name__}')


def _record_tensors(node, prefix=''):
    """Parameters and persistent buffers of a pickled module tree by dotted name, as state_dict() names them."""
    if prefix.count('.') > MAX_PICKLE_DEPTH:
        raise UnsafePickleError(f'modules nested deeper than {MAX_PICKLE_DEPTH} levels')
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
        raise UnsafePickleError(f'refusing class {class_name!r}: this project has no such class in {", ".join(safe_build.PERSISTENT_MODULES)}')
    return found[0]


def _build_published(record):
    """This project's object for a published record: constructed from its stored arguments, then its tensors."""
    cls = _published_class(record.class_name)
    state = record.state
    init_args = state.get('_init_args', state.get('init_args', ()))
    init_kwargs = state.get('_init_kwargs', state.get('init_kwargs', {}))
    if not isinstance(init_kwargs, dict):
        raise ValueError(f'cannot build {cls.__name__}: stored constructor arguments are not a tuple and a dict')
    init_kwargs = dict(init_kwargs)
    if cls is networks.FDM_VEPrecond:  # its published weights were trained for m = 1 whatever the arguments say
        init_kwargs['fdm_multiplier'] = networks.PUBLISHED_VE_FDM_MULTIPLIER
    elif issubclass(cls, networks.FDMInputScaling) and 'fdm_multiplier' not in init_kwargs:
        init_kwargs['fdm_multiplier'] = networks.PUBLISHED_FDM_MULTIPLIER_DEFAULT  # upstream's default, not ours
    inner = (state.get('_modules') or {}).get('model')
    if 'model_type' not in init_kwargs and isinstance(inner, _Record):
        init_kwargs['model_type'] = inner.class_name  # upstream defaults differ from ours; the pickle says which
    tensors = _record_tensors(record) if issubclass(cls, torch.nn.Module) else None
    return safe_build.build(cls, init_args, init_kwargs, tensors, state.get('training', False))


def _published_root_names():
    """Classes that a published pickle holds at its top level: preconditioners, losses, augment pipes."""
    names = {path.rsplit('.', 1)[1] for path in networks.PRECONDITIONERS.values()}
    for module in (loss, augment):
        names.update(name for name, value in vars(module).items() if getattr(value, '_persistent', False) is True)
    return names


def read_published(meta):
    """`_reconstruct_persistent_obj(meta)` under plain `pickle.load` (torch_utils.persistence calls it), without
    executing `module_src`.

    Building blocks stay inert records and each top-level object (preconditioner, loss, augment pipe) is
    rebuilt from this project's class; `load` is the safe way to read.
    """
    record = _published_record(meta)
    return _build_published(record) if record.class_name in _published_root_names() else record


def check_archive_sizes(f, size, what='tensor storage'):
    """Refuse a ZIP archive (torch's format; the binary file `f` of `size` bytes) whose records declare more bytes
    than the archive holds.

    torch writes its records uncompressed, so they fit; a deflated record can declare gigabytes in a few megabytes,
    and torch's reader allocates and inflates a record in full before it looks at it. The sizes come from the
    archive's own directory, read before anything is inflated.
    """
    try:
        records = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise UnsafePickleError(f'{what} is a damaged ZIP archive: {persistence.one_line(e)}') from None
    if sum(record.file_size for record in records) > size:
        largest = max(records, key=lambda record: record.file_size)
        raise UnsafePickleError(f'{what} record {largest.filename!r} would inflate to {largest.file_size} bytes from '
                                f'{largest.compress_size} compressed ones (the archive holds {size}); torch writes '
                                f'records uncompressed')


def _load_storage_bytes(data):
    """Tensor storage as torch pickles it; the stock `_load_from_bytes` would unpickle with weights_only=False."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f'tensor storage data is a {type(data).__name__}, not bytes')
    if bytes(data[:4]) == b'PK\x03\x04':
        check_archive_sizes(io.BytesIO(data), len(data))
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
    tensor = torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, collections.OrderedDict(),
                                             metadata if isinstance(metadata, dict) else None)
    storage_bytes = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > storage_bytes:  # e.g. a 10¹² view of one number that .clone() would allocate
        raise UnsafePickleError(f'a tensor of shape {list(tensor.shape)} views a storage of {storage_bytes} bytes (overlapping strides)')
    return tensor


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


def _bytearray(*args):
    """Protocol 2 writes a bytearray as bytearray(text, 'latin-1'); bytearray(n) of a huge n would allocate n bytes."""
    if not args or not isinstance(args[0], (str, bytes)):
        raise UnsafePickleError('bytearray may only be built from pickled bytes')
    return bytearray(*args)


class _EasyDict:
    """Creates a dnnlib.EasyDict when the pickle asks for one, so that the real class is never handed out."""

    def __new__(cls, *args):
        return dnnlib.EasyDict(*args)

    def __setstate__(self, state):
        """Present so that a pickle cannot set attributes on this class itself (BUILD calls this instead)."""
        raise UnsafePickleError('dnnlib.util.EasyDict cannot take pickled state')


def _reconstruct_ours(module_name, class_name, init_args=(), init_kwargs=None, state=None, training=None):
    """`persistence._reconstruct` limited to safe_build.PERSISTENT_MODULES and built by `safe_build`."""
    return safe_build.build(safe_build.persistent_class(module_name, class_name), init_args, {} if init_kwargs is None else init_kwargs,
                            state, training)


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
    ('builtins', 'bytearray'): _bytearray,
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


def _tuple_op(build):
    """A tuple-building opcode that records the tuple's size as a tree and refuses one over MAX_PICKLE_NODES."""
    def op(self):
        build(self)
        built = self.stack[-1]
        size = 1 + sum(self.tuple_sizes.get(id(item), (1,))[0] for item in built)
        if size > MAX_PICKLE_NODES:
            raise UnsafePickleError(f'a tuple of more than {MAX_PICKLE_NODES} values (counting shared ones where they occur)')
        self.tuple_sizes[id(built)] = (size, built)  # the reference keeps the id from being reused
    return op


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the names in `_ALLOWED_GLOBALS`; any other name stops the load before it can be called.

    Python's own unpickler, not the C one, so that tuples can be measured as they are built: a few hundred
    bytes of tuples that share their parts stand for a tree of 2⁶⁰ values, which hashing a dict key or
    printing would walk for ever.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    for _code in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
        dispatch[_code[0]] = _tuple_op(pickle._Unpickler.dispatch[_code[0]])
    del _code

    def load_mark(self):
        if len(self.metastack) >= 2 * MAX_PICKLE_DEPTH:  # a published module level opens about three
            raise UnsafePickleError(f'nested deeper than {2 * MAX_PICKLE_DEPTH} marks')
        pickle._Unpickler.load_mark(self)
    dispatch[pickle.MARK[0]] = load_mark

    def __init__(self, file):
        super().__init__(file)
        self.tuple_sizes = {}

    def find_class(self, module, name):
        module = _PYTHON2_MODULE_NAMES.get(module, module)
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f'refusing {module}.{name}: not an allowed type in a network pickle')
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError('refusing a persistent id: network pickles have none')


def load(f, name):
    """The dict of the network pickle in the binary file `f` (`name` in messages), read without running code from it.

    Accepts this project's snapshots and published FDM/EDM pickles (docs/design.md#snapshots); raises
    UnsafePickleError when the file refers to anything else or exceeds a bound, ValueError when it is unreadable.
    """
    try:
        payload = _RestrictedUnpickler(f).load()
        check_pickle_size(payload)
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
        warnings.warn(f'{name}: leaving out {key!r}: {e}', stacklevel=4)
        return _OMITTED

