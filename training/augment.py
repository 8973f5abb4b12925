"""EDM's non-leaking geometric augmentation: random flips and sub-pixel warps, reported as 9 labels.

Each transform hits an image with probability p (times its own multiplier) and is described in a fixed
9-vector of labels that the network receives (augment_dim = 9); at sampling time it gets none, i.e. zeros,
and so produces un-augmented images: the augmentations do not leak into the samples. Warps run at twice
the resolution, between sym6 wavelet up- and down-sampling, so that they add little aliasing.
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import persistence

# Low-pass filter of Daubechies' symlet 6 (orthonormal: taps sum to √2, squares to 1); docs/design.md#augmentation.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
# Where the filter puts its output: its centroid, i.e. its group delay at low frequencies (≈ 5.1 taps). sym6 is
# not symmetric, and a centre off its delay would shift rotated or mirrored content by twice the error.
SYM6_CENTER = sum(k * tap for k, tap in enumerate(SYM6)) / sum(SYM6)

# The augmentation labels, in the order the network's map_augment expects.
LABEL_NAMES = (
    'xflip', 'yflip', 'scale', 'rotate_cos_minus_1', 'rotate_sin',
    'aniso_cos', 'aniso_sin', 'translate_x', 'translate_y',
)


def _matrices(entries):
    """Stack 2-D homogeneous matrices [N,3,3] from rows of per-sample values (tensors [N] or numbers)."""
    reference = next(value for row in entries for value in row if torch.is_tensor(value))
    rows = [torch.stack([torch.as_tensor(value, dtype=torch.float32, device=reference.device).expand_as(reference)
                         for value in row], dim=-1) for row in entries]
    bottom = torch.tensor([0.0, 0.0, 1.0], device=reference.device).expand(len(reference), 3)
    return torch.stack(rows + [bottom], dim=-2)


def _rotation(angle):
    return _matrices([[angle.cos(), -angle.sin(), 0], [angle.sin(), angle.cos(), 0]])


def _scaling(scale_x, scale_y):
    return _matrices([[scale_x, 0, 0], [0, scale_y, 0]])


def _translation(shift_x, shift_y):
    return _matrices([[1, 0, shift_x], [0, 1, shift_y]])


@persistence.persistent_class
class AugmentPipe:
    """Random flips, scaling, rotation, anisotropic scaling and translation of a batch of images.

    `pipe(images)` returns (augmented images [N,C,H,W] float32, labels [N,9] float32); a label is 0 where
    its transform was not applied. Random numbers come from torch's global RNG on the images' device.
    """

    augment_dim = len(LABEL_NAMES)

    def __init__(self,
        p                   = 1,        # Probability of each transform, scaled by its multiplier below.
        xflip               = 0,        # Multiplier for x-flips; an eligible image is flipped with probability ½.
        yflip               = 0,        # Multiplier for y-flips; an eligible image is flipped with probability ½.
        scale               = 0,        # Multiplier for isotropic scaling.
        rotate_frac         = 0,        # Multiplier for rotation by an arbitrary angle.
        aniso               = 0,        # Multiplier for anisotropic scaling.
        translate_frac      = 0,        # Multiplier for sub-pixel translation.
        scale_std           = 0.2,      # Standard deviation of log2 of the isotropic scale.
        rotate_frac_max     = 1,        # Largest rotation, in half turns.
        aniso_std           = 0.2,      # Standard deviation of log2 of the anisotropic scale.
        aniso_rotate_prob   = 0.5,      # Probability that the anisotropic scaling acts in a rotated frame.
        translate_frac_std  = 0.125,    # Standard deviation of the translation, as a fraction of the image size.
    ):
        if not 0 <= p <= 1:
            raise ValueError(f'augmentation probability p must lie in [0, 1], got {p!r}')
        non_negative = dict(xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                           translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                           aniso_std=aniso_std, translate_frac_std=translate_frac_std)
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f'augmentation option {name} must be non-negative, got {value!r}')
        if not 0 <= aniso_rotate_prob <= 1:
            raise ValueError(f'aniso_rotate_prob must lie in [0, 1], got {aniso_rotate_prob!r}')
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    def __call__(self, images):
        # Geometry in fp32 whatever the caller's autocast: under bf16 the warp matrices and filters lost precision
        # (CPU) or returned bf16 into a float32 batch (CUDA's index_copy failed).
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images)

    def _augment(self, images):
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe expects images [N,C,H,W], got shape {list(images.shape)}')
        num_images, _, height, width = images.shape
        device = images.device
        images = images.to(torch.float32)
        labels = torch.zeros([num_images, len(LABEL_NAMES)], device=device)

        def applied(multiplier):
            return torch.rand([num_images], device=device) < multiplier * self.p

        # Flips move whole pixels: exact, no resampling.
        for column, multiplier, dim in [(0, self.xflip, 3), (1, self.yflip, 2)]:
            if multiplier > 0:
                flip = (torch.randint(2, [num_images], device=device) == 1) & applied(multiplier)
                images = torch.where(flip[:, None, None, None], images.flip(dim), images)
                labels[:, column] = flip.to(torch.float32)

        # Warps compose into one map from output to input pixel coordinates per image.
        output_to_input = torch.eye(3, device=device).repeat(num_images, 1, 1)
        warped = torch.zeros([num_images], dtype=torch.bool, device=device)
        if self.scale > 0:
            log2_scale = torch.randn([num_images], device=device)
            hit = applied(self.scale)
            log2_scale = torch.where(hit, log2_scale, 0)
            scale = torch.exp2(log2_scale * self.scale_std)
            output_to_input = output_to_input @ _scaling(1 / scale, 1 / scale)
            labels[:, 2] = log2_scale
            warped |= hit
        if self.rotate_frac > 0:
            angle = (torch.rand([num_images], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max)
            hit = applied(self.rotate_frac)
            angle = torch.where(hit, angle, 0)
            output_to_input = output_to_input @ _rotation(angle)
            labels[:, 3] = angle.cos() - 1
            labels[:, 4] = angle.sin()
            warped |= hit
        if self.aniso > 0:
            log2_aniso = torch.randn([num_images], device=device)
            frame = (torch.rand([num_images], device=device) * 2 - 1) * math.pi
            hit = applied(self.aniso)
            rotated = torch.rand([num_images], device=device) < self.aniso_rotate_prob
            log2_aniso = torch.where(hit, log2_aniso, 0)
            frame = torch.where(rotated, frame, 0)
            aniso = torch.exp2(log2_aniso * self.aniso_std)
            output_to_input = output_to_input @ _rotation(-frame) @ _scaling(1 / aniso, aniso) @ _rotation(frame)
            # As published: (w, r) and (−w, r + π) share these labels though they stretch along swapped axes.
            labels[:, 5] = log2_aniso * frame.cos()
            labels[:, 6] = log2_aniso * frame.sin()
            warped |= hit
        if self.translate_frac > 0:
            shift = torch.randn([2, num_images], device=device)
            hit = applied(self.translate_frac)
            shift = torch.where(hit, shift, 0)
            output_to_input = output_to_input @ _translation(-shift[0] * (width * self.translate_frac_std),
                                                             -shift[1] * (height * self.translate_frac_std))
            labels[:, 7] = shift[0]
            labels[:, 8] = shift[1]
            warped |= hit

        # Only warped images are resampled, so the others stay bit-exact.
        if warped.any():
            index = warped.nonzero()[:, 0]
            images = images.index_copy(0, index, warp(images[index], output_to_input[index]))
        return images, labels


def warp(images, output_to_input):
    """Resample `images` [N,C,H,W] at output_to_input [N,3,3] (pixel units, origin at the image centre).

    Steps: reflect-pad enough for every image of the batch, upsample 2× with sym6, sample bilinearly on
    the 2× output grid, downsample 2× with sym6. The 2× grid has K − 2 extra samples (K filter taps), and
    its sample k sits at low-resolution position (k − SYM6_CENTER)/2, so that down(up(x)) = x exactly.
    """
    num_images, channels, height, width = images.shape
    device = images.device
    taps = len(SYM6)
    reach = taps // 4  # low-resolution pixels on either side that one filtered sample depends on
    center_x, center_y = (width - 1) / 2, (height - 1) / 2

    # Padding: input area seen by the output area the down-sampling reads (an affine map: corners suffice).
    extent_x, extent_y = center_x + reach, center_y + reach
    corners = torch.tensor([[-extent_x, -extent_y, 1], [extent_x, -extent_y, 1], [extent_x, extent_y, 1],
                            [-extent_x, extent_y, 1]], device=device).T
    seen = output_to_input @ corners
    needed = torch.stack([-seen[:, 0].min() - center_x, seen[:, 0].max() - center_x,
                          -seen[:, 1].min() - center_y, seen[:, 1].max() - center_y]) + reach
    limits = torch.tensor([width - 1, width - 1, height - 1, height - 1], dtype=torch.float32, device=device)
    pad_left, pad_right, pad_top, pad_bottom = [int(v) for v in needed.ceil().clamp(min=0).minimum(limits).tolist()]
    images = F.pad(images, [pad_left, pad_right, pad_top, pad_bottom], mode='reflect')

    # Upsample: zero insertion and √2·sym6 per axis (unit gain for constant images).
    filter_1d = torch.tensor(SYM6, dtype=torch.float32, device=device)
    images = _upsample_width(images, filter_1d * math.sqrt(2))
    images = _upsample_width(images.transpose(2, 3), filter_1d * math.sqrt(2)).transpose(2, 3)
    up_height, up_width = images.shape[2:]

    # Sampling grid: output 2× index → centred output pixels → input pixels → grid_sample's [-1, 1].
    shift = SYM6_CENTER / 2
    index_to_output = torch.tensor([[0.5, 0, -shift - center_x], [0, 0.5, -shift - center_y], [0, 0, 1]],
                                   device=device)
    input_to_normalized = torch.tensor(
        [[4 / up_width, 0, (4 * (center_x + pad_left + shift) + 1) / up_width - 1],
         [0, 4 / up_height, (4 * (center_y + pad_top + shift) + 1) / up_height - 1]], device=device)
    index_to_normalized = input_to_normalized @ output_to_input @ index_to_output  # [N,2,3]
    out_height, out_width = 2 * height + taps - 2, 2 * width + taps - 2
    rows = torch.arange(out_height, dtype=torch.float32, device=device)
    cols = torch.arange(out_width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing='ij')
    indices = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)  # [H2,W2,3]
    grid = torch.einsum('nij,hwj->nhwi', index_to_normalized, indices)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    # Downsample: sym6/√2 per axis with stride 2; lands exactly on the H×W output pixels.
    images = _downsample_width(images, filter_1d / math.sqrt(2))
    return _downsample_width(images.transpose(2, 3), filter_1d / math.sqrt(2)).transpose(2, 3)


def _upsample_width(images, filter_1d):
    """Double the width: zeros between the columns, then full convolution with the filter (K − 2 extra)."""
    num_images, channels, height, width = images.shape
    spread = images.new_zeros([num_images, channels, height, 2 * width - 1])
    spread[..., ::2] = images
    kernel = filter_1d.flip(0).expand(channels, 1, 1, len(filter_1d))  # conv2d correlates; flip to convolve
    return F.conv2d(spread, kernel, padding=(0, len(filter_1d) - 1), groups=channels)


def _downsample_width(images, filter_1d):
    """Halve the width: correlate with the filter at every second column (the adjoint of the upsampling)."""
    channels = images.shape[1]
    return F.conv2d(images, filter_1d.expand(channels, 1, 1, len(filter_1d)), stride=(1, 2), groups=channels)
