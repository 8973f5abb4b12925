"""The kernels that network layers call: one function per operation, its device-specific implementations inside.

A layer says the maths (`ops.linear(x, w, b)`); which kernel computes it is decided here, by the tensor's device
as torch's own operators are, and by two explicit settings that the caller chooses, never by autograd mode:
- `batch_invariant=True` (the layers pass it in eval mode): each image's result does not depend on the other
  images of its batch, to the bit. On CPUs three kernels need help for that (docs/compatibility.md#batch-invariance);
  elsewhere the argument changes nothing.
- the memory layout (`memory_format`): channels-last on CPUs, where oneDNN then convolves without reordering each
  layer's input; a network may choose either explicitly (`Precond.channels_last`).
Every function computes the same values as its torch reference up to float rounding (tests/test_ops.py).
"""

import math

import numpy as np
import torch
from torch.nn import functional as F


def linear(x, weight, bias=None, batch_invariant=False):
    """x·Wᵀ + b (`F.linear`); batch-invariant on CPUs as a batch of one-row products (`linear_by_row`)."""
    if batch_invariant and x.device.type == 'cpu' and x.ndim == 2:
        # In float32 outside autocast: bf16's batched CPU product rounds a row by the batch it sits in.
        with torch.autocast('cpu', enabled=False):
            return linear_by_row(x.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x, weight, bias)


def linear_by_row(x, weight, bias):
    """x·Wᵀ + b as a batch of one-row products, so that no row's rounding depends on the others: on CPUs MKL
    multiplies one row, a few rows and many rows with different kernels. Rows equal to the first (unconditional
    sampling) are computed once."""
    if len(x) > 1 and torch.equal(x, x[:1].expand_as(x)):
        return linear_by_row(x[:1], weight, bias).expand(len(x), -1)
    rows, weights = x.unsqueeze(1), weight.t().expand(len(x), -1, -1)
    if bias is None:
        return torch.bmm(rows, weights).squeeze(1)
    return torch.baddbmm(bias.expand(len(x), 1, -1), rows, weights).squeeze(1)


def group_norm(x, num_groups, weight, bias, eps, batch_invariant=False):
    """`F.group_norm`; batch-invariant on CPUs by padding a batch that the kernel would cut through images."""
    if batch_invariant and x.device.type == 'cpu' and splits_images_by_batch(x):
        # Pad the batch to a multiple of the threads: each thread then sums whole images, as in any other batch.
        # Copies of the last image, each channels-last: torch.cat of an expanded view returns channels-first.
        pad = -len(x) % torch.get_num_threads()
        padded = torch.cat([x] + [x[-1:]] * pad) if pad else x
        return F.group_norm(padded, num_groups=num_groups, weight=weight, bias=bias, eps=eps)[:len(x)]
    return F.group_norm(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps)


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
    """softmax(qᵀk/√c)·v over positions; q, k, v are [batch·heads, channels, positions], the result is v's shape.

    The softmax is in float32, as the published networks compute it: reduced-precision inputs are promoted.
    On CUDA the fused kernel (`F.scaled_dot_product_attention`); on CPUs two batched products, whose backward
    pass is ~20% cheaper than the fused kernel's fallback there.
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


def dropout(x, p, training=True):
    """`F.dropout`: x unchanged unless training with p > 0; on CPUs p is rounded to a multiple of 2⁻¹⁶.

    On CPUs torch draws random numbers one at a time on one thread (its Bernoulli sampler ~3x slower still).
    There the mask compares 16-bit lanes of 64-bit words from numpy's SFC64 generator, seeded by one draw from
    torch's generator (so `torch.manual_seed` and a resumed training state still fix every mask), and is laid
    out like `x`.
    """
    if not (training and p):  # no mask draw at p = 0: the generators stay where they were
        return x
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


def memory_format(x, channels_last=None):
    """x in the layout that the network's layers run in: channels-last when `channels_last`, as it is
    (channels-first) when False; None = the faster one for the device and dtype (`prefers_channels_last`)."""
    if channels_last is None:
        channels_last = prefers_channels_last(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prefers_channels_last(x):
    """Whether a network computing on x runs faster channels-last: on CPUs in float32, where oneDNN then convolves
    without reordering each layer's input (~10% faster). Not in bfloat16 there (x bf16, or autocast to bf16), where
    PyTorch's channels-last GroupNorm is ~5x slower than its channels-first one and made a training step ~40% slower
    (benchmarks/results/README.md); nor on other devices."""
    if x.device.type != 'cpu':
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)
    return not bf16


def layout_like(a, x):
    """`a` laid out as `x` (channels-last or not), so that a layer's output keeps the layout of its input:
    oneDNN would otherwise reorder every later layer's input (~10% of a CPU training step)."""
    return a.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else a


def batch_of_one_as_two(x, batch_invariant=False):
    """x with a single image repeated when `batch_invariant` on CPUs, where oneDNN convolves one image with other
    kernels than several; the caller keeps the first len(x) results."""
    if batch_invariant and x.device.type == 'cpu' and len(x) == 1:
        return torch.cat([x, x])
    return x


def half_dtype(device):
    """The dtype of a network run in float16 (`use_fp16`): float16 on CUDA, float32 elsewhere, where half
    convolutions are slow or missing."""
    return torch.float16 if torch.device(device).type == 'cuda' else torch.float32
