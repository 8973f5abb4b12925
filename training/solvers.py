"""The solvers of the diffusion ODE/SDE, their options and their network evaluations.

Every sampler is one function `(net, latents, class_labels=None, randn_like=torch.randn_like, **options)
-> images` with no hidden state (docs/design.md#samplers): `net(x, sigma, class_labels)` is the denoiser D(x; σ),
`latents` are unit Gaussian, `randn_like` is the noise source of stochastic steps. The state is kept in
float64 so that step arithmetic does not lose precision at small σ; the network itself runs in its own
precision. The σ grids they step through are in training/schedules.py. `check_options` is the one check of
their options, `NFE_PER_IMAGE` the one count of their network evaluations. Seeds, latents, guidance and the
loop over batches are in training/sampling.py.
"""

import inspect
import math

import torch

from training import schedules


def _denoise(net, x, sigma, class_labels):
    return net(x, sigma, class_labels).to(torch.float64)


def _round_sigma(net, sigma):
    """The net's supported σ nearest to `sigma`, kept in float64 whatever dtype the net rounds in."""
    return net.round_sigma(sigma).to(torch.float64)


def _step_sigmas(net, schedule, num_levels, sigma_min, sigma_max, rho, device):
    """`num_levels` levels of the step schedule, σ_max to σ_min clamped to the net's range, rounded by the net."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    return _round_sigma(net, schedules.step_sigmas(schedule, num_levels, sigma_min, sigma_max, rho, device=device))


def _denoise_or_afs(net, x, sigma, class_labels, analytical):
    """D(x; σ), or with `analytical` the analytical first step's D = 0, i.e. ε = x/σ: at σ_max the noise is
    so much larger than the data that the denoiser returns about the data mean, which is near 0."""
    if analytical:
        return torch.zeros_like(x)
    return _denoise(net, x, sigma, class_labels)


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N: noise levels before the final 0; 2N−1 network evaluations.
    sigma_min=0.002,            # Lowest noise level, raised to net.sigma_min if needed.
    sigma_max=80,               # Highest noise level, lowered to net.sigma_max if needed.
    schedule='edm',             # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    S_churn=0,                  # Total stochasticity; 0 gives the deterministic ODE sampler.
    S_min=0,                    # Churn only at σ ∈ [S_min, S_max].
    S_max=float('inf'),
    S_noise=1,                  # Scale of the added noise (slightly > 1 offsets denoiser over-smoothing).
):
    """EDM's second-order Heun sampler with optional churn (Karras et al. 2022, Algorithm 2)."""
    check_options('edm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule)
    sigmas = _step_sigmas(net, schedule, num_steps, sigma_min, sigma_max, rho, latents.device)
    sigmas = torch.cat([sigmas, torch.zeros_like(sigmas[:1])])
    gammas = _churn_gammas(sigmas[:-1].tolist(), num_steps, S_churn, S_min, S_max)  # one host sync, before the loop

    x_next = latents.to(torch.float64) * sigmas[0]
    for i, gamma in enumerate(gammas):
        sigma_cur, sigma_next, x_cur = sigmas[i], sigmas[i + 1], x_next
        sigma_hat, x_hat = sigma_cur, x_cur
        if S_churn > 0:  # the published sampler draws noise at every step once churn is on; so do we, for the same images
            sigma_hat = _round_sigma(net, sigma_cur * (1 + gamma))
            x_hat = x_cur + (sigma_hat ** 2 - sigma_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - _denoise(net, x_hat, sigma_hat, class_labels)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d_cur
        if i < num_steps - 1:  # Heun's correction, except into σ = 0
            d_next = (x_next - _denoise(net, x_next, sigma_next, class_labels)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_next)
    return x_next


def _churn_gammas(sigmas, num_steps, S_churn, S_min, S_max):
    """Per-step relative noise increase γ_i of EDM's stochastic sampler, on the host."""
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
    return [gamma if S_min <= sigma <= S_max else 0.0 for sigma in sigmas]


class _NoiseSchedule:
    """σ(t), dσ/dt and t(σ) of one of the ablation sampler's schedules (docs/design.md#samplers)."""

    def __init__(self, name, vp_beta_d, vp_beta_min):
        if name not in ('vp', 've', 'linear'):
            raise ValueError(f"schedule must be 'vp', 've' or 'linear', got {name!r}")
        self.name, self.beta_d, self.beta_min = name, vp_beta_d, vp_beta_min

    def sigma(self, t):
        return {'vp': lambda: schedules.vp_sigma(t, self.beta_d, self.beta_min), 've': lambda: t.sqrt(), 'linear': lambda: t}[self.name]()

    def sigma_deriv(self, t):
        if self.name == 'vp':
            sigma = self.sigma(t)
            return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)
        return 0.5 / t.sqrt() if self.name == 've' else torch.ones_like(t)

    def sigma_inv(self, sigma):
        if self.name == 'vp':
            return schedules.vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return sigma ** 2 if self.name == 've' else sigma


class _Scaling:
    """s(t) and ds/dt of one of the ablation sampler's signal scalings: 'vp' = 1/√(1+σ²), 'none' = 1."""

    def __init__(self, name, schedule):
        if name not in ('vp', 'none'):
            raise ValueError(f"scaling must be 'vp' or 'none', got {name!r}")
        self.name, self.schedule = name, schedule

    def s(self, t):
        return 1 / (1 + self.schedule.sigma(t) ** 2).sqrt() if self.name == 'vp' else torch.ones_like(t)

    def s_deriv(self, t):
        if self.name == 'vp':
            return -self.schedule.sigma(t) * self.schedule.sigma_deriv(t) * self.s(t) ** 3
        return torch.zeros_like(t)


ABLATION_DEFAULT_SIGMA_RANGES = {  # (σ_min, σ_max) per discretisation, before clamping to the net's range
    'vp': tuple(float(schedules.vp_sigma(t)) for t in (1e-3, 1.0)),
    've': (0.02, 100),
    'iddpm': (0.002, 81),
    'edm': (0.002, 80),
}


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N: time steps before the final t = 0.
    sigma_min=None,             # Lowest noise level; default per discretisation (ABLATION_DEFAULT_SIGMA_RANGES).
    sigma_max=None,             # Highest noise level; default per discretisation.
    rho=7,                      # Exponent of the 'edm' discretisation.
    solver='heun',              # 'euler' (N evaluations) | 'heun' (2N−1).
    discretization='edm',       # Time steps: 'vp' | 've' | 'iddpm' | 'edm'.
    schedule='linear',          # Noise schedule σ(t): 'vp' | 've' | 'linear' (σ = t).
    scaling='none',             # Signal scaling s(t): 'vp' | 'none'.
    epsilon_s=1e-3,             # Last t of the 'vp' discretisation.
    C_1=0.001,                  # iDDPM schedule constants.
    C_2=0.008,
    M=1000,
    S_churn=0,                  # Stochasticity, as in edm_sampler.
    S_min=0,
    S_max=float('inf'),
    S_noise=1,
):
    """EDM's generalised sampler (Karras et al. 2022, Algorithm 1 with churn), which reproduces the samplers
    of VP, VE and iDDPM as special cases: dx/dt = (σ'/σ + s'/s)·x − (σ'·s/σ)·D(x/s; σ)."""
    check_options('ablation', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
    if solver not in ('euler', 'heun'):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if discretization not in ABLATION_DEFAULT_SIGMA_RANGES:
        raise ValueError(f'discretization must be one of {list(ABLATION_DEFAULT_SIGMA_RANGES)}, got {discretization!r}')
    default_min, default_max = ABLATION_DEFAULT_SIGMA_RANGES[discretization]
    sigma_min = max(default_min if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(default_max if sigma_max is None else sigma_max, net.sigma_max)

    device = latents.device
    schedule_fns = _NoiseSchedule(schedule, *schedules.vp_betas_for_range(sigma_min, sigma_max, epsilon_s))
    scaling_fns = _Scaling(scaling, schedule_fns)
    sigma, sigma_deriv, sigma_inv, s, s_deriv = (schedule_fns.sigma, schedule_fns.sigma_deriv, schedule_fns.sigma_inv,
        scaling_fns.s, scaling_fns.s_deriv)
    sigma_steps = {
        'vp': lambda: schedules.vp_sigmas(num_steps, sigma_min, sigma_max, epsilon_s, device=device),
        've': lambda: schedules.ve_sigmas(num_steps, sigma_min, sigma_max, device=device),
        'iddpm': lambda: schedules.iddpm_sigmas(num_steps, sigma_min, sigma_max, C_1, C_2, M, device=device),
        'edm': lambda: schedules.edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=device),
    }[discretization]()
    t_steps = sigma_inv(_round_sigma(net, sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    gammas = _churn_gammas(sigma(t_steps[:-1]).tolist(), num_steps, S_churn, S_min, S_max)  # one host sync

    def dx_dt(x, t):
        denoised = _denoise(net, x / s(t), sigma(t), class_labels)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, gamma in enumerate(gammas):
        t_cur, t_next, x_cur = t_steps[i], t_steps[i + 1], x_next
        t_hat = sigma_inv(_round_sigma(net, sigma(t_cur) * (1 + gamma)))
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if S_churn > 0:  # drawn at every step once churn is on, as edm_sampler does
            x_hat = x_hat + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = dx_dt(x_hat, t_hat)
        x_next = x_hat + h * d_cur
        if solver == 'heun' and i < num_steps - 1:
            x_next = x_hat + h * (0.5 * d_cur + 0.5 * dx_dt(x_next, t_next))
    return x_next


def singlestep_orders(num_solver_steps):
    """Orders of the outer intervals of the "fast" order-3 singlestep DPM-Solver; they sum to num_solver_steps."""
    num_intervals = num_solver_steps // 3 + 1
    tail = {0: [2, 1], 1: [1], 2: [2]}[num_solver_steps % 3]
    return [3] * (num_intervals - len(tail)) + tail


def dpm_solver_pp(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N network evaluations: N−1 solver steps plus the final denoising.
    sigma_min=0.002,            # Last time point and the σ of the final denoising (not clamped to the net).
    sigma_max=80,               # First time point.
    schedule='logsnr',          # Step schedule of the outer time points (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
):
    """DPM-Solver++ (Lu et al. 2022), data prediction, singlestep order 3 with the "dpmsolver" combination,
    for the EDM process x = y + σn (α = 1, λ = −ln σ); outer time points from `schedule` (FDM: uniform in λ),
    then x ← D(x; σ_min). `randn_like` is unused: the solver is deterministic."""
    check_options('dpm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule)
    num_outer = len(singlestep_orders(num_steps - 1)) + 1
    lambda_outer = (-schedules.step_sigmas(schedule, num_outer, sigma_min, sigma_max, rho).log()).tolist()
    intervals = list(zip(singlestep_orders(num_steps - 1), lambda_outer[:-1], lambda_outer[1:]))
    eval_sigmas = [math.exp(-(lambda_s + r * (lambda_t - lambda_s)))
        for order, lambda_s, lambda_t in intervals for r in SINGLESTEP_FRACTIONS[order]] + [sigma_min]
    eval_sigmas = iter(torch.tensor(eval_sigmas, dtype=torch.float64, device=latents.device))  # one copy, before the loop
    denoise_next = lambda x_: _denoise(net, x_, next(eval_sigmas), class_labels)

    x = latents.to(torch.float64) * sigma_max
    for order, lambda_s, lambda_t in intervals:
        x = _dpm_solver_pp_step(denoise_next, x, lambda_t - lambda_s, order)
    return denoise_next(x)


SINGLESTEP_FRACTIONS = {1: [0], 2: [0, 1 / 2], 3: [0, 1 / 3, 2 / 3]}  # where in [λ_s, λ_t] each order evaluates D


def _dpm_solver_pp_step(denoise_next, x, h, order):
    """One singlestep DPM-Solver++ update of order 1, 2 (r1 = ½) or 3 (r1 = ⅓, r2 = ⅔) over a λ-interval h.

    `denoise_next(x)` evaluates D at the next of the interval's points (SINGLESTEP_FRACTIONS). With α = 1 the
    exact solution is x_t = (σ_t/σ_s)·x_s + σ_t∫e^λ D dλ; the φ below are its Taylor weights.
    """
    phi_1 = math.expm1(-h)
    D_s = denoise_next(x)
    if order == 1:
        return math.exp(-h) * x - phi_1 * D_s
    if order == 2:
        r1 = SINGLESTEP_FRACTIONS[2][1]
        x_s1 = math.exp(-r1 * h) * x - math.expm1(-r1 * h) * D_s
        D_s1 = denoise_next(x_s1)
        return math.exp(-h) * x - phi_1 * D_s - (0.5 / r1) * phi_1 * (D_s1 - D_s)
    r1, r2 = SINGLESTEP_FRACTIONS[3][1:]
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1
    phi_2 = phi_1 / h + 1
    x_s1 = math.exp(-r1 * h) * x - math.expm1(-r1 * h) * D_s
    D_s1 = denoise_next(x_s1)
    x_s2 = math.exp(-r2 * h) * x - math.expm1(-r2 * h) * D_s + (r2 / r1) * phi_22 * (D_s1 - D_s)
    D_s2 = denoise_next(x_s2)
    return math.exp(-h) * x - phi_1 * D_s + (1 / r2) * phi_2 * (D_s2 - D_s)


def dpm_solver_2m(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N network evaluations, one per step.
    sigma_min=0.002,            # Last nonzero time point, raised to net.sigma_min if needed.
    sigma_max=80,               # First time point, lowered to net.sigma_max if needed.
    schedule='logsnr',          # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    afs=False,                  # Analytical first step: D(x; σ_max) taken as 0, one evaluation fewer.
):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022), data prediction, for the EDM process: N time points
    from σ_max to σ_min (by default uniform in log-SNR), then σ = 0. The first step is first order (no
    history) and so is the last one into σ = 0, which is the plain denoising x ← D(x; σ_min). `randn_like`
    is unused."""
    check_options('dpm2m', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, afs=afs)
    sigmas = _step_sigmas(net, schedule, num_steps, sigma_min, sigma_max, rho, latents.device)
    lambdas = (-sigmas.log()).tolist()  # one host sync, before the loop

    x = latents.to(torch.float64) * sigmas[0]
    D_prev, h_prev = None, None
    for i in range(num_steps):
        D_cur = _denoise_or_afs(net, x, sigmas[i], class_labels, afs and i == 0)
        if i == num_steps - 1:
            return D_cur
        h = lambdas[i + 1] - lambdas[i]
        D_eff = D_cur
        if D_prev is not None:
            r = h_prev / h
            D_eff = (1 + 0.5 / r) * D_cur - (0.5 / r) * D_prev
        x = math.exp(-h) * x - math.expm1(-h) * D_eff
        D_prev, h_prev = D_cur, h


# Few-step multistep solvers (docs/design.md#few-step-solvers). Each takes N steps through the N + 1 levels of a
# step schedule from σ_max to σ_min, one network evaluation per step at its start (none in the first with `afs`),
# and returns x at σ_min, where the noise left (σ_min = 0.002 ≪ 1/255) is below one uint8 level.


IPNDM_COEFFICIENTS = {  # Adams–Bashforth weights of ε_i, ε_{i−1}, … for equal steps, by order
    1: [1],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def ipndm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N steps, one network evaluation each (N − 1 with afs).
    sigma_min=0.002,            # Last level, raised to net.sigma_min if needed.
    sigma_max=80,               # First level, lowered to net.sigma_max if needed.
    schedule='edm',             # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    order=None,                 # Adams–Bashforth order 1-4; None = 4, or num_steps if fewer. The first steps use lower ones.
    afs=False,                  # Analytical first step: ε(x; σ_max) taken as x/σ_max, one evaluation fewer.
):
    """Improved PNDM (Zhang & Chen 2023): Adams–Bashforth with the fixed equal-step weights on
    dx/dσ = ε(x; σ) = (x − D(x; σ))/σ, order 1, 2, … at the start as the history of ε grows. `randn_like` is unused."""
    check_options('ipndm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, order=order, afs=afs)
    order = order or min(MAX_ORDER['ipndm'], num_steps)
    sigmas = _step_sigmas(net, schedule, num_steps + 1, sigma_min, sigma_max, rho, latents.device)
    sigma_values = sigmas.tolist()  # one host sync, before the loop
    x = latents.to(torch.float64) * sigmas[0]
    eps_history = []  # newest first
    for i in range(num_steps):
        eps = (x - _denoise_or_afs(net, x, sigmas[i], class_labels, afs and i == 0)) / sigmas[i]
        eps_history = [eps] + eps_history[:order - 1]
        weights = IPNDM_COEFFICIENTS[len(eps_history)]
        x = x + (sigma_values[i + 1] - sigma_values[i]) * sum(w * e for w, e in zip(weights, eps_history))
    return x


GAUSS_LEGENDRE_2 = [(-1 / math.sqrt(3), 1.0), (1 / math.sqrt(3), 1.0)]  # nodes on [−1, 1] and weights; exact to degree 3


def lagrange_integrals(nodes, start, end):
    """∫_start^end ℓ_j(t) dt for each Lagrange basis polynomial ℓ_j of `nodes` (at most 4 nodes: degree ≤ 3, which
    two-point Gauss–Legendre integrates exactly)."""
    if len(nodes) > 4:
        raise ValueError(f'at most 4 nodes, got {len(nodes)}')
    half, middle = (end - start) / 2, (end + start) / 2
    def basis(j, t):
        return math.prod((t - other) / (nodes[j] - other) for k, other in enumerate(nodes) if k != j)
    return [half * sum(weight * basis(j, middle + half * node) for node, weight in GAUSS_LEGENDRE_2) for j in range(len(nodes))]


def deis_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N steps, one network evaluation each (N − 1 with afs).
    sigma_min=0.002,            # Last level, raised to net.sigma_min if needed.
    sigma_max=80,               # First level, lowered to net.sigma_max if needed.
    schedule='edm',             # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    order=None,                 # Polynomial order 1-3 (degree + 1); None = 3, or num_steps if fewer. The first steps use lower ones.
    afs=False,                  # Analytical first step: ε(x; σ_max) taken as x/σ_max, one evaluation fewer.
):
    """tAB-DEIS (Zhang & Chen 2023) in the EDM time t = σ: dx/dσ = ε(x; σ) has no linear part, so the exponential
    integrator is x_{i+1} = x_i + Σ_j C_ij·ε_{i−j} with C_ij = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, ℓ_j the Lagrange basis
    of the last `order` levels: Adams–Bashforth with the weights of the actual, unequal steps. `randn_like` is unused."""
    check_options('deis', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, order=order, afs=afs)
    order = order or min(MAX_ORDER['deis'], num_steps)
    sigmas = _step_sigmas(net, schedule, num_steps + 1, sigma_min, sigma_max, rho, latents.device)
    sigma_values = sigmas.tolist()  # one host sync, before the loop
    x = latents.to(torch.float64) * sigmas[0]
    eps_history = []  # newest first, ε_{i}, ε_{i−1}, …
    for i in range(num_steps):
        eps = (x - _denoise_or_afs(net, x, sigmas[i], class_labels, afs and i == 0)) / sigmas[i]
        eps_history = [eps] + eps_history[:order - 1]
        weights = lagrange_integrals(sigma_values[i::-1][:len(eps_history)], sigma_values[i], sigma_values[i + 1])
        x = x + sum(w * e for w, e in zip(weights, eps_history))
    return x


def phi_functions(h, count):
    """[φ_1(−h), …, φ_count(−h)] of the exponential integrators: φ_1(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z."""
    phis = [-math.expm1(-h) / h]
    for k in range(1, count):
        phis.append((phis[-1] - 1 / math.factorial(k)) / -h)
    return phis


def _unipc_update(x, lambda_s, lambda_t, D_s, points):
    """One UniPC-bh2 update (Zhao et al. 2023) from λ_s to λ_t, data prediction (α = 1, σ = e^−λ):

        x_t = e^−h·x_s − expm1(−h)·D_s − B(h)·Σ_m ρ_m·(D_m − D_s)/r_m,   r_m = (λ_m − λ_s)/h,   B(h) = expm1(−h),

    with ρ solving Σ_m ρ_m·r_m^(k−1) = −h·k!·φ_{k+1}(−h)/B(h), k = 1…M, which matches the Taylor terms of D up to
    order M; with one point (M = 1) bh2 takes ρ = ½. `points` are the (λ_m, D_m) besides (λ_s, D_s).
    """
    h = lambda_t - lambda_s
    x_t = math.exp(-h) * x - math.expm1(-h) * D_s
    if not points:
        return x_t
    ratios = [(lambda_m - lambda_s) / h for lambda_m, _ in points]
    B_h = math.expm1(-h)
    if len(points) == 1:
        rhos = [0.5]
    else:
        phis = phi_functions(h, len(points) + 1)
        rhs = torch.tensor([-h * math.factorial(k) * phis[k] / B_h for k in range(1, len(points) + 1)], dtype=torch.float64)
        vandermonde = torch.tensor([[r ** k for r in ratios] for k in range(len(points))], dtype=torch.float64)
        rhos = torch.linalg.solve(vandermonde, rhs).tolist()  # a 2×2 or 3×3 system of host floats
    return x_t - B_h * sum(rho * (D_m - D_s) / r for rho, r, (_, D_m) in zip(rhos, ratios, points))


def unipc_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N steps, one network evaluation each (N − 1 with afs).
    sigma_min=0.002,            # Last level, raised to net.sigma_min if needed.
    sigma_max=80,               # First level, lowered to net.sigma_max if needed.
    schedule='edm',             # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    order=None,                 # Predictor order 1-3 (the corrector adds one); None = 3, or num_steps if fewer. The first steps use lower ones.
    afs=False,                  # Analytical first step: D(x; σ_max) taken as 0, one evaluation fewer.
):
    """UniPC-bh2 (Zhao et al. 2023), data prediction in λ = −ln σ: each step predicts with the last `order` values
    of D (UniP), and once D is evaluated at the predicted point it corrects the same step with that value too
    (UniC), without another evaluation; the next step starts from the corrected x and the evaluated D. The last
    step, with no evaluation after it, is not corrected. `randn_like` is unused."""
    check_options('unipc', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, order=order, afs=afs)
    order = order or min(MAX_ORDER['unipc'], num_steps)
    sigmas = _step_sigmas(net, schedule, num_steps + 1, sigma_min, sigma_max, rho, latents.device)
    lambdas = (-sigmas.log()).tolist()  # one host sync, before the loop
    x = latents.to(torch.float64) * sigmas[0]
    history = []  # (λ, D) newest first
    for i in range(num_steps):
        D_cur = _denoise_or_afs(net, x, sigmas[i], class_labels, afs and i == 0)
        if history:  # UniC: redo the last step with the new value
            (lambda_prev, D_prev), earlier = history[0], history[1:]
            x = _unipc_update(x_prev, lambda_prev, lambdas[i], D_prev, earlier + [(lambdas[i], D_cur)])
        history = [(lambdas[i], D_cur)] + history[:order - 1]
        x_prev = x
        x = _unipc_update(x, lambdas[i], lambdas[i + 1], D_cur, history[1:])
    return x


def dpm_solver_3m(net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18,               # N steps, one network evaluation each (N − 1 with afs).
    sigma_min=0.002,            # Last level, raised to net.sigma_min if needed.
    sigma_max=80,               # First level, lowered to net.sigma_max if needed.
    schedule='edm',             # Step schedule (schedules.STEP_SCHEDULES).
    rho=7,                      # Exponent of the 'edm' step schedule.
    afs=False,                  # Analytical first step: D(x; σ_max) taken as 0, one evaluation fewer.
):
    """Multistep DPM-Solver++(3M) (Lu et al. 2022), data prediction in λ = −ln σ: the Taylor expansion of
    x_t = e^−h·x_s + σ_t∫e^λ·D dλ, x_t = e^−h·x_s + h·φ_1·D_s + h²·φ_2·D'_s + h³·φ_3·D''_s (φ_k at −h), with D' and D''
    from the quadratic through the last three values of D in λ (the line through two in the second step, D_s alone
    in the first). `randn_like` is unused."""
    check_options('dpm3m', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, afs=afs)
    sigmas = _step_sigmas(net, schedule, num_steps + 1, sigma_min, sigma_max, rho, latents.device)
    lambdas = (-sigmas.log()).tolist()  # one host sync, before the loop
    x = latents.to(torch.float64) * sigmas[0]
    history = []  # (λ, D) newest first
    for i in range(num_steps):
        history = [(lambdas[i], _denoise_or_afs(net, x, sigmas[i], class_labels, afs and i == 0))] + history[:2]
        h = lambdas[i + 1] - lambdas[i]
        phi_1, phi_2, phi_3 = phi_functions(h, 3)
        x = math.exp(-h) * x + h * phi_1 * history[0][1]
        if len(history) >= 2:  # Newton divided differences in λ, at λ_s
            (l0, D0), (l1, D1) = history[:2]
            slope = (D0 - D1) / (l0 - l1)
            if len(history) == 3:
                l2, D2 = history[2]
                curvature = (slope - (D1 - D2) / (l1 - l2)) / (l0 - l2)  # D''/2
                x = x + h ** 2 * phi_2 * (slope + curvature * (l0 - l1)) + h ** 3 * phi_3 * 2 * curvature
            else:
                x = x + h ** 2 * phi_2 * slope
    return x


SAMPLERS = {
    'edm': edm_sampler,
    'ablation': ablation_sampler,
    'dpm': dpm_solver_pp,
    'dpm2m': dpm_solver_2m,
    'ipndm': ipndm_sampler,
    'unipc': unipc_sampler,
    'deis': deis_sampler,
    'dpm3m': dpm_solver_3m,
}

# Network evaluations per image of each sampler, from its options with the defaults filled in: the one formula
# that `network_evaluations`, `steps_for_nfe` and the tests' call counts all rest on.
NFE_PER_IMAGE = {
    'edm':      lambda o: 2 * o['num_steps'] - 1,
    'ablation': lambda o: o['num_steps'] if o['solver'] == 'euler' else 2 * o['num_steps'] - 1,
    'dpm':      lambda o: o['num_steps'],
    'dpm2m':    lambda o: o['num_steps'] - o['afs'],
    'ipndm':    lambda o: o['num_steps'] - o['afs'],
    'unipc':    lambda o: o['num_steps'] - o['afs'],
    'deis':     lambda o: o['num_steps'] - o['afs'],
    'dpm3m':    lambda o: o['num_steps'] - o['afs'],
}

# Fewest steps: the σ schedules of the first three need two levels; the multistep ones can take one step (and
# need one evaluation beyond the analytical first step); 3M reaches its order in three.
MIN_NUM_STEPS = {'edm': 2, 'ablation': 2, 'dpm': 2, 'dpm2m': 1, 'ipndm': 1, 'unipc': 1, 'deis': 1, 'dpm3m': 3}
MAX_ORDER = {'ipndm': 4, 'unipc': 3, 'deis': 3}  # also their default orders, where the steps allow
AFS_SAMPLERS = ['dpm2m', 'ipndm', 'unipc', 'deis', 'dpm3m']  # the multistep ones, whose first step is a plain D(x; σ_max)


class SamplerOptionError(ValueError):
    """A sampler option whose value cannot work; `keyword` is the option's keyword (the CLI names its flag)."""

    def __init__(self, message, keyword):
        super().__init__(message)
        self.keyword = keyword


def sampler_defaults(sampler_name):
    """{keyword: default} of the options of a sampler: its signature after (net, latents, class_labels, randn_like)."""
    if sampler_name not in SAMPLERS:
        raise ValueError(f'unknown sampler {sampler_name!r}; expected one of {", ".join(SAMPLERS)}')
    parameters = list(inspect.signature(SAMPLERS[sampler_name]).parameters.values())[4:]
    return {parameter.name: parameter.default for parameter in parameters}


def check_options(sampler_name, **options):
    """`options` with the sampler's defaults filled in, or SamplerOptionError for the first value that cannot work.

    Every sampler checks its options with this on entry; the command-line tools call it before loading a network.
    """
    defaults = sampler_defaults(sampler_name)
    for keyword in options:
        if keyword == 'afs' and keyword not in defaults:
            raise SamplerOptionError(f'the analytical first step needs a multistep solver ({", ".join(AFS_SAMPLERS)}); '
                                     f'the {sampler_name} sampler cannot use it', 'afs')
        if keyword not in defaults:
            raise SamplerOptionError(f'the {sampler_name} sampler has no option {keyword}', keyword)
    o = dict(defaults, **options)
    minimum = MIN_NUM_STEPS[sampler_name] + (1 if o.get('afs') and sampler_name != 'dpm3m' else 0)
    if int(o['num_steps']) != o['num_steps'] or o['num_steps'] < minimum:
        raise SamplerOptionError(f'num_steps must be an integer >= {minimum} for the {sampler_name} sampler'
                                 f'{" with afs" if o.get("afs") else ""}, got {o["num_steps"]}', 'num_steps')
    if o['sigma_min'] is not None and o['sigma_max'] is not None and o['sigma_min'] >= o['sigma_max']:
        raise SamplerOptionError(f'sigma_min {o["sigma_min"]} is not below sigma_max {o["sigma_max"]}', 'sigma_min')
    if sampler_name != 'ablation' and o['schedule'] not in schedules.STEP_SCHEDULES:
        raise SamplerOptionError(f'schedule must be one of {", ".join(schedules.STEP_SCHEDULES)}, got {o["schedule"]!r}', 'schedule')
    if o.get('order') is not None:  # None: the highest order the steps allow
        if o['order'] not in range(1, MAX_ORDER[sampler_name] + 1):
            raise SamplerOptionError(f'order must be 1 to {MAX_ORDER[sampler_name]} for the {sampler_name} sampler, '
                                     f'got {o["order"]}', 'order')
        if o['order'] > o['num_steps']:
            raise SamplerOptionError(f'order {o["order"]} needs at least {o["order"]} steps, got {o["num_steps"]} '
                                     f'({NFE_PER_IMAGE[sampler_name](o)} evaluations)', 'order')
    return o


def network_evaluations(sampler_name, **options):
    """Network evaluations per image of `sampler_name` with `options` (a guided net makes each one batched call)."""
    return NFE_PER_IMAGE[sampler_name](check_options(sampler_name, **options))


def steps_for_nfe(sampler_name, nfe, **options):
    """The num_steps with which the sampler makes exactly `nfe` network evaluations under `options` (which must not
    hold num_steps); ValueError listing the possible counts when none does, SamplerOptionError when the steps
    do not suit another option (an order above the steps)."""
    defaults = dict(sampler_defaults(sampler_name), **options)
    count = lambda num_steps: NFE_PER_IMAGE[sampler_name](dict(defaults, num_steps=num_steps))
    minimum = MIN_NUM_STEPS[sampler_name] + (1 if defaults.get('afs') and sampler_name != 'dpm3m' else 0)
    for num_steps in range(minimum, max(nfe, 0) + 2):
        if count(num_steps) == nfe:
            check_options(sampler_name, **options, num_steps=num_steps)
            return num_steps
    possible = [count(num_steps) for num_steps in range(minimum, minimum + 6)]
    raise ValueError(f'the {sampler_name} sampler{" with afs" if defaults.get("afs") else ""} cannot make exactly '
                     f'{nfe} network evaluations; possible: {", ".join(map(str, possible))}, …')
