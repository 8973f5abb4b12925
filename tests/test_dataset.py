"""training/dataset.py: ImageFolderDataset reads the dataset layout (docs/design.md#datasets) from a ZIP or a
folder, with labels, xflip, max_size and cache, pickles into DataLoader workers, and names the file in every error."""

import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import DatasetError, ImageFolderDataset

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BUNDLED_ZIP = REPO_ROOT / 'datasets' / 'fashion-mnist-32x32-5k.zip'


def png_bytes(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png')
    return buffer.getvalue()


def write_dataset(path, images, labels=None, extra_files=()):
    """Write images ([H, W, C] uint8) in the dataset layout: a ZIP when `path` ends in .zip, else a folder."""
    files = {f'{i // 1000:05d}/img{i:08d}.png': png_bytes(image[:, :, 0] if image.shape[2] == 1 else image)
             for i, image in enumerate(images)}
    names = list(files)
    if labels is not False:
        files['dataset.json'] = json.dumps({'labels': None if labels is None else
                                            [[name, label] for name, label in zip(names, labels)]}).encode()
    files.update(extra_files)
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return path


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=[6, 8, 8, 3], dtype=np.uint8)


LABELS = [2, 0, 1, 2, 0, 1]


@pytest.fixture(params=['zip', 'folder'])
def dataset_path(request, tmp_path, images):
    return write_dataset(tmp_path / ('data.zip' if request.param == 'zip' else 'data'), images, LABELS)


def test_items_are_uint8_chw_images_in_index_order(dataset_path, images):
    ds = ImageFolderDataset(dataset_path)
    assert len(ds) == len(images) and ds.image_shape == [3, 8, 8]
    assert (ds.resolution, ds.num_channels, ds.name) == (8, 3, 'data')
    for i, expected in enumerate(images):
        image, label = ds[i]
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected.transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.shape == (0,)


def test_zip_and_folder_read_identically(tmp_path, images):
    from_zip = ImageFolderDataset(write_dataset(tmp_path / 'a.zip', images, LABELS), use_labels=True)
    from_dir = ImageFolderDataset(write_dataset(tmp_path / 'a', images, LABELS), use_labels=True)
    assert len(from_zip) == len(from_dir) and from_zip.label_dim == from_dir.label_dim
    for i in range(len(from_zip)):
        for a, b in zip(from_zip[i], from_dir[i]):
            np.testing.assert_array_equal(a, b)


def test_grayscale_images_have_one_channel(tmp_path, images):
    gray = images[:, :, :, :1]
    ds = ImageFolderDataset(write_dataset(tmp_path / 'g.zip', gray))
    assert ds.image_shape == [1, 8, 8]
    np.testing.assert_array_equal(ds[3][0], gray[3].transpose(2, 0, 1))


def test_labels_are_one_hot(dataset_path):
    ds = ImageFolderDataset(dataset_path, use_labels=True)
    assert ds.label_dim == 3 and ds.has_labels
    for i, label in enumerate(LABELS):
        np.testing.assert_array_equal(ds[i][1], np.eye(3, dtype=np.float32)[label])
        np.testing.assert_array_equal(ds.get_label(i), np.eye(3, dtype=np.float32)[label])


def test_labels_off_gives_empty_labels(dataset_path):
    ds = ImageFolderDataset(dataset_path, use_labels=False)
    assert ds.label_dim == 0 and not ds.has_labels and ds.get_label(0).shape == (0,)


def test_xflip_appends_mirror_images(dataset_path, images):
    ds = ImageFolderDataset(dataset_path, use_labels=True, xflip=True)
    assert len(ds) == 2 * len(images)
    for i in range(len(images)):
        np.testing.assert_array_equal(ds[i][0], images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[len(images) + i][0], images[i][:, ::-1].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[len(images) + i][1], ds[i][1])


def test_max_size_draws_a_sorted_subset_fixed_by_the_seed(dataset_path, images):
    subsets = {}
    for seed in range(4):
        ds = ImageFolderDataset(dataset_path, use_labels=True, max_size=4, random_seed=seed)
        assert len(ds) == 4
        chosen = [next(j for j in range(len(images)) if np.array_equal(ds[i][0], images[j].transpose(2, 0, 1)))
                  for i in range(len(ds))]
        assert chosen == sorted(chosen) and len(set(chosen)) == 4
        assert [int(ds[i][1].argmax()) for i in range(4)] == [LABELS[j] for j in chosen]
        subsets[seed] = chosen
    again = ImageFolderDataset(dataset_path, max_size=4, random_seed=2)
    np.testing.assert_array_equal(again[0][0], images[subsets[2][0]].transpose(2, 0, 1))
    assert len(set(map(tuple, subsets.values()))) > 1
    assert len(ImageFolderDataset(dataset_path, max_size=100)) == len(images)


def test_cache_keeps_images_after_the_files_are_gone(tmp_path, images):
    path = write_dataset(tmp_path / 'data', images)
    ds = ImageFolderDataset(path, cache=True)
    first = ds[1][0]
    os.remove(path / '00000' / 'img00000001.png')
    np.testing.assert_array_equal(ds[1][0], first)


def test_items_are_copies(dataset_path):
    ds = ImageFolderDataset(dataset_path, cache=True, xflip=True)
    ds[0][0][:] = 0
    ds[6][0][:] = 0
    assert ds[0][0].any() and ds[6][0].any()


def test_pickled_dataset_reads_the_same_in_dataloader_workers(dataset_path, images):
    ds = ImageFolderDataset(dataset_path, use_labels=True)
    ds[0]  # opens the ZIP in this process
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).argmax(1).numpy(), LABELS)


# Errors name the dataset or file.

def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match='nope.zip: dataset not found'):
        ImageFolderDataset(tmp_path / 'nope.zip')


def test_empty_archive(tmp_path):
    with pytest.raises(DatasetError, match='empty.zip: no images'):
        ImageFolderDataset(write_dataset(tmp_path / 'empty.zip', []))


def test_not_a_zip(tmp_path):
    (tmp_path / 'junk.zip').write_bytes(b'junk')
    with pytest.raises(DatasetError, match='junk.zip: not a readable ZIP'):
        ImageFolderDataset(tmp_path / 'junk.zip')


def test_mixed_sizes(tmp_path, images):
    extra = {'00000/img00000099.png': png_bytes(np.zeros([16, 16, 3], np.uint8))}
    with pytest.raises(DatasetError, match='img00000099.png: image is 16x16'):
        ImageFolderDataset(write_dataset(tmp_path / 'd.zip', images, labels=False, extra_files=extra))


def test_mixed_channels(tmp_path, images):
    extra = {'00000/img00000099.png': png_bytes(np.zeros([8, 8], np.uint8))}
    with pytest.raises(DatasetError, match='img00000099.png: .* 1 channel'):
        ImageFolderDataset(write_dataset(tmp_path / 'd.zip', images, labels=False, extra_files=extra))


@pytest.mark.parametrize('shape', [[12, 12, 3], [8, 16, 3]])
def test_non_square_or_non_power_of_two(tmp_path, shape):
    with pytest.raises(DatasetError, match='img00000000.png: image is .* power-of-two'):
        ImageFolderDataset(write_dataset(tmp_path / 'd.zip', [np.zeros(shape, np.uint8)]))


def test_resolution_mismatch(dataset_path):
    with pytest.raises(DatasetError, match='images are 8x8, expected resolution 32'):
        ImageFolderDataset(dataset_path, resolution=32)


@pytest.mark.parametrize('labels', [None, False], ids=['null', 'no-json'])
def test_use_labels_without_labels(tmp_path, images, labels):
    path = write_dataset(tmp_path / 'd.zip', images, labels=labels)
    with pytest.raises(DatasetError, match='d.zip: the dataset has no class labels .*--cond=0'):
        ImageFolderDataset(path, use_labels=True)
    assert len(ImageFolderDataset(path, use_labels=False)) == len(images)


def test_label_missing_for_an_image(tmp_path, images):
    path = write_dataset(tmp_path / 'd.zip', images, LABELS[:5])
    with pytest.raises(DatasetError, match='dataset.json: the label of 00000/img00000005.png is None'):
        ImageFolderDataset(path, use_labels=True)


def test_unreadable_image_is_named(tmp_path, images):
    extra = {'00000/img00000099.png': b'not a png'}
    with pytest.raises(DatasetError, match='img00000099.png: cannot read image'):
        ImageFolderDataset(write_dataset(tmp_path / 'd.zip', images, labels=False, extra_files=extra))


def test_truncated_image_is_named_when_read(tmp_path, images):
    data = png_bytes(images[0])
    extra = {'00000/img00000099.png': data[:len(data) // 2]}  # the header survives, the pixels do not
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd.zip', images, labels=False, extra_files=extra))
    with pytest.raises(DatasetError, match='img00000099.png: cannot read image'):
        ds[len(ds) - 1]


def test_unsupported_image_mode_is_named(tmp_path):
    extra = {'00000/img00000000.png': png_bytes(np.zeros([8, 8, 4], np.uint8))}
    with pytest.raises(DatasetError, match='img00000000.png: image mode .*RGB'):
        ImageFolderDataset(write_dataset(tmp_path / 'd.zip', [], labels=False, extra_files=extra))


# The bundled real dataset.

def test_bundled_fashion_mnist_subset():
    ds = ImageFolderDataset(BUNDLED_ZIP, use_labels=True)
    assert len(ds) == 5000 and ds.image_shape == [1, 32, 32] and ds.label_dim == 10
    class_counts = np.sum([ds.get_label(i) for i in range(len(ds))], axis=0)
    np.testing.assert_array_equal(class_counts, np.full(10, 500))
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and label.sum() == 1
    assert not image[:, :2].any() and not image[:, -2:].any() and image.max() > 0  # padded 28x28


# Labels that would size the network, and files that are not regular files (issue 22).


@pytest.mark.parametrize('huge_id', [999_999, 10**30])
def test_a_stray_huge_class_id_is_refused_naming_dataset_json(tmp_path, images, huge_id):
    path = write_dataset(tmp_path / 'data.zip', images, [0, 1, 2, 0, 1, huge_id])
    with pytest.raises(DatasetError, match='dataset.json: class ids go up to') as error:
        ImageFolderDataset(path, use_labels=True)
    assert str(path) in str(error.value)


def test_sparse_class_ids_below_a_thousand_are_kept(tmp_path, images):
    ds = ImageFolderDataset(write_dataset(tmp_path / 'data.zip', images, [3, 3, 7, 7, 999, 3]), use_labels=True)
    assert ds.label_dim == 1000 and ds.get_label(4)[999] == 1


def test_half_the_ids_used_is_enough_above_a_thousand(tmp_path):
    many = np.zeros([1100, 1, 1, 1], dtype=np.uint8)
    labels = list(range(0, 2200, 2))  # 1100 of the ids 0..2198
    assert ImageFolderDataset(write_dataset(tmp_path / 'data.zip', many, labels), use_labels=True).label_dim == 2199


OPEN_FOLDER = '''
import sys
from training.dataset import ImageFolderDataset
print(len(ImageFolderDataset(sys.argv[1])))
'''


def test_a_named_pipe_called_like_an_image_is_not_read(tmp_path, images):
    path = write_dataset(tmp_path / 'data', images, LABELS)
    os.mkfifo(path / '00000' / 'img99999999.png')  # opening it would wait for a writer for ever
    result = subprocess.run([sys.executable, '-c', OPEN_FOLDER, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0 and result.stdout.split() == [str(len(images))], result.stderr
