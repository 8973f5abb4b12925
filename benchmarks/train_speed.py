"""Training speed (sec/kimg) and peak memory of a named train.py configuration.

Runs what `train.py` runs (`training.launch.run`) on a synthetic dataset of the config's shape: one warm-up
step (tick 0), then `--steps` timed steps (tick 1), and reads the timing from that tick's `stats.jsonl` entry.

    python benchmarks/train_speed.py                        # CIFAR-10 DDPM++ (batch 16 on CPU, 512 on GPU)
    python benchmarks/train_speed.py --config=small --steps=3
"""

import json
import os
import pathlib
import sys
import tempfile

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

# Before torch loads OpenMP, as train.py does: the settings a user of train.py gets.
cpu_runtime.prepare_process()

import torch  # noqa: E402

import dnnlib  # noqa: E402  (the repository root must be on the path first)
from torch_utils import distributed  # noqa: E402
from benchmarks import common  # noqa: E402
from training import launch  # noqa: E402
from training.precision import AUTO, TRAINING_PRECISIONS  # noqa: E402

# Named configurations: dataset shape, train.py options (names → values), and the batch used on each device type.
CONFIGS = {
    'cifar10-ddpmpp': dict(
        resolution  = 32,
        channels    = 3,
        num_classes = 10,
        options     = dict(cond=True, arch='ddpmpp', precond='fdm_edm', warmup_ite=200),
        batch       = dict(cpu=16, cuda=512),
        batch_gpu   = dict(cpu=None, cuda=128),
    ),
    'small': dict(                  # the configuration benchmarks/compare_published.py runs side by side
        resolution  = 32,
        channels    = 3,
        num_classes = 0,
        options     = dict(precond='fdm_edm', arch='ddpmpp', cbase=32, cres=[1, 2, 2], augment=0),
        batch       = dict(cpu=32, cuda=32),
        batch_gpu   = dict(cpu=None, cuda=None),
    ),
}


def run_benchmark(config_name, device_type, steps, batch, batch_gpu, precision, compile, workers):
    """Train for 1 + `steps` steps and return the timed tick's statistics."""
    config = CONFIGS[config_name]
    batch = batch or config['batch'][device_type]
    batch_gpu = batch_gpu or config['batch_gpu'][device_type]
    with tempfile.TemporaryDirectory(prefix='train_speed_') as tmp:
        data = os.path.join(tmp, 'dataset.zip')
        common.write_synthetic_dataset(data, max(2 * batch, 64), config['resolution'], config['channels'], config['num_classes'])
        options = dict(config['options'], outdir=f'{tmp}/run', nosubdir=True, data=data, device=device_type, seed=0,
                       batch=batch, duration=(1 + steps) * batch / 1e6, tick=steps * batch / 1000, snap=0, dump=0,
                       workers=workers, precision=precision, compile=compile)
        if batch_gpu is not None:
            options['batch_gpu'] = batch_gpu
        distributed.init(device_type)
        try:
            launch.run(dnnlib.EasyDict(launch.DEFAULTS, **options))
        finally:
            distributed.shutdown()
        with open(os.path.join(tmp, 'run', 'stats.jsonl')) as f:
            ticks = [json.loads(line) for line in f]
        with open(os.path.join(tmp, 'run', 'training_options.json')) as f:
            precision = json.load(f)['precision']  # what 'auto' chose
    timed = ticks[-1]
    return dict(
        config          = config_name,
        device          = device_type,
        device_name     = torch.cuda.get_device_name() if device_type == 'cuda' else 'cpu',
        threads         = torch.get_num_threads(),
        batch           = batch,
        batch_gpu       = batch_gpu or batch,
        precision       = precision,
        compile         = compile,
        timed_steps     = steps,
        sec_per_kimg    = timed['Timing/sec_per_kimg']['mean'],
        sec_per_step    = timed['Timing/sec_per_kimg']['mean'] * batch / 1000,
        cpu_sec_per_kimg = timed['Timing/cpu_sec_per_kimg']['mean'],
        peak_cpu_mem_gb = timed['Resources/peak_cpu_mem_gb']['mean'],
        peak_gpu_mem_gb = timed['Resources/peak_gpu_mem_gb']['mean'],
        options         = launch.command_line(options),
    )


@click.command()
@click.option('--config',       help='Named configuration', type=click.Choice(sorted(CONFIGS)), default='cifar10-ddpmpp', show_default=True)
@click.option('--device',       help='Where to train (auto: cuda if present)', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--steps',        help='Timed optimizer steps after one warm-up step', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--batch',        help='Override the config\'s batch size', type=click.IntRange(min=1))
@click.option('--batch-gpu',    help='Override the images per forward pass', type=click.IntRange(min=1))
@click.option('--precision',    help='Arithmetic; auto = bf16 where the device has bf16 matrix units, else fp32', type=click.Choice(TRAINING_PRECISIONS + [AUTO]), default=AUTO, show_default=True)
@click.option('--compile',      help='torch.compile the network', type=bool, default=False, show_default=True)
@click.option('--workers',      help='DataLoader worker processes', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--threads',      help='CPU threads of torch  [default: torch\'s choice]', type=click.IntRange(min=1))
@click.option('--json', 'json_path', help='Also write the result to this JSON file', type=click.Path(dir_okay=False))
def main(config, device, steps, batch, batch_gpu, precision, compile, workers, threads, json_path):
    """Measure sec/kimg and peak memory of one training configuration.

    On a shared CPU, compare `cpu_sec_per_kimg` (CPU time of the training process) as well as wall time.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    result = run_benchmark(config, device, steps, batch, batch_gpu, precision, compile, workers)
    rows = [(key, result[key]) for key in ('config', 'device', 'device_name', 'threads', 'batch', 'batch_gpu',
                                           'precision', 'compile', 'timed_steps', 'sec_per_step', 'sec_per_kimg',
                                           'cpu_sec_per_kimg', 'peak_cpu_mem_gb', 'peak_gpu_mem_gb')]
    print()
    print(f'{"quantity":<16} value')
    print(f'{"-" * 16} {"-" * 24}')
    for key, value in rows:
        print(f'{key:<16} {value:.3f}' if isinstance(value, float) else f'{key:<16} {value}')
    print(json.dumps(result))
    if json_path is not None:
        with open(json_path, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
