"""Per-step statistics (losses, timings) reported anywhere in the code and reduced across ranks on demand.

`report(name, value)` adds every finite element of `value` as one sample to running float64 moments (count, sum,
sum of squares) kept on the value's own device, so reporting never forces a GPU sync. A `Collector`
turns the samples reported since its previous `update()` into num/mean/std, summed over all ranks.
"""

import re

import torch
import torch.distributed as dist

from dnnlib.util import EasyDict
from torch_utils import distributed

_NUM_MOMENTS = 3  # count, sum, sum of squares
_moments = dict()  # name -> {device: float64 tensor [3]}, cumulative since the process started


def report(name, value):
    """Add the elements of `value` (scalar, sequence or tensor) as samples of statistic `name`; returns `value`."""
    samples = torch.as_tensor(value).detach().flatten().to(torch.float64)
    # Non-finite samples are left out: the moments are cumulative, so one NaN would spoil every later interval.
    finite = torch.isfinite(samples)
    samples = torch.where(finite, samples, 0)
    moments = torch.stack([
        finite.sum().to(torch.float64),
        samples.sum(),
        samples.square().sum(),
    ])
    per_device = _moments.setdefault(name, dict())
    if samples.device in per_device:
        per_device[samples.device].add_(moments)
    else:
        per_device[samples.device] = moments
    return value


def report0(name, value):
    """Report on rank 0 only; other ranks register the name with no samples so every rank knows it."""
    report(name, value if distributed.is_main() else [])
    return value


def _all_names():
    """The union of the names reported on any rank, in one order shared by all ranks."""
    names = set(_moments)
    if distributed.get_world_size() > 1:
        gathered = [None] * distributed.get_world_size()
        dist.all_gather_object(gathered, sorted(names))
        names = set().union(*gathered)
    return sorted(names)


class Collector:
    """Reads the statistics whose names match `regex`; each `update()` starts a new collection interval."""

    def __init__(self,
        regex           = '.*',     # Which statistic names this collector reads.
        keep_previous   = True,     # A statistic with no new samples keeps its last interval's values.
    ):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._seen = dict()         # name -> local cumulative moments at the previous update()
        self._interval = dict()     # name -> moments of the last interval, summed over ranks
        self._match_cache = dict()

    def _matches(self, name):
        if name not in self._match_cache:
            self._match_cache[name] = self._regex.fullmatch(name) is not None
        return self._match_cache[name]

    def names(self):
        """Names that have samples in the current interval."""
        return sorted(name for name, moments in self._interval.items() if moments[0] > 0)

    def update(self):
        """Close the interval: collect samples reported since the last call, summed over ranks.

        A collective operation when a process group is running: call it on every rank.
        """
        names = [name for name in _all_names() if self._matches(name)]
        reduce_device = distributed.get_reduce_device()
        deltas = torch.zeros(len(names), _NUM_MOMENTS, dtype=torch.float64, device=reduce_device)
        for row, name in enumerate(names):
            cumulative = torch.zeros(_NUM_MOMENTS, dtype=torch.float64, device=reduce_device)
            for moments in _moments.get(name, dict()).values():
                cumulative += moments.to(reduce_device)
            deltas[row] = cumulative - self._seen.get(name, 0)
            self._seen[name] = cumulative
        if distributed.get_world_size() > 1 and names:
            dist.all_reduce(deltas, op=dist.ReduceOp.SUM)
        deltas = deltas.cpu()
        if not self._keep_previous:
            self._interval.clear()
        for row, name in enumerate(names):
            if deltas[row, 0] > 0 or name not in self._interval:
                self._interval[name] = deltas[row]

    def num(self, name):
        """Number of samples of `name` in the last interval (0 if none)."""
        moments = self._interval.get(name)
        return 0 if moments is None else int(moments[0])

    def mean(self, name):
        """Mean of `name` over the last interval; nan if it has no samples."""
        moments = self._interval.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        return float(moments[1] / moments[0])

    def std(self, name):
        """Population standard deviation of `name` over the last interval; nan if it has no samples."""
        moments = self._interval.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        mean = moments[1] / moments[0]
        return float((moments[2] / moments[0] - mean.square()).clamp(min=0).sqrt())

    def as_dict(self):
        """{name: EasyDict(num, mean, std)} for every statistic with samples, ready for a JSON log line."""
        return {name: EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in self.names()}

    def __getitem__(self, name):
        return self.mean(name)


default_collector = Collector()
