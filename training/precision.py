"""The network's arithmetic by name, for training and for sampling: one table, and the run-time choice of 'auto'.

"fp16" means different things in the two, as in the published code: training runs the inner network in
float16 (the network's `use_fp16`), sampling autocasts. Training takes TF32 from its own --tf32 flag.
"bf16" autocasts on CUDA and on CPUs alike, with float32 master weights; "auto" is bf16 where the device has
bfloat16 matrix units (docs/compatibility.md#precision), fp32 elsewhere, for training and sampling alike.
"""

import collections

import torch

Precision = collections.namedtuple('Precision', [
    'sample_tf32',          # Sampling: TF32 convolutions and matmuls on CUDA.
    'sample_autocast',      # Sampling: torch.autocast dtype; None = off.
    'train_use_fp16',       # Training: the network's use_fp16 (float16 inner network on CUDA); None = not offered.
    'train_autocast',       # Training: torch.autocast dtype; None = off.
    'on_cpu',               # Offered on CPUs (sampling; training runs every precision but fp16 as fp32 there).
])

PRECISIONS = {
    'fp32': Precision(False, None,           False, None,           True),  # exact float32: an image is bit-identical whatever its batch
    'tf32': Precision(True,  None,           None,  None,           False), # CUDA default for sampling (~7x faster on an H200)
    'fp16': Precision(True,  torch.float16,  True,  None,           False),
    'bf16': Precision(True,  torch.bfloat16, False, torch.bfloat16, True),
}

AUTO = 'auto'   # bf16 where the device has bfloat16 matrix units, fp32 elsewhere (resolve_precision)
TRAINING_PRECISIONS = [name for name, precision in PRECISIONS.items() if precision.train_use_fp16 is not None]

# x86 CPU flags (as /proc/cpuinfo spells them) of bfloat16 matrix units, fastest first.
CPU_BF16_UNITS = [
    ('AMX-BF16',    {'amx_bf16', 'amx_tile'}),  # tile matrix multiply (Sapphire Rapids and later)
    ('AVX512-BF16', {'avx512_bf16'}),           # bf16 dot products in vector registers (Cooper Lake, Zen 4 and later)
]
CUDA_BF16_MIN_CAPABILITY = (8, 0)               # Ampere: bf16 tensor cores


def default_sampling_precision(device):
    """tf32 on CUDA (what PyTorch's convolutions do by default, as in the published code), fp32 elsewhere."""
    return 'tf32' if torch.device(device).type == 'cuda' else 'fp32'


def parse_cpu_flags(cpuinfo_text):
    """The feature flags of the first processor in /proc/cpuinfo's text (x86 'flags', Arm 'Features')."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
            return set(value.split())
    return set()


def cpu_flags():
    """This machine's CPU flags: from /proc/cpuinfo on Linux, else the few that PyTorch's own CPU probe reports."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = parse_cpu_flags(f.read())
        if flags:
            return flags
    except OSError:
        pass
    probes = dict(avx512_bf16='_is_avx512_bf16_supported', amx_tile='_is_amx_tile_supported')
    flags = {flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}
    return flags | ({'amx_bf16'} if 'amx_tile' in flags else set())  # PyTorch probes AMX as a whole


def cpu_bf16_units(flags):
    """The name of the fastest bfloat16 matrix unit among `flags` (CPU_BF16_UNITS), or None."""
    return next((name for name, required in CPU_BF16_UNITS if required <= set(flags)), None)


def bf16_matrix_units(device):
    """What gives `device` fast bfloat16 products, in words ('AMX-BF16', 'compute capability 9.0'), or None.

    On CPUs the bf16 convolutions and matmuls are oneDNN's, which uses these units when present.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        capability = torch.cuda.get_device_capability(device)
        return f'compute capability {capability[0]}.{capability[1]}' if capability >= CUDA_BF16_MIN_CAPABILITY else None
    if device.type == 'cpu' and torch.backends.mkldnn.is_available():
        return cpu_bf16_units(cpu_flags())
    return None


def resolve_precision(precision, device):
    """(precision, reason): 'auto' becomes bf16 or fp32 on `device`, with the reason in words; other precisions pass
    through. Measured on CPUs with AVX512-BF16 alone (no AMX), bf16 trained 1.64x and sampled 1.46x as fast as the
    published fp32 code, against 1.2x for our fp32 (benchmarks/results/README.md)."""
    if precision != AUTO:
        return precision, 'as given'
    device = torch.device(device)
    units = bf16_matrix_units(device)
    if units is None:
        if device.type == 'cpu':
            return 'fp32', 'this CPU has no bf16 matrix units (flags amx_bf16 or avx512_bf16)'
        return 'fp32', f'no bf16 matrix units on this {device.type} device'
    return 'bf16', f'{device.type} has bf16 matrix units: {units}'


def describe_choice(precision, device):
    """(precision, one line saying what 'auto' chose and why) for the scripts to print; the line is None otherwise."""
    resolved, reason = resolve_precision(precision, device)
    return resolved, (f'Precision auto: {resolved} ({reason})' if precision == AUTO else None)
