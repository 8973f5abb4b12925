"""training/ema.py: σ_rel ↔ γ, the power-function EMA against its closed-form weights, inner products, least squares."""

import numpy as np
import pytest
import scipy.integrate
import torch

from training import ema


def test_gamma_and_std_round_trip():
    for std in (0.01, 0.05, 0.1, 0.2, ema.MAX_STD):
        assert float(ema.std_from_gamma(ema.gamma_from_std(std))) == pytest.approx(std, rel=1e-6)
    for gamma in (0.0, 1.0, 6.94, 100.0):
        assert ema.gamma_from_std(ema.std_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-6, abs=1e-6)


def test_gamma_solves_the_cubic():
    std = 0.05
    gamma = ema.gamma_from_std(std)
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - std ** -2) * gamma + (12 - std ** -2) == pytest.approx(0, abs=1e-6)


def test_std_outside_the_range_is_refused():
    for std in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match='σ_rel must be in'):
            ema.gamma_from_std(std)


def test_profile_equals_the_closed_form_weighted_average_of_the_parameter_sequence():
    net = torch.nn.Linear(3, 2)
    profiles = ema.PowerEMA(net, [0.05, 0.2])
    sequence = []
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        with torch.no_grad():
            for param in net.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        sequence.append([p.detach().clone().to(torch.float64) for p in net.parameters()])
        profiles.update(step)
    for gamma, average in zip(profiles.gammas, profiles.emas):
        weights = ema.profile_weights(gamma, 30)
        assert weights.sum() == pytest.approx(1, abs=1e-12)
        for index, param in enumerate(average.parameters()):
            expected = sum(w * values[index] for w, values in zip(weights, sequence))
            assert torch.allclose(param.to(torch.float64), expected, atol=1e-6, rtol=0)


def test_weights_are_the_density_integrated_over_each_step():
    gamma, step = 6.94, 20
    density = lambda s: (gamma + 1) * s ** gamma / step ** (gamma + 1)
    integrals = [scipy.integrate.quad(density, tau - 1, tau)[0] for tau in range(1, step + 1)]
    assert np.allclose(ema.profile_weights(gamma, step), integrals, atol=1e-9)


def test_inner_products_match_numerical_integrals():
    (ga, ta), (gb, tb) = (3.0, 50), (12.0, 80)
    pa = lambda s: (ga + 1) * s ** ga / ta ** (ga + 1)
    pb = lambda s: (gb + 1) * s ** gb / tb ** (gb + 1)
    numerical = scipy.integrate.quad(lambda s: pa(s) * pb(s), 0, min(ta, tb))[0]
    assert ema.profile_inner_products([ga], [ta], [gb], [tb])[0, 0] == pytest.approx(numerical, rel=1e-8)


def test_least_squares_give_back_a_stored_profile():
    gammas = [ema.gamma_from_std(std) for std in (0.05, 0.1)] * 3
    steps = [100, 100, 200, 200, 300, 300]
    coefficients = ema.solve_coefficients(gammas, steps, gammas[3], 200)
    assert np.allclose(coefficients, np.eye(6)[3], atol=1e-6)


def test_least_squares_approximate_an_in_between_profile():
    stds = (0.05, 0.1)
    gammas = [ema.gamma_from_std(std) for std in stds] * 4
    steps = [250, 250, 500, 500, 750, 750, 1000, 1000]
    target = ema.gamma_from_std(0.075)
    coefficients = ema.solve_coefficients(gammas, steps, target, 1000)
    combined = sum(c * np.pad(ema.profile_weights(g, t), (0, 1000 - t)) for c, g, t in zip(coefficients, gammas, steps))
    wanted = ema.profile_weights(target, 1000)
    error = np.linalg.norm(combined - wanted)
    nearest_stored = min(np.linalg.norm(ema.profile_weights(g, 1000) - wanted) for g in gammas[-2:])
    assert error < 0.05 * np.linalg.norm(wanted) and error < 0.2 * nearest_stored


def test_state_dict_round_trip_is_bit_exact():
    net = torch.nn.Linear(3, 2)
    profiles = ema.PowerEMA(net, [0.05])
    for step in range(1, 4):
        with torch.no_grad():
            net.weight.add_(0.1)
        profiles.update(step)
    restored = ema.PowerEMA(torch.nn.Linear(3, 2), [0.05])
    restored.load_state_dict(profiles.state_dict())
    assert restored.step == 3
    for a, b in zip(profiles.emas[0].parameters(), restored.emas[0].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match='σ_rel'):
        ema.PowerEMA(net, [0.1]).load_state_dict(profiles.state_dict())
