"""The training loop: data, optimizer steps, EMA, progress ticks, snapshots and exactly resumable states.

Randomness of a step (σ, noise, dropout, augmentation) comes from torch's global generator, re-seeded
before every pass from (seed, step, global pass index). With the data order also global (each process takes
its slice of one shared sequence), a run gives the same result whatever the number of processes, for a
given --batch and --batch-gpu; a resumed run continues bit-for-bit. Files are written and read by
training/checkpoints.py (snapshots) and training/training_state.py (states).
"""

import copy
import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

import dnnlib
from torch_utils import distributed
from torch_utils import misc
from torch_utils import training_stats
from training import checkpoints
from training import divergence
from training import ema as power_ema_lib
from training import run_control
from training import snapshot_metrics
from training import ticks
from training import training_state
from training.run_control import TrainingError  # noqa: F401  (what launch catches)
from training.precision import PRECISIONS

EMA_RAMPUP_RATIO = 0.05                 # EMA half-life is at most this fraction of the images seen so far.


class BatchSizeError(ValueError):
    """Batch sizes that do not split over the processes and passes; `argument` names the one at fault."""

    def __init__(self, argument, message):
        super().__init__(message)
        self.argument = argument        # 'batch_size' or 'batch_gpu'


def batch_rounds(batch_size, batch_gpu, world_size):
    """(images per pass per process, passes per optimizer step) for `batch_size` images per step over all processes."""
    if batch_size % world_size != 0:
        raise BatchSizeError('batch_size', f'{batch_size} is not divisible by the number of processes ({world_size})')
    batch_per_process = batch_size // world_size
    batch_gpu = min(batch_gpu or batch_per_process, batch_per_process)
    if batch_per_process % batch_gpu != 0:
        raise BatchSizeError('batch_gpu', f'{batch_gpu} does not divide the per-process batch {batch_per_process} '
                                          f'(a batch of {batch_size} over {world_size} processes)')
    return batch_gpu, batch_per_process // batch_gpu


@dataclasses.dataclass
class Counters:
    """Where the run stands; saved in every training state."""

    cur_nimg: int = 0                   # Images trained on, over all processes.
    cur_step: int = 0                   # Optimizer steps taken.
    cur_tick: int = 0                   # Progress ticks reported.
    tick_start_nimg: int = 0            # cur_nimg when the current tick began.

    @classmethod
    def resumed(cls, state):
        """Where a training state stood; zeros for None."""
        if state is None:
            return cls()
        return cls(**{field.name: state[field.name] for field in dataclasses.fields(cls)})

    def count_step(self, batch_size):
        self.cur_nimg += batch_size
        self.cur_step += 1

    def next_tick(self):
        """Close the current tick and return its number."""
        self.cur_tick += 1
        self.tick_start_nimg = self.cur_nimg
        return self.cur_tick - 1


class _GlobalOrderSampler(torch.utils.data.Sampler):
    """This process's share of one dataset order common to all processes.

    Every global batch of `batch_size` consecutive items is cut into `world_size` contiguous slices, and
    process `rank` yields slice `rank`; so the images of a step do not depend on the process count.
    """

    def __init__(self,
        dataset,                # The training set.
        rank,                   # This process's index.
        world_size,             # Number of processes.
        batch_size,             # Items of one optimizer step over all processes.
        seed,                   # Seed of the shuffled order.
        start_nimg,             # Items of the global order already consumed (resume).
    ):
        self.order = misc.InfiniteSampler(dataset, rank=0, num_replicas=1, shuffle=True, seed=seed, start_index=start_nimg)
        self.rank = rank
        self.batch_per_process = batch_size // world_size
        self.batch_size = batch_size

    def __iter__(self):
        for position, index in enumerate(self.order):
            if (position % self.batch_size) // self.batch_per_process == self.rank:
                yield index


def _plain_options(arguments):
    """training_loop's arguments as plain JSON values, less the objects read for it (resume, transfer)."""
    options = {key: value for key, value in arguments.items() if key not in ('resume', 'transfer')}
    return json.loads(json.dumps(options, default=str))


def _pass_seed(seed, step, pass_index):
    """Seed of the generator for one forward/backward pass: a hash of the run seed, step and pass."""
    return int(np.random.SeedSequence([seed, step, pass_index]).generate_state(1, np.uint64)[0] >> 1)


def _param_digest(module):
    """(sum, sum of squares) of all parameters in float64: equal on every rank while DDP keeps them in sync."""
    flat = torch.cat([p.detach().flatten().to(torch.float64) for p in module.parameters()])
    return [float(flat.sum()), float(flat.square().sum())]


def _gather_objects(obj):
    """[obj of rank 0, obj of rank 1, …] on every rank."""
    if distributed.get_world_size() == 1:
        return [obj]
    gathered = [None] * distributed.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def training_loop(
    run_dir             = '.',          # Output directory.
    dataset_kwargs      = {},           # Options of the training set.
    data_loader_kwargs  = {},           # Options of torch.utils.data.DataLoader.
    network_kwargs      = {},           # Options of the preconditioned network.
    loss_kwargs         = {},           # Options of the loss function.
    optimizer_kwargs    = {},           # Options of the optimizer.
    augment_kwargs      = None,         # Options of the augmentation pipe; None = no augmentation.
    seed                = 0,            # Run seed: data order and every random draw derive from it.
    batch_size          = 512,          # Images per optimizer step, over all processes.
    batch_gpu           = None,         # Images per forward pass per process; None = batch_size / processes.
    total_kimg          = 200000,       # Training duration in thousands of images.
    ema_halflife_kimg   = 500,          # EMA half-life in thousands of images.
    ema_rampup_ratio    = EMA_RAMPUP_RATIO, # EMA ramp-up coefficient; None = no ramp-up.
    ema_profiles        = None,         # σ_rel of the power-function EMA profiles kept for post-hoc EMA; None = none.
    metric_kwargs       = None,         # Options of snapshot_metrics.SnapshotMetrics (FID at snapshots); None = none.
    tensorboard         = False,        # Also write each tick's stats as TensorBoard events into run_dir.
    lr_rampup_kimg      = 10000,        # Learning rate ramp-up in thousands of images.
    loss_scaling        = 1,            # Loss scaling factor (fp16 headroom).
    kimg_per_tick       = 50,           # Progress line interval in thousands of images.
    snapshot_ticks      = 50,           # Network snapshot interval in ticks; None = only at the end.
    snapshot_format     = 'pickle',     # Files of snapshots and power-EMA profiles: checkpoints.FORMATS.
    state_dump_ticks    = 500,          # Training state interval in ticks; None = only at the end.
    resume_pkl          = None,         # Snapshot whose parameters start the run (--transfer); read as `transfer`.
    resume_state        = None,         # Training state to continue exactly (--resume); read as `resume`.
    cudnn_benchmark     = True,         # cuDNN autotuning on CUDA.
    allow_tf32          = False,        # TF32 matmuls/convolutions on CUDA (off: float32 stays float32).
    precision           = 'fp32',       # 'fp32', 'fp16' (the network's use_fp16) or 'bf16' (autocast); see PRECISIONS.
    compile             = False,        # torch.compile the inner network.
    device              = None,         # 'cpu' or 'cuda'; None = the device distributed.init() chose.
    nan_policy          = 'stop',       # Non-finite loss or gradients: 'stop' the run or 'skip-step'; see divergence.py.
    resume              = None,         # The training state at resume_state, as training_state.load_training_state read it.
    transfer            = None,         # The snapshot at resume_pkl, as training_state.load_transfer read it.
):
    """Train until `total_kimg` or a SIGINT/SIGTERM; returns a summary of the last tick."""
    options = _plain_options(locals())  # the config, recorded in every state
    start_time = time.time()
    device = _training_device(device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    _seed_and_configure_torch(seed, rank, world_size, cudnn_benchmark, allow_tf32)
    batch_gpu, num_rounds = batch_rounds(batch_size, batch_gpu, world_size)
    counters = Counters.resumed(resume)

    distributed.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    loader = _data_loader(dataset, data_loader_kwargs, seed, batch_size, batch_gpu, resume['sampler_nimg'] if resume else 0)
    distributed.print0('Constructing network...')
    net = _build_network(network_kwargs, dataset, device, batch_gpu)

    distributed.print0('Setting up optimizer...')
    run = _Run(run_dir=run_dir, options=options, counters=counters, net=net,
               ema=power_ema_lib.TrainingEMA(net, ema_halflife_kimg, ema_rampup_ratio, ema_profiles),
               loss_fn=dnnlib.util.construct_class_by_name(**loss_kwargs),
               optimizer=dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs),
               augment_pipe=dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs else None,
               device=device, kimg_per_tick=kimg_per_tick, snapshot_format=snapshot_format, start_time=start_time)
    run.start_from(transfer, resume_pkl, resume, resume_state)
    del transfer, resume
    ddp, autocast = _for_training(net, device, compile, precision)
    guard = divergence.NonFiniteGuard(net.parameters(), run.optimizer, nan_policy)
    metrics = None if metric_kwargs is None else snapshot_metrics.SnapshotMetrics(
        run_dir=run_dir, device=device, resume_state=resume_state, resume_nimg=counters.cur_nimg, **metric_kwargs)
    log = ticks.TickLog(run_dir, tensorboard)
    total_nimg = round(total_kimg * 1000)       # whole images, so that 0.048 kimg means 48 images
    nimg_per_tick = max(round(kimg_per_tick * 1000), 1)
    distributed.print0(f'Training for {total_kimg:g} kimg from {counters.cur_nimg / 1000:g} kimg...\n')
    tick_timer = ticks.TickTimer(start_time, run.time_offset_sec)
    progress = ticks.TickBar(counters, batch_size, nimg_per_tick, total_nimg)
    data = iter(loader)                         # starts the workers: RunControl ends them on every way out
    with log, progress, run_control.RunControl(run_dir, data, run.save_state, lambda: guard.verdict(batch_size),
                                               lambda: (counters.cur_nimg, counters.cur_step), run.newest_state) as control:
        while True:
            # One optimizer step over `num_rounds` accumulated passes.
            run.optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_rounds):
                with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
                    images, labels = next(data)
                    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
                    labels = labels.to(device, non_blocking=True)
                    torch.manual_seed(_pass_seed(seed, counters.cur_step, rank * num_rounds + round_idx))
                    with torch.autocast(**autocast):
                        loss = run.loss_fn(net=ddp, images=images, labels=labels, augment_pipe=run.augment_pipe,
                                           step=counters.cur_step)
                    training_stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / (batch_size // world_size)).backward()
            for group in run.optimizer.param_groups:
                group['lr'] = optimizer_kwargs['lr'] * min(counters.cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
            with control.updating():
                guard.step(counters.cur_step)
                counters.count_step(batch_size)
                run.ema.update(counters.cur_nimg, counters.cur_step, batch_size)
            progress.advance(tick_timer.tick_start_time)
            finished = counters.cur_nimg >= total_nimg
            stopping = control.stop.agreed()
            if not (finished or stopping or counters.cur_tick == 0
                    or counters.cur_nimg >= counters.tick_start_nimg + nimg_per_tick):
                continue
            progress.close()
            skipped_steps = guard.verdict(batch_size)  # before anything of this tick is written
            summary = ticks.report_tick(tick_timer, counters, total_nimg, device, stopping, skipped_steps)
            ended_tick = counters.next_tick()  # first, so that a state written now resumes at the next tick
            if run_dir is not None and (finished or (snapshot_ticks is not None and ended_tick % snapshot_ticks == 0)):
                with control.writing('writing a network snapshot'):
                    snapshot_nets = run.save_snapshots(dataset_kwargs)
                if metrics is not None:
                    with control.writing('measuring the snapshot'):
                        metrics.evaluate(counters.cur_nimg, snapshot_nets)
            if run_dir is not None and (finished or stopping or (state_dump_ticks is not None and ended_tick != 0
                                                                 and ended_tick % state_dump_ticks == 0)):
                with control.writing('writing a training state', state=True):
                    run.save_state()
            log.write(counters.cur_nimg)
            tick_timer.start_tick()
            if finished or stopping:
                break
            progress.start()

    summary.stopped = stopping and not finished
    distributed.print0('Stopped on request.' if summary.stopped else 'Exiting...')
    return summary


def _training_device(device):
    """The torch device to train on; None = the one distributed.init() chose (with the local rank's CUDA index)."""
    if device is None:
        return distributed.get_device()
    device = torch.device(device)
    if device.type == distributed.get_device().type:
        device = distributed.get_device()  # carries the local rank's CUDA index
    return device


def _seed_and_configure_torch(seed, rank, world_size, cudnn_benchmark, allow_tf32):
    torch.manual_seed(seed)  # the same initial weights whatever the number of processes
    np.random.seed((seed * world_size + rank) % (1 << 31))
    random.seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def _data_loader(dataset, data_loader_kwargs, seed, batch_size, batch_gpu, start_nimg):
    """This process's batches of the global data order, from image `start_nimg` of it on."""
    sampler = _GlobalOrderSampler(dataset, rank=distributed.get_rank(), world_size=distributed.get_world_size(),
                                  batch_size=batch_size, seed=seed, start_nimg=start_nimg)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu, generator=torch.Generator().manual_seed(seed),
                                       worker_init_fn=run_control.ignore_stop_signals, **data_loader_kwargs)


def _build_network(network_kwargs, dataset, device, batch_gpu):
    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.train().requires_grad_(True).to(device)
    if distributed.is_main():
        _print_network_summary(net, batch_gpu, device)
    return net


def _for_training(net, device, compile, precision):
    """(the module to call: DDP over `net` with several processes, the autocast options of `precision`)."""
    ddp = net if distributed.get_world_size() == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
    if compile:
        net.model.compile()
    autocast_dtype = PRECISIONS[precision].train_autocast
    return ddp, dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)


def _print_network_summary(net, batch_gpu, device):
    with torch.no_grad():
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)


class _Run:
    """The objects of a run that training states and snapshots hold, and their reading and writing."""

    def __init__(self, run_dir, options, counters, net, ema, loss_fn, optimizer, augment_pipe, device, kimg_per_tick,
                 snapshot_format, start_time):
        self.run_dir, self.options, self.counters = run_dir, options, counters
        self.net, self.ema, self.loss_fn, self.optimizer, self.augment_pipe = net, ema, loss_fn, optimizer, augment_pipe
        self.device, self.kimg_per_tick, self.start_time = device, kimg_per_tick, start_time
        self.snapshot_format = snapshot_format
        self.time_offset_sec = 0.0      # training time of the runs this one resumes

    def start_from(self, snapshot, snapshot_path, state, state_path):
        """Take the weights of a snapshot's EMA network (--transfer) and/or continue a training state (--resume)."""
        if snapshot is not None:
            distributed.print0(f'Loading network weights from "{snapshot_path}"...')
            misc.copy_params_and_buffers(src_module=snapshot['ema'], dst_module=self.net, require_all=False)
            misc.copy_params_and_buffers(src_module=snapshot['ema'], dst_module=self.ema.ema, require_all=False)
        if state is not None:
            distributed.print0(f'Loading training state from "{state_path}"...')
            self._restore(state, state_path)

    def _restore(self, state, path):
        """Continue from a training state (read from `path`); random states only when the process count is the same."""
        training_state.restore_training_state(state, path, self.net, self.ema.ema, self.optimizer, self.loss_fn,
                                           self.augment_pipe)
        if self.ema.power is not None:
            training_state.restore_power_ema(state, path, self.ema.power)
        self.time_offset_sec = state['total_time_sec']
        if state['world_size'] == distributed.get_world_size():
            training_state.set_rng_state(state['rng_states'][distributed.get_rank()], self.device)

    def save_state(self):
        """Write a training state of the run as it stands (collective: every process calls it)."""
        divergence.check_finite('the network to save', self.net, *self.ema.networks())
        rng_states = _gather_objects(training_state.rng_state(self.device))
        digests = _gather_objects(_param_digest(self.net))
        if any(digest != digests[0] for digest in digests):
            distributed.print0(f'Warning: the processes hold different parameters: {digests}')
        if distributed.is_main():
            training_state.save_training_state(
                os.path.join(self.run_dir, checkpoints.state_name(self.counters.cur_nimg, self.kimg_per_tick)), self.net,
                self.ema.ema, self.optimizer, self.loss_fn, self.augment_pipe, dataclasses.asdict(self.counters),
                self.time_offset_sec + time.time() - self.start_time, rng_states, len(rng_states), digests, self.options,
                power_ema=self.ema.power)

    def save_snapshots(self, dataset_kwargs):
        """Write the EMA snapshot and one pickle per power-EMA profile; returns {name: network} to measure."""
        divergence.check_finite('the EMA network to save', *self.ema.networks())
        cur_nimg = self.counters.cur_nimg
        self._save_snapshot(checkpoints.snapshot_name(cur_nimg, self.kimg_per_tick), self.ema.ema, dataset_kwargs)
        networks = {'ema': self.ema.ema}
        if self.ema.power is not None:
            for record, profile in zip(self.ema.power.records(cur_nimg), self.ema.power.emas):
                self._save_snapshot(checkpoints.power_ema_name(cur_nimg, record['std'], self.kimg_per_tick), profile,
                                    dataset_kwargs, power_ema=record)
                networks[power_ema_lib.profile_network_name(record['std'])] = profile
        return networks

    def _save_snapshot(self, name, ema, dataset_kwargs, **extra):
        data = dict(ema=ema, loss_fn=self.loss_fn, augment_pipe=self.augment_pipe, dataset_kwargs=dict(dataset_kwargs), **extra)
        for key, value in data.items():
            if isinstance(value, torch.nn.Module):
                value = copy.deepcopy(value).eval().requires_grad_(False)
                if distributed.get_world_size() > 1:
                    misc.check_ddp_consistency(value)
                data[key] = value.cpu()
        if distributed.is_main():
            checkpoints.save_network(os.path.join(self.run_dir, name), data, self.snapshot_format)

    def newest_state(self):
        """The training state a resume of run_dir picks, or None."""
        try:
            return training_state.resolve_resume_path(self.run_dir) if self.run_dir else None
        except training_state.TrainingStateError:
            return None
