"""Network snapshots as safetensors files: the tensors of the 'ema' network, and everything else as JSON metadata.

The tensors carry the network's state_dict names, so other tools read them with `safetensors.torch.load_file`. The
metadata (docs/design.md#network-files) holds, under each key of the snapshot dict, JSON:
`{"class_name": "training.networks.EDMPrecond", "init_kwargs": {...}}` for the network,
`{"class_name": ..., "init_kwargs": ..., "state": ...}` for the loss and augment pipe, `{"value": ...}` for plain
data (dataset_kwargs, power_ema). Reading one never unpickles anything: the header is parsed as JSON, the classes
must be this project's, and the network built from the arguments on the `meta` device must have exactly the file's
tensor names and shapes before anything is allocated (training.safe_build).
"""

import json
import math
import struct

import safetensors.torch
import torch

import dnnlib
from torch_utils import persistence
from training import safe_build

MAGIC_FORMAT = 'fdm-network'        # metadata 'format'
FORMAT_VERSION = '1'
MAX_HEADER_BYTES = 100_000_000     # the safetensors library's own limit
_DTYPES = {'F16': torch.float16, 'BF16': torch.bfloat16, 'F32': torch.float32, 'F64': torch.float64}


def looks_like_safetensors(head):
    """True when the first 9 bytes of a file are a safetensors header's: a little-endian length, then '{'."""
    return len(head) >= 9 and 2 <= struct.unpack('<Q', head[:8])[0] <= MAX_HEADER_BYTES and head[8:9] == b'{'


def _class_path(obj):
    return f'{type(obj).__module__}.{type(obj).__qualname__}'


def _json(key, value):
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f'snapshot entry {key!r} cannot be written as JSON metadata: {e}') from None


def _object_entry(key, obj):
    """The JSON of a persistent object: class, constructor arguments by name, state."""
    kwargs = safe_build.named_arguments(type(obj), obj.init_args, obj.init_kwargs)
    entry = dict(class_name=_class_path(obj), init_kwargs=kwargs)
    if not isinstance(obj, torch.nn.Module):
        entry['state'] = obj.state_dict() if hasattr(obj, 'state_dict') else None
    return _json(key, entry)


def encode(data):
    """(tensors, metadata) of a snapshot dict with an 'ema' network, as safetensors stores them."""
    if not isinstance(data, dict) or not isinstance(data.get('ema'), torch.nn.Module):
        raise ValueError('a network snapshot must be a dict with an "ema" network')
    metadata = dict(format=MAGIC_FORMAT, format_version=FORMAT_VERSION)
    for key, value in data.items():
        if key in metadata:
            raise ValueError(f'snapshot key {key!r} is reserved for the file format')
        if isinstance(value, torch.nn.Module) and key != 'ema':
            raise ValueError(f'snapshot entry {key!r}: only "ema" may be a network in a safetensors file')
        metadata[key] = _object_entry(key, value) if getattr(type(value), '_persistent', False) else _json(key, dict(value=value))
    tensors = {name: t.detach().cpu().contiguous() for name, t in data['ema'].state_dict().items()}
    return tensors, metadata


def save(path, data):
    """Write a snapshot dict (with 'ema') atomically as a safetensors file."""
    tensors, metadata = encode(data)
    payload = safetensors.torch.save(tensors, metadata)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        f.write(payload)


def _read_header(f):
    """(header bytes, header dict) of a safetensors stream, checked to be a JSON object of the documented shape."""
    length_bytes = f.read(8)
    if len(length_bytes) != 8:
        raise ValueError('truncated safetensors header')
    length = struct.unpack('<Q', length_bytes)[0]
    if length > MAX_HEADER_BYTES:
        raise ValueError(f'safetensors header of {length} bytes, more than {MAX_HEADER_BYTES}')
    raw = f.read(length)
    if len(raw) != length:
        raise ValueError('truncated safetensors header')
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'safetensors header is not JSON: {e}') from None
    metadata = header.pop('__metadata__', None) if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata, dict):
        raise ValueError('not a network file of this project: its safetensors header has no metadata')
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.get('dtype') in _DTYPES and isinstance(entry.get('shape'), list)
                and all(isinstance(n, int) and 0 <= n <= safe_build.MAX_VALUES for n in entry['shape'])
                and isinstance(entry.get('data_offsets'), list) and len(entry['data_offsets']) == 2
                and all(isinstance(n, int) for n in entry['data_offsets'])):
            raise ValueError(f'tensor {name!r}: not a floating-point tensor entry (dtype, shape, data_offsets)')
    return length_bytes + raw, header, metadata


def _data_bytes(header, f):
    """Bytes of tensor data the header declares, checked against what the stream holds before any is read."""
    declared = max((entry['data_offsets'][1] for entry in header.values()), default=0)
    for name, entry in header.items():
        begin, end = entry['data_offsets']
        itemsize = _DTYPES[entry['dtype']].itemsize
        if not 0 <= begin <= end or end - begin != itemsize * math.prod(entry['shape']):
            raise ValueError(f'tensor {name!r}: its data_offsets do not match its shape and dtype')
    if f.seekable():
        here = f.tell()
        remaining = f.seek(0, 2) - here
        f.seek(here)
        if remaining != declared:
            raise ValueError(f'the header declares {declared} bytes of tensor data, the file holds {remaining} (truncated?)')
    return declared


def _metadata_json(metadata, key):
    try:
        return json.loads(metadata[key])
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f'metadata {key!r} is not JSON: {e}') from None


def _object_class(entry, key):
    if not (isinstance(entry, dict) and isinstance(entry.get('class_name'), str) and isinstance(entry.get('init_kwargs'), dict)):
        raise ValueError(f'metadata {key!r} has no class_name and init_kwargs')
    module_name, _, class_name = entry['class_name'].rpartition('.')
    return safe_build.persistent_class(module_name, class_name)


def load(f, name):
    """The snapshot dict of the safetensors stream `f` (`name` in messages); ValueError naming the file and the fault."""
    try:
        return _load(f)
    except ValueError as e:
        raise type(e)(f'{name}: {persistence.one_line(e)}') from None


def _load(f):
    header_bytes, header, metadata = _read_header(f)
    if metadata.get('format') != MAGIC_FORMAT or metadata.get('format_version') != FORMAT_VERSION:
        raise ValueError(f'not a network file of this project (metadata format {metadata.get("format")!r}, '
                         f'version {metadata.get("format_version")!r}; expected {MAGIC_FORMAT!r}, {FORMAT_VERSION})')
    if 'ema' not in metadata:
        raise ValueError('its metadata describes no "ema" network')
    entries = {key: _metadata_json(metadata, key) for key in metadata if key not in ('format', 'format_version')}
    ema_entry = entries.pop('ema')
    cls = _object_class(ema_entry, 'ema')
    if not issubclass(cls, torch.nn.Module):
        raise ValueError(f'metadata "ema" names {cls.__name__}, not a network')
    safe_build.check(cls, (), ema_entry['init_kwargs'], {key: entry['shape'] for key, entry in header.items()})
    data_bytes = _data_bytes(header, f)
    payload = header_bytes + f.read(data_bytes)
    if len(payload) != len(header_bytes) + data_bytes or f.read(1):
        raise ValueError(f'the header declares {data_bytes} bytes of tensor data, the file holds others (truncated?)')
    try:
        tensors = safetensors.torch.load(payload)
    except Exception as e:  # the library's own checks of offsets and lengths; it runs no code from the file
        raise ValueError(f'damaged safetensors data: {type(e).__name__}: {persistence.one_line(e)}') from None
    ema = persistence.construct(cls, (), ema_entry['init_kwargs'])
    persistence.restore_module(ema, tensors, training=False)
    data = dict(ema=ema.requires_grad_(False))
    for key, entry in entries.items():
        if isinstance(entry, dict) and set(entry) == {'value'}:
            data[key] = entry['value']
        else:
            obj_cls = _object_class(entry, key)
            if issubclass(obj_cls, torch.nn.Module):
                raise ValueError(f'metadata {key!r} names the network {obj_cls.__name__}; only "ema" may be one')
            data[key] = safe_build.build(obj_cls, (), entry['init_kwargs'], entry.get('state'))
    if isinstance(data.get('dataset_kwargs'), dict):
        data['dataset_kwargs'] = dnnlib.EasyDict(data['dataset_kwargs'])
    return data
