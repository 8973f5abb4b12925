from .util import EasyDict, Logger, atomic_write, construct_class_by_name, format_time, get_obj_by_name, open_url  # noqa: F401
