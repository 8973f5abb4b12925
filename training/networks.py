"""Network architectures and preconditioners of EDM and FDM (docs/design.md#preconditioners, #networks).

Parameter and buffer names match the published checkpoints exactly, so their state_dicts load by name.
The FDM input scaling s(σ) is one piece (`FDMInputScaling`) composed with the VP, VE and EDM baselines.
"""

import math

import numpy as np
import torch
from torch.nn import functional as F

import dnnlib
from torch_utils import persistence
from training import schedules

# Architecture presets used by train.py: keyword arguments of the inner network.
ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

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


def _choice(name, value, allowed):
    """Raise a ValueError naming the constructor argument when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not one of {sorted(allowed)}')

# Building blocks.

def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor with the variance of the named initialisation rule (docs/design.md#initialisation)."""
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'init_mode={mode!r} is not one of xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal')


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer whose fp32 master weights follow the input's dtype."""

    def __init__(self,
        in_features,                    # Number of input features.
        out_features,                   # Number of output features.
        bias        = True,             # Learn an additive bias?
        init_mode   = 'kaiming_normal', # Initialisation rule of weight_init().
        init_weight = 1,                # Scale of the initial weight.
        init_bias   = 0,                # Scale of the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None
        if not self.training and x.device.type == 'cpu' and x.ndim == 2:
            return linear_by_row(x, weight, bias)
        return F.linear(x, weight, bias)


def linear_by_row(x, weight, bias):
    """x·Wᵀ + b as a batch of one-row products, so that no row's rounding depends on the others: on CPUs MKL
    multiplies one row, a few rows and many rows with different kernels, and an image's embedding would depend on
    its batch (docs/compatibility.md#batch-invariance). Rows equal to the first (unconditional sampling) are
    computed once."""
    if len(x) > 1 and torch.equal(x, x[:1].expand_as(x)):
        return linear_by_row(x[:1], weight, bias).expand(len(x), -1)
    rows, weights = x.unsqueeze(1), weight.t().expand(len(x), -1, -1)
    if bias is None:
        return torch.bmm(rows, weights).squeeze(1)
    return torch.baddbmm(bias.expand(len(x), 1, -1), rows, weights).squeeze(1)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional FIR up/downsampling by 2; kernel 0 means resampling only."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        kernel,                         # Kernel size; 0 = no convolution (resample only).
        bias            = True,         # Learn an additive bias?
        up              = False,        # Upsample by 2 before the convolution?
        down            = False,        # Downsample by 2 after the convolution?
        resample_filter = [1, 1],       # 1D low-pass filter of the resampling.
        fused_resample  = False,        # Swap the order of resampling and convolution (NCSN++ residual path).
        init_mode       = 'kaiming_normal', # Initialisation rule of weight_init().
        init_weight     = 1,            # Scale of the initial weight.
        init_bias       = 0,            # Scale of the initial bias.
    ):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be set')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        # The bias goes into the last convolution with weights, saving a separate add (and its backward).
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.up:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if self.down:
            x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        return F.conv2d(x, w, b, padding=w_pad) if w is not None else x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with at least `min_channels_per_group` channels per group."""

    def __init__(self,
        num_channels,                   # Number of channels normalised.
        num_groups             = 32,    # Upper bound on the number of groups.
        min_channels_per_group = 4,     # Fewer groups when the channels would not fill them.
        eps                    = 1e-5,  # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not self.training and x.device.type == 'cpu' and splits_images_by_batch(x):
            # Pad the batch to a multiple of the threads: each thread then sums whole images, as in any other batch.
            pad = -len(x) % torch.get_num_threads()
            padded = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)]) if pad else x
            return F.group_norm(padded, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)[:len(x)]
        return F.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)


def splits_images_by_batch(x):
    """Whether PyTorch's CPU GroupNorm divides this batch's pixels evenly among its threads, cutting an image's sums
    where the batch size puts the cut: channels-last input of at least 1024 pixels per image (its kernel's own
    threshold; channels-first input and smaller images are divided by image and group)."""
    return is_channels_last(x) and x.shape[2] * x.shape[3] >= 1024


def is_channels_last(x):
    """Whether x is a 4-D tensor laid out channels-last and not channels-first, which a tensor of one channel or one
    pixel is as well (PyTorch's kernels then take the channels-first path)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def attention(q, k, v):
    """Softmax attention over positions; q, k, v are [batch·heads, channels, positions].

    softmax(qᵀk/√c)·v with the softmax in float32, as the published networks compute it: reduced-precision
    inputs are promoted. On CUDA the fused kernel; on CPUs two batched products, whose backward pass is ~20%
    cheaper than the fused kernel's fallback there.
    """
    dtype = q.dtype
    if q.device.type == 'cuda':
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).to(dtype)
    # Contiguous operands: given q and v as strided views of qkv, CPU bmm copies them one matrix at a time, in the
    # backward pass too (a quarter of attention's training time).
    q, k, v = q.float().transpose(1, 2).contiguous(), k.float(), v.float().contiguous()
    weights = torch.bmm(q, k * (1 / math.sqrt(k.shape[1]))).softmax(dim=2)
    return torch.bmm(v, weights.transpose(1, 2)).to(dtype)


def dropout(x, p):
    """Training-mode dropout; p is rounded to a multiple of 2⁻¹⁶ on CPUs.

    On CPUs torch draws random numbers one at a time on one thread (its Bernoulli sampler ~3x slower still).
    There the mask compares 16-bit lanes of 64-bit words from numpy's SFC64 generator, seeded by one draw from
    torch's generator (so `torch.manual_seed` and a resumed training state still fix every mask), and is laid
    out like `x`: dropout then costs ~40% less per training step of a small U-Net (9% of it before).
    """
    if x.device.type != 'cpu':
        return F.dropout(x, p=p, training=True)
    seed = int(torch.empty([], dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4)
    lanes = torch.from_numpy(words.view(np.int16)[:x.numel()])  # uniform on [-2¹⁵, 2¹⁵)
    if is_channels_last(x):
        n, c, h, w = x.shape
        lanes = lanes.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        lanes = lanes.view(x.shape)
    mask = torch.where(lanes >= round(p * 65536) - 32768, 1 / (1 - p), 0.0).to(x.dtype)
    return x * mask


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block with timestep embedding and optional self-attention, shared by both U-Nets."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding channels.
        up                = False,      # Upsample by 2?
        down              = False,      # Downsample by 2?
        attention         = False,      # Append a self-attention layer?
        num_heads         = None,       # Attention heads; None = out_channels // channels_per_head.
        channels_per_head = 64,         # Channels per head when num_heads is None.
        dropout           = 0,          # Dropout probability.
        skip_scale        = 1,          # Scale of the residual sums.
        eps               = 1e-5,       # GroupNorm epsilon.
        resample_filter   = [1, 1],     # 1D filter of the resampling.
        resample_proj     = False,      # 1x1 convolution on the resampled skip path?
        adaptive_scale    = True,       # Embedding gives scale and shift (True) or a bias (False).
        init              = dict(),     # Initialisation of most layers.
        init_zero         = dict(init_weight=0), # Initialisation of the last layer of each branch.
        init_attn         = None,       # Initialisation of qkv; None = init.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        # Without autograd (sampling) elementwise results overwrite their inputs: the same values, and no fresh
        # memory whose first write costs a read (0-5% of a CPU forward in paired runs).
        inplace = not torch.is_grad_enabled()
        orig = x
        x = self.conv0(F.silu(self.norm0(x), inplace=inplace))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = self.norm1(x)
            into_x = inplace and torch.result_type(shift, x) == x.dtype  # as in scaled_sum
            x = F.silu(torch.addcmul(shift, x, scale + 1, out=x if into_x else None), inplace=inplace)
        else:
            x = F.silu(self.norm1(x + params), inplace=inplace)

        if self.dropout and self.training:  # skip the no-op mask draw at p = 0 and in eval mode
            x = dropout(x, self.dropout)
        x = scaled_sum(self.conv1(x), self.skip(orig) if self.skip is not None else orig, self.skip_scale, inplace)

        if self.num_heads:
            n, c, h, w = x.shape
            # q, k and v are interleaved with stride 3 along the channels (upstream layout).
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = attention(q, k, v).reshape(n, c, h, w)
            if self.training and x.is_contiguous(memory_format=torch.channels_last):
                # Else every later layer trains channels-first and oneDNN reorders each input (~10% of a CPU step).
                # Sampling was no faster this way in paired runs, and channels-first its later GroupNorms need
                # no padding for batch invariance (GroupNorm.forward).
                a = a.contiguous(memory_format=torch.channels_last)
            x = scaled_sum(self.proj(a), x, self.skip_scale, inplace)
        return x


def scaled_sum(x, y, scale, inplace):
    """(x + y)·scale, written into x when `inplace` and x can hold the result (x must be a fresh tensor)."""
    if inplace and torch.result_type(x, y) == x.dtype:
        return x.add_(y).mul_(scale)
    return (x + y) * scale


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of the noise level (DDPM++, ADM)."""

    def __init__(self,
        num_channels,                   # Output channels (cos half, then sin half).
        max_positions = 10000,          # Longest wavelength.
        endpoint      = False,          # Include the longest wavelength itself?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of the noise level (NCSN++)."""

    def __init__(self,
        num_channels,                   # Output channels (cos half, then sin half).
        scale = 16,                     # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

# Inner networks.

def drop_labels(class_labels, label_dropout, training):
    """Zero each sample's class label with probability `label_dropout` while training (classifier-free guidance)."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ U-Net of Song et al., with the variants of docs/design.md#networks."""

    def __init__(self,
        img_resolution,                 # Image resolution (a power of two).
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        label_dim          = 0,         # Number of class labels; 0 = unconditional.
        augment_dim        = 0,         # Number of augmentation labels; 0 = none.
        model_channels     = 128,       # Base channel count.
        channel_mult       = [1, 2, 2, 2], # Channel multiplier per resolution level.
        channel_mult_emb   = 4,         # Embedding channels = model_channels × this.
        num_blocks         = 4,         # Residual blocks per resolution.
        attn_resolutions   = [16],      # Resolutions with self-attention.
        dropout            = 0.10,      # Dropout probability of the blocks.
        label_dropout      = 0,         # Probability of dropping the class label during training.
        embedding_type     = 'positional', # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise = 1,         # Noise embedding channels = model_channels × this.
        encoder_type       = 'standard', # 'standard', 'skip' or 'residual'.
        decoder_type       = 'standard', # 'standard' or 'skip'.
        resample_filter    = [1, 1],    # 1D filter of the resampling layers.
    ):
        _check_resolution(img_resolution)
        _choice('embedding_type', embedding_type, {'positional', 'fourier'})
        _choice('encoder_type', encoder_type, {'standard', 'skip', 'residual'})
        _choice('decoder_type', decoder_type, {'standard', 'skip'})
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping of noise level, class and augmentation labels to the embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # sin half first
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol."""

    def __init__(self,
        img_resolution,                 # Image resolution (a power of two).
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        label_dim        = 0,           # Number of class labels; 0 = unconditional.
        augment_dim      = 0,           # Number of augmentation labels; 0 = none.
        model_channels   = 192,         # Base channel count.
        channel_mult     = [1, 2, 3, 4], # Channel multiplier per resolution level.
        channel_mult_emb = 4,           # Embedding channels = model_channels × this.
        num_blocks       = 3,           # Residual blocks per resolution.
        attn_resolutions = [32, 16, 8], # Resolutions with self-attention.
        dropout          = 0.10,        # Dropout probability of the blocks.
        label_dropout    = 0,           # Probability of dropping the class label during training.
    ):
        _check_resolution(img_resolution)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping of noise level, augmentation and class labels to the embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


INNER_NETWORKS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}


def _check_resolution(img_resolution):
    if not (isinstance(img_resolution, int) and img_resolution >= 4 and dnnlib.util.is_power_of_two(img_resolution)):
        raise ValueError(f'img_resolution={img_resolution!r} is not a power of two >= 4')

# Preconditioners: D(x) = c_skip·x + c_out·F(c_in·x, c_noise, labels).

class Precond(torch.nn.Module):
    """Shared input handling of all preconditioners; subclasses define `coefficients(sigma)`."""

    # Run the inner network on channels-last tensors? None = on CPUs only, where oneDNN then convolves without
    # reordering each layer's input (~10% faster); set it on an instance to choose (e.g. for CUDA benchmarks).
    channels_last = None

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_out_channels=None, **model_kwargs):
        _choice('model_type', model_type, set(INNER_NETWORKS))
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
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = (c_in * x).to(dtype)
        if self.channels_last if self.channels_last is not None else x.device.type == 'cpu':
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if not self.training and x_in.device.type == 'cpu' and len(x_in) == 1:
            # oneDNN convolves one image with other kernels than several: run it as two (docs/compatibility.md#batch-invariance).
            x_in = torch.cat([x_in, x_in])
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
