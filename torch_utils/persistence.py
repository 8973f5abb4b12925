"""Pickling of this project's networks and training objects by class name, arguments and state.

A class decorated with `persistent_class` remembers its constructor arguments, is entered in a registry, and
pickles as `_reconstruct(module, class_name, init_args, init_kwargs, state, training)`: plain `pickle.load`
rebuilds it from the registered class, with no source code in the file. Only registered classes are rebuilt;
a module named by a pickle is imported only when it is a module of this repository.

Reading files safely (the restricted unpickler, published FDM/EDM pickles) is the business of
`training/safe_pickle.py`; the names here are the entry points that pickles refer to.
"""

import copy
import functools
import importlib
import os

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REGISTRY = {}                          # (module name, class name) → persistent class
# Maps published objects onto this project's classes; imported by name when a published pickle asks for it (as
# `_reconstruct` imports the module a pickle names), so that plain pickle.load does not depend on what was imported before.
PUBLISHED_READER_MODULE = 'training.safe_pickle'


class UnsafePickleError(ValueError):
    """A network file refers to something that is not a known, safe type, or asks for more than a network needs;
    it was refused before that could run or be allocated."""


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
    _REGISTRY[(cls.__module__, cls.__qualname__)] = cls
    return cls


def registered_class(module_name, class_name):
    """The persistent class `module_name.class_name`, or None when it is not one this project may rebuild."""
    if not isinstance(module_name, str) or not isinstance(class_name, str):
        return None
    if (module_name, class_name) not in _REGISTRY and _is_repository_module(module_name):
        importlib.import_module(module_name)  # our own code: its decorators fill the registry
    return _REGISTRY.get((module_name, class_name))


def registered_classes_named(class_name):
    """Every registered class called `class_name`, whatever its module (published pickles name no module)."""
    return [cls for (_, name), cls in _REGISTRY.items() if name == class_name]


def _is_repository_module(module_name):
    """True for a module inside one of this repository's packages (a folder with __init__.py beside torch_utils)."""
    parts = module_name.split('.')
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        return False
    return (os.path.isfile(os.path.join(_REPO_ROOT, parts[0], '__init__.py'))
            and os.path.isfile(os.path.join(_REPO_ROOT, *parts) + '.py'))


def restore_module(module, tensors, training):
    """Load `tensors` (dotted name → tensor) into `module` with strict names, keeping requires_grad flags."""
    if not isinstance(tensors, dict):
        raise ValueError(f'cannot restore {type(module).__name__}: its state is a {type(tensors).__name__}, not a dict')
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    if device is not None:
        module.to(device)  # so that copy.deepcopy of a CUDA network stays on CUDA
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f'cannot restore {type(module).__name__}: {one_line(e)}') from None
    for name, param in module.named_parameters():
        if isinstance(tensors.get(name), torch.Tensor):
            param.requires_grad_(tensors[name].requires_grad)
    if training is not None:
        module.train(bool(training))


def _reconstruct(module_name, class_name, init_args, init_kwargs, state, training=None):
    """Rebuild a registered persistent object; the inverse of `persistent_class.__reduce__`."""
    cls = registered_class(module_name, class_name)
    if cls is None:
        raise UnsafePickleError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class of this project')
    obj = construct(cls, init_args, init_kwargs)
    if isinstance(obj, torch.nn.Module):
        restore_module(obj, state, training)
    elif state is not None:
        obj.load_state_dict(state)
    return obj


def _reconstruct_persistent_obj(meta):
    """The name under which published FDM/EDM pickles store their objects; `module_src` is never executed.

    Under plain `pickle.load` the reader of PUBLISHED_READER_MODULE rebuilds each top-level object from this
    project's class; `training.checkpoints.load_network_pickle` is the safe way to read such a file.
    """
    return importlib.import_module(PUBLISHED_READER_MODULE).read_published(meta)


def construct(cls, init_args, init_kwargs):
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise ValueError(f'cannot build {cls.__name__}: stored constructor arguments are not a tuple and a dict')
    try:
        return cls(*init_args, **init_kwargs)
    except TypeError as e:
        raise ValueError(f'cannot build {cls.__name__} from its stored arguments: {e}') from None


def one_line(error):
    """An error message on one line, at most 500 characters."""
    text = ' '.join(str(error).split())
    return text if len(text) <= 500 else text[:500] + ' ...'
