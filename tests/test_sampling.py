"""Samplers and the seed → RNG rule (training/sampling.py)."""

import copy
import math
import warnings

import pytest
import torch

import conftest
from training import networks, sampling
from training import solvers

SOLVERS = {  # test id → (sampler name, options)
    'edm': ('edm', {}),
    'euler': ('ablation', dict(solver='euler')),
    'dpm': ('dpm', {}),
    'dpm2m': ('dpm2m', {}),
    'vp-heun': ('ablation', dict(solver='heun', discretization='vp', schedule='vp', scaling='vp')),
    've-heun': ('ablation', dict(solver='heun', discretization='ve', schedule='ve', scaling='none')),
    'iddpm-euler': ('ablation', dict(solver='euler', discretization='iddpm', schedule='linear', scaling='none')),
}


class GaussianToy:
    """Data ~ N(μ, s²) per pixel, whose exact denoiser is D(x; σ) = μ + s²/(s²+σ²)·(x − μ); counts its calls."""

    label_dim = 0
    img_channels = 1
    img_resolution = 8
    sigma_min = 0
    sigma_max = float('inf')

    def __init__(self, mean=0.3, std=0.5):
        self.mean, self.std, self.num_calls = mean, std, 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.num_calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return self.mean + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - self.mean)

    def exact_sample(self, latents, sigma_max=80, sigma_min=0.002):
        """The probability-flow ODE solved exactly from latents·σ_max down to σ_min, then denoised there."""
        x_start = latents.to(torch.float64) * sigma_max
        ratio = math.sqrt((self.std ** 2 + sigma_min ** 2) / (self.std ** 2 + sigma_max ** 2))
        return self(self.mean + (x_start - self.mean) * ratio, sigma_min)


def toy_latents(batch=256):
    return torch.randn([batch, 1, 8, 8], generator=torch.Generator().manual_seed(0))


def run_solver(net, solver_id, num_steps, **extra):
    name, options = SOLVERS[solver_id]
    return solvers.SAMPLERS[name](net, toy_latents(), None, num_steps=num_steps, **options, **extra)


def max_error_vs_exact(solver_id, num_steps):
    net = GaussianToy()
    return (run_solver(net, solver_id, num_steps) - net.exact_sample(toy_latents())).abs().max().item()


# Published fixtures.


@pytest.fixture(scope='module')
def published_runs(reference_dir):
    """(file name, net, seeds, run) for every run of both sampler fixtures; nets built once per file."""
    result = []
    for file_name in ('samplers-fdm.pt', 'samplers-edm.pt'):
        fixture = torch.load(reference_dir / file_name, weights_only=True)
        net = conftest.build_reference_net(fixture)
        result += [(file_name, net, fixture['seeds'], run) for run in fixture['runs']]
    return result


RUN_IDS = ['fdm-edm', 'fdm-edm-churn', 'fdm-dpm', 'edm-edm', 'edm-edm-churn', 'edm-vp-euler', 'edm-ve-heun', 'edm-iddpm-heun']


@pytest.mark.parametrize('run_index', range(len(RUN_IDS)), ids=RUN_IDS)
def test_published_sampler_runs_are_reproduced(published_runs, run_index):
    file_name, net, seeds, run = published_runs[run_index]
    latents, class_labels, generators = sampling.draw_latents_and_labels(net, seeds, 'cpu')
    assert torch.equal(latents, run['latents'])
    assert torch.equal(class_labels, run['class_labels'])

    options = dict(run['config'])
    sampler = solvers.SAMPLERS[options.pop('sampler')]
    with torch.inference_mode():
        images = sampler(net, latents, class_labels, randn_like=generators.randn_like, **options)
    assert images.dtype == torch.float64
    rel_error = ((images - run['images']).norm() / run['images'].norm()).item()
    assert rel_error < (2e-3 if options.get('S_churn', 0) > 0 else 1e-4), (file_name, run['config'], rel_error)


def test_every_published_run_is_tested(published_runs):
    assert len(published_runs) == len(RUN_IDS)


# Seed → RNG rule.


def test_latent_of_a_seed_does_not_depend_on_its_batch():
    net = GaussianToy()
    alone, _, _ = sampling.draw_latents_and_labels(net, [7], 'cpu')
    batched, _, _ = sampling.draw_latents_and_labels(net, [3, 7, 2**32 + 7], 'cpu')
    assert torch.equal(batched[1], alone[0])
    assert torch.equal(batched[2], alone[0])  # seeds are taken mod 2^32


def test_seed_streams_draw_latent_then_label_then_step_noise():
    net = GaussianToy()
    net.label_dim = 5
    latents, class_labels, generators = sampling.draw_latents_and_labels(net, [11], 'cpu')
    noise = generators.randn_like(torch.zeros([1, 1, 8, 8], dtype=torch.float64))
    g = torch.Generator().manual_seed(11)
    assert torch.equal(latents[0], torch.randn([1, 8, 8], generator=g))
    assert class_labels[0].argmax().item() == torch.randint(5, size=[], generator=g).item()
    assert torch.equal(noise[0], torch.randn([1, 8, 8], generator=g, dtype=torch.float64))


def test_fixed_class_still_consumes_the_label_draw():
    net = GaussianToy()
    net.label_dim = 5
    _, free_labels, free_generators = sampling.draw_latents_and_labels(net, [1, 2], 'cpu')
    _, fixed_labels, fixed_generators = sampling.draw_latents_and_labels(net, [1, 2], 'cpu', class_idx=3)
    assert fixed_labels.argmax(dim=1).tolist() == [3, 3]
    assert free_labels.sum(dim=1).tolist() == [1, 1]
    x = torch.zeros([2, 1, 8, 8])
    assert torch.equal(free_generators.randn_like(x), fixed_generators.randn_like(x))


def test_unconditional_net_has_no_labels():
    _, class_labels, _ = sampling.draw_latents_and_labels(GaussianToy(), [0], 'cpu')
    assert class_labels is None


@pytest.mark.parametrize('label_dim, class_idx', [(0, 0), (5, 5), (5, -1)])
def test_bad_class_index_is_a_value_error(label_dim, class_idx):
    net = GaussianToy()
    net.label_dim = label_dim
    with pytest.raises(ValueError, match='class'):
        sampling.draw_latents_and_labels(net, [0], 'cpu', class_idx=class_idx)


def test_generate_images_draws_from_the_seeds_and_converts_to_uint8():
    net = GaussianToy()
    images = sampling.generate_images(net, [5, 9], 'dpm', dict(num_steps=4), 'cpu')
    latents, _, _ = sampling.draw_latents_and_labels(net, [5, 9], 'cpu')
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 8, 8)
    assert torch.equal(images, sampling.images_to_uint8(solvers.dpm_solver_pp(net, latents, num_steps=4)))


@pytest.mark.parametrize('precision', ['tf32', 'fp16'])
def test_cuda_only_precisions_are_refused_on_cpu(precision):
    with pytest.raises(ValueError, match='precision'):
        sampling.generate_images(GaussianToy(), [0], 'edm', {}, 'cpu', precision=precision)


class Float64MatmulToy(GaussianToy):
    """GaussianToy computed by a float64 matrix product, an op that autocast would run in bf16 were it float32;
    records whether each call ran under CPU autocast."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def __call__(self, x, sigma, class_labels=None):
        self.autocast.append(torch.is_autocast_enabled('cpu'))
        assert x.dtype == torch.float64
        eye = torch.eye(x.shape[-1], dtype=torch.float64)
        return super().__call__(torch.matmul(x, eye), sigma, class_labels)


@pytest.mark.parametrize('sampler_name', ['edm', 'dpm2m'])
def test_cpu_bf16_autocasts_the_network_and_leaves_the_float64_solver_state_alone(sampler_name):
    fp32_net, bf16_net = Float64MatmulToy(), Float64MatmulToy()
    fp32 = sampling.generate_images(fp32_net, range(4), sampler_name, dict(num_steps=5), 'cpu', precision='fp32')
    bf16 = sampling.generate_images(bf16_net, range(4), sampler_name, dict(num_steps=5), 'cpu', precision='bf16')
    assert bf16_net.autocast and all(bf16_net.autocast) and not any(fp32_net.autocast)
    assert torch.equal(bf16, fp32)
    assert not torch.is_autocast_enabled('cpu')  # the context ends with the batch


def tiny_32x32_net(label_dim=0):
    """A 32x32 DDPM++ with perturbed weights (the output layer starts near zero), big enough for GroupNorm's
    whole-batch split (>= 1024 pixels) that batch invariance must survive."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=3, label_dim=label_dim, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], dropout=0.0).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return net


@pytest.fixture(scope='module', params=[0, 10], ids=['uncond', 'cond'])
def bf16_images(request):
    """(label_dim, generate(seeds, precision), fp32 images, bf16 images) of seeds 0-5 drawn in one batch."""
    net = tiny_32x32_net(request.param)
    generate = lambda seeds, precision: sampling.generate_images(net, seeds, 'dpm2m', dict(num_steps=4), 'cpu', precision=precision)
    return request.param, generate, generate(range(6), 'fp32'), generate(range(6), 'bf16')


def test_cpu_bf16_images_do_not_depend_on_the_batch(bf16_images):
    _, generate, _, whole = bf16_images
    for start, stop in ((0, 1), (1, 3), (3, 6)):
        assert torch.equal(generate(range(start, stop), 'bf16'), whole[start:stop]), (start, stop)


def test_cpu_bf16_images_stay_close_to_fp32(bf16_images):
    _, _, fp32, bf16 = bf16_images
    difference = (bf16.float() - fp32.float()).abs()
    assert difference.max() > 0                 # bf16 did run
    assert difference.mean() < 1.0, difference.mean()   # grey levels of 255


def test_images_to_uint8_rounds_to_nearest_and_clips():
    levels = torch.tensor([-300, 0, 127.4, 127.5, 127.6, 254.9, 255, 400], dtype=torch.float64)  # x·127.5 + 127.5
    assert sampling.images_to_uint8((levels - 127.5) / 127.5).tolist() == [0, 0, 127, 128, 128, 255, 255, 255]


@pytest.mark.parametrize('num_solver_steps', range(1, 13))
def test_singlestep_orders_cover_every_step(num_solver_steps):
    orders = solvers.singlestep_orders(num_solver_steps)
    assert sum(orders) == num_solver_steps
    assert orders[:-2] == [3] * len(orders[:-2]) and all(order in (1, 2, 3) for order in orders)


# Evaluation counts.


@pytest.mark.parametrize('solver_id, expected_nfe', [('edm', 2 * 7 - 1), ('euler', 7), ('dpm', 7), ('dpm2m', 7),
    ('vp-heun', 2 * 7 - 1)])
def test_network_evaluations_per_image(solver_id, expected_nfe):
    net = GaussianToy()
    run_solver(net, solver_id, num_steps=7)
    assert net.num_calls == expected_nfe


@pytest.mark.parametrize('num_steps', [2, 3, 4, 5, 6])
def test_dpm_solver_uses_exactly_n_evaluations_for_every_order_pattern(num_steps):
    net = GaussianToy()
    run_solver(net, 'dpm', num_steps)
    assert net.num_calls == num_steps


@pytest.mark.parametrize('sampler_name, too_few_steps', [('edm', 1), ('ablation', 1), ('dpm', 1), ('dpm2m', 0)])
def test_too_few_steps_is_a_value_error(sampler_name, too_few_steps):
    with pytest.raises(ValueError, match='num_steps'):
        solvers.SAMPLERS[sampler_name](GaussianToy(), toy_latents(2), num_steps=too_few_steps)


# Gaussian toy: distribution and convergence.


STEPS_FOR_ONE_PERCENT_VARIANCE = {'euler': 256, 've-heun': 256, 'iddpm-euler': 128}  # the slow ones; others 32


@pytest.mark.parametrize('solver_id', SOLVERS)
def test_samples_match_the_gaussian_target(solver_id):
    net = GaussianToy()
    samples = run_solver(net, solver_id, num_steps=STEPS_FOR_ONE_PERCENT_VARIANCE.get(solver_id, 32))
    assert samples.mean().item() == pytest.approx(net.mean, abs=0.02)
    assert samples.var().item() == pytest.approx(net.std ** 2, rel=0.05)


def test_stochastic_sampler_matches_the_gaussian_target():
    net = GaussianToy()
    noise = torch.Generator().manual_seed(1)
    randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, generator=noise)
    samples = solvers.edm_sampler(net, toy_latents(), randn_like=randn_like, num_steps=128, S_churn=10, S_min=0.05, S_max=50)
    assert samples.mean().item() == pytest.approx(net.mean, abs=0.02)
    assert samples.var().item() == pytest.approx(net.std ** 2, rel=0.05)


@pytest.mark.parametrize('solver_id', ['edm', 'euler', 'dpm', 'dpm2m'])
def test_error_falls_as_steps_grow(solver_id):
    errors = [max_error_vs_exact(solver_id, num_steps) for num_steps in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2]


def test_heun_and_dpm_solver_converge_faster_than_euler():
    order = lambda solver_id: math.log2(max_error_vs_exact(solver_id, 16) / max_error_vs_exact(solver_id, 64)) / 2
    euler, heun, dpm, dpm2m = order('euler'), order('edm'), order('dpm'), order('dpm2m')
    assert 0.8 < euler < 1.3
    assert heun > 1.8 and dpm2m > 1.6
    assert dpm > 2.5


# Guidance.


class ClassGaussianToy(GaussianToy):
    """Class c ~ N(means[c], s²), the all-zero label ~ N(uncond_mean, s²): D_uncond + w·(D_c − D_uncond) is then the exact
    denoiser of N(uncond_mean + w·(means[c] − uncond_mean), s²). Records the batch size of each call."""

    label_dim = 2

    def __init__(self, means=(1.0, -0.5), uncond_mean=0.25, std=0.5, label_dropout=0.1):
        super().__init__(uncond_mean, std)
        self.means, self.batch_sizes = torch.tensor(means, dtype=torch.float64), []
        self.model = type('Model', (), dict(label_dropout=label_dropout))()

    def __call__(self, x, sigma, class_labels=None):
        self.batch_sizes.append(len(x))
        labels = class_labels.to(torch.float64)
        mean = (labels @ self.means + (1 - labels.sum(1)) * self.mean).reshape(-1, 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return mean + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - mean)


@pytest.mark.parametrize('solver_id', ['edm', 'euler', 'dpm', 'dpm2m'])
@pytest.mark.parametrize('guidance', [0, 2.5])
def test_classifier_free_guidance_moves_the_mean_as_the_closed_form_says(solver_id, guidance):
    net = ClassGaussianToy()
    labels = torch.eye(2, dtype=torch.float64)[[0] * len(toy_latents())]
    name, options = SOLVERS[solver_id]
    guided = sampling.guided_denoiser(net, guidance)
    samples = solvers.SAMPLERS[name](guided, toy_latents(), labels, num_steps=64, **options)
    guided_mean = net.mean + guidance * (net.means[0].item() - net.mean)
    expected = GaussianToy(guided_mean, net.std).exact_sample(toy_latents())
    assert samples.mean().item() == pytest.approx(expected.mean().item(), abs=0.01)
    assert abs(samples.mean().item() - net.means[0].item()) > 0.5  # far from the unguided mean


def test_classifier_free_guidance_evaluates_both_labels_in_one_batched_call():
    net = ClassGaussianToy()
    labels = torch.eye(2, dtype=torch.float64)[[1] * 4]
    solvers.edm_sampler(sampling.guided_denoiser(net, 2), toy_latents(4), labels, num_steps=3)
    assert net.batch_sizes == [8] * 5


def test_guidance_weight_one_is_the_network_itself():
    net = ClassGaussianToy(label_dropout=0)
    assert sampling.guided_denoiser(net, 1) is net
    assert sampling.guided_denoiser(net, 1, gnet=ClassGaussianToy()) is net


@pytest.mark.parametrize('guidance', [0, 0.5, 3])
def test_autoguidance_by_the_network_itself_gives_the_same_samples(guidance):
    net = ClassGaussianToy(label_dropout=0)
    labels = torch.eye(2, dtype=torch.float64)[[0, 1] * 2]
    unguided = solvers.edm_sampler(net, toy_latents(4), labels, num_steps=4)
    guided = solvers.edm_sampler(sampling.guided_denoiser(net, guidance, gnet=net), toy_latents(4), labels, num_steps=4)
    assert torch.equal(guided, unguided)


def test_guided_denoiser_offers_what_samplers_read():
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type='SongUNet', model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[], label_dropout=0.1).eval()
    guided = sampling.guided_denoiser(net, 2)
    assert (guided.img_resolution, guided.img_channels, guided.label_dim) == (8, 3, 2)
    assert (guided.sigma_min, guided.sigma_max) == (net.sigma_min, net.sigma_max)
    assert torch.equal(guided.round_sigma(torch.tensor([0.5])), net.round_sigma(torch.tensor([0.5])))
    assert sampling.trained_label_dropout(net) == 0.1


@pytest.mark.parametrize('label_dim, label_dropout, gnet_changes, option, fragment', [
    (0, 0.1, None, '--guidance', 'unconditional'),
    (2, 0, None, '--guidance', 'label dropout'),
    (2, 0.1, dict(img_resolution=16), '--gnet', 'img_resolution'),
    (2, 0.1, dict(img_channels=3), '--gnet', 'img_channels'),
    (2, 0.1, dict(label_dim=0), '--gnet', 'label_dim'),
])
def test_unusable_guidance_is_a_guidance_error_naming_the_option(label_dim, label_dropout, gnet_changes, option, fragment):
    net = ClassGaussianToy(label_dropout=label_dropout)
    net.label_dim = label_dim
    gnet = None
    if gnet_changes is not None:
        gnet = ClassGaussianToy()
        for name, value in gnet_changes.items():
            setattr(gnet, name, value)
    with pytest.raises(sampling.GuidanceError, match=fragment) as error:
        sampling.guided_denoiser(net, 2, gnet)
    assert error.value.option == option


# CUDA.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.fixture
def exact_float32_on_cuda():
    """TF32 off, so that CUDA convolutions are comparable with the CPU fixtures at 1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize('run_index', [0, 2, 3, 5, 6, 7], ids=[RUN_IDS[i] for i in [0, 2, 3, 5, 6, 7]])
def test_published_deterministic_runs_are_reproduced_on_cuda(published_runs, run_index, exact_float32_on_cuda):
    _, net, _, run = published_runs[run_index]
    options = dict(run['config'])
    sampler = solvers.SAMPLERS[options.pop('sampler')]
    with torch.inference_mode():
        images = sampler(copy.deepcopy(net).cuda(), run['latents'].cuda(), run['class_labels'].cuda(), **options)
    rel_error = ((images.cpu() - run['images']).norm() / run['images'].norm()).item()
    assert rel_error < 1e-4, (run['config'], rel_error)


@needs_cuda
def test_cuda_latent_of_a_seed_does_not_depend_on_its_batch():
    alone, _, _ = sampling.draw_latents_and_labels(GaussianToy(), [7], 'cuda')
    batched, _, _ = sampling.draw_latents_and_labels(GaussianToy(), [3, 7], 'cuda')
    assert alone.device.type == 'cuda' and torch.equal(batched[1], alone[0])


@needs_cuda
@pytest.mark.parametrize('solver_id', ['edm', 'euler', 'dpm', 'dpm2m', 'vp-heun', 'iddpm-euler'])
def test_no_host_sync_per_step_on_cuda(published_runs, solver_id):
    net = copy.deepcopy(published_runs[0][1]).cuda()
    name, options = SOLVERS[solver_id]
    latents = torch.randn([2, 3, 16, 16], device='cuda')

    def count_syncs(num_steps):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                solvers.SAMPLERS[name](net, latents, None, num_steps=num_steps, **options)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        return sum('synchroniz' in str(w.message) for w in caught)

    count_syncs(2)  # first calls make one-time syncs (lazy initialisation)
    assert count_syncs(3) == count_syncs(6)


@needs_cuda
@pytest.mark.parametrize('precision', ['tf32', 'fp16', 'bf16'])
def test_reduced_precision_images_stay_close_on_cuda(published_runs, precision):
    net = copy.deepcopy(published_runs[0][1]).cuda()
    full = sampling.generate_images(net, range(16), 'edm', dict(num_steps=6), 'cuda', precision='fp32').float()
    reduced = sampling.generate_images(net, range(16), 'edm', dict(num_steps=6), 'cuda', precision=precision).float()
    mean_abs_levels = (full - reduced).abs().mean().item()
    assert mean_abs_levels < 4, mean_abs_levels


@needs_cuda
def test_fp32_generation_does_not_depend_on_the_batch_on_cuda(published_runs):
    net = copy.deepcopy(published_runs[0][1]).cuda()
    generate = lambda seeds: sampling.generate_images(net, seeds, 'edm', dict(num_steps=4), 'cuda', precision='fp32')
    one_by_one = torch.cat([generate([seed]) for seed in range(6)])
    in_pairs = torch.cat([generate([seed, seed + 1]) for seed in (0, 2, 4)])
    assert torch.equal(one_by_one, in_pairs)


@needs_cuda
def test_fp32_turns_tf32_off_only_inside_the_context():
    flags_before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with sampling.network_precision('cuda', 'fp32'):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags_before
