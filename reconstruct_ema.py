"""Post-hoc EMA: a network averaged with any σ_rel, combined from the power-EMA profiles a run stored
(train.py --ema_profiles; docs/design.md#post-hoc-ema).

The stored profiles up to the chosen snapshot are combined with the least-squares coefficients of
`training.ema.solve_coefficients`; the result is a network pickle that generate.py and fid.py read like any
snapshot.
"""

import copy
import os

import click

import torch

import dnnlib
from torch_utils import misc
from training import checkpoints
from training import cli
from training import ema as power_ema


def _stored_profiles(run_dir):
    """[(path, kimg in the name, record)] of the run's power-ema-* files (pickle or safetensors, each profile once),
    oldest first."""
    if not os.path.isdir(run_dir):
        raise click.BadParameter(f'{run_dir} is not a directory', param_hint='--run')
    found, seen = [], set()
    for name in sorted(os.listdir(run_dir)):
        match = checkpoints.POWER_EMA_FILE_RE.fullmatch(name)
        if match is None or match.group(0).rsplit('.', 1)[0] in seen:  # --format=both writes each profile twice
            continue
        seen.add(match.group(0).rsplit('.', 1)[0])
        path = os.path.join(run_dir, name)
        try:
            record = checkpoints.load_network(path).get('power_ema')
        except (OSError, ValueError) as err:
            raise click.ClickException(str(err).replace('\n', ' ')) from None
        if not isinstance(record, dict) or not {'std', 'gamma', 'step', 'nimg'} <= set(record):
            raise click.ClickException(f'{path}: records no σ_rel, γ and step of a power-EMA profile')
        found.append((path, int(match.group(1)), record))
    if not found:
        raise click.ClickException(f'--run={run_dir}: no power-ema-* files (train with --ema_profiles=...)')
    return sorted(found, key=lambda item: (item[2]['step'], item[2]['std']))


def _combine(sources, coefficients):
    """The network of the first source with parameters Σ coefficient · parameters (in float64), other pickle
    contents and buffers taken from the newest source."""
    result = None
    sums = None
    for (path, _, _), coefficient in zip(sources, coefficients):
        data = checkpoints.load_network(path)
        if problem := misc.nonfinite_problem(data['ema']):
            raise click.ClickException(f'{path}: {problem}')
        params = dict(data['ema'].named_parameters())
        if sums is None:
            sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
        for name, p in params.items():
            sums[name] += float(coefficient) * p.detach().to(torch.float64)
        result = data
    net = copy.deepcopy(result['ema']).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(sums[name].to(p.dtype))
    result['ema'] = net
    return result


@click.command()
@click.option('--run', 'run_dir', help='Run directory with power-ema-* files', metavar='DIR', type=str, required=True)
@click.option('--std', help=f'σ_rel of the wanted EMA, in (0, {power_ema.MAX_STD:.4f}]', metavar='FLOAT', type=cli.FiniteFloat(), required=True)
@click.option('--kimg', help='Snapshot to reconstruct at  [default: the newest]', metavar='INT', type=click.IntRange(min=0))
@click.option('--dest', help='Network file to write (.safetensors: safetensors, else a pickle)', metavar='PKL|SAFETENSORS', type=str, required=True)
def main(run_dir, std, kimg, dest):
    """Write the network averaged with the power-function EMA of σ_rel --std, at snapshot --kimg.

    \b
    python reconstruct_ema.py --run=training-runs/00000-... --std=0.075 --dest=ema-0.075.pkl
    """
    dnnlib.util.tolerate_undecodable_output()
    try:
        power_ema.check_std(std)
        target_gamma = power_ema.gamma_from_std(std)
    except (ValueError, ArithmeticError) as err:  # a tiny σ_rel overflows γ
        raise click.BadParameter(str(err), param_hint='--std') from None
    if os.path.isdir(dest) or not os.path.basename(dest):
        raise click.BadParameter(f'{dest!r} names a folder, not the .pkl file to write', param_hint='--dest')
    try:
        dnnlib.util.check_writable_folder(os.path.dirname(os.path.abspath(dest)))
    except OSError as err:
        raise click.BadParameter(f'cannot write to {err.filename or dest}: {err.strerror or err}', param_hint='--dest') from None
    stored = _stored_profiles(run_dir)
    kimgs = sorted({item[1] for item in stored})
    kimg = kimgs[-1] if kimg is None else kimg
    if kimg not in kimgs:
        raise click.BadParameter(f'{run_dir} has power-EMA profiles at kimg {", ".join(map(str, kimgs))}, not {kimg}', param_hint='--kimg')
    target_step = max(item[2]['step'] for item in stored if item[1] == kimg)
    sources = [item for item in stored if item[2]['step'] <= target_step]
    coefficients = power_ema.solve_coefficients([item[2]['gamma'] for item in sources], [item[2]['step'] for item in sources],
                                                target_gamma, target_step)
    print(f'σ_rel {std:g} (γ {target_gamma:.4f}) at step {target_step} (kimg {kimg}) from {len(sources)} stored profiles:')
    for (path, _, record), coefficient in zip(sources, coefficients):
        print(f'  {coefficient:+.6f}  {os.path.basename(path)}  (σ_rel {record["std"]:g}, step {record["step"]})')
    data = _combine(sources, coefficients)
    nonfinite = misc.first_nonfinite_tensor(data['ema'])
    if nonfinite is not None:  # coefficients of an extreme σ_rel can overflow
        raise click.BadParameter(f'{std:g}: the combined network\'s {nonfinite} is not finite', param_hint='--std')
    data['power_ema'] = dict(std=float(std), gamma=target_gamma, step=target_step, nimg=sources[-1][2]['nimg'],
                             sources=[os.path.basename(path) for path, _, _ in sources],
                             coefficients=[float(c) for c in coefficients])
    try:
        if dest.endswith(checkpoints.SUFFIXES['safetensors']):
            checkpoints.save_network_safetensors(dest, data)
        else:
            checkpoints.save_network_pickle(dest, data)
    except OSError as err:
        raise click.ClickException(f'--dest: cannot write {dest}: {err.strerror or err}') from None
    print(f'Saved {dest}')


if __name__ == '__main__':
    main()
