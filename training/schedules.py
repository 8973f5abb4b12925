"""Noise schedules: the VP σ(t) and its inverse, iDDPM's levels, FDM's input kernel s(σ), the samplers' σ grids.

Networks and losses evaluate them in float32 the way the published code does (the published networks' σ_min,
c_noise and u buffer depend on that rounding); samplers evaluate them in float64. Where the two differ, the
function takes `dtype` and documents what each choice computes. The σ grids return float64 tensors.
"""

import math

import torch


def vp_sigma(t, beta_d=19.9, beta_min=0.1, dtype=torch.float64):
    """σ(t) = √(exp(½β_d·t² + β_min·t) − 1) of the VP SDE (docs/design.md#preconditioners).

    float64 uses expm1 (accurate at small t); float32 computes exp(·) − 1 as the published networks do.
    """
    t = torch.as_tensor(t, dtype=dtype, device=t.device if isinstance(t, torch.Tensor) else 'cpu')  # also under torch.device('meta')
    exponent = 0.5 * beta_d * t ** 2 + beta_min * t
    return (exponent.expm1() if dtype == torch.float64 else exponent.exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1, dtype=torch.float64):
    """t(σ), the inverse of `vp_sigma`: (√(β_min² + 2β_d·ln(1 + σ²)) − β_min) / β_d.

    float64 uses log1p; float32 computes ln(1 + σ²) as the published networks do (their c_noise).
    """
    sigma = torch.as_tensor(sigma, dtype=dtype)
    log_one_plus = (sigma ** 2).log1p() if dtype == torch.float64 else (1 + sigma ** 2).log()
    return ((beta_min ** 2 + 2 * beta_d * log_one_plus).sqrt() - beta_min) / beta_d


def vp_betas_for_range(sigma_min, sigma_max, epsilon_s=1e-3):
    """(β_d, β_min) with σ_vp(ε_s) = σ_min and σ_vp(1) = σ_max, from ln(σ²+1) = ½β_d t² + β_min t at both ends."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def iddpm_levels(C_1=0.001, C_2=0.008, M=1000, dtype=torch.float64, device='cpu'):
    """The M+1 noise levels u_0 > … > u_M = 0 of iDDPM's cosine schedule (docs/design.md#preconditioners).

    float32 repeats the published network's recursion (its `u` buffer); float64 is what the samplers step on.
    """
    j = torch.arange(M + 1, dtype=dtype, device=device)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    alpha_ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)  # ᾱ(j−1)/ᾱ(j) for j = 1…M
    if dtype == torch.float64:  # Python floats are float64: the recursion runs on them, without tensor overhead
        ratios, u = alpha_ratio.tolist(), [0.0] * (M + 1)
        for k in range(M, 0, -1):  # a recursion: each level needs the next one
            u[k - 1] = math.sqrt((u[k] ** 2 + 1) / ratios[k - 1] - 1)
        return torch.tensor(u, dtype=dtype, device=device)
    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for k in range(M, 0, -1):
        u[k - 1] = ((u[k] ** 2 + 1) / alpha_ratio[k - 1] - 1).sqrt()
    return u


def fdm_input_scale(sigma, sigma_min, sigma_max, beta_d=19.9, beta_min=0.1, multiplier=2.0):
    """s(σ) = exp(−m·β(t))·(1 + m·β(t)), β(t) = β_min·t + ½β_d·t², t = (σ − σ_min)/(σ_max − σ_min).

    This is the critically damped oscillation's solution: FDM's networks use it in place of the baseline's c_in
    (docs/design.md#fdm-kernel).
    """
    t = (sigma - sigma_min) / (sigma_max - sigma_min)
    beta = multiplier * (beta_min * t + 0.5 * beta_d * t ** 2)
    return torch.exp(-beta) * (1 + beta)


# σ grids. Each returns the N noise levels σ_0 > … > σ_{N-1} of an N-step sampler (float64, no final 0).


def edm_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7, device='cpu'):
    """EDM's discretisation: uniform in σ^(1/ρ), which concentrates steps at low noise."""
    step_fraction = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    return (sigma_max ** (1 / rho) + step_fraction * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_sigmas(num_steps, sigma_min, sigma_max, epsilon_s=1e-3, device='cpu'):
    """VP (DDPM++) discretisation: uniform in t ∈ [1, ε_s] of a VP schedule re-fit to the σ range."""
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    step_fraction = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    return vp_sigma(1 + step_fraction * (epsilon_s - 1), beta_d, beta_min)


def ve_sigmas(num_steps, sigma_min, sigma_max, device='cpu'):
    """VE (NCSN++) discretisation: geometric in σ (equivalently in σ²)."""
    step_fraction = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** step_fraction).sqrt()


def iddpm_sigmas(num_steps, sigma_min, sigma_max, C_1=0.001, C_2=0.008, M=1000, device='cpu'):
    """iDDPM discretisation: N of the cosine schedule's M+1 levels u_j, evenly spread over those in range."""
    u = iddpm_levels(C_1, C_2, M, device=device)
    u_in_range = u[(u >= sigma_min) & (u <= sigma_max)]
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    return u_in_range[((len(u_in_range) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]


def logsnr_sigmas(num_steps, sigma_min=0.002, sigma_max=80, device='cpu'):
    """Uniform in log-SNR λ = −ln σ (the data-scale α is 1 in the EDM process), from σ_max to σ_min."""
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), num_steps, dtype=torch.float64, device=device)
    return (-lambdas).exp()


def time_uniform_sigmas(num_steps, sigma_min=0.002, sigma_max=80, device='cpu'):
    """Uniform in the EDM time t = σ: equal steps everywhere, so most of them fall at high noise."""
    return torch.linspace(sigma_max, sigma_min, num_steps, dtype=torch.float64, device=device)


def polylog_sigmas(num_steps, sigma_min=0.002, sigma_max=80, power=2, device='cpu'):
    """Polynomial in ln σ: ln σ_i = ln σ_min + (ln σ_max − ln σ_min)·(1 − i/(N−1))^power.

    power = 1 is the log-SNR grid; larger powers move steps towards low noise, as ρ does for the EDM grid.
    """
    step_fraction = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    log_range = math.log(sigma_max) - math.log(sigma_min)
    return (math.log(sigma_min) + log_range * (1 - step_fraction) ** power).exp()


# The step schedules a sampler's `schedule=` chooses; each maps (N, σ_min, σ_max, ρ, device) to its N levels.
STEP_SCHEDULES = {
    'edm':    lambda num_steps, sigma_min, sigma_max, rho, device: edm_sigmas(num_steps, sigma_min, sigma_max, rho, device),
    'time':   lambda num_steps, sigma_min, sigma_max, rho, device: time_uniform_sigmas(num_steps, sigma_min, sigma_max, device),
    'logsnr': lambda num_steps, sigma_min, sigma_max, rho, device: logsnr_sigmas(num_steps, sigma_min, sigma_max, device),
    'polylog': lambda num_steps, sigma_min, sigma_max, rho, device: polylog_sigmas(num_steps, sigma_min, sigma_max, device=device),
}


def step_sigmas(schedule, num_steps, sigma_min=0.002, sigma_max=80, rho=7, device='cpu'):
    """The N levels σ_max = σ_0 > … > σ_{N−1} = σ_min of the step schedule named `schedule` (STEP_SCHEDULES);
    ρ is the EDM grid's exponent and is unused by the others."""
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f'schedule must be one of {", ".join(STEP_SCHEDULES)}; got {schedule!r}')
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'a step schedule needs at least 2 levels, got {num_steps}')
    return STEP_SCHEDULES[schedule](int(num_steps), sigma_min, sigma_max, rho, device)
