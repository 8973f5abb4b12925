"""training/checkpoints.py and the pickle names of torch_utils/persistence.py: our snapshots round-trip,
published pickles load without running their code, anything else is refused before it runs, damaged files
give one-line errors naming the file."""

import contextlib
import copy
import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import checkpoints, loss, networks

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


def test_resume_from_a_directory_takes_the_newest_state_of_either_naming(tmp_path):
    for name in ('training-state-000000.999.pt', 'training-state-000001.pt', 'training-state-000001.016.pt',
                 'training-state-000000.pt'):
        (tmp_path / name).write_bytes(b'')
    assert checkpoints.resolve_resume_path(str(tmp_path)) == str(tmp_path / 'training-state-000001.016.pt')
