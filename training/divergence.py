"""Non-finite loss or gradients: found on the device at every step, acted on at tick and write boundaries.

A diverged step shows as a non-finite gradient (a NaN or infinite loss back-propagates into the gradients, and
under DDP every process holds the same reduced gradients, so all processes decide alike). The optimizer step of
such a gradient is dropped on the device (fused Adam's `found_inf`, as torch's GradScaler does), so the weights
stay those of the last good step; the counts are read back only when the loop asks (`verdict()`), so a GPU run
does not wait for its stream at every step. Policies:

- 'stop':      the first non-finite step ends the run at the next boundary, before anything is written.
- 'skip-step': non-finite steps are dropped and counted; `max_in_a_row` of them in a row end the run.
"""

import torch

POLICIES = ('stop', 'skip-step')
MAX_SKIPPED_IN_A_ROW = 20               # skip-step: this many dropped steps in a row mean the run has diverged.


class DivergenceError(RuntimeError):
    """Training produced non-finite values; the message says at which step."""


class NonFiniteGuard:
    """Per-step check of the gradients and device-side counts of the steps it dropped."""

    def __init__(self,
        params,                         # The trained parameters (their .grad are checked).
        optimizer,                      # The optimizer whose step is dropped on non-finite gradients.
        policy          = 'stop',       # One of POLICIES.
        max_in_a_row    = MAX_SKIPPED_IN_A_ROW, # skip-step: dropped steps in a row that end the run.
    ):
        if policy not in POLICIES:
            raise ValueError(f'non-finite policy must be one of {", ".join(POLICIES)}, got {policy!r}')
        self.params = list(params)
        self.optimizer = optimizer
        self.policy = policy
        self.max_in_a_row = max_in_a_row
        # Fused optimizers skip their update on the device when found_inf is 1; others need the flag on the host.
        self.on_device = bool(optimizer.defaults.get('fused'))
        device = self.params[0].device
        self.skipped = torch.zeros([], dtype=torch.int64, device=device)       # dropped steps since the start
        self.first_step = torch.full([], -1, dtype=torch.int64, device=device)  # step of the first one, -1 = none
        self.in_a_row = torch.zeros([], dtype=torch.int64, device=device)
        self.max_seen_in_a_row = torch.zeros([], dtype=torch.int64, device=device)
        self.reported_skipped = 0

    def step(self, step):
        """Take the optimizer step `step` unless its gradients are non-finite (then it is dropped and counted)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()) if grads else torch.zeros([], dtype=torch.bool)
        bad = bad.to(self.skipped.device)
        self.skipped += bad
        self.first_step.copy_(torch.where(bad & (self.first_step < 0), step, self.first_step))
        self.in_a_row.copy_((self.in_a_row + 1) * bad)
        torch.maximum(self.max_seen_in_a_row, self.in_a_row, out=self.max_seen_in_a_row)
        if self.on_device:
            self.optimizer.found_inf = bad.to(torch.float32)
            self.optimizer.step()
        elif not bad.item():  # a host sync per step, only for optimizers without a device-side skip
            self.optimizer.step()

    def verdict(self, batch_size):
        """Raise DivergenceError when the policy says the run must end; else return the steps dropped so far.

        One read-back from the device; call it at boundaries (ticks, before writing), not at every step.
        """
        skipped, first_step, max_in_a_row = torch.stack([self.skipped, self.first_step, self.max_seen_in_a_row]).tolist()
        if skipped and (self.policy == 'stop' or max_in_a_row >= self.max_in_a_row):
            streak = '' if self.policy == 'stop' else f' and stayed so for {max_in_a_row} steps in a row'
            raise DivergenceError(f'the loss or the gradients became non-finite at step {first_step} '
                                  f'({first_step * batch_size / 1000:g} kimg){streak}')
        self.reported_skipped = skipped
        return skipped


def check_finite(what, *modules):
    """Raise DivergenceError naming `what` when a parameter or buffer of `modules` is not finite (one sync)."""
    tensors = [t for module in modules if module is not None for t in module.state_dict().values()
               if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise DivergenceError(f'{what} holds non-finite weights')
