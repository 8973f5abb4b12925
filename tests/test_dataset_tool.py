"""dataset_tool.py: each source type converts to the dataset layout (docs/design.md#datasets) with exact pixels
and labels, and each bad input stops with a one-line error."""

import gzip
import io
import json
import os
import pickle
import resource
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool

NUM_CLASSES = 10


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(arg) for arg in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert 'Traceback' not in result.output
    last_line = result.output.strip().splitlines()[-1]
    assert last_line.startswith('Error:'), result.output
    for fragment in fragments:
        assert fragment in last_line, last_line


def read_zip_dataset(path):
    """{name: uint8 array [H, W, C]} and the dataset.json labels of a ZIP dataset."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
        images = {name: np.asarray(PIL.Image.open(io.BytesIO(archive.read(name))))
                  for name in archive.namelist() if name.endswith('.png')}
        labels = json.loads(archive.read('dataset.json'))['labels']
    return {name: image[:, :, np.newaxis] if image.ndim == 2 else image for name, image in images.items()}, labels


def expected_names(count):
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in range(count)]


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


# Sources made in the test, in the published file layouts.

def write_cifar10_tar(path, images_per_batch=4, seed=0):
    """The python-version CIFAR-10 archive: data_batch_1..5, test_batch and batches.meta, pickled at protocol 2
    with numpy's Python-2-era module names, as the published files are."""
    rng = np.random.default_rng(seed)
    train_images, train_labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        def add(member_name, obj):
            data = pickle.dumps(obj, protocol=2).replace(b'numpy._core.', b'numpy.core.')
            info = tarfile.TarInfo(f'cifar-10-batches-py/{member_name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for batch in ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch']:
            images_nchw = rng.integers(0, 256, size=[images_per_batch, 3, 32, 32], dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, NUM_CLASSES, size=images_per_batch)]
            add(batch, {'batch_label': f'{batch} of 5', 'labels': labels, 'data': images_nchw.reshape(-1, 3072),
                        'filenames': [f'image_{i}.png' for i in range(images_per_batch)]})
            if batch != 'test_batch':
                train_images.append(images_nchw.transpose(0, 2, 3, 1))
                train_labels += labels
        add('batches.meta', {'num_cases_per_batch': images_per_batch, 'num_vis': 3072,
                             'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                                             'ship', 'truck']})
    return np.concatenate(train_images), train_labels


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_pair(folder, prefix='train', count=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=[count, 28, 28], dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=count).astype(np.uint8)
    write_idx(folder / f'{prefix}-images-idx3-ubyte.gz', images)
    write_idx(folder / f'{prefix}-labels-idx1-ubyte.gz', labels)
    return images, labels


def write_class_folders(root, classes=('cat', 'dog', 'wild'), per_class=2, size=8, seed=0):
    """AFHQv2-like layout; returns the images in the tool's order (sorted paths) with their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(classes):
        for i in range(per_class):
            image = rng.integers(0, 256, size=[size, size, 3], dtype=np.uint8)
            save_png(root / name / f'{name}_{i:03d}.png', image)
            images.append(image)
            labels.append(label)
    return images, labels


# Conversions.

def test_cifar10_archive_converts_training_images_with_labels(tmp_path):
    images, labels = write_cifar10_tar(tmp_path / 'cifar-10-python.tar.gz')
    result = run_tool('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    out_images, out_labels = read_zip_dataset(tmp_path / 'out.zip')
    assert sorted(out_images) == expected_names(len(images)) == [name for name, _ in out_labels]
    assert [label for _, label in out_labels] == labels
    for i, name in enumerate(expected_names(len(images))):
        np.testing.assert_array_equal(out_images[name], images[i])


def test_cifar10_pickle_that_names_other_callables_is_refused(tmp_path):
    marker = tmp_path / 'executed'

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        data = pickle.dumps({'data': Payload(), 'labels': []}, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = run_tool('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip')
    assert_one_line_error(result, 'data_batch_1', 'refusing to load posix.mkdir')
    assert not marker.exists()


def test_mnist_images_file_converts_padded_to_32_with_labels(tmp_path):
    images, labels = write_mnist_pair(tmp_path)
    result = run_tool('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    out_images, out_labels = read_zip_dataset(tmp_path / 'out.zip')
    assert [label for _, label in out_labels] == labels.tolist()
    for i, name in enumerate(expected_names(len(images))):
        expected = np.zeros([32, 32, 1], dtype=np.uint8)
        expected[2:30, 2:30, 0] = images[i]
        np.testing.assert_array_equal(out_images[name], expected)


def test_mnist_folder_means_its_training_pair(tmp_path):
    write_mnist_pair(tmp_path, prefix='t10k', count=3, seed=1)
    images, _ = write_mnist_pair(tmp_path, prefix='train', count=5)
    assert run_tool('--source', tmp_path, '--dest', tmp_path / 'from_folder.zip').exit_code == 0
    images_file = tmp_path / 'train-images-idx3-ubyte.gz'
    assert run_tool('--source', images_file, '--dest', tmp_path / 'from_file.zip').exit_code == 0
    assert (tmp_path / 'from_folder.zip').read_bytes() == (tmp_path / 'from_file.zip').read_bytes()
    assert len(read_zip_dataset(tmp_path / 'from_folder.zip')[0]) == len(images)


def test_class_subfolders_give_sorted_labels(tmp_path):
    images, labels = write_class_folders(tmp_path / 'afhq', classes=('wild', 'cat', 'dog'))
    result = run_tool('--source', tmp_path / 'afhq', '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    out_images, out_labels = read_zip_dataset(tmp_path / 'out.zip')
    order = sorted(range(len(images)), key=lambda i: ('cat', 'dog', 'wild').index(('wild', 'cat', 'dog')[labels[i]]))
    assert [label for _, label in out_labels] == [0, 0, 1, 1, 2, 2]
    for name, i in zip(expected_names(len(images)), order):
        np.testing.assert_array_equal(out_images[name], images[i])


def test_labels_come_from_the_folder_holding_each_image(tmp_path):
    write_class_folders(tmp_path / 'afhqv2' / 'train', per_class=2)
    write_class_folders(tmp_path / 'afhqv2' / 'test', per_class=1, seed=1)
    assert run_tool('--source', tmp_path / 'afhqv2', '--dest', tmp_path / 'out.zip').exit_code == 0
    _, out_labels = read_zip_dataset(tmp_path / 'out.zip')
    assert [label for _, label in out_labels] == [0, 1, 2, 0, 0, 1, 1, 2, 2]  # test/* sorts before train/*


def test_numbered_shard_folders_are_not_classes(tmp_path):
    write_class_folders(tmp_path / 'ffhq', classes=('00000', '01000'), per_class=2)
    assert run_tool('--source', tmp_path / 'ffhq', '--dest', tmp_path / 'out.zip').exit_code == 0
    assert read_zip_dataset(tmp_path / 'out.zip')[1] is None


def test_dataset_json_in_the_source_folder_gives_the_labels(tmp_path):
    write_class_folders(tmp_path / 'src', classes=('a', 'b'), per_class=1)
    labels = [['a/a_000.png', 7], ['b/b_000.png', 3]]
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': labels}))
    assert run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip').exit_code == 0
    assert read_zip_dataset(tmp_path / 'out.zip')[1] == [[expected_names(2)[0], 7], [expected_names(2)[1], 3]]


def test_zip_source_and_folder_destination_match_folder_source_and_zip(tmp_path):
    write_class_folders(tmp_path / 'src')
    assert run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'a.zip').exit_code == 0
    assert run_tool('--source', tmp_path / 'a.zip', '--dest', tmp_path / 'b_dir').exit_code == 0
    images_a, labels_a = read_zip_dataset(tmp_path / 'a.zip')
    for name, image in images_a.items():
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / 'b_dir' / name)), image)
    assert json.loads((tmp_path / 'b_dir' / 'dataset.json').read_text())['labels'] == labels_a


def test_resolution_resizes_with_lanczos(tmp_path):
    source = np.random.default_rng(0).integers(0, 256, size=[16, 16, 3], dtype=np.uint8)
    save_png(tmp_path / 'src' / 'x.png', source)
    assert run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--resolution', '8x8').exit_code == 0
    expected = np.asarray(PIL.Image.fromarray(source).resize((8, 8), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(read_zip_dataset(tmp_path / 'out.zip')[0][expected_names(1)[0]], expected)


def test_center_crop_takes_the_central_square(tmp_path):
    source = np.random.default_rng(0).integers(0, 256, size=[8, 12, 3], dtype=np.uint8)
    save_png(tmp_path / 'src' / 'x.png', source)
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--transform', 'center-crop',
                      '--resolution', '8x8')
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_zip_dataset(tmp_path / 'out.zip')[0][expected_names(1)[0]], source[:, 2:10])


def test_center_crop_wide_pads_a_band_to_a_square(tmp_path):
    source = np.random.default_rng(0).integers(1, 256, size=[12, 16, 3], dtype=np.uint8)  # 4:3, band 2:1
    save_png(tmp_path / 'src' / 'x.png', source)
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--transform', 'center-crop-wide',
                      '--resolution', '16x8')
    assert result.exit_code == 0, result.output
    out = read_zip_dataset(tmp_path / 'out.zip')[0][expected_names(1)[0]]
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[4:12], source[2:10])
    assert not out[:4].any() and not out[12:].any()


def test_max_images_stops_early(tmp_path):
    write_mnist_pair(tmp_path, count=12)
    assert run_tool('--source', tmp_path, '--dest', tmp_path / 'out.zip', '--max-images', 5).exit_code == 0
    assert sorted(read_zip_dataset(tmp_path / 'out.zip')[0]) == expected_names(5)


def test_max_per_class_keeps_the_first_images_of_each_class(tmp_path):
    _, labels = write_mnist_pair(tmp_path, count=60)
    assert run_tool('--source', tmp_path, '--dest', tmp_path / 'out.zip', '--max-per-class', 2).exit_code == 0
    kept = [i for i in range(len(labels)) if list(labels[:i]).count(labels[i]) < 2]
    assert [label for _, label in read_zip_dataset(tmp_path / 'out.zip')[1]] == labels[kept].tolist()


def test_skip_bad_skips_and_reports_unreadable_images(tmp_path):
    write_class_folders(tmp_path / 'src', classes=('a', 'b'), per_class=2)
    (tmp_path / 'src' / 'a' / 'a_001.png').write_bytes(b'not a png')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--skip-bad')
    assert result.exit_code == 0, result.output
    assert 'skipped 1 unreadable image' in result.output
    assert [label for _, label in read_zip_dataset(tmp_path / 'out.zip')[1]] == [0, 1, 1]


# Bad input: one line naming the file or option.

def test_missing_source(tmp_path):
    result = run_tool('--source', tmp_path / 'nope', '--dest', tmp_path / 'o.zip')
    assert_one_line_error(result, 'nope', 'does not exist')


def test_unknown_source_type(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    assert_one_line_error(run_tool('--source', tmp_path / 'notes.txt', '--dest', tmp_path / 'o.zip'),
                          'notes.txt', 'unknown source type')


def test_unreadable_image_is_named(tmp_path):
    write_class_folders(tmp_path / 'src', classes=('a', 'b'), per_class=1)
    (tmp_path / 'src' / 'b' / 'broken.png').write_bytes(b'not a png')
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'),
                          'broken.png', '--skip-bad')


def test_truncated_image_is_named(tmp_path):
    save_png(tmp_path / 'src' / 'x.png', np.random.default_rng(0).integers(0, 256, [16, 16, 3], dtype=np.uint8))
    data = (tmp_path / 'src' / 'x.png').read_bytes()
    (tmp_path / 'src' / 'x.png').write_bytes(data[:len(data) // 2])
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'), 'x.png', 'cannot read')


def test_truncated_mnist_file_is_named(tmp_path):
    write_mnist_pair(tmp_path, count=4)
    data = gzip.decompress((tmp_path / 'train-images-idx3-ubyte.gz').read_bytes())
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(gzip.compress(data[:-100]))
    assert_one_line_error(run_tool('--source', tmp_path, '--dest', tmp_path / 'o.zip'),
                          'train-images-idx3-ubyte.gz', 'truncated')


def test_dataset_json_without_a_label_for_an_image(tmp_path):
    write_class_folders(tmp_path / 'src', classes=('a', 'b'), per_class=1)
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [['a/a_000.png', 0]]}))
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'),
                          'dataset.json', 'no label for b/b_000.png')


def test_malformed_dataset_json(tmp_path):
    write_class_folders(tmp_path / 'src', classes=('a', 'b'), per_class=1)
    (tmp_path / 'src' / 'dataset.json').write_text('{"labels": [[')
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'),
                          'dataset.json', 'expected')


def test_mixed_sizes_without_resolution(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([8, 8, 3], np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.zeros([16, 16, 3], np.uint8))
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'), 'b.png', '--resolution')


def test_mixed_channel_counts(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([8, 8, 3], np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.zeros([8, 8], np.uint8))
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'), 'b.png', 'channel')


def test_non_power_of_two_source_without_resolution(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([12, 12, 3], np.uint8))
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'), 'a.png', 'power of two')


@pytest.mark.parametrize('resolution, fragment', [('48x48', 'power of two'), ('64x32', 'not square'),
                                                  ('64', 'WxH')])
def test_bad_resolution(tmp_path, resolution, fragment):
    write_class_folders(tmp_path / 'src')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip', '--resolution', resolution)
    assert_one_line_error(result, '--resolution', fragment)


def test_transform_without_resolution(tmp_path):
    write_class_folders(tmp_path / 'src')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip', '--transform', 'center-crop')
    assert_one_line_error(result, '--transform', '--resolution')


def test_destination_folder_not_empty(tmp_path):
    write_class_folders(tmp_path / 'src')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('x')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out')
    assert_one_line_error(result, 'out', 'not an empty folder')


def test_destination_zip_exists(tmp_path):
    write_class_folders(tmp_path / 'src')
    (tmp_path / 'o.zip').write_bytes(b'old')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip')
    assert_one_line_error(result, 'o.zip', 'already exists')
    assert (tmp_path / 'o.zip').read_bytes() == b'old'


@pytest.mark.parametrize('dest_name', ['out.zip', 'out_dir'])
def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch, dest_name):
    write_class_folders(tmp_path / 'src', per_class=3)
    encode_png = dataset_tool.encode_png
    calls = []

    def interrupt_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return encode_png(*args, **kwargs)

    monkeypatch.setattr(dataset_tool, 'encode_png', interrupt_after_three)
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / dest_name)
    assert result.exit_code != 0 and len(calls) == 4
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_16_bit_grayscale_png_keeps_its_high_byte(tmp_path):
    wide = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0, 257, …: high byte = 0, 1, …
    os.makedirs(tmp_path / 'src')
    PIL.Image.fromarray(wide).save(tmp_path / 'src' / 'wide.png')
    assert PIL.Image.open(tmp_path / 'src' / 'wide.png').mode == 'I;16'
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip')
    assert result.exit_code == 0, result.output
    images, _ = read_zip_dataset(tmp_path / 'o.zip')
    np.testing.assert_array_equal(images[expected_names(1)[0]][:, :, 0], (wide >> 8).astype(np.uint8))


def test_floating_point_image_is_refused_with_one_line(tmp_path):
    os.makedirs(tmp_path / 'src')
    PIL.Image.fromarray(np.full([16, 16], 0.5, dtype=np.float32)).save(tmp_path / 'src' / 'float.tif')
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip'), 'float.tif', 'floating-point')


def test_zip_member_declaring_gigabytes_is_refused_before_reading(tmp_path):
    source = tmp_path / 'bomb.zip'
    with zipfile.ZipFile(source, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('big.png', bytes(1 << 20))
    data = bytearray(source.read_bytes())
    declared = (3 * 10**9).to_bytes(4, 'little')
    local, central = data.index(b'PK\x03\x04'), data.index(b'PK\x01\x02')
    data[local + 22:local + 26] = declared      # uncompressed size in the local header
    data[central + 24:central + 28] = declared  # and in the central directory
    source.write_bytes(bytes(data))
    assert len(data) < 10_000
    assert_one_line_error(run_tool('--source', source, '--dest', tmp_path / 'o.zip'), 'big.png', '3,000,000,000 bytes')


# Sources that are not regular files, destinations that cannot be written, mixed folders (issue 22).


@pytest.mark.parametrize('name', ['source.zip', 'train-images-idx3-ubyte', 'cifar-10-python.tar.gz'])
def test_a_named_pipe_source_is_refused_without_opening_it(tmp_path, name):
    os.mkfifo(tmp_path / name)  # opening it for reading would wait for a writer for ever
    assert_one_line_error(run_tool('--source', tmp_path / name, '--dest', tmp_path / 'out.zip'),
                          'neither a folder nor a regular file')


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_a_destination_under_a_file_is_one_line_before_reading(tmp_path, dest_name):
    write_class_folders(tmp_path / 'src')
    (tmp_path / 'file').write_bytes(b'')
    assert_one_line_error(run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'file' / dest_name), '--dest',
                          str(tmp_path / 'file'))


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, dest_name):
    write_class_folders(tmp_path / 'src', per_class=4)
    (tmp_path / 'dest').mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, hard))  # each PNG of 8x8 noise takes ~250 bytes
    try:
        result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'dest' / dest_name)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_error(result, '--dest: cannot write', 'File too large')
    assert os.listdir(tmp_path / 'dest') == []


def test_images_beside_class_folders_give_no_labels(tmp_path):
    write_class_folders(tmp_path / 'src', per_class=1)
    save_png(tmp_path / 'src' / 'top.png', np.zeros([8, 8, 3], dtype=np.uint8))
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    assert 'labels none' in result.output
