"""torch_utils.distributed: single process without environment, no CUDA calls on CPU, 2 gloo ranks under torchrun."""

import json
import pathlib
import textwrap

import pytest
import torch
import torch.distributed as dist

from torch_utils import distributed
import conftest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_process(monkeypatch):
    """A process not started by torchrun, with no device chosen yet."""
    for name in conftest.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, '_device', None)


def test_plain_process_is_rank_0_of_1_without_process_group():
    assert distributed.init('cpu') == torch.device('cpu')
    assert not dist.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.get_device() == torch.device('cpu')
    assert distributed.get_backend() is None


def test_single_process_helpers_are_no_ops(capsys):
    distributed.init('cpu')
    distributed.barrier()
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum_(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    distributed.print0('hello', 1)
    assert capsys.readouterr().out == 'hello 1\n'


def test_cpu_init_makes_no_cuda_call(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('CUDA was called on a CPU run')
    for name in ('is_available', 'device_count', 'set_device', 'current_device', 'init', 'synchronize'):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    distributed.init('cpu')
    distributed.get_device()
    distributed.barrier()
    distributed.all_reduce_sum_(torch.zeros(1))


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert distributed.init() == torch.device('cpu')


def test_cuda_request_without_cuda_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='CUDA is not available'):
        distributed.init('cuda')


def test_unsupported_device_raises():
    with pytest.raises(ValueError, match='meta'):
        distributed.init('meta')


def test_malformed_local_rank_names_the_variable(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', 'zero')
    with pytest.raises(ValueError, match='LOCAL_RANK'):
        distributed.init('cpu')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_init_selects_local_rank_device():
    device = distributed.init('cuda')
    assert device == torch.device('cuda', 0) and torch.cuda.current_device() == 0


RANKS_SCRIPT = """
    import contextlib, io, json, sys
    import torch
    from torch_utils import distributed

    device = distributed.init('cpu')
    rank = distributed.get_rank()
    total = distributed.all_reduce_sum_(torch.tensor([rank + 1.0], dtype=torch.float64))
    distributed.barrier()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distributed.print0('only on rank 0')
    result = dict(rank=rank, local_rank=distributed.get_local_rank(), world=distributed.get_world_size(),
                  backend=distributed.get_backend(), device=str(device), total=total.item(), printed=printed.getvalue())
    with open(sys.argv[1] + f'/rank{rank}.json', 'w') as f:
        json.dump(result, f)
    distributed.shutdown()
"""


def run_torchrun(script_text, tmp_path, nproc_per_node):
    """Run a script under torchrun on this machine; it receives tmp_path as argv[1]."""
    script = tmp_path / 'script.py'
    script.write_text(textwrap.dedent(script_text))
    conftest.run_torchrun([script, tmp_path], nproc=nproc_per_node, cwd=tmp_path, timeout=120)


def test_two_gloo_ranks_under_torchrun(tmp_path):
    run_torchrun(RANKS_SCRIPT, tmp_path, nproc_per_node=2)
    for rank in range(2):
        output = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert output == dict(rank=rank, local_rank=rank, world=2, backend='gloo', device='cpu', total=3.0,
                              printed='only on rank 0\n' if rank == 0 else '')


NCCL_SCRIPT = """
    import json, sys
    import torch
    from torch_utils import distributed

    device = distributed.init()
    distributed.barrier()
    on_cpu = distributed.all_reduce_sum_(torch.tensor([2.0]))
    on_gpu = distributed.all_reduce_sum_(torch.tensor([3.0], device=device))
    result = dict(device=str(device), current=torch.cuda.current_device(), backend=distributed.get_backend(),
                  on_cpu=[str(on_cpu.device), on_cpu.item()], on_gpu=[str(on_gpu.device), on_gpu.item()])
    with open(sys.argv[1] + '/rank0.json', 'w') as f:
        json.dump(result, f)
    distributed.shutdown()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_torchrun_on_cuda_uses_nccl_and_the_local_rank_device(tmp_path):
    run_torchrun(NCCL_SCRIPT, tmp_path, nproc_per_node=1)
    output = json.loads((tmp_path / 'rank0.json').read_text())
    assert output == dict(device='cuda:0', current=0, backend='nccl', on_cpu=['cpu', 2.0], on_gpu=['cuda:0', 3.0])


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun_env(monkeypatch, rank, world_size):
    for name, value in dict(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=0, MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=free_port()).items():
        monkeypatch.setenv(name, str(value))


def test_joining_through_the_environment_gives_the_group_of_torchrun(monkeypatch):
    torchrun_env(monkeypatch, rank=0, world_size=1)
    try:
        distributed.init('cpu')
        assert dist.is_initialized() and distributed.get_world_size() == 1 and distributed.get_backend() == 'gloo'
    finally:
        distributed.shutdown()


def test_a_process_group_that_cannot_be_joined_is_retried_then_one_line(monkeypatch, tmp_path):
    # Rank 1 of 2 whose rank 0 never comes: every attempt times out, the retries end within the start-up bound.
    torchrun_env(monkeypatch, rank=1, world_size=2)
    monkeypatch.setattr(distributed, 'STARTUP_TIMEOUT_SEC', 4)
    monkeypatch.setattr(distributed, 'ATTEMPT_TIMEOUT_SEC', 1)
    monkeypatch.setattr(distributed, 'RETRY_DELAY_SEC', 0.5)
    attempts = []
    real_rendezvous = dist.rendezvous
    monkeypatch.setattr(dist, 'rendezvous', lambda *args, **kwargs: attempts.append(1) or real_rendezvous(*args, **kwargs))
    from click.testing import CliRunner
    import train
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={tmp_path}', '--device=cpu'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code != 0 and not dist.is_initialized() and 'Traceback' not in result.output
    assert len(errors) == 1 and 'could not join the process group at 127.0.0.1' in errors[0], result.output
    assert 'rank 1 of 2 within 4 s' in errors[0] and len(attempts) >= 2


def test_missing_torchrun_variables_are_one_line(monkeypatch):
    torchrun_env(monkeypatch, rank=0, world_size=2)
    monkeypatch.delenv('MASTER_ADDR')
    with pytest.raises(distributed.ProcessGroupError, match='MASTER_ADDR'):
        distributed.init('cpu')
