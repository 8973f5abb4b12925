"""The layers of the U-Nets (docs/design.md#networks): each forward says the maths and calls torch_utils.ops.

Parameter and buffer names match the published checkpoints. In eval mode the layers ask the ops for
batch-invariant kernels (an image's result does not depend on its batch, docs/compatibility.md#batch-invariance).
"""

import numpy as np
import torch
from torch.nn import functional as F

from torch_utils import ops
from torch_utils import persistence


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
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.linear(x, self.weight.to(x.dtype), bias, batch_invariant=not self.training)


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
        return ops.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps,
                              batch_invariant=not self.training)


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
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(ops.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            # q, k and v are interleaved with stride 3 along the channels (upstream layout).
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = ops.layout_like(ops.attention(q, k, v).reshape(n, c, h, w), x)
            x = (self.proj(a) + x) * self.skip_scale
        return x


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
