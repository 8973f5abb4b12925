"""training/networks.py: fixtures of the published code, parameter counts, init rules, precision, errors."""

import math

import pytest
import torch

import conftest
from training import networks

FIXTURE_FILES = ['networks-fdm.pt', 'networks-edm.pt']
SMALL_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
SMALL_ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def load_cases(reference_dir):
    return [case for name in FIXTURE_FILES for case in torch.load(reference_dir / name, weights_only=True)]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fixtures_cover_every_arch_and_preconditioner(reference_dir):
    names = {case['name'] for case in load_cases(reference_dir)}
    assert len(names) == 20
    assert {'ddpmpp-fdm_edm-m2', 'ncsnpp-fdm_ve-m1', 'adm-iddpm'} <= names


def test_every_fixture_case_matches_published_output(reference_dir):
    for case in load_cases(reference_dir):
        net = conftest.build_reference_net(case)
        with torch.no_grad():
            out = net(case['x'], case['sigma'], case['class_labels'], augment_labels=case['augment_labels'])
        assert relative_error(out, case['out']) < 1e-5, case['name']
        assert net.sigma_min == pytest.approx(case['sigma_min'], rel=1e-6, abs=0), case['name']
        assert net.sigma_max == pytest.approx(case['sigma_max'], rel=1e-6), case['name']


def test_fixture_network_with_other_keys_or_shapes_is_refused(reference_dir):
    case = load_cases(reference_dir)[0]
    renamed = dict(case, keys=[[key.replace('map_label', 'map_class'), shape] for key, shape in case['keys']])
    (first_key, first_shape), *rest = case['keys']
    reshaped = dict(case, keys=[[first_key, [dim + 1 for dim in first_shape]], *rest])
    for bad in (renamed, reshaped):
        with pytest.raises(AssertionError, match='differing keys or shapes'):
            conftest.build_reference_net(bad)


def cifar10_ddpmpp():
    return networks.FDM_EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
                                   **networks.ARCH_PRESETS['ddpmpp'])


def test_cifar10_ddpmpp_conditional_has_published_parameter_count():
    net = cifar10_ddpmpp()
    assert sum(p.numel() for p in net.parameters()) == 55_735_299


def uniform_std(bound):
    return bound / math.sqrt(3)


def expected_weight_std(module, rule):
    """Standard deviation of a fresh weight under the rule of its layer (docs/design.md#initialisation), scaled as the network scales it."""
    fan_in = module.weight[0].numel()
    fan_out = module.weight.shape[0] * module.weight[0, 0].numel() if module.weight.ndim == 4 else module.weight.shape[0]
    mode, scale = rule
    if mode == 'xavier_uniform':
        return uniform_std(math.sqrt(6 / (fan_in + fan_out))) * scale
    if mode == 'kaiming_uniform':
        return uniform_std(math.sqrt(3 / fan_in)) * scale
    return math.sqrt(1 / fan_in) * scale  # kaiming_normal


def check_std(tensor, expected, name):
    if tensor.numel() < 2000:
        return
    assert tensor.std().item() == pytest.approx(expected, rel=0.1), name


def test_songunet_initial_weight_scales_follow_their_rules():
    torch.manual_seed(0)
    net = cifar10_ddpmpp().model
    checked = 0
    for name, module in net.named_modules():
        if not isinstance(module, (networks.Linear, networks.Conv2d)) or module.weight is None:
            continue
        leaf = name.rsplit('.', 1)[-1]
        scale = 1e-5 if leaf in ('conv1', 'proj') or leaf.endswith('aux_conv') else math.sqrt(0.2) if leaf == 'qkv' else 1
        check_std(module.weight, expected_weight_std(module, ('xavier_uniform', scale)), name)
        if module.bias is not None:
            assert module.bias.abs().max().item() == 0, name
        checked += 1
    assert checked > 100


def test_dhariwalunet_initial_weight_scales_follow_their_rules():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, **networks.ARCH_PRESETS['adm'],
                              num_blocks=1).model
    for name, module in net.named_modules():
        if not isinstance(module, (networks.Linear, networks.Conv2d)) or module.weight is None:
            continue
        leaf = name.rsplit('.', 1)[-1]
        if leaf in ('conv1', 'proj', 'out_conv', 'map_augment'):
            assert module.weight.abs().max().item() == 0, name
        elif leaf == 'map_label':
            check_std(module.weight, 1.0, name)  # kaiming_normal × √label_dim with fan_in = label_dim
        else:
            expected = expected_weight_std(module, ('kaiming_uniform', math.sqrt(1 / 3)))
            check_std(module.weight, expected, name)
            if module.bias is not None:  # kaiming_uniform × √(1/3): uniform on ±√(1/fan_in), not zero
                bound = math.sqrt(1 / module.weight[0].numel())
                assert 0 < module.bias.abs().max().item() <= bound, name


ARCHS = {
    'ddpmpp': dict(networks.ARCH_PRESETS['ddpmpp'], **SMALL_SONG),
    'ncsnpp': dict(networks.ARCH_PRESETS['ncsnpp'], **SMALL_SONG),
    'adm': dict(networks.ARCH_PRESETS['adm'], **SMALL_ADM),
}


@pytest.mark.parametrize('precond', sorted(networks.PRECONDITIONERS))
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_forward_and_backward_run_on_cpu(arch, precond):
    torch.manual_seed(0)
    cls = networks.PRECONDITIONERS[precond].rsplit('.', 1)[1]
    net = getattr(networks, cls)(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, **ARCHS[arch])
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.05, 3.0])
    labels = torch.eye(10)[[1, 7]]
    out = net(x, sigma, labels, augment_labels=torch.zeros(2, 9))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_cpu_training_layers_stay_channels_last_through_attention(arch):
    # oneDNN reorders every channels-first input on CPUs: one layer losing the format (attention's output did)
    # makes all later layers pay, in training ~10% of a step. Same output either way.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, **ARCHS[arch]).train()
    formats = []
    hooks = [m.register_forward_pre_hook(lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
             for m in net.modules() if isinstance(m, networks.Conv2d)]
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    out = net(x, sigma)
    for hook in hooks:
        hook.remove()
    assert len(formats) > 10 and all(formats)
    net.channels_last = False
    torch.testing.assert_close(net(x, sigma), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp', 'adm'])
@pytest.mark.parametrize('label_dim', [0, 10])
def test_cpu_sampling_gives_each_image_the_same_result_in_any_batch(arch, label_dim):
    # 32x32 so that GroupNorm meets its kernel's whole-batch split (>= 1024 pixels); generate.py's promise that the
    # batch size does not change the files rests on this. Exact equality: a difference of one rounding step counts.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=3, label_dim=label_dim, **dict(ARCHS[arch], attn_resolutions=[16])).eval()
    x, sigma = torch.randn(6, 3, 32, 32), torch.full([6], 2.5)
    labels = torch.eye(10)[torch.arange(6) % 10] if label_dim else None
    with torch.no_grad():
        whole = net(x, sigma, labels)
        for start, stop in ((0, 1), (1, 3), (3, 6), (5, 6)):
            part = net(x[start:stop], sigma[start:stop], labels[start:stop] if label_dim else None)
            assert torch.equal(part, whole[start:stop]), (start, stop)
    net.train()  # the same rows in training mode are allowed to round differently; only the values must agree
    torch.testing.assert_close(net(x[:1], sigma[:1], labels[:1] if label_dim else None), whole[:1], rtol=0, atol=1e-4)


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp', 'adm'])
@pytest.mark.parametrize('grad', [False, True])
def test_forward_hooks_see_activations_that_nothing_overwrites_later(arch, grad):
    # Feature probing keeps the tensors that forward hooks capture: no later layer may write into them, with
    # autograd or without, and the input stays as given; the result does not depend on autograd.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **ARCHS[arch]).eval()
    x, sigma, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 2.0, 9.0]), torch.eye(10)[[1, 4, 7]]
    x_before = x.clone()
    captured = []
    hooks = [m.register_forward_hook(lambda m, args, out: captured.append((out, out.clone())))
             for m in net.model.modules() if m is not net.model]
    with torch.set_grad_enabled(grad):
        got = net(x, sigma, labels)
    for hook in hooks:
        hook.remove()
    assert len(captured) > 20 and all(torch.equal(kept, copy) for kept, copy in captured)
    assert torch.equal(x, x_before)
    with torch.set_grad_enabled(not grad):
        assert torch.equal(net(x, sigma, labels), got)


def test_skip_encoder_and_decoder_variants_run():
    net = networks.VPPrecond(img_resolution=16, img_channels=3, encoder_type='skip', decoder_type='skip', **SMALL_SONG)
    keys = net.state_dict().keys()
    assert 'model.enc.8x8_aux_skip.weight' in keys and 'model.dec.8x8_aux_conv.weight' in keys
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 3, 16, 16)


def test_use_fp16_keeps_cpu_in_float32():
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, use_fp16=True, **SMALL_SONG)
    seen = []
    net.model.register_forward_hook(lambda m, inputs, output: seen.append(output.dtype))
    net(torch.randn(1, 3, 16, 16), torch.tensor([1.0]))
    assert seen == [torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='float16 inner network runs on CUDA only')
def test_use_fp16_runs_inner_network_in_half_on_cuda():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, use_fp16=True, **SMALL_SONG).cuda()
    seen = []
    net.model.register_forward_hook(lambda m, inputs, output: seen.append(output.dtype))
    x, sigma = torch.randn(2, 3, 16, 16, device='cuda'), torch.tensor([0.5, 5.0], device='cuda')
    out = net(x, sigma)
    assert seen == [torch.float16] and out.dtype == torch.float32
    ref = net(x, sigma, force_fp32=True)
    assert relative_error(out, ref) < 1e-2


def test_fdm_ve_honours_multiplier():
    torch.manual_seed(0)
    a = networks.FDM_VEPrecond(img_resolution=16, img_channels=3, fdm_multiplier=1.0, **SMALL_SONG)
    b = networks.FDM_VEPrecond(img_resolution=16, img_channels=3, fdm_multiplier=2.0, **SMALL_SONG)
    sigma = torch.tensor([10.0]).reshape(-1, 1, 1, 1)
    assert a.coefficients(sigma)[2].item() != pytest.approx(b.coefficients(sigma)[2].item())


def test_fdm_differs_from_baseline_only_in_c_in():
    base = networks.EDMPrecond(img_resolution=16, img_channels=3, **SMALL_SONG)
    fdm = networks.FDM_EDMPrecond(img_resolution=16, img_channels=3, **SMALL_SONG)
    sigma = torch.tensor([0.3, 7.0]).reshape(-1, 1, 1, 1)
    for i in (0, 1, 3):
        torch.testing.assert_close(base.coefficients(sigma)[i], fdm.coefficients(sigma)[i])


def test_constructor_records_arguments_for_persistence():
    net = networks.FDM_EDMPrecond(img_resolution=16, img_channels=3, fdm_multiplier=1.0, **SMALL_SONG)
    assert net.init_kwargs['fdm_multiplier'] == 1.0 and net.init_kwargs['model_channels'] == 16


@pytest.mark.parametrize('kwargs, argument', [
    (dict(img_resolution=24), 'img_resolution'),
    (dict(img_resolution=16, embedding_type='sinusoid'), 'embedding_type'),
    (dict(img_resolution=16, encoder_type='dense'), 'encoder_type'),
    (dict(img_resolution=16, decoder_type='residual'), 'decoder_type'),
    (dict(img_resolution=16, model_type='UNet3D'), 'model_type'),
])
def test_bad_constructor_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        networks.EDMPrecond(img_channels=3, **kwargs)


def test_network_read_from_a_published_pickle_samples_each_image_the_same_in_any_batch(tmp_path):
    # Published pickles are rebuilt from our classes, so the ops' batch-invariant kernels apply to them too.
    from test_checkpoints import small_net, write_published
    from training import checkpoints
    path = write_published(tmp_path / 'published.pkl', dict(ema=small_net('FDM_EDMPrecond')), tmp_path / 'module_src_ran')
    net = checkpoints.load_network_pickle(path)['ema']
    x, sigma, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 2.0, 9.0]), torch.eye(10)[[1, 4, 7]]
    augment_labels = torch.zeros(3, 9)
    with torch.no_grad():
        whole = net(x, sigma, labels, augment_labels=augment_labels)
        for start, stop in ((0, 1), (1, 3), (2, 3)):
            part = net(x[start:stop], sigma[start:stop], labels[start:stop], augment_labels=augment_labels[start:stop])
            assert torch.equal(part, whole[start:stop]), (start, stop)
