"""What the machine's arithmetic can do and what a training step needs: measured GFLOP/s of the kernels a step is
made of, in float32 and bfloat16, and the FLOP per image of a training step, whose ratio is a floor on sec/kimg.

The floor assumes every FLOP runs at the speed of one large kernel; the step's other work (normalisation,
elementwise operations, the optimizer) and smaller, less efficient products put real runs above it.
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from training import launch

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def _median_seconds(fn, repeats, min_seconds=0.2):
    """Median wall time of one call of `fn` over `repeats` rounds, each round calling it until `min_seconds` pass."""
    fn()  # warm-up: first-call setup (oneDNN primitive creation) is not what we measure
    times = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        times.append(elapsed / calls)
    return statistics.median(times)


def kernel_cases(size=2048, channels=128, resolution=32, batch=32):
    """{name: (FLOP per call or None, make(dtype) → a function to time)} for the kernels a step is made of."""
    def matmul(dtype):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        return lambda: torch.mm(a, b)

    def image(dtype):
        return torch.randn(batch, channels, resolution, resolution).to(dtype).contiguous(memory_format=torch.channels_last)

    def conv(dtype):
        x, w = image(dtype), torch.randn(channels, channels, 3, 3, dtype=dtype)
        return lambda: F.conv2d(x, w, padding=1)

    def group_norm(dtype):
        x = image(dtype)
        weight, bias = torch.ones(channels, dtype=dtype), torch.zeros(channels, dtype=dtype)
        return lambda: F.group_norm(x, 32, weight, bias)

    return {
        f'matmul {size}x{size}':                        (2 * size ** 3, matmul),
        f'conv 3x3 {channels}ch {resolution}x{resolution} batch {batch}': (2 * batch * resolution ** 2 * channels ** 2 * 9, conv),
        f'group_norm {channels}ch {resolution}x{resolution} batch {batch}': (None, group_norm),
    }


def measure_kernels(precisions=('fp32', 'bf16'), repeats=3, cases=None):
    """Rows {name, precision, ms, gflops} for every kernel case and precision, the precisions alternating per round."""
    cases = cases or kernel_cases()
    rows = []
    for name, (flop, make) in cases.items():
        fns = {precision: make(DTYPES[precision]) for precision in precisions}
        seconds = {precision: [] for precision in precisions}
        for _ in range(repeats):  # alternate, so that a slow phase of a shared machine hits both
            for precision in precisions:
                seconds[precision].append(_median_seconds(fns[precision], repeats=1))
        for precision in precisions:
            sec = statistics.median(seconds[precision])
            rows.append(dict(name=name, precision=precision, ms=sec * 1e3, gflops=flop / sec / 1e9 if flop else None))
    return rows


def matmul_gflops(precisions=('fp32', 'bf16'), repeats=3, size=2048):
    """{precision: GFLOP/s of a size² matmul} on this CPU."""
    flop, make = kernel_cases(size=size)[f'matmul {size}x{size}']
    rows = measure_kernels(precisions, repeats, cases={'matmul': (flop, make)})
    return {row['precision']: row['gflops'] for row in rows}


def training_network(options, resolution, channels, label_dim):
    """The preconditioned network that train.py builds for `options` (train.py option names → values)."""
    opts = dnnlib.EasyDict(launch.DEFAULTS, data=None, device='cpu', **options)
    c = launch.build_config(opts, world_size=1)
    return dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=resolution, img_channels=channels,
                                               label_dim=label_dim)


def training_flop_per_image(options, resolution=32, channels=3, label_dim=0, batch=4):
    """FLOP of the products and convolutions of one training image's forward and backward pass (PyTorch's counter:
    2 per multiply-add); elementwise work and the optimizer are not counted."""
    net = training_network(options, resolution, channels, label_dim).train()
    x = torch.randn(batch, channels, resolution, resolution)
    sigma = torch.full([batch], 1.0)
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    with FlopCounterMode(display=False) as counter:
        net(x, sigma, labels).square().mean().backward()
    return counter.get_total_flops() / batch


def sec_per_kimg_floor(flop_per_image, gflops):
    """The sec/kimg that `flop_per_image` would take at `gflops` GFLOP/s."""
    return flop_per_image * 1000 / (gflops * 1e9)
