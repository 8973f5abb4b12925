"""torch_utils/bf16_kernels.py against torch.nn.functional.group_norm (+ silu) in float32."""

import pytest
import torch
import torch.nn.functional as F

from torch_utils import bf16_kernels


def inputs(channels_last):
    torch.manual_seed(0)
    x = (torch.randn(3, 64, 16, 16) * 3 + 1).requires_grad_()
    weight, bias = (torch.rand(64) + 0.5).requires_grad_(), torch.randn(64).requires_grad_()
    return x, weight, bias, channels_last


def reference(x, weight, bias, silu):
    y = F.group_norm(x, 32, weight, bias, 1e-5)
    return F.silu(y) if silu else y


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('silu', [False, True])
def test_bf16_group_norm_silu_matches_float32_to_bf16_rounding_in_value_and_gradient(channels_last, silu):
    x, weight, bias, _ = inputs(channels_last)
    x16 = x.detach().to(torch.bfloat16)
    if channels_last:
        x16 = x16.contiguous(memory_format=torch.channels_last)
    x16.requires_grad_()
    grad = torch.randn(3, 64, 16, 16)
    expected = reference(x16.detach().float().requires_grad_(), weight, bias, silu)  # the same bf16 input, in float32
    got = bf16_kernels.group_norm_silu(x16, 32, weight, bias, silu=silu)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # one bf16 rounding of the float32 result: within half a bf16 ulp (2^-9 relative), exactly the rounded value
    assert torch.equal(got, expected.detach().to(torch.bfloat16))
    native = reference(x16.detach(), weight.detach().to(torch.bfloat16), bias.detach().to(torch.bfloat16), silu)
    assert (got.float() - expected).abs().mean() <= (native.float() - expected).abs().mean()  # no worse than PyTorch's bf16
    got.backward(grad.to(torch.bfloat16))
    assert weight.grad is not None and weight.grad.dtype == torch.float32  # into the float32 master weights
    reference_x, reference_weight = x16.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    reference(reference_x, reference_weight, bias.detach(), silu).backward(grad.to(torch.bfloat16).float())
    torch.testing.assert_close(x16.grad.float(), reference_x.grad, rtol=2 ** -7, atol=1e-3)  # rounded to bf16 once
    torch.testing.assert_close(weight.grad, reference_weight.grad)


def test_float32_input_is_pytorchs_own_result():
    x, weight, bias, _ = inputs(False)
    assert torch.equal(bf16_kernels.group_norm_silu(x, 32, weight, bias), F.silu(F.group_norm(x, 32, weight, bias, 1e-5)))
