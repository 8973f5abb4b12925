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
