"""Pickling of this project's networks and training objects without embedded source code.

A class decorated with `persistent_class` remembers its constructor arguments and pickles as
`_reconstruct(module, class_name, init_args, init_kwargs, state)`: plain `pickle.load` rebuilds it from
this repository's own classes, and the safe loader (`load_network_pickle`) accepts exactly that call.
"""

import copy
import functools
import importlib

# Modules whose persistent classes may be rebuilt from a pickle.
TRUSTED_MODULES = ('training.networks', 'training.loss', 'training.augment')


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


def _reconstruct(module_name, class_name, init_args, init_kwargs, state, training=None):
    """Rebuild a persistent object from a trusted module; the inverse of `persistent_class.__reduce__`."""
    if module_name not in TRUSTED_MODULES:
        raise ValueError(f'refusing to rebuild {module_name}.{class_name}: not one of {TRUSTED_MODULES}')
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None or not getattr(cls, '_persistent', False):
        raise ValueError(f'refusing to rebuild {module_name}.{class_name}: not a persistent class')
    obj = cls(*init_args, **init_kwargs)
    if state is not None:
        obj.load_state_dict(state)
    if training is not None:
        obj.train(training)
    return obj
