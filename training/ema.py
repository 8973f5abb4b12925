"""The averages of the trained network: EDM's half-life EMA and power-function EMA profiles (EDM2's post-hoc EMA):
σ_rel ↔ γ, the running averages, and the least-squares combination of stored profiles that approximates another
profile (docs/design.md#post-hoc-ema). The training loop holds them all in one `TrainingEMA`.

A profile of exponent γ at optimizer step t averages the parameters θ_1 … θ_t of steps 1 … t. The update
θ̂ ← β θ̂ + (1 − β) θ_t with β = (1 − 1/t)^(γ+1) gives θ_τ the weight (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1), which is
the density p(s) = (γ+1) s^γ / t^(γ+1) on [0, t] integrated over [τ−1, τ]. The least squares treat profiles
as these continuous densities; their inner products then have a closed form (`profile_inner_products`).
"""

import copy

import numpy as np
import torch

MAX_STD = float(np.sqrt(1 / 12))        # σ_rel of γ = 0 (the plain average); larger σ_rel would need γ < 0.


def std_from_gamma(gamma):
    """σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))): the relative width of the profile of exponent γ."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_std(std):
    """The exponent γ ≥ 0 with std_from_gamma(γ) = σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0."""
    std = float(std)
    check_std(std)
    inv2 = std ** -2
    roots = np.roots([1, 7, 16 - inv2, 12 - inv2])
    gamma = float(roots[np.abs(roots.imag) < 1e-9].real.max())
    return max(gamma, 0.0)


def check_std(std):
    """Raise ValueError unless 0 < σ_rel ≤ sqrt(1/12) (γ ≥ 0)."""
    if not 0 < std <= MAX_STD:
        raise ValueError(f'σ_rel must be in (0, {MAX_STD:.4f}] (exponent γ ≥ 0), got {std:g}')


def profile_weights(gamma, step):
    """Weights [step] of θ_1 … θ_step in the profile of exponent γ at `step` (the running update, in closed form)."""
    tau = np.arange(1, step + 1, dtype=np.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / float(step) ** (gamma + 1)


def profile_inner_products(gammas_a, steps_a, gammas_b, steps_b):
    """Matrix [len(a), len(b)] of ∫ p_a(s) p_b(s) ds for the densities p(s) = (γ+1) s^γ / t^(γ+1) on [0, t]:
    (γ_a+1)(γ_b+1) min(t_a, t_b)^(γ_a+γ_b+1) / ((γ_a+γ_b+1) t_a^(γ_a+1) t_b^(γ_b+1))."""
    ga = np.asarray(gammas_a, dtype=np.float64)[:, None]
    ta = np.asarray(steps_a, dtype=np.float64)[:, None]
    gb = np.asarray(gammas_b, dtype=np.float64)[None, :]
    tb = np.asarray(steps_b, dtype=np.float64)[None, :]
    t_min = np.minimum(ta, tb)
    # In logarithms: t^γ overflows float64 for the γ of small σ_rel at millions of steps.
    log_value = ((ga + gb + 1) * np.log(t_min) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
                 + np.log((ga + 1) * (gb + 1) / (ga + gb + 1)))
    return np.exp(log_value)


def solve_coefficients(gammas, steps, target_gamma, target_step):
    """Coefficients [len(gammas)] of the stored profiles (γ_i, t_i) whose combination is closest, in L², to
    the profile (target_gamma, target_step)."""
    gram = profile_inner_products(gammas, steps, gammas, steps)
    rhs = profile_inner_products(gammas, steps, [target_gamma], [target_step])[:, 0]
    coefficients, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
    return coefficients


class PowerEMA:
    """One power-function EMA copy of a network per σ_rel, moved after every optimizer step."""

    def __init__(self,
        net,                            # The trained network (its parameters are read, never written).
        stds,                           # Relative standard deviations σ_rel, one profile each.
    ):
        self.stds = [float(std) for std in stds]
        self.gammas = [gamma_from_std(std) for std in self.stds]
        self.step = 0
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]
        self.net_params = list(net.parameters())
        self.net_buffers = [b for b in net.buffers() if b.is_floating_point()]

    def update(self, step):
        """Take in the network after optimizer step `step` ≥ 1 (the first step replaces the copies)."""
        if step < 1:
            raise ValueError(f'optimizer steps count from 1, got {step}')
        with torch.no_grad():
            for gamma, ema in zip(self.gammas, self.emas):
                beta = (1 - 1 / step) ** (gamma + 1)
                torch._foreach_lerp_(list(ema.parameters()), self.net_params, 1 - beta)
                ema_buffers = [b for b in ema.buffers() if b.is_floating_point()]
                if ema_buffers:
                    torch._foreach_copy_(ema_buffers, self.net_buffers)
        self.step = step

    def records(self, cur_nimg):
        """(σ_rel, γ, step, nimg) of each profile as plain numbers, the record stored beside its network."""
        return [dict(std=std, gamma=gamma, step=self.step, nimg=int(cur_nimg)) for std, gamma in zip(self.stds, self.gammas)]

    def state_dict(self):
        return dict(stds=list(self.stds), gammas=list(self.gammas), step=self.step,
                    emas=[{name: t.detach().cpu().contiguous() for name, t in ema.state_dict().items()} for ema in self.emas])

    def load_state_dict(self, state):
        if [float(std) for std in state['stds']] != self.stds:
            raise ValueError(f'the state holds EMA profiles for σ_rel {state["stds"]}, this run asks for {self.stds}')
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)
        self.step = int(state['step'])


class HalfLifeEMA:
    """EDM's EMA: one copy of the network whose half-life is fixed in images, shorter while training starts."""

    def __init__(self,
        net,                            # The trained network (its parameters are read, never written).
        halflife_kimg,                  # Half-life in thousands of images.
        rampup_ratio    = None,         # The half-life is at most this fraction of the images seen; None = no ramp-up.
    ):
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio
        self.net_params = list(net.parameters())
        self.ema_params = list(self.ema.parameters())
        self.net_buffers = [b for b in net.buffers() if b.is_floating_point()]
        self.ema_buffers = [b for b in self.ema.buffers() if b.is_floating_point()]

    def update(self, cur_nimg, batch_size):
        """Take in the network after a step of `batch_size` images that began at `cur_nimg` images."""
        halflife_nimg = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.net_params, 1 - beta)
            if self.net_buffers:
                torch._foreach_copy_(self.ema_buffers, self.net_buffers)


class TrainingEMA:
    """Every average a run keeps: the half-life EMA (`ema`, the snapshot's network) and the optional profiles."""

    def __init__(self,
        net,                            # The trained network.
        halflife_kimg,                  # As HalfLifeEMA.
        rampup_ratio    = None,         # As HalfLifeEMA.
        profile_stds    = None,         # σ_rel of the power-function profiles; None = none.
    ):
        self.half_life = HalfLifeEMA(net, halflife_kimg, rampup_ratio)
        self.ema = self.half_life.ema
        self.power = PowerEMA(net, profile_stds) if profile_stds else None

    def update(self, cur_nimg, cur_step, batch_size):
        """Take in the network after optimizer step `cur_step` ≥ 1, which brought the images seen to `cur_nimg`."""
        self.half_life.update(cur_nimg - batch_size, batch_size)
        if self.power is not None:
            self.power.update(cur_step)

    def networks(self):
        """Every average as a module: the EMA first, then the profiles."""
        return [self.ema, *(self.power.emas if self.power is not None else [])]


def profile_network_name(std):
    """How metrics.jsonl and messages name the network of a profile."""
    return f'power-ema-{std:.3f}'
