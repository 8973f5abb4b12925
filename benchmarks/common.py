"""Output shared by the benchmarks: markdown tables, JSON and text files, and a line plot drawn with Pillow.

The plot needs no plotting library: Pillow is already a dependency, and a benchmark's figure is a few
polylines on labelled axes.
"""

import datetime
import io
import json
import os
import platform
import zipfile

import numpy as np

import PIL.Image

import dnnlib

# Line colours of successive series (RGB): blue, orange, green, red, purple, brown.


def format_value(value, digits=2):
    """A table cell: floats with `digits` decimals (None: shortest form, :g), None as '–', others as str()."""
    if value is None:
        return '–'
    if isinstance(value, float):
        return f'{value:g}' if digits is None else f'{value:.{digits}f}'
    return str(value)


def markdown_table(headers, rows, digits=2):
    """A GitHub-flavoured markdown table with padded columns; numbers are right-aligned.

    `digits` is the decimals of float cells, one number for all columns or a list with one per column.
    """
    column_digits = digits if isinstance(digits, (list, tuple)) else [digits] * len(headers)
    cells = [[format_value(value, column_digits[i]) for i, value in enumerate(row)] for row in rows]
    widths = [max([len(str(header))] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]
    def line(values):
        return '| ' + ' | '.join(value.rjust(width) if is_numeric else value.ljust(width)
                                 for value, width, is_numeric in zip(values, widths, numeric)) + ' |'
    rule = '|' + '|'.join('-' * (width + 1) + ':' if is_numeric else '-' * (width + 2)
                          for width, is_numeric in zip(widths, numeric)) + '|'
    return '\n'.join([line([str(header) for header in headers]), rule] + [line(row) for row in cells])


def write_text(path, text):
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(text)


def write_json(path, data):
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')


def write_synthetic_dataset(path, num_images, resolution, channels, num_classes, seed=0):
    """A ZIP in the dataset layout of docs/design.md#datasets: random images, and random labels if classes > 0."""
    rng = np.random.default_rng(seed)
    labels = []
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as archive:
        for index in range(num_images):
            pixels = rng.integers(0, 256, size=[resolution, resolution, channels], dtype=np.uint8)
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buffer, format='png')
            name = f'{index // 1000:05d}/img{index:08d}.png'
            archive.writestr(name, buffer.getvalue())
            labels.append([name, int(rng.integers(num_classes))] if num_classes else None)
        archive.writestr('dataset.json', json.dumps({'labels': labels if num_classes else None}))


def machine_description():
    """What the numbers were measured on: processor, cores, memory, library versions, GPU, date."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu_model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        memory_gb = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    description = dict(cpu=cpu_model, cores=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
                       memory_gb=memory_gb, python=platform.python_version(), system=platform.platform(),
                       date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'))
    try:
        import torch
        description.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return description
