"""Shared test fixtures: the published-code reference fixtures (tests/fixtures), torchrun, small torch settings."""

import math
import os
import pathlib
import subprocess
import sys
import zlib

# Idle OpenMP threads yield instead of spinning: the suite runs several processes (torchrun tests) on 2 cores.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / 'tests' / 'fixtures'
REFERENCE_FILES = ('networks-fdm.pt', 'networks-edm.pt', 'samplers-fdm.pt', 'samplers-edm.pt')

torch.set_num_threads(2)


@pytest.fixture(scope='session')
def reference_dir():
    """The fixtures produced by the published code; a missing file is a test failure, not a skip."""
    missing = [name for name in REFERENCE_FILES if not (REFERENCE_DIR / name).is_file()]
    assert not missing, f'reference fixtures {missing} not found in {REFERENCE_DIR}'
    return REFERENCE_DIR


def fill_rule_parameters(net, salt):
    """Every parameter of `net` drawn by the fill rule of tests/fixtures/README.md, as {name: tensor}."""
    state = {}
    for name, param in net.named_parameters():
        generator = torch.Generator().manual_seed(zlib.crc32(f'{salt}:{name}'.encode()))
        z = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            state[name] = z / math.sqrt(max(param.numel() // param.shape[0], 1))
        elif name.endswith('weight'):
            state[name] = 1 + 0.1 * z
        else:
            state[name] = 0.1 * z
    return state


def build_reference_net(case):
    """The network of a fixture case in eval mode: built from `ctor`, checked against the published keys and
    shapes, its parameters filled by the rule and its buffers loaded as stored."""
    from training import networks
    ctor = dict(case['ctor'])
    net = getattr(networks, ctor.pop('class_name'))(**ctor)
    ours = [(key, tuple(value.shape)) for key, value in net.state_dict().items()]
    published = [(key, tuple(shape)) for key, shape in case['keys']]
    assert ours == published, (case.get('name', ctor), 'differing keys or shapes:', sorted(set(ours) ^ set(published))[:10])
    net.load_state_dict({**fill_rule_parameters(net, case['salt']), **case['buffers']}, strict=True)
    return net.eval()


TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def run_torchrun(script_and_args, nproc=2, cwd=REPO_ROOT, threads=1, timeout=300):
    """Run a script under `torchrun --standalone` on the CPU (gloo), assert that it succeeded, return the result."""
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '--',
               *map(str, script_and_args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope='session')
def posthoc_runs(tmp_path_factory):
    """Tiny train.py runs with power-EMA profiles and FID at every snapshot (tiny TorchScript detector):
    'straight' (4 steps), 'resumed' (2 steps, then resumed to 4), and the data, detector and reference."""
    from click.testing import CliRunner
    import fid
    import train
    from test_fid import PooledColours
    from test_train import write_dataset
    root = tmp_path_factory.mktemp('posthoc')
    data = write_dataset(root / 'train-8x8.zip', num_images=12, resolution=8, num_classes=0)
    detector = root / 'pooled.pt'
    torch.jit.save(torch.jit.script(PooledColours()), str(detector))
    ref = root / 'ref.npz'
    result = CliRunner().invoke(fid.main, [str(a) for a in ['ref', '--data', data, '--dest', ref, '--detector', detector,
                                                            '--workers', 0, '--device', 'cpu']])
    assert result.exit_code == 0, result.output

    def options(outdir, steps, *extra):
        return [f'--outdir={outdir}', f'--data={data}', '--nosubdir', '--device=cpu', '--cbase=16', '--cres=1,2', '--batch=8',
                f'--duration={steps * 8 / 1e6}', '--tick=0.016', '--snap=1', '--dump=1', '--workers=0', '--seed=7',
                '--lr=2e-3', '--lr_rampup=0.00002', '--ema=0.00002', '--augment=0', '--ema_profiles=0.05,0.1',
                '--metrics=fid', f'--metric_ref={ref}', '--metric_num=4', f'--metric_detector={detector}',
                '--metric_profiles=True', *extra]

    def train_run(args):
        result = CliRunner().invoke(train.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(options(root / 'straight', 4))
        train_run(options(root / 'half', 2))
        train_run(options(root / 'resumed', 4, f'--resume={root / "half"}'))
    finally:
        torch.set_num_threads(threads)
    return dict(straight=root / 'straight', half=root / 'half', resumed=root / 'resumed', data=data, detector=detector, ref=ref)
