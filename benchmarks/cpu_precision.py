"""float32 against bfloat16 on this CPU: matmul, 3x3 convolution and GroupNorm alone, and the small training config's
step (benchmarks/train_speed.py --config=small), with the CPU model, its bf16 flags and what --precision=auto picks.

    python benchmarks/cpu_precision.py                      # kernels and 3 timed training steps per precision
    python benchmarks/cpu_precision.py --train-steps=0      # kernels only
    python benchmarks/cpu_precision.py --profile=bf16       # also the top operators of the step (torch.profiler)

Measure on an idle machine; each ratio is taken within one run, the precisions alternating.
"""

import pathlib
import sys

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

cpu_runtime.prepare_process()  # before torch loads OpenMP, as train.py does

import torch  # noqa: E402

import dnnlib  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import flops  # noqa: E402
from benchmarks import train_speed  # noqa: E402
from training import precision as precision_lib  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402

# The flags that decide bf16 speed on x86 CPUs (lscpu spells them the same).
BF16_FLAGS = ('avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_fp16', 'avx512_fp16')


def profile_step(precision, steps=3, batch=32, top=20):
    """torch.profiler's table of the top operators by self CPU time over `steps` training steps of the small config
    (forward, backward and the fused Adam step, under autocast as the training loop runs them)."""
    config = train_speed.CONFIGS['small']
    options = dict(config['options'], batch=batch)
    c = flops.launch.build_config(dnnlib.EasyDict(flops.launch.DEFAULTS, data=None, device='cpu', precision=precision, **options), world_size=1)
    net = flops.training_network(dict(options, precision=precision), config['resolution'], config['channels'], 0).train()
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    autocast_dtype = PRECISIONS[c.precision].train_autocast
    images = torch.rand(batch, config['channels'], config['resolution'], config['resolution']) * 2 - 1

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_fn(net=net, images=images)
        loss.sum().div(batch).backward()
        optimizer.step()

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    return profiler.key_averages().table(sort_by='self_cpu_time_total', row_limit=top)


def cpu_description():
    """The CPU model, its bf16-related flags, PyTorch's CPU capability and what --precision=auto picks here."""
    flags = precision_lib.cpu_flags()
    auto, reason = precision_lib.resolve_precision(precision_lib.AUTO, 'cpu')
    return dict(cpu=common.machine_description()['cpu'], threads=torch.get_num_threads(),
                bf16_flags=[flag for flag in BF16_FLAGS if flag in flags], torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                auto=auto, auto_reason=reason)


@click.command()
@click.option('--repeats',     help='Rounds per kernel and precision (median)', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--train-steps', help='Timed training steps per precision (0 = kernels only)', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--matmul-size', help='Side of the square matmul', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--channels',    help='Channels of the convolution and GroupNorm (a multiple of 32)', type=click.IntRange(min=32), default=128, show_default=True)
@click.option('--profile',     help='Also profile the small config\'s step in this precision (top operators by self CPU time)', type=click.Choice(['fp32', 'bf16']))
@click.option('--threads',     help='CPU threads of torch  [default: torch\'s choice]', type=click.IntRange(min=1))
@click.option('--json', 'json_path', help='Also write the results to this JSON file', type=click.Path(dir_okay=False))
def main(repeats, train_steps, matmul_size, channels, profile, threads, json_path):
    """Print fp32 and bf16 speed of the kernels of a training step and of the step itself on this CPU."""
    if threads is not None:
        torch.set_num_threads(threads)
    description = cpu_description()
    for key, value in description.items():
        print(f'{key:<22} {value}')
    if channels % 32:
        raise click.BadParameter(f'{channels} is not a multiple of 32 (GroupNorm\'s groups)', param_hint='--channels')
    kernels = flops.measure_kernels(repeats=repeats, cases=flops.kernel_cases(size=matmul_size, channels=channels))
    rows = []
    for fp32, bf16 in zip(kernels[0::2], kernels[1::2]):
        rows.append([fp32['name'], fp32['ms'], bf16['ms'], fp32['gflops'], bf16['gflops'], fp32['ms'] / bf16['ms']])
    train = {}
    if train_steps:
        for precision in ('fp32', 'bf16'):
            train[precision] = train_speed.run_benchmark('small', 'cpu', train_steps, None, None, precision, False, workers=0)
        rows.append(['training step, small config (sec/kimg)', train['fp32']['sec_per_kimg'], train['bf16']['sec_per_kimg'],
                     None, None, train['fp32']['sec_per_kimg'] / train['bf16']['sec_per_kimg']])
    print()
    print(common.markdown_table(['kernel', 'fp32 ms', 'bf16 ms', 'fp32 GFLOP/s', 'bf16 GFLOP/s', 'bf16 speed-up'], rows,
                                digits=[None, 2, 2, 0, 0, 2]))
    if profile is not None:
        print(f'\nProfile of three {profile} training steps of the small config (batch 32):')
        print(profile_step(profile))
    if json_path is not None:
        common.write_json(json_path, dict(machine=common.machine_description(), cpu=description, kernels=kernels,
                                          train={key: value for key, value in train.items()}))


if __name__ == '__main__':
    main()
