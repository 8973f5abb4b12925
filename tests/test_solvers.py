"""The few-step solvers of training/solvers.py: order of accuracy measured against closed-form ODE solutions,
network-evaluation counts, the analytical first step and option checks.

The data are per-pixel Gaussians N(μ, s²), whose probability-flow ODE dx/dσ = (x − D(x; σ))/σ has the solution
x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_T²), and a two-component Gaussian mixture, solved to ~1e-10 by a fine
reference solve. The closed-form denoisers run inside real preconditioners (edm, vp, fdm_edm), so that their σ
range, float32 arithmetic and input scaling are what the solvers see.
"""

import math

import numpy as np
import pytest
import torch

from training import networks, schedules
from training import solvers

SIGMA_MIN, SIGMA_MAX = 0.002, 80

# Solver → (sampler, options, theoretical order on the EDM ρ = 7 grid). iPNDM's fixed weights are those of equal
# steps and its first step is Euler's, so it is second order whatever its Adams–Bashforth order
# (docs/design.md#few-step-solvers); the others' low-order first steps fall at σ ≈ 80, where D hardly changes.
ORDERS = {
    'heun':    ('edm', {}, 2),
    'dpm2m':   ('dpm2m', {}, 2),
    'ipndm':   ('ipndm', dict(order=4), 2),
    'unipc-2': ('unipc', dict(order=2), 3),
    'unipc-3': ('unipc', dict(order=3), 4),
    'deis':    ('deis', dict(order=3), 3),
    'dpm3m':   ('dpm3m', {}, 3),
}
# NFE over which each slope is fitted: where the error is asymptotic and far above float32 round-off of the nets.
NFE_RANGE = {'heun': [33, 65, 129], 'dpm2m': [32, 64, 128], 'ipndm': [32, 64, 128], 'unipc-2': [32, 64, 128],
             'unipc-3': [32, 64, 128], 'deis': [64, 128, 256], 'dpm3m': [32, 64, 128]}


class Gaussian:
    """Per-pixel N(μ, s²): D(x; σ) = μ + s²/(s²+σ²)·(x − μ)."""

    def __init__(self, mean=0.3, std=0.5):
        self.mean, self.std = mean, std

    def __call__(self, x, sigma):
        return self.mean + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - self.mean)

    def exact_state(self, x_start, sigma_start, sigma_end):
        return self.mean + (x_start - self.mean) * math.sqrt((self.std ** 2 + sigma_end ** 2) / (self.std ** 2 + sigma_start ** 2))


class Mixture:
    """Per-pixel mixture Σ_k π_k N(μ_k, s_k²): D is the responsibility-weighted sum of the components' denoisers."""

    def __init__(self, weights=(0.3, 0.7), means=(-0.6, 0.4), stds=(0.2, 0.3)):
        self.weights, self.means, self.stds = weights, means, stds

    def __call__(self, x, sigma):
        variances = [s ** 2 + sigma ** 2 for s in self.stds]
        log_densities = torch.stack([math.log(w) - 0.5 * (x - m) ** 2 / v - 0.5 * torch.log(v + 0 * x)
                                     for w, m, v in zip(self.weights, self.means, variances)])
        responsibilities = torch.softmax(log_densities, dim=0)
        return sum(r * (m + s ** 2 / v * (x - m)) for r, m, s, v in zip(responsibilities, self.means, self.stds, variances))


class ClosedFormModel(torch.nn.Module):
    """The inner network F that makes a preconditioner's output D = c_skip·x + c_out·F the closed-form denoiser:
    it recovers σ from c_noise and x from c_in·x, and returns (D(x; σ) − c_skip·x)/c_out, in float32 as a net would."""

    def __init__(self, precond, denoiser, sigma_of_noise):
        super().__init__()
        self.coefficients, self.denoiser, self.sigma_of_noise = precond.coefficients, denoiser, sigma_of_noise

    def forward(self, x_in, noise_labels, class_labels=None, augment_labels=None):
        sigma = self.sigma_of_noise(noise_labels.to(torch.float64)).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.coefficients(sigma)
        x = x_in.to(torch.float64) / c_in
        return ((self.denoiser(x, sigma) - c_skip * x) / c_out).to(torch.float32)


def wrapped(precond_name, denoiser):
    """A real preconditioner of `precond_name` whose inner network is `denoiser` in closed form."""
    tiny = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    precond = {'edm': networks.EDMPrecond, 'vp': networks.VPPrecond, 'fdm_edm': networks.FDM_EDMPrecond}[precond_name](**tiny)
    sigma_of_noise = {
        'edm': lambda c_noise: (4 * c_noise).exp(),
        'fdm_edm': lambda c_noise: (4 * c_noise).exp(),
        'vp': lambda c_noise: schedules.vp_sigma(c_noise / (precond.M - 1), precond.beta_d, precond.beta_min),
    }[precond_name]
    precond.model = ClosedFormModel(precond, denoiser, sigma_of_noise)
    return precond.eval()


class Plain:
    """The closed-form denoiser as a net in float64, with no preconditioner; counts its calls."""

    label_dim, img_channels, img_resolution, sigma_min, sigma_max = 0, 1, 8, 0, float('inf')

    def __init__(self, denoiser):
        self.denoiser, self.num_calls = denoiser, 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.num_calls += 1
        return self.denoiser(x, torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1))


def latents(batch=8):
    return torch.randn([batch, 1, 8, 8], generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def solve(net, solver, nfe, **extra):
    """The solver's output for `latents()` with exactly `nfe` evaluations (Heun: its nearest odd count)."""
    sampler_name, options, _ = ORDERS[solver]
    num_steps = solvers.steps_for_nfe(sampler_name, nfe, **options, **extra)
    return solvers.SAMPLERS[sampler_name](net, latents(), num_steps=num_steps, **options, **extra)


def target(denoiser_state, solver, denoiser):
    """What a solver returns when exact: x(σ_min) for the multistep solvers; D(x(σ_min); σ_min) for Heun and 2M,
    whose last step (Euler into σ = 0, or the final denoising) evaluates D there."""
    if ORDERS[solver][0] in ('edm', 'dpm2m'):
        return denoiser(denoiser_state, torch.tensor(SIGMA_MIN, dtype=torch.float64))
    return denoiser_state


def fitted_order(nfes, errors):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


@pytest.fixture(scope='module')
def mixture_state():
    """x(σ_min) of the mixture's ODE from latents·σ_max: UniPC-3 with 4096 steps (error ~1e-12 by its 4th order)."""
    return solvers.unipc_sampler(Plain(Mixture()), latents(), num_steps=4096, order=3)


@pytest.mark.parametrize('precond_name', ['edm', 'vp', 'fdm_edm'])
@pytest.mark.parametrize('solver', list(ORDERS))
def test_gaussian_error_falls_at_the_theoretical_order(precond_name, solver):
    gaussian = Gaussian()
    net = wrapped(precond_name, gaussian)
    exact = target(gaussian.exact_state(latents() * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN), solver, gaussian)
    nfes = NFE_RANGE[solver]
    errors = [(solve(net, solver, nfe) - exact).abs().max().item() for nfe in nfes]
    assert fitted_order(nfes, errors) == pytest.approx(ORDERS[solver][2], abs=0.3), errors


@pytest.mark.parametrize('solver', list(ORDERS))
def test_mixture_error_falls_at_the_theoretical_order(solver, mixture_state):
    mixture = Mixture()
    exact = target(mixture_state, solver, mixture)
    nfes = [2 * nfe - (solver == 'heun') for nfe in NFE_RANGE[solver]]  # the mixture's denoiser bends harder: the asymptotic range starts later
    errors = [(solve(Plain(mixture), solver, nfe) - exact).abs().max().item() for nfe in nfes]
    assert fitted_order(nfes, errors) == pytest.approx(ORDERS[solver][2], abs=0.3), errors


def test_all_solvers_agree_at_high_nfe():
    net = wrapped('edm', Mixture())
    results = {solver: solve(net, solver, 257 if solver == 'heun' else 256) for solver in ORDERS}
    states = torch.stack([results[solver] for solver in ORDERS if ORDERS[solver][0] not in ('edm', 'dpm2m')])
    assert (states - states.mean(0)).abs().max().item() < 1e-4
    denoised = Mixture()(states.mean(0), torch.tensor(SIGMA_MIN, dtype=torch.float64))
    for solver in ('heun', 'dpm2m'):  # their output is D at σ_min of the state the others return
        assert (results[solver] - denoised).abs().max().item() < 1e-3


# Network evaluations.


@pytest.mark.parametrize('sampler_name', ['edm', 'dpm', 'dpm2m', 'ipndm', 'unipc', 'deis', 'dpm3m'])
@pytest.mark.parametrize('nfe', [3, 4, 5, 9, 10])
def test_nfe_makes_exactly_that_many_network_calls(sampler_name, nfe):
    net = Plain(Gaussian())
    try:
        num_steps = solvers.steps_for_nfe(sampler_name, nfe)
    except ValueError:
        assert sampler_name == 'edm' and nfe % 2 == 0  # Heun makes 2·steps − 1
        return
    solvers.SAMPLERS[sampler_name](net, latents(2), num_steps=num_steps)
    assert net.num_calls == nfe == solvers.network_evaluations(sampler_name, num_steps=num_steps)


@pytest.mark.parametrize('sampler_name', solvers.AFS_SAMPLERS)
def test_analytical_first_step_saves_one_call_and_barely_moves_the_samples(sampler_name):
    denoiser = Gaussian(mean=0.0)  # D(x; σ_max) ≈ 0, which the analytical first step assumes
    with_afs, without = Plain(denoiser), Plain(denoiser)
    num_steps = solvers.steps_for_nfe(sampler_name, 12, afs=True)
    images_afs = solvers.SAMPLERS[sampler_name](with_afs, latents(2), num_steps=num_steps, afs=True)
    images = solvers.SAMPLERS[sampler_name](without, latents(2), num_steps=num_steps)
    assert with_afs.num_calls == 12 == without.num_calls - 1
    assert 0 < (images_afs - images).abs().max().item() < 1e-3


def test_the_analytical_first_step_is_refused_by_samplers_that_cannot_use_it():
    for sampler_name in ('edm', 'ablation', 'dpm'):
        with pytest.raises(solvers.SamplerOptionError, match='analytical first step') as error:
            solvers.check_options(sampler_name, afs=True)
        assert error.value.keyword == 'afs'


def test_impossible_nfe_lists_the_possible_counts():
    with pytest.raises(ValueError, match=r'cannot make exactly 10 .* possible: 3, 5, 7, 9, 11, 13'):
        solvers.steps_for_nfe('edm', 10)
    with pytest.raises(ValueError, match=r'possible: 3, 4, 5'):
        solvers.steps_for_nfe('dpm3m', 2)


@pytest.mark.parametrize('sampler_name, order, nfe', [('ipndm', 4, 3), ('unipc', 3, 2), ('deis', 3, 2)])
def test_order_above_the_steps_is_an_error_naming_order(sampler_name, order, nfe):
    with pytest.raises(solvers.SamplerOptionError, match=f'order {order} needs at least {order} steps') as error:
        solvers.steps_for_nfe(sampler_name, nfe, order=order)
    assert error.value.keyword == 'order'


@pytest.mark.parametrize('sampler_name, options, keyword', [
    ('unipc', dict(schedule='cosine'), 'schedule'),
    ('unipc', dict(order=4), 'order'),
    ('ipndm', dict(order=0), 'order'),
    ('deis', dict(num_steps=0), 'num_steps'),
    ('dpm3m', dict(sigma_min=1, sigma_max=0.5), 'sigma_min'),
    ('dpm3m', dict(S_churn=1), 'S_churn'),
])
def test_bad_options_name_their_keyword(sampler_name, options, keyword):
    with pytest.raises(solvers.SamplerOptionError) as error:
        solvers.check_options(sampler_name, **options)
    assert error.value.keyword == keyword
    if keyword in solvers.sampler_defaults(sampler_name):  # the sampler itself checks the same way
        with pytest.raises(solvers.SamplerOptionError, match=str(error.value)):
            solvers.SAMPLERS[sampler_name](Plain(Gaussian()), latents(1), **options)


@pytest.mark.parametrize('schedule', list(schedules.STEP_SCHEDULES))
def test_every_solver_steps_through_the_chosen_schedule(schedule):
    sigmas_seen = []
    class Recording(Plain):
        def __call__(self, x, sigma, class_labels=None):
            sigmas_seen.append(float(sigma))
            return super().__call__(x, sigma, class_labels)
    solvers.unipc_sampler(Recording(Gaussian()), latents(1), num_steps=6, schedule=schedule)
    expected = schedules.step_sigmas(schedule, 7, SIGMA_MIN, SIGMA_MAX)[:-1].tolist()
    assert sigmas_seen == pytest.approx(expected, rel=1e-12)
