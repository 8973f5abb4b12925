"""training/precision.py: the run-time detection of bf16 matrix units and what --precision=auto chooses."""

import pytest
import torch

from training import precision as precision_lib

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bogomips\t: 4000

processor\t: 1
flags\t\t: fpu sse2
"""


def test_cpu_flags_are_read_from_the_first_processor():
    assert precision_lib.parse_cpu_flags(CPUINFO) == {'fpu', 'sse2', 'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'amx_int8'}
    assert precision_lib.parse_cpu_flags('Features\t: fp asimd bf16 sve\n') == {'fp', 'asimd', 'bf16', 'sve'}
    assert precision_lib.parse_cpu_flags('') == set()


@pytest.mark.parametrize('flags, units', [
    ({'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'}, 'AMX-BF16'),
    ({'avx512f', 'avx512_bf16'}, 'AVX512-BF16'),
    ({'avx512f', 'amx_tile'}, None),            # tiles without their bf16 instructions
    ({'avx2', 'fma'}, None),
])
def test_fastest_bf16_unit_is_named(flags, units):
    assert precision_lib.cpu_bf16_units(flags) == units


def test_detection_agrees_with_pytorchs_own_cpu_probe():
    # A second implementation: PyTorch's cpuinfo-based probe of the same instructions.
    has_units = precision_lib.bf16_matrix_units('cpu') is not None
    assert has_units == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize('flags, expected', [
    ({'avx512_bf16'}, 'bf16'), ({'amx_bf16', 'amx_tile', 'avx512_bf16'}, 'bf16'), ({'amx_bf16'}, 'fp32'), ({'avx2'}, 'fp32'),
])
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_matrix_units(monkeypatch, flags, expected):
    monkeypatch.setattr(precision_lib, 'cpu_flags', lambda: flags)
    chosen, line = precision_lib.describe_choice('auto', 'cpu')
    assert chosen == expected
    assert line.startswith(f'Precision auto: {expected} (') and '\n' not in line


@pytest.mark.parametrize('given', ['fp32', 'bf16', 'tf32', 'fp16'])
def test_explicit_precisions_pass_through_without_a_line(given):
    assert precision_lib.describe_choice(given, 'cpu') == (given, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_auto_on_cuda_follows_the_compute_capability():
    expected = 'bf16' if torch.cuda.get_device_capability() >= (8, 0) else 'fp32'
    assert precision_lib.resolve_precision('auto', 'cuda')[0] == expected
