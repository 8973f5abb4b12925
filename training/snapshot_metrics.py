"""Quality measured during training: the FID of each snapshot's networks, appended to `metrics.jsonl`.

The images are those `fid.py calc --network=<snapshot> --seeds=0-{N-1} --precision=fp32` generates with the same
sampler (by default EDM's with its defaults; any sampler of training/sampling.py with its options), one RNG per
seed, so a line of `metrics.jsonl` can be checked against fid.py. Every rank generates a share of the seeds and the
feature sums are added over ranks, as in fid.py.
"""

import json
import os
import time

import dnnlib
from torch_utils import distributed
from training import metrics
from training import sampling
from training import solvers

METRICS_FILE = 'metrics.jsonl'
SAMPLER_NAME = 'edm'                    # the sampler of fid.py and generate.py without sampler options
SAMPLER_KWARGS = {}                     # its defaults: 18 steps, σ from 0.002 to 80, ρ = 7, no churn
PRECISION = 'fp32'                      # bit-exact whatever the batch, so every process count gives the same images
MAX_NUM_IMAGES = 50000                  # the default number of images: the dataset's size up to this


class MetricSetupError(ValueError):
    """Metric options that cannot be used (missing reference, other detector, unknown metric)."""


def default_num_images(dataset_size):
    return min(dataset_size, MAX_NUM_IMAGES)


def _line_key(line):
    return line['nimg'], line['network'], line['metric']


def _read_lines(path):
    if not os.path.isfile(path):
        return []
    with open(path, 'rt') as f:
        return [json.loads(text) for text in f if text.strip()]


def carry_over(run_dir, previous_run_dir, resume_nimg):
    """Start `run_dir`'s metrics.jsonl with the lines up to `resume_nimg` of the resumed run (and of its own file),
    each (nimg, network, metric) once; returns the keys kept. Lines after the resumed state are measured again."""
    lines = _read_lines(os.path.join(previous_run_dir, METRICS_FILE))
    if os.path.abspath(previous_run_dir) != os.path.abspath(run_dir):
        lines += _read_lines(os.path.join(run_dir, METRICS_FILE))
    kept = {}
    for line in lines:
        if line['nimg'] <= resume_nimg:
            kept.setdefault(_line_key(line), line)
    with dnnlib.util.atomic_write(os.path.join(run_dir, METRICS_FILE), 'wt') as f:
        for line in sorted(kept.values(), key=lambda line: line['nimg']):
            f.write(json.dumps(line) + '\n')
    return set(kept)


class SnapshotMetrics:
    """FID of the networks of every snapshot against reference statistics; rank 0 appends to metrics.jsonl."""

    def __init__(self,
        run_dir,                        # Where metrics.jsonl lives; None = print only.
        device,                         # Where the networks sample and the detector runs.
        metric          = 'fid',        # The only metric so far.
        ref             = None,         # Reference statistics (.npz path or URL), as fid.py calc --ref.
        num_images      = 50000,        # Images per evaluation: seeds 0 … num_images−1.
        detector        = 'nvidia',     # nvidia, offline or a TorchScript file, as fid.py --detector.
        profiles        = False,        # Also evaluate each power-EMA profile, not only the EMA.
        max_batch_size  = 64,           # Images per batch and process (fid.py --batch).
        resume_state    = None,         # The training state this run resumes; its run's lines are carried over.
        resume_nimg     = 0,            # Images trained when resuming.
        sampler_name    = SAMPLER_NAME, # A sampler of solvers.SAMPLERS, as fid.py --solver chooses it.
        sampler_kwargs  = None,         # Its options (solvers.check_options); None = SAMPLER_KWARGS.
    ):
        if metric != 'fid':
            raise ValueError(f'metric must be fid (the only one so far), got {metric!r}')
        if ref is None:
            raise ValueError('FID needs reference statistics (ref)')
        self.sampler_name, self.sampler_kwargs = sampler_name, dict(SAMPLER_KWARGS if sampler_kwargs is None else sampler_kwargs)
        try:
            solvers.check_options(sampler_name, **self.sampler_kwargs)
        except ValueError as err:
            raise MetricSetupError(f'sampler {sampler_name} {self.sampler_kwargs}: {err}') from None
        self.run_dir = run_dir
        self.device = device
        self.metric = metric
        self.ref = ref
        self.seeds = list(range(num_images))
        self.profiles = profiles
        self.max_batch_size = max_batch_size
        try:
            self.detector = distributed.rank0_first(lambda: metrics.load_detector(detector, device=device, verbose=distributed.is_main()))
            self.reference = distributed.rank0_first(self._load_reference)
            metrics.check_same_detector(self.reference['detector'], self.detector, ref)
        except (OSError, metrics.DetectorError, metrics.StatisticsError) as err:
            raise MetricSetupError(str(err)) from None
        self.done = set()
        if distributed.is_main() and run_dir is not None and resume_state is not None:
            self.done = carry_over(run_dir, os.path.dirname(os.path.abspath(resume_state)), resume_nimg)

    def _load_reference(self):
        with dnnlib.util.open_url(self.ref, verbose=distributed.is_main()) as f:
            return metrics.load_statistics(f, self.ref)

    def evaluate(self, cur_nimg, networks):
        """Measure each of `networks` ({name: network}; 'ema' always, profiles when asked) at `cur_nimg`."""
        for name, net in networks.items():
            if name != 'ema' and not self.profiles:
                continue
            if (cur_nimg, name, self.metric) in self.done:
                continue
            start = time.time()
            stats = self.feature_statistics(net)
            if not distributed.is_main():
                continue
            value = metrics.frechet_distance(*stats.mean_cov(), self.reference['mu'], self.reference['sigma'])
            line = dict(kimg=cur_nimg / 1000, nimg=cur_nimg, network=name, metric=self.metric, value=value,
                        num_images=stats.num, detector=self.detector.identity, sampler=self.sampler_name,
                        sampler_kwargs=self.sampler_kwargs,
                        seconds=time.time() - start, timestamp=time.time())
            distributed.print0(f'{self.metric} {name} {value:g} ({stats.num} images, {line["seconds"]:.1f} s)')
            if self.run_dir is not None:
                with open(os.path.join(self.run_dir, METRICS_FILE), 'at') as f:
                    f.write(json.dumps(line) + '\n')
            self.done.add((cur_nimg, name, self.metric))

    def feature_statistics(self, net):
        """Detector statistics of `net`'s images for the fixed seeds, summed over all ranks."""
        batches, _ = distributed.split_seeds(self.seeds, self.max_batch_size, distributed.get_rank(), distributed.get_world_size())
        images = (sampling.generate_images(net, batch.tolist(), self.sampler_name, self.sampler_kwargs, self.device,
                                           precision=PRECISION)
                  for batch in batches if len(batch))
        stats = metrics.feature_statistics(self.detector, images, self.device)
        if stats is None:  # fewer seeds than ranks: this rank had none
            stats = metrics.FeatureStats(len(self.reference['mu']), device=self.device)
        return stats.all_reduce()
