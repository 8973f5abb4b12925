"""The network's arithmetic by name, for training and for sampling: one table.

"fp16" means different things in the two, as in the published code: training runs the inner network in
float16 (the network's `use_fp16`), sampling autocasts. Training takes TF32 from its own --tf32 flag.
"""

import collections

import torch

Precision = collections.namedtuple('Precision', [
    'sample_tf32',          # Sampling: TF32 convolutions and matmuls on CUDA.
    'sample_autocast',      # Sampling: torch.autocast dtype; None = off.
    'train_use_fp16',       # Training: the network's use_fp16 (float16 inner network on CUDA); None = not offered.
    'train_autocast',       # Training: torch.autocast dtype; None = off.
])

PRECISIONS = {
    'fp32': Precision(False, None,           False, None),           # exact float32: an image is bit-identical whatever its batch
    'tf32': Precision(True,  None,           None,  None),           # CUDA default for sampling (~7x faster on an H200)
    'fp16': Precision(True,  torch.float16,  True,  None),
    'bf16': Precision(True,  torch.bfloat16, False, torch.bfloat16),
}

TRAINING_PRECISIONS = [name for name, precision in PRECISIONS.items() if precision.train_use_fp16 is not None]


def default_sampling_precision(device):
    """tf32 on CUDA (what PyTorch's convolutions do by default, as in the published code), fp32 elsewhere."""
    return 'tf32' if torch.device(device).type == 'cuda' else 'fp32'
