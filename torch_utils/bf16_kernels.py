"""Prototype CPU kernels for bf16 training; torch_utils/ops.py takes over what proves faster in the network.

PyTorch's CPU GroupNorm (+SiLU) on bfloat16 input is slower than on float32, and after the convolutions it is the
largest share of a bf16 training step. `group_norm_silu` is the first candidate: the float32 kernel on a float32
copy, with float32 statistics and one rounding. Alone it is no faster than PyTorch's bf16 kernel (the two casts
cost what float32 saves; benchmarks/results/README.md), so it is not used yet: it is the exact reference (and the
speed to beat) for a fused kernel that reads bf16, keeps float32 statistics and writes bf16 in one pass.
"""

import torch
import torch.nn.functional as F


def group_norm_silu(x, num_groups, weight, bias, eps=1e-5, silu=True):
    """SiLU(GroupNorm(x)) (or GroupNorm alone) of bfloat16 `x` computed in float32 and rounded once to bfloat16;
    other dtypes go to PyTorch's kernels unchanged. `weight` and `bias` may be float32 master weights."""
    if x.dtype != torch.bfloat16:
        y = F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
        return F.silu(y) if silu else y
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)  # still float32: the result is rounded to bfloat16 once, not twice
    return y.to(torch.bfloat16)
