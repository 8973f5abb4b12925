from .util import EasyDict, atomic_write  # noqa: F401
