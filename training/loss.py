"""Training losses of the VP, VE and EDM formulations, with FDM's loss-weight warm-up.

Each loss draws one noise level σ per image, noises the (optionally augmented) image and returns the
per-element weighted squared error of the denoiser; the training loop sums and scales it. FDM caps the
weight while training starts: here the cap is a function of the optimizer step, which the training loop
passes with every call (`step=`), so that gradient accumulation does not change it and a resumed run keeps it.
"""

import numbers

import torch

from torch_utils import persistence
from training import schedules


class WarmupSchedule:
    """FDM's cap on the loss weight: 5·100^(step/warmup_ite) for step < warmup_ite, no cap afterwards.

    The cap grows geometrically from 5 to 500 over `warmup_ite` optimizer steps; `warmup_ite=None` turns
    the warm-up off. It is a pure function of the step, so the loss that uses it only keeps the step.
    """

    CAP_START = 5.0         # Cap at step 0.
    CAP_GROWTH = 100.0      # Factor by which the cap grows over the warm-up.

    def __init__(self,
        warmup_ite = None,  # Warm-up length in optimizer steps; None = no cap ever.
    ):
        if warmup_ite is not None and (isinstance(warmup_ite, bool) or not isinstance(warmup_ite, numbers.Integral)
                                       or warmup_ite < 1):
            raise ValueError(f'warmup_ite must be a positive integer or None, got {warmup_ite!r}')
        self.warmup_ite = None if warmup_ite is None else int(warmup_ite)

    def cap(self, step):
        """The largest weight allowed at optimizer step `step`, or None where no cap applies."""
        if self.warmup_ite is None or step >= self.warmup_ite:
            return None
        return self.CAP_START * self.CAP_GROWTH ** (step / self.warmup_ite)

    def clamp(self, weight, step):
        """`weight` clamped from above by the cap of `step` (unchanged where no cap applies)."""
        cap = self.cap(step)
        return weight if cap is None else weight.clamp(max=cap)


class _DenoisingLoss:
    """What the three losses share: the noising, the weighted error and the warm-up.

    A subclass only says how σ is drawn and how it is weighted (`sigma_and_weight`).
    """

    def __init__(self, warmup_ite):
        self.warmup = WarmupSchedule(warmup_ite)
        self.step = 0                   # Steps served: one past the last `step` given (the training state's record).

    def sigma_and_weight(self, rnd_shape, device):
        """Draw σ of shape `rnd_shape` on `device` and return (σ, weight before the warm-up cap)."""
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None, step=None):
        """Per-element loss [N,C,H,W] of `net` on `images` (float, in [-1, 1]) with optional class labels, at optimizer
        step `step` (None = the steps counted by `advance()` or the training state)."""
        if step is None:
            step = self.step
        else:
            self.step = step + 1
        sigma, weight = self.sigma_and_weight([images.shape[0], 1, 1, 1], images.device)
        weight = self.warmup.clamp(weight, step)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noise = torch.randn_like(y) * sigma
        net_kwargs = {} if augment_labels is None else dict(augment_labels=augment_labels)  # nets without augment_dim
        denoised = net(y + noise, sigma, labels, **net_kwargs)
        return weight * (denoised - y).square()

    def advance(self):
        """Count one optimizer step, for callers that do not pass `step` (the training loop passes it)."""
        self.step += 1

    def state_dict(self):
        return {'step': self.step}

    def load_state_dict(self, state):
        step = state.get('step') if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f'loss state must be {{"step": non-negative integer}}, got {state!r}')
        self.step = int(step)


@persistence.persistent_class
class VPLoss(_DenoisingLoss):
    """Variance-preserving loss: t uniform on [ε_t, 1], σ = σ_vp(t), weight 1/σ²."""

    def __init__(self,
        beta_d      = 19.9,     # Extent of the VP noise schedule.
        beta_min    = 0.1,      # Initial slope of the VP noise schedule.
        epsilon_t   = 1e-5,     # Smallest diffusion time drawn.
        warmup_ite  = None,     # FDM weight warm-up length in optimizer steps; None = off.
    ):
        if not 0 < epsilon_t < 1:
            raise ValueError(f'epsilon_t must lie in (0, 1), got {epsilon_t!r}')
        super().__init__(warmup_ite)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma_and_weight(self, rnd_shape, device):
        t = 1 + torch.rand(rnd_shape, device=device) * (self.epsilon_t - 1)
        sigma = schedules.vp_sigma(t, self.beta_d, self.beta_min, dtype=torch.float32)
        return sigma, 1 / sigma ** 2


@persistence.persistent_class
class VELoss(_DenoisingLoss):
    """Variance-exploding loss: ln σ uniform on [ln σ_min, ln σ_max], weight 1/σ²."""

    def __init__(self,
        sigma_min   = 0.02,     # Smallest noise level drawn.
        sigma_max   = 100,      # Largest noise level drawn.
        warmup_ite  = None,     # FDM weight warm-up length in optimizer steps; None = off.
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}')
        super().__init__(warmup_ite)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sigma_and_weight(self, rnd_shape, device):
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(rnd_shape, device=device)
        return sigma, 1 / sigma ** 2


@persistence.persistent_class
class EDMLoss(_DenoisingLoss):
    """EDM loss: ln σ ~ N(P_mean, P_std²), weight (σ² + σ_data²)/(σ·σ_data)²."""

    def __init__(self,
        P_mean      = -1.2,     # Mean of ln σ.
        P_std       = 1.2,      # Standard deviation of ln σ.
        sigma_data  = 0.5,      # Standard deviation of the training data.
        warmup_ite  = None,     # FDM weight warm-up length in optimizer steps; None = off.
    ):
        if not P_std > 0 or not sigma_data > 0:
            raise ValueError(f'P_std and sigma_data must be positive, got P_std={P_std!r}, sigma_data={sigma_data!r}')
        super().__init__(warmup_ite)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sigma_and_weight(self, rnd_shape, device):
        sigma = (torch.randn(rnd_shape, device=device) * self.P_std + self.P_mean).exp()
        return sigma, (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
