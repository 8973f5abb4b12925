"""training/checkpoints.py with training/safe_pickle.py, training/safe_build.py and the pickle names of
torch_utils/persistence.py: our snapshots round-trip, published pickles load without running their code, anything
else is refused before it runs or is allocated, damaged files give one-line errors naming the file."""

import collections
import contextlib
import copy
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import checkpoints, loss, networks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
SMALL_ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def small_net(class_name='EDMPrecond', arch=SMALL_SONG, **kwargs):
    """A small conditional network in eval mode with every weight perturbed, so that every path shows in the output."""
    if class_name.startswith('FDM_'):
        kwargs.setdefault('fdm_multiplier', 2.0)  # explicit, as published train.py always passes it
    torch.manual_seed(0)
    net = getattr(networks, class_name)(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, **arch, **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return net.eval().requires_grad_(False)


def net_output(net):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn([2, 3, 16, 16], generator=generator)
    sigma = torch.tensor([0.3, 5.0])
    labels = torch.eye(10)[[1, 7]]
    augment_labels = torch.randn([2, 9], generator=generator)
    with torch.no_grad():
        return net(x, sigma, labels, augment_labels=augment_labels)


def save(path, data):
    checkpoints.save_network_pickle(path, data)
    return path


class PublishedPickler(pickle.Pickler):
    """Writes persistent objects the way the published code does: `_reconstruct_persistent_obj(meta)`, with
    the object's `__dict__` as state and a `module_src` that leaves a marker file and fails if executed."""

    def __init__(self, file, marker, rename=None, drop_kwargs=(), protocol=None):
        super().__init__(file, protocol=protocol)
        self.module_src = f'import pathlib\npathlib.Path({str(marker)!r}).write_text("executed")\nraise SystemExit("module_src ran")\n'
        self.rename = rename or {}
        self.drop_kwargs = drop_kwargs

    def reducer_override(self, obj):
        if not getattr(type(obj), '_persistent', False):
            return NotImplemented
        state = dict(vars(obj))
        if '_init_kwargs' in state:
            state['_init_kwargs'] = {k: v for k, v in state['_init_kwargs'].items() if k not in self.drop_kwargs}
        class_name = self.rename.get(type(obj).__name__, type(obj).__name__)
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=class_name, state=state)
        return (persistence._reconstruct_persistent_obj, (meta,))


def write_published(path, data, marker, **kwargs):
    with open(path, 'wb') as f:
        PublishedPickler(f, marker, **kwargs).dump(data)
    return path


class Shell:
    """Pickles as a call of os.system that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class Eval:
    """Pickles as a call of builtins.eval that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f'__import__("pathlib").Path({str(self.marker)!r}).touch()',))


class StorageBytes:
    """Pickles as tensor storage whose bytes are a pickle of `inner` (what the stock loader would run)."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (pickle.dumps(self.inner, protocol=2),))


def test_snapshot_round_trips_through_load_network_pickle(tmp_path):
    net = small_net()
    path = save(tmp_path / 'network-snapshot-000000.pkl', dict(ema=net, dataset_kwargs=dict(path='data.zip', xflip=False)))
    data = checkpoints.load_network_pickle(path)
    assert type(data['ema']) is networks.EDMPrecond
    assert torch.equal(net_output(data['ema']), net_output(net))
    assert data['dataset_kwargs'] == dict(path='data.zip', xflip=False)


def test_snapshot_round_trips_through_plain_pickle_load(tmp_path):
    net = small_net('FDM_EDMPrecond', fdm_multiplier=2.0)
    path = save(tmp_path / 'snapshot.pkl', dict(ema=net))
    with open(path, 'rb') as f:
        ema = pickle.load(f)['ema']
    assert ema.fdm_multiplier == 2.0
    assert torch.equal(net_output(ema), net_output(net))


def test_snapshot_reads_from_an_open_file(tmp_path):
    net = small_net()
    path = save(tmp_path / 'snapshot.pkl', dict(ema=net))
    with open(path, 'rb') as f:
        assert torch.equal(net_output(checkpoints.load_network_pickle(f)['ema']), net_output(net))


def test_snapshot_keeps_eval_mode_and_requires_grad_flags(tmp_path):
    path = save(tmp_path / 'snapshot.pkl', dict(ema=small_net()))
    ema = checkpoints.load_network_pickle(path)['ema']
    assert not ema.training and not any(module.training for module in ema.modules())
    assert not any(param.requires_grad for param in ema.parameters())


def test_snapshot_restores_loss_state(tmp_path):
    loss_fn = loss.EDMLoss(P_mean=-1.0, warmup_ite=100)
    for _ in range(3):
        loss_fn.advance()
    path = save(tmp_path / 'snapshot.pkl', dict(ema=small_net(), loss_fn=loss_fn))
    restored = checkpoints.load_network_pickle(path)['loss_fn']
    assert type(restored) is loss.EDMLoss
    assert restored.P_mean == -1.0 and restored.state_dict() == {'step': 3}


def test_snapshot_keeps_easydict_dataset_kwargs(tmp_path):
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='data.zip')
    path = save(tmp_path / 'snapshot.pkl', dict(ema=small_net(), dataset_kwargs=kwargs))
    restored = checkpoints.load_network_pickle(path)['dataset_kwargs']
    assert type(restored) is dnnlib.EasyDict and restored == kwargs


def test_deepcopy_of_a_persistent_network_is_an_equal_independent_copy():
    net = small_net().train().requires_grad_(True)
    net.model.map_layer0.bias.requires_grad_(False)
    copied = copy.deepcopy(net)
    assert type(copied) is type(net) and copied.training
    assert [p.requires_grad for p in copied.parameters()] == [p.requires_grad for p in net.parameters()]
    assert torch.equal(net_output(copied.eval()), net_output(net.eval()))
    with torch.no_grad():
        copied.model.map_layer0.weight.zero_()
    assert not torch.equal(net.model.map_layer0.weight, copied.model.map_layer0.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_deepcopy_of_a_cuda_network_stays_on_cuda():
    net = small_net().cuda()
    copied = copy.deepcopy(net)
    assert all(tensor.is_cuda for tensor in copied.state_dict().values())
    assert torch.equal(net_output(copied.cpu()), net_output(net.cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('write', [save, lambda path, data: write_published(path, data, path.with_suffix('.marker'))])
def test_pickle_of_a_cuda_network_loads_on_the_cpu(tmp_path, write):
    net = small_net()
    path = write(tmp_path / 'snapshot.pkl', dict(ema=copy.deepcopy(net).cuda()))
    ema = checkpoints.load_network_pickle(path)['ema']
    assert all(not tensor.is_cuda for tensor in ema.state_dict().values())
    assert torch.equal(net_output(ema), net_output(net))


def test_save_network_pickle_refuses_a_dict_without_ema(tmp_path):
    with pytest.raises(ValueError, match='ema'):
        checkpoints.save_network_pickle(tmp_path / 'snapshot.pkl', dict(net=small_net()))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('class_name, arch', [('FDM_EDMPrecond', SMALL_SONG), ('EDMPrecond', SMALL_ADM), ('FDM_VPPrecond', SMALL_SONG)])
def test_published_pickle_loads_into_our_class_without_running_module_src(tmp_path, class_name, arch):
    net = small_net(class_name, arch)
    marker = tmp_path / 'module_src_ran'
    path = write_published(tmp_path / 'published.pkl', dict(ema=net, dataset_kwargs=dict(resolution=16)), marker)
    data = checkpoints.load_network_pickle(path)
    assert type(data['ema']) is type(net)
    assert torch.equal(net_output(data['ema']), net_output(net))
    assert data['dataset_kwargs'] == dict(resolution=16)
    assert not marker.exists()


def test_published_pickle_written_with_protocol_1_loads(tmp_path):
    net = small_net()
    marker = tmp_path / 'module_src_ran'
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), marker, protocol=1)
    assert torch.equal(net_output(checkpoints.load_network_pickle(path)['ema']), net_output(net))
    assert not marker.exists()


def test_published_pickle_through_plain_pickle_load_never_runs_module_src(tmp_path):
    net = small_net('FDM_EDMPrecond')
    marker = tmp_path / 'module_src_ran'
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), marker)
    with open(path, 'rb') as f:
        ema = pickle.load(f)['ema']
    assert type(ema) is networks.FDM_EDMPrecond
    assert torch.equal(net_output(ema), net_output(net))
    assert not marker.exists()


def test_plain_pickle_load_of_a_published_pickle_does_not_depend_on_earlier_imports(tmp_path):
    net = small_net('FDM_EDMPrecond')
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker')
    torch.save(net_output(net), tmp_path / 'expected.pt')
    script = (f'import pickle, sys, torch; ema = pickle.load(open({str(path)!r}, "rb"))["ema"]; '  # before any project import
              f'sys.path.insert(0, "tests"); from test_checkpoints import net_output; '
              f'assert torch.equal(net_output(ema), torch.load({str(tmp_path / "expected.pt")!r}))')
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / 'marker').exists()


def test_published_ve_fdm_loads_with_multiplier_one(tmp_path):
    net = small_net('FDM_VEPrecond', fdm_multiplier=2.0)
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker')
    ema = checkpoints.load_network_pickle(path)['ema']
    assert ema.fdm_multiplier == 1
    net.fdm_multiplier = 1.0  # what the published VE-FDM code computed with these weights
    assert torch.equal(net_output(ema), net_output(net))


@pytest.mark.parametrize('class_name', ['FDM_EDMPrecond', 'FDM_VPPrecond'])
def test_published_fdm_pickle_without_multiplier_uses_the_published_default(tmp_path, class_name):
    net = small_net(class_name, fdm_multiplier=1.0)  # upstream's default m; ours is 2
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker', drop_kwargs=('fdm_multiplier',))
    ema = checkpoints.load_network_pickle(path)['ema']
    assert ema.fdm_multiplier == 1
    assert torch.equal(net_output(ema), net_output(net))


def test_published_model_type_defaults_to_the_pickled_inner_network(tmp_path):
    net = small_net('EDMPrecond', SMALL_ADM)  # our EDMPrecond defaults to SongUNet, upstream's to DhariwalUNet
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker', drop_kwargs=('model_type',))
    ema = checkpoints.load_network_pickle(path)['ema']
    assert type(ema.model) is networks.DhariwalUNet
    assert torch.equal(net_output(ema), net_output(net))


class PublishedEDMLoss:
    """What a published FDM EDMLoss pickles: its arguments and plain attributes, numpy numbers among them."""

    _persistent = True

    def __init__(self, **kwargs):
        self._init_args = ()
        self._init_kwargs = kwargs
        self.__dict__.update(kwargs)
        self.clamp_cur = 5.0
        self.warmup_step = np.exp(np.log(100) / kwargs['warmup_ite'])


def test_published_loss_is_rebuilt_from_its_arguments(tmp_path):
    data = dict(ema=small_net(), loss_fn=PublishedEDMLoss(P_std=1.1, warmup_ite=50))
    path = write_published(tmp_path / 'published.pkl', data, tmp_path / 'marker', rename={'PublishedEDMLoss': 'EDMLoss'})
    restored = checkpoints.load_network_pickle(path)['loss_fn']
    assert type(restored) is loss.EDMLoss and restored.P_std == 1.1


def test_published_unknown_loss_is_left_out_with_a_warning(tmp_path):
    data = dict(ema=small_net(), loss_fn=PublishedEDMLoss(warmup_ite=50))
    path = write_published(tmp_path / 'published.pkl', data, tmp_path / 'marker', rename={'PublishedEDMLoss': 'FancyLoss'})
    with pytest.warns(UserWarning, match="leaving out 'loss_fn'.*FancyLoss"):
        data = checkpoints.load_network_pickle(path)
    assert set(data) == {'ema'}


def test_published_unknown_network_class_is_refused_by_name(tmp_path):
    path = write_published(tmp_path / 'published.pkl', dict(ema=small_net()), tmp_path / 'marker', rename={'EDMPrecond': 'StyleGAN3Generator'})
    with pytest.raises(checkpoints.UnsafePickleError, match='StyleGAN3Generator') as info:
        checkpoints.load_network_pickle(path)
    assert str(path) in str(info.value)


def test_published_pickle_with_missing_parameters_is_refused(tmp_path):
    net = small_net()
    del net.model.map_layer0._parameters['bias']
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker')
    with pytest.raises(ValueError, match='map_layer0.bias'):
        checkpoints.load_network_pickle(path)


@pytest.mark.parametrize('payload, refused_name', [
    (Shell, 'system'),
    (Eval, 'builtins.eval'),
    (lambda marker: StorageBytes(Shell(marker)), 'system'),
])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, payload, refused_name):
    control = tmp_path / 'control'
    with contextlib.suppress(Exception):  # the storage payload runs, then fails as tensor data
        pickle.loads(pickle.dumps(payload(control)))
    assert control.exists(), 'plain pickle.load must run the payload, or this test proves nothing'

    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=payload(marker))))
    with pytest.raises(checkpoints.UnsafePickleError, match=refused_name) as info:
        checkpoints.load_network_pickle(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)
    assert not marker.exists()


def test_code_hidden_after_a_valid_network_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=small_net(), dataset_kwargs=dict(hook=Shell(marker)))))
    with pytest.raises(checkpoints.UnsafePickleError, match='system'):
        checkpoints.load_network_pickle(path)
    assert not marker.exists()


def test_untrusted_module_in_our_format_is_refused(tmp_path):
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_ReconstructCall('os', 'system'))))
    with pytest.raises(checkpoints.UnsafePickleError, match='os.system'):
        checkpoints.load_network_pickle(path)


class _ReconstructCall:
    def __init__(self, module_name, class_name):
        self.args = (module_name, class_name, ('true',), {}, None, None)

    def __reduce__(self):
        return (persistence._reconstruct, self.args)


def test_truncated_file_error_names_the_file(tmp_path):
    path = save(tmp_path / 'snapshot.pkl', dict(ema=small_net()))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match='truncated') as info:
        checkpoints.load_network_pickle(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / 'noise.pkl'
    path.write_bytes(b'this is not a pickle at all')
    with pytest.raises(ValueError, match='noise.pkl'):
        checkpoints.load_network_pickle(path)


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='absent.pkl'):
        checkpoints.load_network_pickle(tmp_path / 'absent.pkl')


def test_non_dict_payload_is_refused(tmp_path):
    path = tmp_path / 'list.pkl'
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match='list.pkl.*found a list'):
        checkpoints.load_network_pickle(path)


def test_dict_without_ema_names_its_keys(tmp_path):
    path = tmp_path / 'stylegan.pkl'
    path.write_bytes(pickle.dumps(dict(G=1, D=2)))
    with pytest.raises(ValueError, match=r"stylegan.pkl.*\['D', 'G'\]"):
        checkpoints.load_network_pickle(path)


def test_checkpoint_names_keep_the_published_kimg_form_for_ticks_of_one_kimg_or_more():
    assert checkpoints.snapshot_name(50176) == 'network-snapshot-000050.pkl'
    assert checkpoints.state_name(50176, kimg_per_tick=1) == 'training-state-000050.pt'


def test_checkpoint_names_below_one_kimg_per_tick_carry_the_images_beyond_the_kimg():
    assert checkpoints.snapshot_name(24, kimg_per_tick=0.016) == 'network-snapshot-000000.024.pkl'
    assert checkpoints.state_name(1008, kimg_per_tick=0.5) == 'training-state-000001.008.pt'


# Hostile constructor arguments and shapes: each is refused with one line in bounded time and memory.

def tuple_dag(depth=60):
    """A tuple of 2**depth leaves in a few hundred bytes of pickle: each level holds the previous one twice."""
    node = ('x',)
    for _ in range(depth):
        node = (node, node)
    return node


class _Call:
    """Pickles as `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def ours_with(**kwargs):
    """Our snapshot format naming EDMPrecond with small arguments, some replaced by `kwargs`, and no tensors."""
    init_kwargs = dict(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    init_kwargs.update(kwargs)
    return _Call(persistence._reconstruct, 'training.networks', 'EDMPrecond', (), init_kwargs, {}, False)


def nested_published_records(depth):
    """Opcodes of a published pickle whose 'ema' holds `depth` modules, each the only child of the one before."""
    def text(value):
        return b'X' + len(value).to_bytes(4, 'little') + value.encode()
    level = (b'ctorch_utils.persistence\n_reconstruct_persistent_obj\n}(' + text('type') + text('class') + text('version')
             + b'K\x06' + text('class_name') + text('EDMPrecond') + text('state') + b'}(' + text('_modules') + b'}(' + text('model'))
    return b'\x80\x02}(' + text('ema') + level * depth + b'N' + b'uuu\x85R' * depth + b'u.'


def deflated_zeros(nbytes):
    """A raw deflate stream of `nbytes` zero bytes in about nbytes/1000 bytes: one flushed 16 MiB block repeated."""
    chunk = bytes(1 << 24)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (nbytes // len(chunk)) + compressor.flush(zlib.Z_FINISH)


def zip_archive(members):
    """A ZIP archive of (name, stored bytes, method, declared size, crc) records, written field by field."""
    out, central = io.BytesIO(), []
    for name, data, method, size, crc in members:
        offset, encoded = out.tell(), name.encode()
        out.write(struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, method, 0, 0, crc, len(data), size, len(encoded), 0) + encoded + data)
        central.append(struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, method, 0, 0, crc, len(data), size,
                                   len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    start = out.tell()
    out.write(b''.join(central))
    out.write(struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()


def storage_bomb_pickle(nbytes=1 << 31):
    """A network pickle of ~nbytes/1000 bytes whose tensor storage is torch's ZIP format with its data record deflated
    from `nbytes` zeros: torch's reader allocates and inflates the record in full."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(4).untyped_storage(), buffer)
    source = zipfile.ZipFile(buffer)
    members = []
    for info in source.infolist():
        data = source.read(info)
        if info.filename.endswith('/data/0'):
            members.append((info.filename, deflated_zeros(nbytes), zipfile.ZIP_DEFLATED, nbytes, 0))
        else:
            members.append((info.filename, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)))
    storage = _Call(torch.storage._load_from_bytes, zip_archive(members))
    tensor = _Call(torch._utils._rebuild_tensor_v2, storage, 0, (4,), (1,), False, collections.OrderedDict())
    return pickle.dumps(dict(ema=tensor), protocol=2)


# name: (the file's bytes, what its one-line refusal must say). Each reason shows that the loader stopped at a bound,
# before the work or memory the file asks for.
HOSTILE_PICKLES = {
    'tuple_dag_model_type': (lambda: pickle.dumps(dict(ema=ours_with(model_type=tuple_dag())), protocol=2), 'tuple of more than'),
    'bytearray_3e9': (lambda: pickle.dumps(dict(ema=_Call(bytearray, 3 * 10**9)), protocol=2), 'bytearray'),
    'model_channels_2048_without_tensors': (lambda: pickle.dumps(dict(ema=ours_with(model_channels=2048)), protocol=2),
                                            'tensors do not fit EDMPrecond'),
    'num_blocks_1e7': (lambda: pickle.dumps(dict(ema=ours_with(num_blocks=10**7)), protocol=2), 'num_blocks=10000000'),
    'params_over_budget': (lambda: pickle.dumps(dict(ema=ours_with(model_channels=1024, channel_mult=[16])), protocol=2),
                           'more than the limit'),
    'int_over_budget': (lambda: pickle.dumps(dict(ema=ours_with(label_dim=10**12)), protocol=2), 'label_dim=1000000000000'),
    'float_channels': (lambda: pickle.dumps(dict(ema=ours_with(model_channels=16.0)), protocol=2), 'cannot build EDMPrecond'),
    'nan_sigma': (lambda: pickle.dumps(dict(ema=ours_with(sigma_data=float('nan'))), protocol=2), 'not a finite number'),
    'odd_resolution': (lambda: pickle.dumps(dict(ema=ours_with(img_resolution=24)), protocol=2), 'EDMPrecond'),
    'nested_records_50k': (lambda: nested_published_records(50_000), 'nested deeper'),
    'nested_lists_50k': (lambda: b'\x80\x02}X\x03\x00\x00\x00ema' + b']' * 50_000 + b'a' * 49_999 + b's.', 'nested deeper'),
    'huge_zero_stride_view': (lambda: pickle.dumps(dict(ema=torch.zeros(1).expand(10**12)), protocol=2), 'overlapping strides'),
    'deflated_storage_2GiB': (storage_bomb_pickle, "record 'archive/data/0' would inflate to 2147483648 bytes"),
}

_LOAD_EACH = """
import json, sys
from training import checkpoints
results = {}
for path in sys.argv[1:]:
    try:
        checkpoints.load_network(path)
        results[path] = 'loaded'
    except ValueError as e:
        results[path] = f'{type(e).__name__}: {e}'
print(json.dumps(results))
"""


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_hostile_pickles_are_refused_by_their_bounds_within_1_gib(tmp_path):
    paths = {}
    for name, (build, _) in HOSTILE_PICKLES.items():
        paths[name] = tmp_path / f'{name}.pkl'
        paths[name].write_bytes(build())
    assert len(paths['tuple_dag_model_type'].read_bytes()) < 1000 and len(paths['bytearray_3e9'].read_bytes()) < 100
    assert len(paths['deflated_storage_2GiB'].read_bytes()) < 3 << 20
    result = subprocess.run([sys.executable, '-c', _LOAD_EACH, *map(str, paths.values())], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_memory)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    for name, path in paths.items():
        message = outcomes[str(path)]
        assert message.startswith(('UnsafePickleError', 'ValueError')) and str(path) in message, (name, message)
        assert HOSTILE_PICKLES[name][1] in message and '\n' not in message and len(message) < 1000, (name, message)


@pytest.mark.parametrize('name, match', [
    ('tuple_dag_model_type', 'tuple of more than'),
    ('bytearray_3e9', 'bytearray'),
    ('num_blocks_1e7', 'num_blocks=10000000'),
    ('params_over_budget', 'more than the limit'),
    ('int_over_budget', 'label_dim=1000000000000 exceeds'),
    ('nested_records_50k', 'nested deeper'),
    ('nested_lists_50k', 'nested deeper'),
    ('huge_zero_stride_view', 'overlapping strides'),
])
def test_hostile_pickle_is_refused_as_unsafe_naming_the_reason(tmp_path, name, match):
    path = tmp_path / f'{name}.pkl'
    path.write_bytes(HOSTILE_PICKLES[name][0]())
    with pytest.raises(checkpoints.UnsafePickleError, match=match):
        checkpoints.load_network_pickle(path)


def test_a_network_without_its_tensors_is_refused_before_it_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(persistence, 'construct', lambda *args: built.append(args))
    path = tmp_path / 'empty.pkl'
    path.write_bytes(HOSTILE_PICKLES['model_channels_2048_without_tensors'][0]())
    with pytest.raises(ValueError, match='tensors do not fit EDMPrecond.*missing: model[.]'):
        checkpoints.load_network_pickle(path)
    assert built == []


def test_published_pickle_with_hostile_arguments_is_refused(tmp_path):
    net = small_net()
    net._init_kwargs['num_blocks'] = 10**7
    path = write_published(tmp_path / 'published.pkl', dict(ema=net), tmp_path / 'marker')
    with pytest.raises(checkpoints.UnsafePickleError, match='num_blocks'):
        checkpoints.load_network_pickle(path)
    assert not (tmp_path / 'marker').exists()


def test_generate_refuses_a_tuple_dag_pickle_with_one_line(tmp_path):
    path = tmp_path / 'dag.pkl'
    path.write_bytes(HOSTILE_PICKLES['tuple_dag_model_type'][0]())
    result = subprocess.run([sys.executable, 'generate.py', f'--network={path}', f'--outdir={tmp_path / "out"}', '--seeds=0'],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)
    assert result.returncode != 0 and 'tuple of more than' in result.stderr and 'Traceback' not in result.stderr, result.stderr[-2000:]
