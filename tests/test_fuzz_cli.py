"""Fuzzing every command-line option: each option of train.py, generate.py, fid.py ref and calc, dataset_tool.py and
reconstruct_ema.py given a huge, tiny, zero, negative, NaN, infinite, empty and non-UTF-8 value, on tiny inputs
(train.py with --dry-run). Each run must succeed or end with exactly one `Error:` line: never a traceback, another
exception, or a hang.

The commands run in-process through click's CliRunner, all in one child process under a 3 GB address-space limit;
a watchdog ends it if one case takes longer than CASE_TIMEOUT_SEC, naming the case. Run this file as a script with a
work folder to see the outcomes.
"""

import faulthandler
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import traceback

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT_SEC = 30
MEMORY_LIMIT_BYTES = 3 << 30
VALUES = dict(huge='1' + '0' * 30, tiny='1e-300', zero='0', negative='-1', nan='nan', inf='inf', empty='',
              non_utf8=os.fsdecode(b'x\xff\xfe'))  # how Python passes undecodable argv bytes on
# Malformed values of options that parse structured text, beyond the values above.
STRUCTURED_VALUES = {
    '--resolution': dict(huge_wxh='{0}x{0}'.format(VALUES['huge']), power_of_two_wxh=f'{2**40}x{2**40}', zero_wxh='0x0',
                         wide_wxh='1x1048576', one_wxh='1x1'),
    '--seeds': dict(huge_range='0-' + VALUES['huge'], reversed_range='5-2', comma=','),
    '--cres': dict(huge_entry='1,' + VALUES['huge'], long_list=','.join(['1'] * 100), comma=','),
    '--attn': dict(huge_entry=VALUES['huge'], none='none'),
    '--ema_profiles': dict(nan_entry='0.1,nan', twice='0.1,0.1', comma=','),
    '--metrics': dict(unknown='fid,nonsense', repeated='fid,fid'),
}
SCRIPTS = ('train', 'generate', 'fid_ref', 'fid_calc', 'dataset_tool', 'reconstruct_ema')


def make_inputs(workdir):
    """The tiny inputs the base command lines refer to: {name: path}."""
    import numpy as np
    import PIL.Image
    import torch
    from click.testing import CliRunner
    import fid
    from test_fid import PooledColours
    from test_train import write_dataset
    from training import checkpoints, ema, networks

    def tiny_net(label_dim):  # few tensors: loading the pickle is most of a generate.py case
        torch.manual_seed(0)
        return networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_channels=8,
                                   channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0).eval()
    paths = dict(data=write_dataset(os.path.join(workdir, 'data-8x8.zip'), num_images=4, resolution=8, num_classes=2),
                 net=os.path.join(workdir, 'net.pkl'), detector=os.path.join(workdir, 'pooled.pt'),
                 ref=os.path.join(workdir, 'ref.npz'), source=os.path.join(workdir, 'source'), run=os.path.join(workdir, 'run'))
    with open(paths['net'], 'wb') as f:
        pickle.dump({'ema': tiny_net(label_dim=2)}, f)
    torch.jit.save(torch.jit.script(PooledColours()), paths['detector'])
    result = CliRunner().invoke(fid.main, ['ref', '--data', paths['data'], '--dest', paths['ref'], '--detector',
                                           paths['detector'], '--workers', '0', '--device', 'cpu', '--features'])
    assert result.exit_code == 0, result.output
    os.makedirs(paths['source'])
    for i in range(2):
        PIL.Image.fromarray(np.full([8, 8, 3], 60 * i, dtype=np.uint8)).save(os.path.join(paths['source'], f'{i}.png'))
    os.makedirs(paths['run'])
    for std in (0.05, 0.1):
        checkpoints.save_network_pickle(os.path.join(paths['run'], checkpoints.power_ema_name(32, std)),
                                        dict(ema=tiny_net(label_dim=0), power_ema=dict(std=std, gamma=ema.gamma_from_std(std),
                                                                                     step=4, nimg=32)))
    return paths


def base_commands(paths, workdir):
    """{script: (click command, function of a case number → base arguments)}."""
    import dataset_tool
    import fid
    import generate
    import reconstruct_ema
    import train
    detector = ['--detector', paths['detector'], '--workers', '0', '--device', 'cpu']
    return dict(
        train=(train.main, lambda i: ['--outdir', os.path.join(workdir, 'train-out'), '--data', paths['data'], '--dry-run',
                                      '--device', 'cpu', '--cbase', '8', '--cres', '1', '--batch', '4', '--workers', '0',
                                      '--seed', '0', '--augment', '0']),
        generate=(generate.main, lambda i: ['--network', paths['net'], '--outdir', os.path.join(workdir, f'gen{i}'),
                                            '--seeds', '0', '--steps', '2', '--device', 'cpu']),
        fid_ref=(fid.main, lambda i: ['ref', '--data', paths['data'], '--dest', os.path.join(workdir, f'ref{i}.npz'),
                                      *detector]),
        fid_calc=(fid.main, lambda i: ['calc', '--images', paths['data'], '--ref', paths['ref'], '--num', '4', *detector]),
        dataset_tool=(dataset_tool.main, lambda i: ['--source', paths['source'], '--dest', os.path.join(workdir, f'ds{i}.zip')]),
        reconstruct_ema=(reconstruct_ema.main, lambda i: ['--run', paths['run'], '--std', '0.07',
                                                          '--dest', os.path.join(workdir, f'rec{i}.pkl')]),
    )


# fid.py calc options that apply to --network only: fuzzed with a network instead of --images.
NETWORK_ONLY = ('--seeds', '--class', '--steps', '--sigma_min', '--sigma_max', '--rho', '--S_churn', '--S_min', '--S_max',
                '--S_noise', '--solver', '--disc', '--schedule', '--scaling', '--guidance', '--gnet', '--precision')


def with_option(args, flag, value):
    """`args` with `flag` set to `value` (replacing a given one), as --flag=value; a switch when value is None."""
    result, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        else:
            result.append(arg)
    return result + ([flag] if value is None else [f'{flag}={value}'])


def cases(command, base, paths):
    """(case name, arguments) for every option of `command` and every value (switches: given once)."""
    import click
    if isinstance(command, click.Group):
        command = command.commands[base(0)[0]]
    number = 0
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        flag = max(param.opts, key=len)
        values = {'on': None} if param.is_flag and param.flag_value is not None and not isinstance(param.type, click.Choice) \
            else {**VALUES, **STRUCTURED_VALUES.get(flag, {})}
        for value_name, value in values.items():
            number += 1
            args = base(number)
            if flag in NETWORK_ONLY and args[0] == 'calc':
                args = [arg for arg in args if arg not in ('--images', paths['data'], '--num', '4')]
                args += ['--network', paths['net'], '--seeds', '0-1', '--steps', '2']
            yield f'{flag}={value_name}', with_option(args, flag, value)


def run_cases(workdir):
    """Every case of every script; returns {script: [[case, outcome, message]]} with outcome 'ok' (exit 0), 'error'
    (one `Error:` line) or 'bad' (anything else, with the output or traceback)."""
    from click.testing import CliRunner
    import torch
    torch.set_num_threads(1)
    os.chdir(workdir)  # relative paths such as --outdir=nan land here
    paths = make_inputs(workdir)
    results = {}
    for script, (command, base) in base_commands(paths, workdir).items():
        results[script] = []
        for case, args in cases(command, base, paths):
            start, cpu_start = time.time(), time.process_time()
            faulthandler.dump_traceback_later(CASE_TIMEOUT_SEC, exit=True)
            print(f'{script} {case}', file=sys.stderr, flush=True)  # the last line names a case that hangs
            result = CliRunner().invoke(command, args)
            faulthandler.cancel_dump_traceback_later()
            errors = [line for line in result.output.splitlines() if line.startswith('Error')]
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                outcome, message = 'bad', ''.join(traceback.format_exception(result.exception))
            elif result.exit_code == 0:
                outcome, message = 'ok', ''
            elif len(errors) == 1 and 'Traceback' not in result.output:
                outcome, message = 'error', errors[0]
            else:
                outcome, message = 'bad', result.output[-2000:]
            results[script].append([case, outcome, message, args])
            print(json.dumps([script, case, outcome, message, args, time.time() - start, time.process_time() - cpu_start]), flush=True)
    return results


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('fuzz-cli')
    result = subprocess.run([sys.executable, __file__, str(workdir)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1'),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES,) * 2))
    assert result.returncode == 0, 'fuzz run died (hang or crash), last lines:\n' + result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])  # the lines before it: each case as it ended


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_option_value_runs_or_gives_one_error_line(outcomes, script):
    results = outcomes[script]
    assert len(results) >= 3 * len(VALUES)  # every option was tried (at least three with values)
    bad = [f'{case} {args}:\n{message}' for case, outcome, message, args in results if outcome == 'bad']
    assert not bad, f'{len(bad)} of {len(results)} cases:\n' + '\n'.join(bad[:3])


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(run_cases(sys.argv[1])))
