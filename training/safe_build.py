"""Building this project's classes from constructor arguments that a file supplies (a network pickle, the metadata of
a safetensors file), within bounds that hold whatever the file says.

The bound is the real constructor's, not a restatement of it: the class is first built on the `meta` device, which
allocates no tensor memory, while a budget counts the torch operations and modules it creates (so that
`num_blocks=10**7` stops after a few hundred blocks instead of building for hours); then the values it would hold are
counted, and the names and shapes of its tensors compared with those the file holds. Only a network that passes is
built for real, so a file cannot make the reader allocate more than the tensors it contains.
"""

import inspect
import math

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from torch_utils import persistence

UnsafePickleError = persistence.UnsafePickleError
PERSISTENT_MODULES = ('training.networks', 'training.loss', 'training.augment')  # whose classes files may name

MAX_VALUES = 2_000_000_000      # parameters and buffers of one network
MAX_BUILD_STEPS = 20_000        # torch operations and modules of one constructor call (CIFAR-10 DDPM++: ~2,900; ImageNet iDDPM: ~11,800)
MAX_INT = 2**24                 # ints in constructor arguments (a count of classes or noise levels is far below)
_ARGUMENT_NODES = 1_000         # values in one object's constructor arguments


def persistent_class(module_name, class_name):
    """The class `module_name.class_name` of PERSISTENT_MODULES that a file may name (no other module is imported)."""
    if not isinstance(module_name, str) or not isinstance(class_name, str):
        raise UnsafePickleError('refusing to rebuild an object whose module or class name is not a string')
    cls = persistence.registered_class(module_name, class_name) if module_name in PERSISTENT_MODULES else None
    if cls is None:
        raise UnsafePickleError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class of {", ".join(PERSISTENT_MODULES)}')
    return cls


def named_arguments(cls, init_args, init_kwargs):
    """Constructor arguments by name, the contents of **kwargs (passed on to an inner network) included."""
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, *init_args, **init_kwargs)
    except TypeError as e:
        raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {e}') from None
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        named.update(value if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


def _check_plain_value(name, value, infinite_allowed):
    """A constructor argument of None, bools, ints up to MAX_INT, finite floats, short strings and small
    lists/tuples/dicts of them (inf only where the constructor's own default is inf)."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > _ARGUMENT_NODES or depth > 4:
            raise UnsafePickleError(f'constructor argument {name}: nested deeper than 4 or larger than {_ARGUMENT_NODES} values')
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, (int, np.integer)):
            if abs(int(item)) > MAX_INT:
                raise UnsafePickleError(f'constructor argument {name}={int(item)} exceeds {MAX_INT}')
        elif isinstance(item, (float, np.floating)):
            if math.isnan(item) or (math.isinf(item) and not infinite_allowed):
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


def _check_arguments(cls, init_args, init_kwargs):
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise ValueError(f'cannot build {cls.__name__}: stored constructor arguments are not a tuple and a dict')
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
    for name, value in named_arguments(cls, init_args, init_kwargs).items():
        default = defaults.get(name)
        _check_plain_value(name, value, infinite_allowed=isinstance(default, float) and math.isinf(default))


def _describe(cls, init_args, init_kwargs):
    arguments = [repr(a) for a in init_args] + [f'{k}={v!r}' for k, v in init_kwargs.items()]
    return persistence.one_line(f'{cls.__name__}({", ".join(arguments)})')


class _BuildBudget(TorchFunctionMode):
    """Counts the torch operations and modules of a constructor call and stops it past MAX_BUILD_STEPS."""

    def __init__(self, description):
        super().__init__()
        self.description = description
        self.steps = 0

    def step(self, *_):
        self.steps += 1
        if self.steps > MAX_BUILD_STEPS:
            raise UnsafePickleError(f'{self.description} takes more than {MAX_BUILD_STEPS} torch operations and modules to build')

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.step()
        return func(*args, **(kwargs or {}))


def _build_on_meta(cls, init_args, init_kwargs):
    budget = _BuildBudget(_describe(cls, init_args, init_kwargs))
    hook = torch.nn.modules.module.register_module_module_registration_hook(budget.step)
    try:
        with torch.device('meta'), budget:
            return cls(*init_args, **init_kwargs)
    except UnsafePickleError:
        raise
    except Exception as e:  # only our constructor runs here; whatever it refuses, the file is at fault
        raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {type(e).__name__}: {persistence.one_line(e)}') from None
    finally:
        hook.remove()


def check(cls, init_args, init_kwargs, tensor_shapes=None):
    """Refuse arguments (and, for a module, tensors {name: shape}) that `cls` cannot be built from in bounded time and
    memory, or that do not fit it: UnsafePickleError for what exceeds a bound, ValueError for what does not fit."""
    _check_arguments(cls, init_args, init_kwargs)
    if not issubclass(cls, torch.nn.Module):
        return
    probe = _build_on_meta(cls, init_args, init_kwargs)
    expected = {name: tuple(t.shape) for name, t in probe.state_dict().items()}
    count = sum(math.prod(shape) for shape in expected.values())
    count += sum(t.numel() for name, t in probe.named_buffers() if name not in expected)  # non-persistent buffers
    if count > MAX_VALUES:
        raise UnsafePickleError(f'{cls.__name__} with these arguments holds {count:.3g} values, more than the limit {MAX_VALUES:.0e}')
    if tensor_shapes is not None:
        problem = tensor_mismatch(expected, {name: tuple(shape) for name, shape in tensor_shapes.items()})
        if problem:
            raise ValueError(f'its tensors do not fit {cls.__name__} built from its arguments: {problem}')


def tensor_mismatch(expected, found):
    """What differs between two {name: shape} dicts, in words ('' when nothing)."""
    def listed(names):
        return ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
    problems = []
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    reshaped = [f'{name} {found[name]} vs {shape}' for name, shape in expected.items() if name in found and found[name] != shape]
    for what, names in ((f'{len(missing)} missing', missing), (f'{len(extra)} unexpected', extra),
                        (f'{len(reshaped)} of another shape', reshaped)):
        if names:
            problems.append(f'{what}: {listed(names)}')
    return '; '.join(problems)


def build(cls, init_args, init_kwargs, tensors=None, training=None):
    """`cls(*init_args, **init_kwargs)` with `tensors` ({name: tensor}) loaded into a module or a state dict into
    another object, after `check`."""
    shapes = None
    if issubclass(cls, torch.nn.Module):
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f'cannot restore {cls.__name__}: its state is not a dict of tensors')
        shapes = {name: t.shape for name, t in tensors.items()}
    check(cls, init_args, init_kwargs, shapes)
    obj = persistence.construct(cls, init_args, init_kwargs)
    if isinstance(obj, torch.nn.Module):
        persistence.restore_module(obj, tensors, training)
    elif tensors is not None:
        if not hasattr(obj, 'load_state_dict'):
            raise ValueError(f'{cls.__name__} takes no stored state')
        obj.load_state_dict(tensors)
    return obj
