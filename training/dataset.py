"""Training images from a dataset in the dataset_tool.py layout (docs/design.md#datasets): a ZIP archive or a
folder of PNGs with an optional dataset.json of integer class labels, read as uint8 CHW arrays."""

import io
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

import dnnlib

IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)
CHANNELS_OF_MODE = {'L': 1, 'RGB': 3}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_MODES = {(8, 0): 'L', (8, 2): 'RGB'}  # (bit depth, colour type) of the PNGs we can train on
# Class ids up to this count are taken as given (a subset of ImageNet's 1000 classes keeps its ids); above it at least
# half of the ids 0..max must label images.
MAX_SPARSE_LABEL_DIM = 1000
# What a damaged file or archive member raises on reading: decoders, zipfile's checks (CRC, headers), inflate, and an
# unknown compression method (NotImplementedError).
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zipfile.BadZipFile, zlib.error, NotImplementedError)


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and what is wrong."""


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of one square power-of-two size, 1 or 3 channels; `ds[i]` is (uint8 [C, H, W], float32 label).

    The ZIP archive is opened lazily in each process, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self,
        path,                   # ZIP archive or folder written by dataset_tool.py.
        resolution  = None,     # Required image size in pixels; None = whatever the data holds.
        use_labels  = False,    # Return one-hot class labels from dataset.json? Else labels are empty.
        max_size    = None,     # Use a random subset of at most this many images; None = all.
        xflip       = False,    # Append a mirrored copy of every image, doubling the length?
        random_seed = 0,        # Seed of the subset drawn for max_size.
        cache       = False,    # Keep decoded images in memory after their first use?
    ):
        self._path = os.fspath(path)
        self._zipfile = None
        self._zipfile_pid = None
        self._cache = cache
        self._cached_images = {}
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]

        if os.path.isdir(self._path):
            self._type = 'dir'
            # Regular files only: a named pipe called *.png would block the scan forever.
            all_names = [os.path.relpath(os.path.join(root, file), self._path).replace(os.sep, '/')
                         for root, _dirs, files in os.walk(self._path) for file in files
                         if os.path.isfile(os.path.join(root, file))]
        elif os.path.isfile(self._path):
            self._type = 'zip'
            try:
                all_names = self._get_zipfile().namelist()
            except (zipfile.BadZipFile, OSError) as error:
                raise DatasetError(f'{self._path}: not a readable ZIP archive ({error})') from None
        else:
            raise DatasetError(f'{self._path}: dataset not found')
        image_names = [name for name in all_names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
        self._image_names = sorted(image_names, key=lambda name: tuple(name.split('/')))
        if not self._image_names:
            raise DatasetError(f'{self._path}: no images in the dataset')

        self.image_shape = self._scan_image_shape()
        self.num_channels, self.resolution = self.image_shape[0], self.image_shape[1]
        if resolution is not None and resolution != self.resolution:
            raise DatasetError(f'{self._path}: images are {self.resolution}x{self.resolution}, '
                               f'expected resolution {resolution}')

        self._raw_labels = self._load_raw_labels() if use_labels else None
        if use_labels and self._raw_labels is None:
            raise DatasetError(f'{self._path}: the dataset has no class labels (dataset.json missing or "labels": '
                               f'null); train unconditionally (--cond=0) or prepare it with labels')
        self.label_dim = int(self._raw_labels.max()) + 1 if use_labels else 0
        self.has_labels = self.label_dim > 0

        self._raw_idx = np.arange(len(self._image_names), dtype=np.int64)
        if max_size is not None and len(self._raw_idx) > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(len(self._raw_idx), dtype=bool)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, ~self._xflip])

    # Files.

    def _get_zipfile(self):
        if self._zipfile is None or self._zipfile_pid != os.getpid():  # a forked worker needs its own handle
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, name):
        if self._type == 'dir':
            return dnnlib.util.open_regular_file(os.path.join(self._path, name))
        return self._get_zipfile().open(name)

    def _describe(self, name):
        return f'{self._path}/{name}' if self._type == 'zip' else os.path.join(self._path, name)

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zipfile_pid=None)

    # Images.

    def _read_header(self, name):
        """(width, height, mode) of one image without decoding its pixels; PNGs are read from their IHDR chunk."""
        with self._open_file(name) as f:
            head = f.read(len(PNG_SIGNATURE) + 18)
            if head.startswith(PNG_SIGNATURE) and head[12:16] == b'IHDR':
                width, height, bit_depth, color_type = struct.unpack('>IIBB', head[16:26])
                return width, height, PNG_MODES.get((bit_depth, color_type), f'PNG colour type {color_type} '
                                                                             f'at {bit_depth} bits')
            f.seek(0)
            with PIL.Image.open(f) as img:
                return img.width, img.height, img.mode

    def _scan_image_shape(self):
        """Check every image's header and return the common [C, H, W], so a bad file fails here, not mid-run."""
        first_name, shape = None, None
        for name in self._image_names:
            try:
                width, height, mode = self._read_header(name)
            except READ_ERRORS as error:
                raise DatasetError(f'{self._describe(name)}: cannot read image ({error})') from None
            if mode not in CHANNELS_OF_MODE:
                raise DatasetError(f'{self._describe(name)}: image mode {mode}; datasets hold 8-bit grayscale (L) '
                                   f'or RGB images, convert it with dataset_tool.py')
            if shape is None:
                if width != height or not dnnlib.util.is_power_of_two(width):
                    raise DatasetError(f'{self._describe(name)}: image is {width}x{height}; dataset images must be '
                                       f'square with a power-of-two size (see dataset_tool.py --resolution)')
                first_name, shape = name, [CHANNELS_OF_MODE[mode], height, width]
            elif [CHANNELS_OF_MODE[mode], height, width] != shape:
                raise DatasetError(f'{self._describe(name)}: image is {width}x{height} with {CHANNELS_OF_MODE[mode]} '
                                   f'channel(s), but {first_name} is {shape[2]}x{shape[1]} with {shape[0]}; '
                                   f'all images must have the same size and channels')
        return shape

    def _load_raw_image(self, raw_idx):
        name = self._image_names[raw_idx]
        try:
            with self._open_file(name) as f, PIL.Image.open(f) as img:
                image = np.asarray(img)
        except READ_ERRORS as error:
            raise DatasetError(f'{self._describe(name)}: cannot read image ({error})') from None
        image = image[:, :, np.newaxis] if image.ndim == 2 else image
        image = image.transpose(2, 0, 1)
        if list(image.shape) != self.image_shape or image.dtype != np.uint8:
            raise DatasetError(f'{self._describe(name)}: decoded to {image.dtype} {list(image.shape)}, '
                               f'expected uint8 {self.image_shape}')
        return image

    def _load_raw_labels(self):
        """Integer class per image from dataset.json, or None when the dataset has no labels."""
        json_name = 'dataset.json'
        if self._type == 'dir':
            json_path = os.path.join(self._path, json_name)
            if not os.path.isfile(json_path):
                return None
        elif json_name not in self._get_zipfile().namelist():
            return None
        try:
            with self._open_file(json_name) as f:
                labels = json.load(io.TextIOWrapper(f, encoding='utf-8'))['labels']
            if labels is None:
                return None
            table = {str(name): label for name, label in labels}
        except (KeyError, TypeError, *READ_ERRORS) as error:
            raise DatasetError(f'{self._describe(json_name)}: expected {{"labels": [[name, class], ...] or null}} '
                               f'({error})') from None
        raw_labels = []
        for name in self._image_names:
            label = table.get(name)
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise DatasetError(f'{self._describe(json_name)}: the label of {name} is {label!r}; '
                                   f'expected a class number')
            raw_labels.append(label)
        # The network gets one label input per id up to the largest: a stray huge id must not build a huge network.
        label_dim, num_classes = max(raw_labels) + 1, len(set(raw_labels))
        if label_dim > max(MAX_SPARSE_LABEL_DIM, 2 * num_classes):
            raise DatasetError(f'{self._describe(json_name)}: class ids go up to {label_dim - 1} but only {num_classes} '
                               f'classes are used; a network has one label input per id, so number the classes 0, 1, '
                               f'2, ... (above {MAX_SPARSE_LABEL_DIM} ids at least half must be used)')
        return np.array(raw_labels, dtype=np.int64)

    # Items.

    def __len__(self):
        return len(self._raw_idx)

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """One-hot float32 [label_dim]; an empty [0] array when labels are off."""
        label = np.zeros([self.label_dim], dtype=np.float32)
        if self.has_labels:
            label[self._raw_labels[self._raw_idx[idx]]] = 1
        return label
