"""Network files: the names of a run's snapshots, power-EMA profiles and training states, and writing and reading
network snapshots as pickles or safetensors files.

A snapshot is a dict: 'ema' (the network) and whatever else the run keeps with it ('loss_fn', 'augment_pipe',
'dataset_kwargs', 'power_ema'). `load_network` reads either format, told apart by the file's first bytes, never
running code from it: pickles (ours and the published FDM/EDM ones) through `training.safe_pickle`, safetensors
files through `training.safetensors_io` (docs/design.md#network-files).
"""

import io
import os
import pickle
import re

import dnnlib
from training import safe_pickle
from training import safetensors_io

UnsafePickleError = safe_pickle.UnsafePickleError
FORMATS = ('pickle', 'safetensors', 'both')                 # what train.py --format writes
SUFFIXES = dict(pickle='.pkl', safetensors='.safetensors')
STATE_FILE_RE = re.compile(r'training-state-(\d+)(?:\.(\d{3}))?\.pt')  # kimg, images beyond it when ticks < 1 kimg
POWER_EMA_FILE_RE = re.compile(r'power-ema-(\d+)(?:\.(\d{3}))?-(\d+\.\d+)\.(pkl|safetensors)')  # kimg, images beyond it, σ_rel


def _nimg_label(cur_nimg, kimg_per_tick):
    """'{kimg:06d}' as published; with ticks under 1 kimg ('.{images beyond it:03d}' added) several fall in one kimg."""
    label = f'{cur_nimg // 1000:06d}'
    return label + f'.{cur_nimg % 1000:03d}' if kimg_per_tick < 1 else label


def snapshot_name(cur_nimg, kimg_per_tick=1):
    return f'network-snapshot-{_nimg_label(cur_nimg, kimg_per_tick)}.pkl'


def power_ema_name(cur_nimg, std, kimg_per_tick=1):
    """The pickle of the power-EMA profile of σ_rel `std` at a snapshot (training.ema)."""
    return f'power-ema-{_nimg_label(cur_nimg, kimg_per_tick)}-{std:.3f}.pkl'


def state_name(cur_nimg, kimg_per_tick=1):
    return f'training-state-{_nimg_label(cur_nimg, kimg_per_tick)}.pt'


def save_network_pickle(path, data):
    """Write a network snapshot dict (with 'ema') atomically, as a plain pickle without embedded source."""
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'{path}: a network snapshot must be a dict with an "ema" network')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(data, f)


def save_network_safetensors(path, data):
    """Write a network snapshot dict (with 'ema') atomically as a safetensors file."""
    try:
        safetensors_io.save(path, data)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None


def save_network(path, data, file_format='pickle'):
    """Write a snapshot in `file_format` (FORMATS): the pickle at `path`, the safetensors file beside it with the
    suffix .safetensors. Returns the paths written."""
    if file_format not in FORMATS:
        raise ValueError(f'network file format {file_format!r} is not one of {", ".join(FORMATS)}')
    written = []
    if file_format in ('pickle', 'both'):
        save_network_pickle(path, data)
        written.append(os.fspath(path))
    if file_format in ('safetensors', 'both'):
        written.append(os.path.splitext(os.fspath(path))[0] + SUFFIXES['safetensors'])
        save_network_safetensors(written[-1], data)
    return written


def _open_and(reader, f_or_path):
    if isinstance(f_or_path, (str, os.PathLike)):
        path = os.fspath(f_or_path)
        try:
            f = open(path, 'rb')
        except FileNotFoundError:
            raise FileNotFoundError(f'network file not found: {path}') from None
        with f:
            return reader(f, path)
    return reader(f_or_path, getattr(f_or_path, 'name', None) or '<network file stream>')


def load_network_pickle(f_or_path):
    """The snapshot dict of a network pickle (path or open binary file), read without running code from it.

    Accepts this project's snapshots and published FDM/EDM pickles (docs/design.md#snapshots). Raises
    UnsafePickleError when the file refers to anything else, ValueError when it is unreadable.
    """
    return _open_and(safe_pickle.load, f_or_path)


def load_network_safetensors(f_or_path):
    """The snapshot dict of a safetensors network file (path or open binary file); ValueError when it is not one."""
    return _open_and(safetensors_io.load, f_or_path)


def _load_either(f, name):
    if not f.seekable():
        f = io.BytesIO(f.read())
    start = f.tell()
    head = f.read(9)
    f.seek(start)
    return (safetensors_io.load if safetensors_io.looks_like_safetensors(head) else safe_pickle.load)(f, name)


def load_network(f_or_path):
    """The snapshot dict of a network file of either format, told apart by its first bytes, not its name."""
    return _open_and(_load_either, f_or_path)
