"""training/divergence.py: non-finite steps are dropped on the device, counted, and end the run by policy."""

import pytest
import torch

from training import divergence


def make(policy, fused=True, max_in_a_row=3):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(10))
    optimizer = torch.optim.Adam([param], lr=0.1, fused=True) if fused else torch.optim.SGD([param], lr=0.1)
    return param, optimizer, divergence.NonFiniteGuard([param], optimizer, policy, max_in_a_row=max_in_a_row)


def take_step(guard, param, step, bad=False):
    param.grad = torch.ones_like(param)
    if bad:
        param.grad[3] = float('nan')
    guard.step(step)


@pytest.mark.parametrize('fused', [True, False])
def test_a_non_finite_step_leaves_the_weights_and_the_optimizer_as_they_were(fused):
    param, optimizer, guard = make('skip-step', fused)
    take_step(guard, param, 0)
    before = param.detach().clone()
    state_before = {k: v.clone() for k, v in optimizer.state_dict()['state'].get(0, {}).items() if torch.is_tensor(v)}
    take_step(guard, param, 1, bad=True)
    assert torch.equal(param.detach(), before)
    for key, value in state_before.items():
        assert torch.equal(optimizer.state_dict()['state'][0][key], value), key
    take_step(guard, param, 2)
    assert not torch.equal(param.detach(), before) and torch.isfinite(param).all()
    assert guard.verdict(batch_size=4) == 1


def test_stop_policy_ends_the_run_naming_the_first_non_finite_step_and_its_kimg():
    param, _, guard = make('stop')
    take_step(guard, param, 0)
    assert guard.verdict(batch_size=500) == 0
    take_step(guard, param, 1)
    take_step(guard, param, 2, bad=True)
    take_step(guard, param, 3, bad=True)
    with pytest.raises(divergence.DivergenceError, match=r'non-finite at step 2 \(1 kimg\)'):
        guard.verdict(batch_size=500)


def test_skip_step_policy_ends_the_run_after_too_many_dropped_steps_in_a_row():
    param, _, guard = make('skip-step', max_in_a_row=3)
    for step, bad in enumerate([True, True, False, True, True, False]):
        take_step(guard, param, step, bad)
    assert guard.verdict(batch_size=4) == 4  # never 3 in a row
    for step in range(6, 9):
        take_step(guard, param, step, bad=True)
    with pytest.raises(divergence.DivergenceError, match='3 steps in a row'):
        guard.verdict(batch_size=4)


def test_check_finite_names_what_holds_non_finite_weights():
    net = torch.nn.Linear(2, 2)
    divergence.check_finite('the network', net)  # huge but finite is not refused
    with torch.no_grad():
        net.weight.fill_(3e38)
    divergence.check_finite('the network', net)
    with torch.no_grad():
        net.bias[1] = float('inf')
    with pytest.raises(divergence.DivergenceError, match='the network holds non-finite weights'):
        divergence.check_finite('the network', net)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match='stop, skip-step'):
        make('ignore')
