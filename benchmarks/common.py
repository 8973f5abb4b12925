"""Output shared by the benchmarks: markdown tables, JSON and text files, and a line plot drawn with Pillow.

The plot needs no plotting library: Pillow is already a dependency, and a benchmark's figure is a few
polylines on labelled axes.
"""

import datetime
import io
import json
import math
import os
import platform
import zipfile

import numpy as np

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib

# Line colours of successive series (RGB): blue, orange, green, red, purple, brown.
SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


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


def nice_ticks(low, high, max_ticks=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError(f'axis range must be finite, got [{low}, {high}]')
    if high <= low:
        low, high = low - 0.5 * max(abs(low), 1), high + 0.5 * max(abs(high), 1)
    raw_step = (high - low) / max(max_ticks - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    count = math.ceil(high / step - first / step - 1e-9) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _tick_label(value):
    return f'{value:g}'


def _font(size):
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return PIL.ImageFont.load_default()


def line_plot(path, series, x_label, y_label, title,
    width   = 800,          # Image width in pixels.
    height  = 500,          # Image height in pixels.
):
    """Write a PNG of one polyline with markers per series; `series` maps a name to [(x, y), ...]."""
    points = [point for values in series.values() for point in values if point[1] is not None]
    if not points:
        raise ValueError('line_plot: no points to draw')
    x_ticks = nice_ticks(min(0, min(x for x, _ in points)), max(x for x, _ in points))
    y_ticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))
    font, title_font = _font(14), _font(18)
    left, right, top, bottom = 80, 30, 50, 60
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(x, y):
        px = left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * plot_w
        py = top + (y_ticks[-1] - y) / (y_ticks[-1] - y_ticks[0]) * plot_h
        return px, py

    image = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(image)
    for x in x_ticks:
        px, _ = to_pixel(x, y_ticks[0])
        draw.line([(px, top), (px, top + plot_h)], fill=(230, 230, 230))
        draw.line([(px, top + plot_h), (px, top + plot_h + 5)], fill='black')
        draw.text((px, top + plot_h + 8), _tick_label(x), fill='black', font=font, anchor='ma')
    for y in y_ticks:
        _, py = to_pixel(x_ticks[0], y)
        draw.line([(left, py), (left + plot_w, py)], fill=(230, 230, 230))
        draw.line([(left - 5, py), (left, py)], fill='black')
        draw.text((left - 8, py), _tick_label(y), fill='black', font=font, anchor='rm')
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline='black')
    draw.text((left + plot_w / 2, height - 8), x_label, fill='black', font=font, anchor='md')
    draw.text((left + plot_w / 2, 15), title, fill='black', font=title_font, anchor='ma')
    y_label_image = PIL.Image.new('RGB', (plot_h, 20), 'white')
    PIL.ImageDraw.Draw(y_label_image).text((plot_h / 2, 10), y_label, fill='black', font=font, anchor='mm')
    image.paste(y_label_image.rotate(90, expand=True), (8, top))

    legend_y = top + 10
    for index, (name, values) in enumerate(series.items()):
        color = SERIES_COLORS[index % len(SERIES_COLORS)]
        pixels = [to_pixel(x, y) for x, y in values if y is not None]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=3, joint='curve')
        for px, py in pixels:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        legend_x = left + plot_w - 150
        draw.line([(legend_x, legend_y), (legend_x + 30, legend_y)], fill=color, width=3)
        draw.text((legend_x + 38, legend_y), name, fill='black', font=font, anchor='lm')
        legend_y += 22
    with dnnlib.util.atomic_write(path, 'wb') as f:
        image.save(f, format='png')


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
