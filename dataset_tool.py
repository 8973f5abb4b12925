"""Convert image collections into training datasets (docs/design.md#datasets).

The output is an uncompressed ZIP archive (or a folder) of PNG images named `{i // 1000:05d}/img{i:08d}.png`,
plus `dataset.json` = {"labels": [[name, class], ...] or null}. All images are square, of one power-of-two
size, and either all grayscale (1 channel) or all RGB (3 channels).

\b
Sources:
  cifar-10-python.tar.gz           the 50,000 CIFAR-10 training images, with labels
  *-images-idx3-ubyte[.gz]         MNIST-format images with the matching *-labels-idx1-ubyte[.gz]; a folder
                                   holding train-images-idx3-ubyte[.gz] means its training pair; 28x28 images
                                   are padded with black to 32x32
  a folder or a .zip of images     searched recursively; labels from its dataset.json if present, else from
                                   the names of the folders holding the images (e.g. AFHQv2's cat/dog/wild)
                                   unless those are numbered shards such as FFHQ's 00000, 01000, ...

\b
Examples:
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64
  python dataset_tool.py --source=/usr/share/datasets/fashion-mnist --dest=datasets/fashion-mnist-32x32.zip
"""

import codecs
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
import tqdm

import dnnlib

IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)
GRAYSCALE_MODES = frozenset(['1', 'L', 'LA'])
WIDE_GRAYSCALE_MODES = frozenset(['I', 'I;16', 'I;16L', 'I;16B', 'I;16N'])  # 16-bit PNGs and TIFFs; 'I' holds int32
MAX_MEMBER_BYTES = 1 << 29  # an image or dataset.json in a source ZIP; a small ZIP can declare gigabytes of zeros
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times make the archive reproducible byte for byte
MAX_RESOLUTION = 1 << 14  # an RGB image of 16384² takes 800 MB; a larger --resolution is a typo
MNIST_PAD_PIXELS = 2  # 28x28 -> 32x32, as EDM and StyleGAN2-ADA do

SOURCE_TYPES_HINT = ('a folder of images, a .zip of images, cifar-10-python.tar.gz, '
                     'or an MNIST-format *-images-idx3-ubyte.gz file')


class BadImage(Exception):
    """An image file that cannot be decoded; --skip-bad skips it, otherwise the conversion stops."""

    def __init__(self, name, reason):
        super().__init__(f'{name}: cannot read image ({reason})')
        self.name = name


@dataclasses.dataclass
class SourceImage:
    name: str           # Where the image comes from, for messages.
    load: object        # Callable returning the image as a uint8 array [H, W, C], C in {1, 3}; may raise BadImage.
    label: object       # Integer class, or None for an unlabelled source.


@dataclasses.dataclass
class Source:
    images: list        # SourceImage items in output order.
    labels_note: str    # Where the labels come from, shown to the user.


# Decoding and transforms.

def decode_image(data_or_path, name):
    """Decode one image file to uint8 [H, W, C]: grayscale modes become 1 channel, all others 3 (RGB)."""
    try:
        fp = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with PIL.Image.open(fp) as img:
            img.load()
            if img.mode in WIDE_GRAYSCALE_MODES:
                array = high_byte(np.asarray(img), name)
            elif img.mode == 'F':
                raise BadImage(name, 'floating-point pixels have no defined 8-bit scale; save it with 8 or 16 bits')
            else:
                mode = 'L' if img.mode in GRAYSCALE_MODES else 'RGB'
                array = np.asarray(img if img.mode == mode else img.convert(mode))
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as error:
        raise BadImage(name, error) from None
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def high_byte(array, name):
    """16-bit grayscale (0–65535) as 8 bits, value >> 8 as Pillow does for 16-bit RGB; PIL's convert('L') would clip."""
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise BadImage(name, f'{array.dtype} pixels outside 0–65535; save it with 8 or 16 bits')
    return (array.astype(np.uint32) >> 8).astype(np.uint8)


def to_pil(image):
    return PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def from_pil(image):
    array = np.asarray(image)
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def resize(image, width, height):
    """Lanczos resize; an image already of that size is returned unchanged."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return from_pil(to_pil(image).resize((width, height), PIL.Image.Resampling.LANCZOS))


def center_crop(image, aspect):
    """The largest centred region of the image with width / height = aspect."""
    height, width = image.shape[:2]
    if width > height * aspect:
        crop = int(round(height * aspect))
        return image[:, (width - crop) // 2:(width - crop) // 2 + crop]
    crop = int(round(width / aspect))
    return image[(height - crop) // 2:(height - crop) // 2 + crop]


def transform_image(image, transform, resolution):
    """Scale or crop to the target; center-crop-wide keeps a W:H band and pads it with black to W x W."""
    if resolution is None:
        return image
    width, height = resolution
    if transform is None:
        return resize(image, width, height)
    if transform == 'center-crop':
        return resize(center_crop(image, 1.0), width, height)
    band = resize(center_crop(image, width / height), width, height)
    canvas = np.zeros([width, width, image.shape[2]], dtype=np.uint8)
    top = (width - height) // 2
    canvas[top:top + height] = band
    return canvas


def encode_png(image, compress_level):
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format='png', compress_level=compress_level)
    return buffer.getvalue()


# Sources.

class _CifarUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 batch pickles (dicts of lists, strings and uint8 arrays) without running code:
    only numpy's array reconstruction helpers may be named, so no other callable can be reached."""

    ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
        ('numpy._core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
        ('numpy.core.numeric', '_frombuffer'): np._core.numeric._frombuffer,
        ('numpy._core.numeric', '_frombuffer'): np._core.numeric._frombuffer,
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('_codecs', 'encode'): codecs.encode,  # how Python 3 protocol-2 pickles spell bytes
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}; a CIFAR-10 batch holds only arrays '
                                         f'and lists') from None


def open_cifar10(path):
    member_names = [f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)]
    images, labels = [], []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for member_name in member_names:
                try:
                    file = tar.extractfile(member_name)
                except KeyError:
                    raise click.ClickException(f'{path}: no {member_name} inside; not a CIFAR-10 python archive '
                                               f'(unknown source type; expected {SOURCE_TYPES_HINT})') from None
                try:
                    batch = _CifarUnpickler(file, encoding='latin1').load()
                    data = np.asarray(batch['data'])
                    batch_labels = np.asarray(batch['labels'])
                except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as error:
                    raise click.ClickException(f'{path}: {member_name}: not a CIFAR-10 batch ({error})') from None
                if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
                        or batch_labels.shape != data.shape[:1] or batch_labels.dtype.kind not in 'iu'):
                    raise click.ClickException(f'{path}: {member_name}: expected uint8 data [N, 3072] and N integer '
                                               f'labels, found {data.dtype} {list(data.shape)} and '
                                               f'{batch_labels.dtype} {list(batch_labels.shape)}')
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(batch_labels)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise click.ClickException(f'{path}: cannot read the archive ({error})') from None
    images = np.concatenate(images)
    labels = np.concatenate(labels).astype(np.int64)
    name = os.path.basename(path)
    items = [SourceImage(f'{name}[{i}]', functools.partial(np.asarray, image), int(label))
             for i, (image, label) in enumerate(zip(images, labels))]
    return Source(items, 'from the CIFAR-10 batches')


def read_idx(path, ndim):
    """An idx-format array of unsigned bytes (the MNIST file format), checking its header and length."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise click.ClickException(f'{path}: cannot read ({error})') from None
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise click.ClickException(f'{path}: not an idx file of unsigned bytes with {ndim} dimension(s)')
    shape = struct.unpack(f'>{ndim}I', data[4:header_bytes])
    body = data[header_bytes:]
    if len(body) != int(np.prod(shape)):
        raise click.ClickException(f'{path}: truncated or oversized: header says {shape}, '
                                   f'i.e. {int(np.prod(shape))} bytes, found {len(body)}')
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def find_mnist_images(folder):
    for name in ('train-images-idx3-ubyte.gz', 'train-images-idx3-ubyte'):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def open_mnist(images_path):
    labels_path = os.path.join(os.path.dirname(images_path),
                               os.path.basename(images_path).replace('images-idx3-ubyte', 'labels-idx1-ubyte'))
    if not os.path.isfile(labels_path):
        raise click.ClickException(f'{images_path}: the matching labels file {labels_path} does not exist')
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if labels.shape[0] != images.shape[0]:
        raise click.ClickException(f'{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images '
                                   f'in {images_path}')
    pad = MNIST_PAD_PIXELS
    images = np.pad(images, [(0, 0), (pad, pad), (pad, pad)])[:, :, :, np.newaxis]
    name = os.path.basename(images_path)
    items = [SourceImage(f'{name}[{i}]', functools.partial(np.asarray, image), int(label))
             for i, (image, label) in enumerate(zip(images, labels))]
    return Source(items, f'from {os.path.basename(labels_path)}')


def sort_key(relative_name):
    return tuple(relative_name.split('/'))


def assign_labels(names, dataset_json, dataset_json_name):
    """Labels from dataset.json when given, else from the names of the folders that hold the images."""
    if dataset_json is not None:
        try:
            labels = json.loads(dataset_json)['labels']
            table = {} if labels is None else {str(name): label for name, label in labels}
        except (ValueError, KeyError, TypeError) as error:
            raise click.ClickException(f'{dataset_json_name}: expected {{"labels": [[name, class], ...] or null}} '
                                       f'({error})') from None
        if labels is None:
            return [None] * len(names), 'none (dataset.json has "labels": null)'
        for name in names:
            if name not in table:
                raise click.ClickException(f'{dataset_json_name}: no label for {name}')
            if not isinstance(table[name], int) or isinstance(table[name], bool) or table[name] < 0:
                raise click.ClickException(f'{dataset_json_name}: the label of {name} is {table[name]!r}; '
                                           f'expected a class number')
        return [table[name] for name in names], 'from dataset.json'
    folders = [name.split('/')[-2] if '/' in name else None for name in names]
    if None in folders:  # images at the top level have no class folder, so none has a label
        return [None] * len(names), 'none (some images are not in class folders)'
    classes = sorted(set(folders))
    if len(classes) < 2 or all(folder.isdigit() for folder in classes):
        return [None] * len(names), 'none'
    index = {folder: i for i, folder in enumerate(classes)}
    note = 'from folder names: ' + ', '.join(f'{folder}={i}' for folder, i in index.items())
    return [index[folder] for folder in folders], note


def open_image_folder(path):
    root = pathlib.Path(path)
    files = {p.relative_to(root).as_posix(): p for p in root.rglob('*')
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    names = sorted(files, key=sort_key)
    if not names:
        raise click.ClickException(f'--source: {path} holds no image files')
    json_path = root / 'dataset.json'
    dataset_json = json_path.read_bytes() if json_path.is_file() else None
    labels, note = assign_labels(names, dataset_json, str(json_path))
    items = [SourceImage(str(files[name]), functools.partial(decode_image, files[name], str(files[name])), label)
             for name, label in zip(names, labels)]
    return Source(items, note)


def open_image_zip(path):
    try:
        archive = zipfile.ZipFile(path)
        members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise click.ClickException(f'--source: {path} is not a readable ZIP archive ({error})') from None
    names = sorted((m for m in members if os.path.splitext(m)[1].lower() in IMAGE_EXTENSIONS and not m.endswith('/')),
                   key=sort_key)
    if not names:
        raise click.ClickException(f'--source: {path} holds no image files')
    for name in ['dataset.json'] if 'dataset.json' in members else []:
        if archive.getinfo(name).file_size > MAX_MEMBER_BYTES:
            raise click.ClickException(f'--source: {path}/{name} declares {archive.getinfo(name).file_size:,} bytes, '
                                       f'more than the {MAX_MEMBER_BYTES:,} a file of a dataset may hold')
    dataset_json = archive.read('dataset.json') if 'dataset.json' in members else None
    labels, note = assign_labels(names, dataset_json, f'{path}/dataset.json')

    def load(name):
        declared = archive.getinfo(name).file_size
        if declared > MAX_MEMBER_BYTES:  # refused before inflating it
            raise BadImage(f'{path}/{name}', f'declares {declared:,} bytes, more than the {MAX_MEMBER_BYTES:,} a file of a dataset may hold')
        try:
            data = archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
            raise BadImage(f'{path}/{name}', error) from None
        return decode_image(data, f'{path}/{name}')

    items = [SourceImage(f'{path}/{name}', functools.partial(load, name), label) for name, label in zip(names, labels)]
    return Source(items, note)


def open_source(path):
    if not os.path.exists(path):
        raise click.ClickException(f'--source: {path} does not exist')
    if os.path.isdir(path):
        mnist_images = find_mnist_images(path)
        return open_mnist(mnist_images) if mnist_images else open_image_folder(path)
    if not os.path.isfile(path):  # a named pipe would block the reading forever, a device never end
        raise click.ClickException(f'--source: {path} is neither a folder nor a regular file')
    name = os.path.basename(path).lower()
    if name.endswith(('.tar.gz', '.tgz')):
        return open_cifar10(path)
    if name.endswith(('-idx3-ubyte.gz', '-idx3-ubyte')):
        return open_mnist(path)
    if name.endswith('.zip'):
        return open_image_zip(path)
    raise click.ClickException(f'--source: {path}: unknown source type; expected {SOURCE_TYPES_HINT}')


# Destination.

def check_destination(dest):
    """Refuse a --dest that exists (a ZIP) or is not an empty folder, or whose folder cannot take files, before reading
    any source."""
    if not dest or not os.path.basename(os.path.normpath(dest)):
        raise click.ClickException(f'--dest: {dest!r} names no file or folder')
    if dest.lower().endswith('.zip'):
        if os.path.lexists(dest):
            raise click.ClickException(f'--dest: {dest} already exists; remove it or choose another name')
    elif os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise click.ClickException(f'--dest: {dest} exists and is not an empty folder')
    try:
        dnnlib.util.check_writable_folder(os.path.dirname(os.path.abspath(dest)))
    except OSError as error:
        raise click.ClickException(f'--dest: cannot write to {error.filename or dest}: {error.strerror or error}') from None


@contextlib.contextmanager
def writing(dest):
    """OSErrors of writing the dataset (disk full, ...) as one line naming --dest."""
    try:
        yield
    except OSError as error:
        raise click.ClickException(f'--dest: cannot write {dest}: {error.strerror or error}') from None


@contextlib.contextmanager
def open_destination(dest):
    """Yield save(archive_name, data); the dataset appears at `dest` only once the block completes."""
    with writing(dest):
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        if dest.lower().endswith('.zip'):
            with dnnlib.util.atomic_write(dest, 'wb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as archive:
                def save(name, data):
                    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
                yield save
            os.chmod(dest, 0o644)  # the temporary file was private
            return
        staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(os.path.abspath(dest))}.', suffix='.tmp')
        try:
            def save(name, data):
                target = os.path.join(staging, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, 'wb') as f:
                    f.write(data)
            yield save
            os.chmod(staging, 0o755)
            if os.path.isdir(dest):
                os.rmdir(dest)  # checked empty before the conversion started
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# Command line.

def parse_resolution(ctx, param, value):
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split('x'))
        if width <= 0 or height <= 0:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f'expected WxH such as 64x64, got {value!r}') from None
    return width, height


def check_target(resolution, transform):
    """Reject a --resolution that cannot give square power-of-two outputs before reading any data."""
    if resolution is None:
        if transform is not None:
            raise click.BadParameter(f'--transform={transform} needs --resolution=WxH', param_hint='--transform')
        return
    width, height = resolution
    if transform == 'center-crop-wide':
        if height > width:
            raise click.BadParameter(f'{width}x{height}: center-crop-wide needs a band no taller than wide',
                                     param_hint='--resolution')
    elif width != height:
        raise click.BadParameter(f'{width}x{height} is not square; dataset images must be square '
                                 f'(center-crop-wide pads a WxH band to WxW)', param_hint='--resolution')
    if not dnnlib.util.is_power_of_two(width):
        raise click.BadParameter(f'{width}x{height}: the output size must be a power of two',
                                 param_hint='--resolution')
    if width > MAX_RESOLUTION:
        raise click.BadParameter(f'{width}x{height}: at most {MAX_RESOLUTION}x{MAX_RESOLUTION}', param_hint='--resolution')


def check_image(name, image, reference_shape):
    height, width, channels = image.shape
    if reference_shape is None:
        if width != height:
            raise click.ClickException(f'{name}: image is {width}x{height}; dataset images must be square: pass '
                                       f'--resolution=WxH, with --transform=center-crop to keep the aspect ratio')
        if not dnnlib.util.is_power_of_two(width):
            size = 1 << (width - 1).bit_length()
            raise click.ClickException(f'{name}: image is {width}x{height}; the size must be a power of two: pass '
                                       f'e.g. --resolution={size}x{size}')
        return
    if image.shape[:2] != reference_shape[:2]:
        raise click.ClickException(f'{name}: image is {width}x{height} but earlier images are '
                                   f'{reference_shape[1]}x{reference_shape[0]}; pass --resolution=WxH to resize all')
    if channels != reference_shape[2]:
        raise click.ClickException(f'{name}: {channels} channel(s) but earlier images have {reference_shape[2]}; '
                                   f'images must be all grayscale or all RGB')


@click.command(help=__doc__, context_settings=dict(max_content_width=120))
@click.option('--source', metavar='PATH', required=True, help='Input: folder, ZIP, CIFAR-10 tar.gz or MNIST idx file')
@click.option('--dest', metavar='ZIP|DIR', required=True, help='Output ZIP archive or empty folder')
@click.option('--max-images', type=click.IntRange(min=1), help='Stop after this many images')
@click.option('--max-per-class', type=click.IntRange(min=1),
              help='Keep only the first N images of each class (a balanced subset)')
@click.option('--transform', type=click.Choice(['center-crop', 'center-crop-wide']),
              help='center-crop: the central square; center-crop-wide: the central WxH band, padded to WxW')
@click.option('--resolution', metavar='WxH', callback=parse_resolution, help='Resize to this size (Lanczos)')
@click.option('--skip-bad', is_flag=True, help='Skip unreadable images instead of stopping')
@click.option('--compress-level', type=click.IntRange(0, 9), default=0, show_default=True,
              help='zlib level of the PNG files: 0 is fastest to read, 9 gives the smallest archive')
def main(source, dest, max_images, max_per_class, transform, resolution, skip_bad, compress_level):
    dnnlib.util.tolerate_undecodable_output()
    check_target(resolution, transform)
    check_destination(dest)
    source_data = open_source(source)
    has_labels = all(item.label is not None for item in source_data.images)
    if max_per_class is not None and not has_labels:
        raise click.BadParameter(f'{source} has no labels to balance by', param_hint='--max-per-class')
    click.echo(f'Source: {source} ({len(source_data.images)} images); labels {source_data.labels_note}')

    total = len(source_data.images)
    if max_per_class is not None:
        class_sizes = np.unique([item.label for item in source_data.images], return_counts=True)[1]
        total = int(np.minimum(class_sizes, max_per_class).sum())
    total = total if max_images is None else min(total, max_images)

    labels = []
    per_class_count = {}
    skipped = []
    reference_shape = None
    with open_destination(dest) as save, tqdm.tqdm(total=total, unit='img', dynamic_ncols=True) as progress:
        for item in source_data.images:
            if max_images is not None and len(labels) >= max_images:
                break
            if max_per_class is not None and per_class_count.get(item.label, 0) >= max_per_class:
                continue
            try:
                image = item.load()
            except BadImage as error:
                if not skip_bad:
                    raise click.ClickException(f'{error}; pass --skip-bad to skip unreadable images') from None
                skipped.append(item.name)
                progress.write(f'Skipping {error}')
                continue
            image = transform_image(image, transform, resolution)
            check_image(item.name, image, reference_shape)
            reference_shape = image.shape
            index = len(labels)
            archive_name = f'{index // 1000:05d}/img{index:08d}.png'
            save(archive_name, encode_png(image, compress_level))
            labels.append([archive_name, item.label])
            per_class_count[item.label] = per_class_count.get(item.label, 0) + 1
            progress.update(1)
        if not labels:
            raise click.ClickException(f'--source: {source}: no images could be read')
        metadata = {'labels': labels if has_labels else None}
        save('dataset.json', json.dumps(metadata).encode('utf-8'))

    height, width, channels = reference_shape
    click.echo(f'Wrote {len(labels)} images of {width}x{height}x{channels} to {dest}'
               + (f'; skipped {len(skipped)} unreadable image(s)' if skipped else ''))


if __name__ == '__main__':
    main()
