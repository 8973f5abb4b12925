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
import inspect
import io
import math
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


# What a pickle may ask to build: every constructor argument is a plain value of bounded size, these are ints in
# [0, limit] (None only where the class means "default"), and a module may hold at most MAX_PARAMETERS values.
MAX_PARAMETERS = 2_000_000_000
MAX_PICKLE_DEPTH = 64            # containers within containers, and modules within modules
MAX_PICKLE_NODES = 1_000_000     # values of a pickle, counting shared ones at each place they occur
_ARGUMENT_NODES = 1_000          # values of one object's constructor arguments
_INT_ARGUMENTS = dict(
    img_resolution=1024, img_channels=4096, in_channels=4096, out_channels=4096, model_out_channels=4096,
    num_channels=4096, in_features=65536, out_features=65536, emb_channels=65536, label_dim=100_000, augment_dim=1024,
    model_channels=1024, channel_mult_emb=16, channel_mult_noise=16, num_blocks=64, num_heads=4096,
    channels_per_head=4096, num_groups=4096, min_channels_per_group=4096, kernel=16, M=1_000_000,
    max_positions=10**9, warmup_ite=10**12,
)
_INT_LIST_ARGUMENTS = dict(channel_mult=(8, 16), attn_resolutions=(16, 1024), resample_filter=(8, 16))  # (length, entry) limits
_INFINITE_ALLOWED = ('sigma_max',)  # EDMPrecond's own default is inf


def _check_plain_value(name, value):
    """A constructor argument of None, bools, ints, finite floats, short strings and small lists/tuples/dicts of them."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > _ARGUMENT_NODES or depth > 4:
            raise UnsafePickleError(f'constructor argument {name}: nested deeper than 4 or larger than {_ARGUMENT_NODES} values')
        if item is None or isinstance(item, (bool, int, np.integer)):
            continue
        if isinstance(item, (float, np.floating)):
            if math.isnan(item) or (math.isinf(item) and name not in _INFINITE_ALLOWED):
                raise UnsafePickleError(f'constructor argument {name}: {float(item)} is not a finite number')
        elif isinstance(item, str):
            if len(item) > 256:
                raise UnsafePickleError(f'constructor argument {name}: a string of {len(item)} characters')
        elif isinstance(item, (list, tuple)):
            stack.extend((entry, depth + 1) for entry in item[:_ARGUMENT_NODES + 1])
        elif isinstance(item, dict):
            for key, entry in list(item.items())[:_ARGUMENT_NODES + 1]:
                if not isinstance(key, str) or len(key) > 256:
                    raise UnsafePickleError(f'constructor argument {name}: a dict key that is not a short string')
                stack.append((entry, depth + 1))
        else:
            raise UnsafePickleError(f'constructor argument {name}: a {type(item).__name__} is not a plain value')


def _check_int_argument(name, value, limit):
    if value is None and name in ('num_heads', 'warmup_ite'):
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= limit:
        raise UnsafePickleError(f'constructor argument {name}={value!r} is not an int in [0, {limit}]')
    if name == 'img_resolution' and not dnnlib.util.is_power_of_two(int(value)):
        raise UnsafePickleError(f'constructor argument img_resolution={value!r} is not a power of two')


def _named_arguments(cls, init_args, init_kwargs):
    """Constructor arguments by name, the contents of **kwargs (passed on to an inner network) included."""
    try:
        bound = inspect.signature(cls.__init__).bind(None, *init_args, **init_kwargs)
    except TypeError as e:
        raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {e}') from None
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = inspect.signature(cls.__init__).parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


def _unet_parameter_bound(cls, named):
    """An upper bound on the parameters of a preconditioner's U-Net (inf for other classes), so that ordinary networks
    are not built twice: a block holds at most 40·C² values for C the widest channel count (convolutions of 2C→C and
    C→C, skip, attention and embedding), a level at most 2·num_blocks + 4 blocks, the mapping a few C²."""
    if not issubclass(cls, networks.Precond):
        return math.inf
    inner = networks.INNER_NETWORKS.get(named.get('model_type', 'SongUNet'))
    if inner is None:
        return 0  # the constructor refuses it
    defaults = {name: p.default for name, p in inspect.signature(inner.__init__).parameters.items()}
    get = lambda name: named.get(name, defaults.get(name, 1))
    channel_mult = list(get('channel_mult')) + [get('channel_mult_emb'), get('channel_mult_noise')]
    width = get('model_channels') * max(channel_mult)
    blocks = len(get('channel_mult')) * (2 * get('num_blocks') + 4) + 4
    return 40 * width**2 * blocks + width * (get('label_dim') + get('augment_dim') + 18 * get('img_channels') + 64)


def check_constructor_arguments(cls, init_args, init_kwargs):
    """Refuse (UnsafePickleError) arguments that a network could not be built from in bounded time and memory.

    Types and ranges first (nothing is built); then, unless a bound on the U-Net's size keeps it below MAX_PARAMETERS,
    the module is built on the `meta` device, which allocates nothing, and its parameters and buffers are counted.
    """
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise ValueError(f'cannot build {cls.__name__}: stored constructor arguments are not a tuple and a dict')
    _check_plain_value('*args', list(init_args))
    _check_plain_value('**kwargs', init_kwargs)
    for name, value in _named_arguments(cls, init_args, init_kwargs).items():
        if name in _INT_ARGUMENTS:
            _check_int_argument(name, value, _INT_ARGUMENTS[name])
        elif name in _INT_LIST_ARGUMENTS:
            max_length, max_entry = _INT_LIST_ARGUMENTS[name]
            if not (isinstance(value, (list, tuple)) and len(value) <= max_length
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= max_entry for v in value)):
                raise UnsafePickleError(f'constructor argument {name}={value!r} is not a list of at most {max_length} ints in [0, {max_entry}]')
    if issubclass(cls, torch.nn.Module) and _unet_parameter_bound(cls, _named_arguments(cls, init_args, init_kwargs)) > MAX_PARAMETERS:
        try:
            with torch.device('meta'):
                probe = cls(*init_args, **init_kwargs)
        except (TypeError, ValueError, RuntimeError, ZeroDivisionError, IndexError, KeyError) as e:
            raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {persistence.one_line(e)}') from None
        count = sum(t.numel() for t in probe.parameters()) + sum(t.numel() for t in probe.buffers())
        if count > MAX_PARAMETERS:
            raise UnsafePickleError(f'{cls.__name__} with these arguments holds {count:.3g} values, more than the limit {MAX_PARAMETERS:.0e}')


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
        raise UnsafePickleError(f'refusing class {class_name!r}: this project has no such class in {", ".join(_PERSISTENT_MODULES)}')
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
    check_constructor_arguments(cls, init_args, init_kwargs)
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


def _reconstruct_ours(module_name, class_name, *args):
    """`persistence._reconstruct` limited to the modules whose classes snapshots hold (no other module is imported)."""
    if not isinstance(module_name, str) or not isinstance(class_name, str):
        raise UnsafePickleError('refusing to rebuild an object whose module or class name is not a string')
    if module_name not in _PERSISTENT_MODULES:
        raise UnsafePickleError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class of {_PERSISTENT_MODULES}')
    cls = persistence.registered_class(module_name, class_name)
    if cls is not None and len(args) >= 2:
        check_constructor_arguments(cls, args[0], args[1])
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
