"""Small utilities shared by the scripts: attribute dicts, atomic writes, classes by name, URLs, log tee."""

import contextlib
import errno
import hashlib
import importlib
import io
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any file we write
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


# atomic_write's temporaries: '.' + target name + '.' + mkstemp's 8 random characters + '.tmp'.
_TEMPORARY_RE = re.compile(r'\.(.+)\.[a-z0-9_]{8}\.tmp')


def remove_stale_temporaries(folder, names):
    """Remove atomic_write's temporaries of the files `names` in `folder` (a killed writer leaves them); returns how
    many. Call it before writing those files: a temporary of a file about to be rewritten serves no one."""
    names = set(names)
    removed = 0
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _TEMPORARY_RE.fullmatch(entry)
        if match is not None and match.group(1) in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))
                removed += 1
    return removed


def check_writable_folder(folder):
    """Create `folder` if needed and create and remove a file in it, so that an output that cannot be written fails
    before the work that would fill it (OSError naming the path)."""
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-test.', suffix='.tmp')
    os.close(fd)
    os.remove(probe)


def open_regular_file(path):
    """Open `path` for binary reading only if it is a regular file (or a link to one): opening a named pipe would wait
    for a writer forever and a device such as /dev/zero never ends, so both are an OSError naming the path."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))  # O_NONBLOCK: opening a FIFO returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, 'not a regular file', path)
        if hasattr(os, 'set_blocking'):
            os.set_blocking(fd, True)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def get_obj_by_name(name):
    """Return the object a dotted path such as 'training.networks.EDMPrecond' names (longest importable module)."""
    if not isinstance(name, str) or not name or name.startswith('.') or name.endswith('.'):
        raise ValueError(f'not a dotted object name: {name!r}')
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # A missing submodule means "try a shorter prefix"; a missing dependency inside it is a real error.
            if err.name is None or not (module_name == err.name or module_name.startswith(err.name + '.')):
                raise
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise ValueError(f'cannot find {name!r}: module {module_name!r} has no attribute path '
                                 f'{".".join(parts[split:])!r}')
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f'cannot find {name!r}: no importable module in it')


def construct_class_by_name(*args, class_name, **kwargs):
    """Build `class_name(*args, **kwargs)`, the one way configs name their pluggable pieces."""
    cls = get_obj_by_name(class_name)
    if not callable(cls):
        raise ValueError(f'{class_name!r} is not a class or callable')
    return cls(*args, **kwargs)


class DownloadError(OSError):
    """A URL could not be fetched; the message names the URL."""


def default_cache_dir():
    """Where downloads are kept: `$FDM_CACHE_DIR`, else `~/.cache/fdm`."""
    return os.environ.get('FDM_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'fdm')


def _cache_file_name(url):
    """A file name unique to the URL that still shows the original base name."""
    base = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    base = re.sub(r'[^0-9A-Za-z._-]', '_', base)[-100:]
    return hashlib.sha256(url.encode('utf-8')).hexdigest()[:16] + '_' + base


def _download(url, dst, timeout_s):
    """Stream `url` into the binary file `dst`, turning every network failure into a DownloadError."""
    request = urllib.request.Request(url, headers={'User-Agent': 'fdm-open-url'})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            shutil.copyfileobj(response, dst, length=1 << 20)
    except urllib.error.HTTPError as err:
        raise DownloadError(f'cannot download {url}: HTTP {err.code} {err.reason}') from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, 'reason', err)
        raise DownloadError(f'cannot download {url}: {reason}') from None


def open_url(url_or_path, cache_dir=None, cache=True, verbose=True, timeout_s=60):
    """Open a local path, file:// URL or http(s) URL as a binary file; http(s) is downloaded once into a cache.

    The result is a file object, so `with open_url(...) as f:` works.
    """
    url_or_path = os.fspath(url_or_path)
    if '://' not in url_or_path:
        return open_regular_file(url_or_path)
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme == 'file':
        if parsed.netloc not in ('', 'localhost'):
            raise ValueError(f'file URL with a remote host is not supported: {url_or_path}')
        return open_regular_file(urllib.request.url2pathname(parsed.path))
    if parsed.scheme not in ('http', 'https'):
        raise ValueError(f'unsupported URL scheme {parsed.scheme!r}: {url_or_path}')

    if not cache:
        buffer = io.BytesIO()
        _download(url_or_path, buffer, timeout_s)
        buffer.seek(0)
        return buffer

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = os.path.join(cache_dir, _cache_file_name(url_or_path))
    if not os.path.isfile(cache_path):
        os.makedirs(cache_dir, exist_ok=True)
        if verbose:
            print(f'Downloading {url_or_path} ...', end='', flush=True)
        with atomic_write(cache_path, 'wb') as f:
            _download(url_or_path, f, timeout_s)
        if verbose:
            print(' done', flush=True)
    return open(cache_path, 'rb')


def tolerate_undecodable_output():
    """Let stdout and stderr print text holding undecodable bytes (a path that is not UTF-8 reaches Python as
    surrogates) with backslash escapes: most UTF-8 locales make stdout strict, and printing such a path would fail."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, 'errors', None) == 'strict' and hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')


class _Tee:
    """One stream's tee: everything written goes to the original stream and to the log file."""

    def __init__(self, stream, file, should_flush):
        self.stream = stream
        self.file = file
        self.should_flush = should_flush

    def write(self, text):
        if not text:
            return 0
        if self.file is not None:
            self.file.write(text)
        self.stream.write(text)
        if self.should_flush:
            self.flush()
        return len(text)

    def flush(self):
        if self.file is not None and not self.file.closed:
            self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        # isatty, encoding, fileno, ... come from the original stream so libraries see a normal console.
        return getattr(self.stream, name)


class Logger:
    """Copy everything printed to stdout and stderr into a log file, until `close()`."""

    def __init__(self,
        file_name       = None,     # Log file; None keeps the console only.
        file_mode       = 'a',      # 'a' appends to an existing log (resumed runs), 'w' starts afresh.
        should_flush    = True,     # Flush after every write, so the log is complete if the run dies.
    ):
        # backslashreplace: a path that is not UTF-8 (bytes kept as surrogates) is logged, not fatal to the run.
        self.file = open(file_name, file_mode, encoding='utf-8', errors='backslashreplace') if file_name is not None else None
        self.stdout = _Tee(sys.stdout, self.file, should_flush)
        self.stderr = _Tee(sys.stderr, self.file, should_flush)
        sys.stdout = self.stdout
        sys.stderr = self.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def flush(self):
        self.stdout.flush()
        self.stderr.flush()

    def close(self):
        """Restore the original streams and close the file; safe to call twice."""
        if sys.stdout is self.stdout:
            sys.stdout = self.stdout.stream
        if sys.stderr is self.stderr:
            sys.stderr = self.stderr.stream
        if self.file is not None and not self.file.closed:
            self.file.flush()
            self.file.close()


def is_power_of_two(n):
    """True for 1, 2, 4, 8, …: the image sizes that datasets, dataset_tool.py and the U-Nets accept."""
    return n > 0 and n & (n - 1) == 0


def format_time(seconds):
    """Human-readable duration: '45s', '3m 05s', '2h 03m 05s', '1d 02h 03m'."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'
