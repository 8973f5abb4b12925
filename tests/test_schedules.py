"""training/schedules.py: the σ grids of the samplers, iDDPM's levels and FDM's input kernel s(σ)."""

import numpy as np
import pytest
import torch

from training import networks, schedules


def test_edm_sigmas_span_the_range_uniformly_in_sigma_to_the_one_over_rho():
    sigmas = schedules.edm_sigmas(5, sigma_min=0.002, sigma_max=80, rho=7)
    assert sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-1].item() == pytest.approx(0.002)
    steps = sigmas ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(4))


def test_vp_sigmas_refit_the_schedule_to_the_range():
    sigmas = schedules.vp_sigmas(6, sigma_min=0.01, sigma_max=50)
    assert sigmas[0].item() == pytest.approx(50) and sigmas[-1].item() == pytest.approx(0.01)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_ve_and_logsnr_sigmas_are_geometric():
    for sigmas in (schedules.ve_sigmas(5, 0.02, 100), schedules.logsnr_sigmas(5, 0.02, 100)):
        ratios = sigmas[1:] / sigmas[:-1]
        assert sigmas[0].item() == pytest.approx(100) and sigmas[-1].item() == pytest.approx(0.02)
        assert torch.allclose(ratios, ratios[0].expand(4))


def test_iddpm_sigmas_are_levels_of_the_network_schedule():
    net = networks.iDDPMPrecond(img_resolution=8, img_channels=1, model_channels=32, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    levels = schedules.iddpm_levels()
    assert levels[-1].item() == 0 and (levels[1:] < levels[:-1]).all()
    assert torch.allclose(levels.float(), net.u, rtol=1e-3)  # the network keeps the published float32 recursion
    sigmas = schedules.iddpm_sigmas(7, sigma_min=0.002, sigma_max=81)
    in_range = levels[(levels >= 0.002) & (levels <= 81)]
    assert sigmas[0] == in_range[0] and sigmas[-1] == in_range[-1]
    assert all((in_range == sigma).any() for sigma in sigmas)


def test_fdm_input_scale_closed_form():
    sigma_min, sigma_max = 0.002, 80.0
    sigma = torch.tensor([sigma_min, 1.0, sigma_max], dtype=torch.float64)
    for m in (1.0, 2.0):
        t = (sigma - sigma_min) / (sigma_max - sigma_min)
        beta = m * (0.1 * t + 0.5 * 19.9 * t ** 2)
        expected = np.exp(-beta.numpy()) * (1 + beta.numpy())
        got = schedules.fdm_input_scale(sigma, sigma_min, sigma_max, multiplier=m)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert schedules.fdm_input_scale(torch.tensor(sigma_min), sigma_min, sigma_max).item() == 1.0


@pytest.mark.parametrize('name', list(schedules.STEP_SCHEDULES))
def test_step_schedules_run_from_sigma_max_down_to_sigma_min(name):
    sigmas = schedules.step_sigmas(name, 9, sigma_min=0.002, sigma_max=80)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 9
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-1].item() == pytest.approx(0.002)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_time_uniform_steps_are_equal_in_sigma():
    sigmas = schedules.time_uniform_sigmas(5, 0.002, 80)
    assert torch.allclose(sigmas[:-1] - sigmas[1:], torch.full([4], (80 - 0.002) / 4, dtype=torch.float64))


def test_polylog_is_a_power_of_the_fraction_in_log_sigma_and_logsnr_at_power_one():
    sigmas = schedules.polylog_sigmas(5, 0.002, 80, power=2)
    fraction_left = (sigmas.log() - np.log(0.002)) / (np.log(80) - np.log(0.002))
    assert torch.allclose(fraction_left, torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64) ** 2)
    assert torch.allclose(schedules.polylog_sigmas(6, 0.002, 80, power=1), schedules.logsnr_sigmas(6, 0.002, 80))


def test_step_sigmas_edm_is_the_edm_grid_and_unknown_names_are_value_errors():
    assert torch.equal(schedules.step_sigmas('edm', 6, 0.01, 50, rho=5), schedules.edm_sigmas(6, 0.01, 50, rho=5))
    with pytest.raises(ValueError, match='schedule must be one of edm, time, logsnr, polylog'):
        schedules.step_sigmas('cosine', 6)
    with pytest.raises(ValueError, match='at least 2 levels'):
        schedules.step_sigmas('edm', 1)
