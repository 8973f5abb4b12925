"""The inner networks: the DDPM++/NCSN++ U-Net of Song et al. and the ADM U-Net of Dhariwal & Nichol
(docs/design.md#networks), and the architecture presets of train.py."""

import numpy as np
import torch
from torch.nn import functional as F

import dnnlib
from torch_utils import persistence
from training.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

# Architecture presets used by train.py: keyword arguments of the inner network.
ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}


def check_choice(name, value, allowed):
    """Raise a ValueError naming the constructor argument when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not one of {sorted(allowed)}')


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
        check_choice('embedding_type', embedding_type, {'positional', 'fourier'})
        check_choice('encoder_type', encoder_type, {'standard', 'skip', 'residual'})
        check_choice('decoder_type', decoder_type, {'standard', 'skip'})
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
