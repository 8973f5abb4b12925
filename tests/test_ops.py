"""torch_utils/ops.py: each kernel against its plain torch reference, and the CPU variants' batch invariance."""

import math

import pytest
import torch
from torch.nn import functional as F

from torch_utils import ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def assert_each_part_equals_the_whole(fn, x, cuts=((0, 1), (1, 3), (3, 6), (5, 6), (0, 5))):
    """fn of every slice of x is, to the bit, that slice of fn(x): an image's result does not depend on its batch."""
    whole = fn(x)
    for start, stop in cuts:
        assert torch.equal(fn(x[start:stop]), whole[start:stop]), (start, stop)


# linear

@pytest.mark.parametrize('batch_invariant', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_linear_is_f_linear(batch_invariant, bias):
    torch.manual_seed(0)
    x, weight = torch.randn(6, 40), torch.randn(24, 40)
    b = torch.randn(24) if bias else None
    torch.testing.assert_close(ops.linear(x, weight, b, batch_invariant=batch_invariant), F.linear(x, weight, b))


@pytest.mark.parametrize('bias', [False, True])
def test_batch_invariant_linear_gives_each_row_the_same_bits_in_any_batch(bias):
    torch.manual_seed(0)
    x, weight = torch.randn(6, 256), torch.randn(512, 256)
    b = torch.randn(512) if bias else None
    assert_each_part_equals_the_whole(lambda rows: ops.linear(rows, weight, b, batch_invariant=True), x)


def test_batch_invariant_linear_of_equal_rows_is_the_first_row_repeated():
    torch.manual_seed(0)
    row, weight, b = torch.randn(1, 64), torch.randn(32, 64), torch.randn(32)
    repeated = ops.linear(row.expand(5, -1), weight, b, batch_invariant=True)
    assert repeated.shape == (5, 32) and torch.equal(repeated, ops.linear(row, weight, b, batch_invariant=True).expand(5, -1))


# group_norm

@pytest.mark.parametrize('batch_invariant', [False, True])
@pytest.mark.parametrize('channels_last', [False, True])
def test_group_norm_is_f_group_norm(batch_invariant, channels_last):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 16, 32, 32) * 2 + 1, torch.rand(16) + 0.5, torch.randn(16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = ops.group_norm(x, 4, weight, bias, 1e-5, batch_invariant=batch_invariant)
    torch.testing.assert_close(got, F.group_norm(x, 4, weight, bias, 1e-5))
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize('threads', [2, 3, 4])
def test_batch_invariant_group_norm_gives_each_image_the_same_bits_in_any_batch(threads):
    # Channels-last with >= 1024 pixels per image is the case that PyTorch's kernel cuts by batch position; with 3
    # or more threads the padding itself must stay channels-last (it once did not, and the bits depended on the batch).
    torch.manual_seed(0)
    x = (torch.randn(6, 32, 32, 32) * 3 + 2).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(32) + 0.5, torch.randn(32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert ops.splits_images_by_batch(x)
        assert_each_part_equals_the_whole(lambda images: ops.group_norm(images, 8, weight, bias, 1e-6, batch_invariant=True), x)
    finally:
        torch.set_num_threads(saved)


def test_only_large_channels_last_images_are_split_by_batch():
    big, small = torch.zeros(2, 8, 32, 32), torch.zeros(2, 8, 16, 16)
    assert not ops.splits_images_by_batch(big)
    assert ops.splits_images_by_batch(big.contiguous(memory_format=torch.channels_last))
    assert not ops.splits_images_by_batch(small.contiguous(memory_format=torch.channels_last))


# attention

def sdpa_reference(q, k, v):
    """softmax(qᵀk/√c)·v by torch's own kernel, on [batch·heads, channels, positions] operands, in float32."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_attention_is_scaled_dot_product_attention_with_a_float32_softmax(dtype):
    torch.manual_seed(0)
    qkv = torch.randn(4, 16, 3, 64).to(dtype)
    q, k, v = qkv.unbind(2)  # strided views, as the U-Nets' interleaved qkv gives them
    got = ops.attention(q, k, v)
    assert got.dtype == dtype and got.shape == v.shape
    torch.testing.assert_close(got.float(), sdpa_reference(q, k, v), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_attention_gradients_are_those_of_the_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 32, requires_grad=True) for _ in range(3))
    expected = torch.autograd.grad(sdpa_reference(q, k, v).square().sum(), [q, k, v])
    got = torch.autograd.grad(ops.attention(q, k, v).square().sum(), [q, k, v])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# dropout

def test_dropout_outside_training_or_at_zero_is_the_identity_and_draws_nothing():
    x = torch.rand(2, 3, 4, 4)
    state = torch.random.get_rng_state()
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0, training=True) is x
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize('channels_last', [False, True])
def test_cpu_dropout_keeps_1_minus_p_and_rescales(channels_last):
    x = torch.rand(16, 8, 32, 32) + 0.5  # never zero, so a zero in the output is a dropped element
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    y = ops.dropout(x, 0.13)
    dropped = y == 0
    n = dropped.numel()
    assert abs(dropped.sum().item() - 0.13 * n) < 5 * math.sqrt(0.13 * 0.87 * n)  # binomial, 5 standard deviations
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.87)
    # Independent of position: each channel and each row of pixels loses about the same share.
    assert dropped.float().mean(dim=(0, 2, 3)).sub(0.13).abs().max() < 0.02
    assert dropped.float().mean(dim=(0, 1, 3)).sub(0.13).abs().max() < 0.03
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    # torch.manual_seed fixes the masks (resume depends on it); the next call draws a new one.
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x, 0.13), y)
    assert not torch.equal(ops.dropout(x, 0.13), y)


def test_cpu_dropout_gradient_is_the_mask():
    x = torch.rand(4, 3, 8, 8).add(0.5).requires_grad_()
    y = ops.dropout(x, 0.5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2)


@needs_cuda
def test_cuda_dropout_is_f_dropout():
    x = torch.rand(4, 3, 8, 8, device='cuda') + 0.5
    torch.manual_seed(5)
    expected = F.dropout(x, p=0.3, training=True)
    torch.manual_seed(5)
    assert torch.equal(ops.dropout(x, 0.3), expected)


# layout, batch of one, precision

def test_memory_format_is_channels_last_on_cpus_unless_chosen():
    x = torch.randn(2, 4, 8, 8)
    assert ops.is_channels_last(ops.memory_format(x))
    assert ops.is_channels_last(ops.memory_format(x, channels_last=True))
    assert ops.memory_format(x, channels_last=False) is x


def test_memory_format_stays_channels_first_for_bf16_on_cpus():
    # PyTorch's channels-last bf16 GroupNorm is ~5x slower than channels-first on CPUs: bf16 runs keep NCHW.
    x = torch.randn(2, 4, 8, 8)
    assert ops.memory_format(x.bfloat16()) is not None and not ops.is_channels_last(ops.memory_format(x.bfloat16()))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert ops.memory_format(x) is x
        assert ops.is_channels_last(ops.memory_format(x, channels_last=True))
    assert ops.is_channels_last(ops.memory_format(x))  # fp32 again once autocast is off


def test_layout_like_follows_the_reference_and_keeps_values():
    a, first = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = first.contiguous(memory_format=torch.channels_last)
    assert ops.layout_like(a, first) is a
    assert ops.is_channels_last(ops.layout_like(a, last)) and torch.equal(ops.layout_like(a, last), a)


def test_a_batch_of_one_runs_as_two_only_when_batch_invariant_on_cpus():
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(ops.batch_of_one_as_two(x, batch_invariant=True), torch.cat([x, x]))
    assert ops.batch_of_one_as_two(x, batch_invariant=False) is x
    assert ops.batch_of_one_as_two(torch.cat([x, x]), batch_invariant=True).shape[0] == 2


def test_half_dtype_is_float16_on_cuda_only():
    assert ops.half_dtype(torch.device('cpu')) == torch.float32
    assert ops.half_dtype('cuda') == torch.float16


def test_batch_invariant_cpu_linear_keeps_float32_under_bf16_autocast():
    # bf16's batched CPU product rounds a row by its batch; the one-row products must not run in it.
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 16), torch.randn(32, 16), torch.randn(32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = ops.linear(x, weight, bias, batch_invariant=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, ops.linear(x, weight, bias, batch_invariant=True))
