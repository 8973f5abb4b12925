"""Sampling images from a network: the seed → RNG rule, latents and labels, the network's precision, guidance,
and the loop that runs a solver of training/solvers.py over a batch of seeds.
"""

import contextlib

import torch

from training import solvers
from training.precision import AUTO, PRECISIONS, default_sampling_precision, resolve_precision

# The seed → RNG rule (docs/design.md#seeds): defined once, used by generate.py, fid.py and the tests.


class SeedGenerators:
    """One `torch.Generator` per seed, so an image depends on its seed alone, not on its batch or rank."""

    def __init__(self,
        seeds,                  # Iterable of non-negative ints, one image each.
        device,                 # Device the generators (and the drawn tensors) live on.
    ):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def __len__(self):
        return len(self.generators)

    def randn(self, size, dtype=torch.float32):
        """`size` = [len(seeds), ...]; row i is drawn from generator i."""
        return torch.stack([torch.randn(size[1:], generator=g, dtype=dtype, device=self.device) for g in self.generators])

    def randint(self, high, size):
        """`size` = [len(seeds), ...]; integers in [0, high), row i from generator i."""
        return torch.stack([torch.randint(high, size=size[1:], generator=g, device=self.device) for g in self.generators])

    def randn_like(self, x):
        """Per-step noise of stochastic samplers: same shape and dtype as `x`, row i from generator i."""
        return self.randn(x.shape, dtype=x.dtype)


def draw_latents_and_labels(net, seeds, device, class_idx=None):
    """Latents, one-hot labels (None for an unconditional net) and the generators that continue per seed.

    Per seed, in this order: the latent randn([C,H,W]); for a conditional net a class index randint(label_dim),
    drawn even when `class_idx` overrides it so that the step noise of a seed does not depend on `class_idx`.
    """
    if class_idx is not None:
        if not net.label_dim:
            raise ValueError(f'class index {class_idx} given, but the network is unconditional (label_dim 0)')
        if not 0 <= class_idx < net.label_dim:
            raise ValueError(f'class index {class_idx} out of range: the network has {net.label_dim} classes (0-{net.label_dim - 1})')
    generators = SeedGenerators(seeds, device)
    latents = generators.randn([len(generators), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = None
    if net.label_dim:
        class_indices = generators.randint(net.label_dim, size=[len(generators)])
        if class_idx is not None:
            class_indices = torch.full_like(class_indices, class_idx)
        class_labels = torch.eye(net.label_dim, device=generators.device)[class_indices]
    return latents, class_labels, generators


def images_to_uint8(images):
    """[-1, 1] images → uint8 (same layout); the +128 (not 127.5) makes the truncation round to nearest."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@contextlib.contextmanager
def network_precision(device, precision=None):
    """Run the network in `precision` (PRECISIONS or 'auto'; None = default_sampling_precision) and restore torch's
    flags after. Autocast changes the network's products only: the solvers' float64 state stays float64.

    On CUDA only fp32 makes results independent of the batch size: with TF32 or autocast the kernels chosen for a
    batch size can change the last bits (one uint8 level in a few percent of the pixels). On CPUs fp32 and bf16
    both are (docs/compatibility.md#batch-invariance).
    """
    device = torch.device(device)
    precision, _ = resolve_precision(precision or default_sampling_precision(device), device)
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {list(PRECISIONS) + [AUTO]}, got {precision!r}')
    if device.type != 'cuda':
        if not PRECISIONS[precision].on_cpu:
            raise ValueError(f'precision {precision} is for CUDA devices; use fp32 or bf16 on {device.type}')
        autocast_dtype = PRECISIONS[precision].sample_autocast
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            yield
        return
    allow_tf32, autocast_dtype = PRECISIONS[precision].sample_tf32, PRECISIONS[precision].sample_autocast
    saved_flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with torch.autocast('cuda', dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_flags


# Guidance: a denoiser wrapper, so that every sampler runs guided without knowing it.


class GuidanceError(ValueError):
    """A guidance weight or guiding network that cannot be used with the network; `option` names the flag at fault."""

    def __init__(self, message, option):
        super().__init__(message)
        self.option = option


def trained_label_dropout(net):
    """The label-dropout probability a (preconditioned) network was trained with; 0 when it records none."""
    return float(getattr(getattr(net, 'model', net), 'label_dropout', 0) or 0)


class GuidedDenoiser(torch.nn.Module):
    """D_guide + w·(D − D_guide) with the same interface as `net` (the call and the attributes samplers read).

    Classifier-free guidance (Ho & Salimans 2022) when `gnet` is None: D_guide is `net` itself given the all-zero
    label that label dropout trains, evaluated in the same batched call as the conditional D. Autoguidance
    (Karras et al. 2024) otherwise: D_guide is `gnet`, a weaker model of the same data and conditioning.
    """

    def __init__(self,
        net,                    # The main denoiser D(x; σ, labels).
        guidance,               # The weight w; 1 gives D (but use `guided_denoiser`, which then returns `net` itself).
        gnet=None,              # Guiding network for autoguidance; None = classifier-free guidance.
    ):
        super().__init__()
        self.net, self.gnet, self.guidance = net, gnet, float(guidance)
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        if self.gnet is not None:
            denoised = self.net(x, sigma, class_labels, **kwargs).to(torch.float64)
            guide = self.gnet(x, sigma, class_labels, **kwargs).to(torch.float64)
        else:
            sigma = torch.as_tensor(sigma, device=x.device)
            both = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]) if sigma.ndim else sigma,
                            torch.cat([class_labels, torch.zeros_like(class_labels)]), **kwargs).to(torch.float64)
            denoised, guide = both.chunk(2)
        return guide + self.guidance * (denoised - guide)  # exactly `guide` when D == D_guide


def guided_denoiser(net, guidance=1, gnet=None):
    """`net` guided with weight `guidance`: classifier-free, or autoguidance by `gnet`; `net` itself when the weight
    is 1, so that unguided sampling stays exactly what it was. Raises GuidanceError for combinations that cannot work."""
    if gnet is not None:
        for name in ('img_resolution', 'img_channels', 'label_dim'):
            if getattr(gnet, name) != getattr(net, name):
                raise GuidanceError(f'the guiding network has {name} {getattr(gnet, name)}, the network '
                                    f'{getattr(net, name)}; they must match', '--gnet')
    if guidance == 1:
        return net
    if gnet is None:
        if not net.label_dim:
            raise GuidanceError(f'{guidance:g} needs a class-conditional network trained with label dropout (or --gnet '
                                f'for autoguidance); this one is unconditional', '--guidance')
        if not trained_label_dropout(net):
            raise GuidanceError(f'{guidance:g} needs a network trained with label dropout (train.py --label_dropout), '
                                f'which this one was not; use --gnet for autoguidance', '--guidance')
    return GuidedDenoiser(net, guidance, gnet)


class NonFiniteImagesError(ValueError):
    """A sampler produced NaN or infinite values: a network with non-finite weights or extreme sampler options."""


@torch.inference_mode()
def generate_images(net, seeds, sampler_name, sampler_kwargs, device, class_idx=None, precision=None):
    """uint8 images [len(seeds), C, H, W] on `device` for one batch of seeds; image i depends on seeds[i] only
    (bit for bit on the CPU, and on CUDA with precision 'fp32'; see `network_precision`)."""
    if sampler_name not in solvers.SAMPLERS:
        raise ValueError(f'unknown sampler {sampler_name!r}; expected one of {list(solvers.SAMPLERS)}')
    with network_precision(device, precision):
        latents, class_labels, generators = draw_latents_and_labels(net, seeds, device, class_idx)
        images = solvers.SAMPLERS[sampler_name](net, latents, class_labels, randn_like=generators.randn_like, **sampler_kwargs)
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):  # NaN would become a black image and inf a white one: one check per batch
        bad_seeds = [int(seed) for seed, ok in zip(seeds, finite.tolist()) if not ok]
        raise NonFiniteImagesError(f'the sampler produced NaN or infinite values for {len(bad_seeds)} of '
                                   f'{len(finite)} images (seeds {", ".join(map(str, bad_seeds[:5]))}'
                                   f'{", ..." if len(bad_seeds) > 5 else ""}); a network with non-finite weights or '
                                   f'sampler options beyond its range?')
    return images_to_uint8(images)
