"""Small utilities shared by the scripts: attribute dicts, atomic file writes."""

import contextlib
import os
import tempfile


class EasyDict(dict):
    """A dict whose items are also attributes (`d.key`), as EDM's configs are."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Write `path` via a temporary file in the same folder and rename it, so readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
