"""Sampling speed (images/s) and network evaluations per image of each solver, for a named network config.

Times `training.sampling.generate_images` (latents, sampler, uint8 conversion: what generate.py runs per
batch) on a randomly initialised network; the weights do not change the cost. Prints a table and writes JSON.

    python benchmarks/sample_speed.py                              # 32x32 DDPM++ cbase 32, cres 1,2,2, batch 64
    python benchmarks/sample_speed.py --config=cifar10-ddpmpp --solvers=edm,dpm --out=speed.json
"""

import json
import pathlib
import platform
import sys
import time

import click
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import dnnlib  # noqa: E402  (the repository root must be on the path first)
from training import networks, sampling  # noqa: E402
from training.precision import AUTO, PRECISIONS, describe_choice  # noqa: E402

# Named network configurations: preconditioner, architecture preset and the options that override it.
CONFIGS = {
    'ddpmpp-c32': dict(             # the network of benchmarks/compare_published.py (2.7 M parameters)
        precond     = 'fdm_edm',
        arch        = 'ddpmpp',
        resolution  = 32,
        channels    = 3,
        label_dim   = 0,
        overrides   = dict(model_channels=32, channel_mult=[1, 2, 2]),
    ),
    'cifar10-ddpmpp': dict(         # the published CIFAR-10 network (55.7 M parameters)
        precond     = 'fdm_edm',
        arch        = 'ddpmpp',
        resolution  = 32,
        channels    = 3,
        label_dim   = 10,
        overrides   = dict(augment_dim=9),
    ),
}

# Solvers as generate.py names them → (sampler, options).
SOLVERS = {
    'edm': ('edm', {}),
    'euler': ('ablation', dict(solver='euler')),
    'dpm': ('dpm', {}),
    'dpm2m': ('dpm2m', {}),
}


class CountingNet:
    """The network with a count of its calls (one call = one evaluation for the whole batch)."""

    def __init__(self, net):
        self.net, self.num_calls = net, 0

    def __call__(self, *args, **kwargs):
        self.num_calls += 1
        return self.net(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


def build_network(config_name, device):
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(class_name=networks.PRECONDITIONERS[config['precond']],
        img_resolution=config['resolution'], img_channels=config['channels'], label_dim=config['label_dim'],
        **{**networks.ARCH_PRESETS[config['arch']], **config['overrides']})
    return net.eval().requires_grad_(False).to(device)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_solver(net, solver, num_steps, batch, num_batches, device, precision):
    """(images/s, evaluations per image) over `num_batches` timed batches after a 2-step warm-up batch."""
    sampler_name, options = SOLVERS[solver]
    sampling.generate_images(net, range(batch), sampler_name, dict(options, num_steps=2), device, precision=precision)  # warm-up
    counting_net = CountingNet(net)
    synchronize(device)
    start_s = time.perf_counter()
    for batch_index in range(num_batches):
        seeds = range(batch_index * batch, (batch_index + 1) * batch)
        sampling.generate_images(counting_net, seeds, sampler_name, dict(options, num_steps=num_steps), device, precision=precision)
    synchronize(device)
    elapsed_s = time.perf_counter() - start_s
    return batch * num_batches / elapsed_s, counting_net.num_calls // num_batches


@click.command()
@click.option('--config', 'config_name', help='Network configuration', type=click.Choice(list(CONFIGS)), default='ddpmpp-c32', show_default=True)
@click.option('--solvers', help='Comma-separated solvers', metavar='LIST', default=','.join(SOLVERS), show_default=True)
@click.option('--steps', 'num_steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--batch', help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--batches', 'num_batches', help='Timed batches per solver', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--device', help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--precision', help='Network arithmetic; auto = bf16 where the device has bf16 matrix units, else fp32', type=click.Choice(list(PRECISIONS) + [AUTO]), default=AUTO, show_default=True)
@click.option('--out', 'out_path', help='JSON results', metavar='PATH', default='sample_speed.json', show_default=True)
def main(config_name, solvers, num_steps, batch, num_batches, device, precision, out_path):
    """Images/s and evaluations per image of each solver at a fixed step count."""
    solver_names = [name.strip() for name in solvers.split(',') if name.strip()]
    unknown = [name for name in solver_names if name not in SOLVERS]
    if unknown or not solver_names:
        raise click.ClickException(f'--solvers: unknown {unknown}; choose from {list(SOLVERS)}')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    precision, choice = describe_choice(precision, device)
    if choice is not None:
        print(choice)
    net = build_network(config_name, device)
    num_params = sum(param.numel() for param in net.parameters())

    print(f'{config_name}: {num_params:,} parameters, batch {batch}, {num_steps} steps, {device}, {precision}, {torch.get_num_threads()} threads')
    print(f'{"solver":<8} {"NFE":>4} {"images/s":>9} {"s/batch":>8}')
    results = []
    for solver in solver_names:
        images_per_s, nfe = time_solver(net, solver, num_steps, batch, num_batches, device, precision)
        results.append(dict(solver=solver, nfe=nfe, images_per_s=images_per_s, seconds_per_batch=batch / images_per_s))
        print(f'{solver:<8} {nfe:>4} {images_per_s:>9.3f} {batch / images_per_s:>8.2f}', flush=True)

    report = dict(config=config_name, network=CONFIGS[config_name], num_params=num_params, batch=batch,
        num_steps=num_steps, num_batches=num_batches, device=str(device), precision=precision, threads=torch.get_num_threads(),
        torch=torch.__version__, machine=platform.machine(), results=results)
    with dnnlib.util.atomic_write(out_path, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'Wrote {out_path}')


if __name__ == '__main__':
    main()
