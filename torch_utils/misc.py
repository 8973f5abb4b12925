"""Training-loop helpers: a resumable infinite sampler, parameter copies, a module summary, DDP checks."""

import contextlib
import re

import numpy as np
import torch
import torch.distributed as dist

from torch_utils import distributed


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless dataset indices, deterministic from `seed`, split between ranks, resumable at any item.

    Global position p draws item `order_e[p mod n]` of epoch e = p // n, where order_e is a fresh permutation
    seeded by (seed, e). Rank r takes positions r, r + R, r + 2R, ...: within an epoch the ranks' items are
    disjoint and together cover the dataset. The position is a closed form of `start_index`, so resuming
    costs one permutation and continues the exact sequence.
    """

    def __init__(self,
        dataset,                    # Anything with len(); indices 0 .. len-1 are drawn.
        rank            = 0,        # This process's rank.
        num_replicas    = 1,        # Number of ranks sharing the data.
        shuffle         = True,     # False walks the dataset in order.
        seed            = 0,        # Seed of the permutations; the same on every rank.
        window_size     = 0.5,      # Accepted for EDM-style call sites; whole-epoch permutations need no window.
        start_index     = 0,        # Items this rank has already yielded; the iteration continues after them.
    ):
        num_items = len(dataset)
        if num_items <= 0:
            raise ValueError('InfiniteSampler: the dataset is empty')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank {rank} is not in [0, num_replicas={num_replicas})')
        if seed < 0:
            raise ValueError(f'InfiniteSampler: seed must be non-negative, got {seed}')
        if not 0 < window_size <= 1:
            raise ValueError(f'InfiniteSampler: window_size must be in (0, 1], got {window_size}')
        if start_index < 0:
            raise ValueError(f'InfiniteSampler: start_index must be non-negative, got {start_index}')
        super().__init__()
        self.num_items = num_items
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.window_size = window_size
        self.start_index = int(start_index)

    def epoch_order(self, epoch):
        """The order in which epoch `epoch` visits the dataset (shared by all ranks)."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self):
        position = self.start_index * self.num_replicas + self.rank
        epoch, order = None, None
        while True:
            position_epoch, offset = divmod(position, self.num_items)
            if position_epoch != epoch:
                epoch, order = position_epoch, self.epoch_order(position_epoch)
            yield int(order[offset])
            position += self.num_replicas


def named_params_and_buffers(module):
    """(name, tensor) for every parameter and buffer, the full state that a copy or a check must cover."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def first_nonfinite_tensor(module):
    """Name of the first floating-point parameter or buffer of `module` holding a NaN or an infinity, else None:
    such a network samples NaN images, which become black PNGs without an error."""
    for name, tensor in named_params_and_buffers(module):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def nonfinite_problem(module):
    """The one wording of every loader's refusal of a network with a NaN or an infinity ("the network's NAME holds
    NaN or infinite values"), or None when every tensor of `module` is finite."""
    name = first_nonfinite_tensor(module)
    return None if name is None else f'the network\'s {name} holds NaN or infinite values'


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy same-named parameters and buffers from `src_module` into `dst_module` in place (e.g. --transfer)."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        src = src_tensors.get(name)
        if src is None:
            if require_all:
                raise ValueError(f'copy_params_and_buffers: source module has no parameter or buffer {name!r}')
            continue
        if src.shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: {name!r} has shape {tuple(src.shape)} in the source '
                             f'but {tuple(tensor.shape)} in the destination')
        tensor.copy_(src.detach())


def _flat_tensors(obj):
    """All tensors inside nested tuples, lists and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _flat_tensors(item)]
    return []


def print_module_summary(module, inputs, max_nesting=3):
    """Run `module(*inputs)` once and print, per submodule called, its #params, #buffers, output shape and dtype.

    Counts are over each module's whole subtree; submodules deeper than `max_nesting` levels are folded
    into their parent. Returns the module's outputs.
    """
    if not isinstance(inputs, (tuple, list)):
        inputs = [inputs]
    calls = dict()  # module name -> [module, number of calls, first outputs], in order of first call
    hooks = []

    def pre_hook(name, mod, _inputs):
        calls.setdefault(name, [mod, 0, None])[1] += 1

    def post_hook(name, _mod, _inputs, outputs):
        if calls[name][2] is None:
            calls[name][2] = _flat_tensors(outputs)

    for name, mod in module.named_modules():
        depth = 0 if name == '' else name.count('.') + 1
        if depth <= max_nesting:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, name=name: pre_hook(name, m, i)))
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: post_hook(name, m, i, o)))
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    for name, (mod, num_calls, tensors) in calls.items():
        label = name or f'<top-level {type(module).__name__}>'
        if num_calls > 1:
            label += f' (x{num_calls})'
        tensors = tensors or []
        rows.append([
            label,
            f'{sum(p.numel() for p in mod.parameters()):,}',
            f'{sum(b.numel() for b in mod.buffers()):,}',
            ' '.join(str(list(t.shape)) for t in tensors) or '-',
            ' '.join(str(t.dtype).removeprefix('torch.') for t in tensors) or '-',
        ])
    rows.append(['Total', f'{sum(p.numel() for p in module.parameters()):,}',
                 f'{sum(b.numel() for b in module.buffers()):,}', '', ''])
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    rule = '  '.join('-' * width for width in widths)
    lines = []
    for index, row in enumerate(rows):
        if index in (1, len(rows) - 1):
            lines.append(rule)
        lines.append('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print('\n'.join(lines))
    return outputs


@torch.no_grad()
def check_ddp_consistency(module, ignore_regex=None):
    """Raise ValueError naming the first parameter or buffer that differs from rank 0 (NaNs compare equal).

    A collective operation when a process group is running: call it on every rank. Every rank raises the
    same error, so none is left waiting in a later collective.
    """
    if distributed.get_world_size() == 1:
        return
    reduce_device = distributed.get_reduce_device()
    prefix = type(module).__name__
    for name, tensor in named_params_and_buffers(module):
        full_name = f'{prefix}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, full_name):
            continue
        local = tensor.detach().to(reduce_device)
        reference = local.clone()
        dist.broadcast(reference, src=0)
        same = local == reference
        if local.is_floating_point():
            same |= local.isnan() & reference.isnan()
        num_differing_ranks = torch.tensor([0 if bool(same.all()) else 1], device=reduce_device)
        dist.all_reduce(num_differing_ranks, op=dist.ReduceOp.SUM)
        if num_differing_ranks.item() > 0:
            raise ValueError(f'check_ddp_consistency: {full_name} differs from rank 0 on '
                             f'{num_differing_ranks.item()} rank(s)')


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce (no_sync) for the accumulation rounds where `sync` is False."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield
