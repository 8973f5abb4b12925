"""The preconditioners of EDM and FDM around the U-Nets (docs/design.md#preconditioners).

Parameter and buffer names match the published checkpoints exactly, so their state_dicts load by name.
The FDM input scaling s(σ) is one piece (`FDMInputScaling`) composed with the VP, VE and EDM baselines.
The layers and U-Nets live in `training.layers` and `training.unets`; the names that published pickles and
train.py refer to stay importable from here.
"""

import torch

from torch_utils import ops
from torch_utils import persistence
from training import schedules
from training.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock  # noqa: F401
from training.unets import ARCH_PRESETS, INNER_NETWORKS, DhariwalUNet, SongUNet, check_choice  # noqa: F401

# Preconditioner names used on the command line, mapped to their classes' dotted paths.
PRECONDITIONERS = {
    'vp':      'training.networks.VPPrecond',
    've':      'training.networks.VEPrecond',
    'iddpm':   'training.networks.iDDPMPrecond',
    'edm':     'training.networks.EDMPrecond',
    'fdm_vp':  'training.networks.FDM_VPPrecond',
    'fdm_ve':  'training.networks.FDM_VEPrecond',
    'fdm_edm': 'training.networks.FDM_EDMPrecond',
}


# Preconditioners: D(x) = c_skip·x + c_out·F(c_in·x, c_noise, labels).

class Precond(torch.nn.Module):
    """Shared input handling of all preconditioners; subclasses define `coefficients(sigma)`."""

    # Memory layout of the inner network: True = channels-last, False = channels-first, None = the device's faster
    # one (torch_utils.ops.memory_format). Set it on an instance to choose (e.g. for CUDA benchmarks).
    channels_last = None

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_out_channels=None, **model_kwargs):
        check_choice('model_type', model_type, set(INNER_NETWORKS))
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = INNER_NETWORKS[model_type](
            img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim,
            out_channels=model_out_channels or img_channels, **model_kwargs)

    def coefficients(self, sigma):
        """Return (c_skip, c_out, c_in, c_noise) for σ of shape [N,1,1,1]."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = ops.half_dtype(x.device) if self.use_fp16 and not force_fp32 else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = ops.memory_format((c_in * x).to(dtype), self.channels_last)
        x_in = ops.batch_of_one_as_two(x_in, batch_invariant=not self.training)
        F_x = self.model(x_in, c_noise.flatten(), class_labels=class_labels, **model_kwargs)[:len(x)]
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPSchedule:
    """The VP noise schedule σ(t) and its inverse with this object's β_d, β_min, in float32 as published."""

    def sigma(self, t):
        return schedules.vp_sigma(t, self.beta_d, self.beta_min, dtype=torch.float32)

    def sigma_inv(self, sigma):
        return schedules.vp_sigma_inv(sigma, self.beta_d, self.beta_min, dtype=torch.float32)


@persistence.persistent_class
class VPPrecond(VPSchedule, Precond):
    """Variance preserving preconditioning (Song et al., DDPM++)."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim     = 0,              # Number of class labels; 0 = unconditional.
        use_fp16      = False,          # Run the inner network in float16 on CUDA?
        beta_d        = 19.9,           # Extent of the noise level schedule.
        beta_min      = 0.1,            # Initial slope of the noise level schedule.
        M             = 1000,           # Original number of timesteps of the DDPM formulation.
        epsilon_t     = 1e-5,           # Smallest t of the schedule.
        model_type    = 'SongUNet',     # Inner network class.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return 1, -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)


@persistence.persistent_class
class VEPrecond(Precond):
    """Variance exploding preconditioning (Song et al., NCSN++)."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim     = 0,              # Number of class labels; 0 = unconditional.
        use_fp16      = False,          # Run the inner network in float16 on CUDA?
        sigma_min     = 0.02,           # Smallest supported noise level.
        sigma_max     = 100,            # Largest supported noise level.
        model_type    = 'SongUNet',     # Inner network class.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(Precond):
    """Improved DDPM preconditioning (Nichol & Dhariwal); σ is snapped to the M discrete levels u_j."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim     = 0,              # Number of class labels; 0 = unconditional.
        use_fp16      = False,          # Run the inner network in float16 on CUDA?
        C_1           = 0.001,          # Lower bound of the ratio ᾱ(j−1)/ᾱ(j).
        C_2           = 0.008,          # Offset of the cosine schedule.
        M             = 1000,           # Number of discrete levels.
        model_type    = 'DhariwalUNet', # Inner network class.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_out_channels=img_channels * 2, **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = schedules.iddpm_levels(C_1, C_2, M, dtype=torch.float32)
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, c_in, c_noise

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@persistence.persistent_class
class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022)."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim     = 0,              # Number of class labels; 0 = unconditional.
        use_fp16      = False,          # Run the inner network in float16 on CUDA?
        sigma_min     = 0,              # Smallest supported noise level.
        sigma_max     = float('inf'),   # Largest supported noise level.
        sigma_data    = 0.5,            # Expected standard deviation of the training data.
        model_type    = 'SongUNet',     # Inner network class.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

# FDM: the baseline preconditioners with c_in replaced by the momentum kernel s(σ).

# The published VE-FDM code ignored fdm_multiplier and always scaled with m = 1 (docs/compatibility.md#ve-fdm-multiplier): its weights and its
# recipe are for m = 1.
PUBLISHED_VE_FDM_MULTIPLIER = 1.0
PUBLISHED_FDM_MULTIPLIER_DEFAULT = 1.0  # the published classes' default m; their train.py always passed m explicitly

class FDMInputScaling:
    """Mix-in that swaps the baseline's c_in for the FDM kernel; the baseline supplies σ_min, σ_max."""

    def init_fdm(self, fdm_beta_d, fdm_beta_min, fdm_multiplier):
        self.fdm_beta_d = fdm_beta_d
        self.fdm_beta_min = fdm_beta_min
        self.fdm_multiplier = fdm_multiplier

    def coefficients(self, sigma):
        c_skip, c_out, _, c_noise = super().coefficients(sigma)
        c_in = schedules.fdm_input_scale(sigma, self.sigma_min, self.sigma_max, self.fdm_beta_d, self.fdm_beta_min, self.fdm_multiplier)
        return c_skip, c_out, c_in, c_noise


@persistence.persistent_class
class FDM_VPPrecond(FDMInputScaling, VPPrecond):
    """VP preconditioning with the FDM momentum input scaling."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim      = 0,             # Number of class labels; 0 = unconditional.
        use_fp16       = False,         # Run the inner network in float16 on CUDA?
        beta_d         = 19.9,          # Extent of the VP noise level schedule.
        beta_min       = 0.1,           # Initial slope of the VP noise level schedule.
        M              = 1000,          # Original number of timesteps of the DDPM formulation.
        epsilon_t      = 1e-5,          # Smallest t of the schedule.
        model_type     = 'SongUNet',    # Inner network class.
        fdm_beta_d     = 19.9,          # β_d of the FDM kernel.
        fdm_beta_min   = 0.1,           # β_min of the FDM kernel.
        fdm_multiplier = 2.0,           # m of the FDM kernel.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, beta_d, beta_min, M, epsilon_t, model_type, **model_kwargs)
        self.init_fdm(fdm_beta_d, fdm_beta_min, fdm_multiplier)


@persistence.persistent_class
class FDM_VEPrecond(FDMInputScaling, VEPrecond):
    """VE preconditioning with the FDM momentum input scaling (m honoured; published nets used m = 1)."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim      = 0,             # Number of class labels; 0 = unconditional.
        use_fp16       = False,         # Run the inner network in float16 on CUDA?
        sigma_min      = 0.02,          # Smallest supported noise level.
        sigma_max      = 100,           # Largest supported noise level.
        model_type     = 'SongUNet',    # Inner network class.
        fdm_beta_d     = 19.9,          # β_d of the FDM kernel.
        fdm_beta_min   = 0.1,           # β_min of the FDM kernel.
        fdm_multiplier = PUBLISHED_VE_FDM_MULTIPLIER, # m of the FDM kernel.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, model_type, **model_kwargs)
        self.init_fdm(fdm_beta_d, fdm_beta_min, fdm_multiplier)


@persistence.persistent_class
class FDM_EDMPrecond(FDMInputScaling, EDMPrecond):
    """EDM preconditioning with the FDM momentum input scaling."""

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of colour channels.
        label_dim      = 0,             # Number of class labels; 0 = unconditional.
        use_fp16       = False,         # Run the inner network in float16 on CUDA?
        sigma_min      = 0.002,         # Smallest noise level (also the kernel's t = 0).
        sigma_max      = 80,            # Largest noise level (also the kernel's t = 1).
        sigma_data     = 0.5,           # Expected standard deviation of the training data.
        model_type     = 'SongUNet',    # Inner network class.
        fdm_beta_d     = 19.9,          # β_d of the FDM kernel.
        fdm_beta_min   = 0.1,           # β_min of the FDM kernel.
        fdm_multiplier = 2.0,           # m of the FDM kernel.
        **model_kwargs,                 # Passed to the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, **model_kwargs)
        self.init_fdm(fdm_beta_d, fdm_beta_min, fdm_multiplier)
