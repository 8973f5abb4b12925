"""The training loop: data, optimizer steps, EMA, progress ticks, snapshots and exactly resumable states.

Randomness of a step (σ, noise, dropout, augmentation) comes from torch's global generator, re-seeded
before every pass from (seed, step, global pass index). With the data order also global (each process takes
its slice of one shared sequence), a run gives the same result whatever the number of processes, for a
given --batch and --batch-gpu; a resumed run continues bit-for-bit. Files are written and read by
training/checkpoints.py.
"""

import copy
import dataclasses
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import time

import numpy as np
import psutil
import torch
import torch.distributed as dist
import tqdm

import dnnlib
from torch_utils import distributed
from torch_utils import misc
from torch_utils import training_stats
from training import checkpoints
from training import divergence
from training import ema as power_ema_lib
from training import snapshot_metrics
from training.precision import PRECISIONS

EMA_RAMPUP_RATIO = 0.05                 # EMA half-life is at most this fraction of the images seen so far.


class TrainingError(RuntimeError):
    """The run failed; the one-line message says where and what, and whether a training state was written."""


class BatchSizeError(ValueError):
    """Batch sizes that do not split over the processes and passes; `option` names the one at fault."""

    def __init__(self, option, message):
        super().__init__(message)
        self.option = option


def batch_rounds(batch_size, batch_gpu, world_size):
    """(images per pass per process, passes per optimizer step) for `batch_size` images per step over all processes."""
    if batch_size % world_size != 0:
        raise BatchSizeError('--batch', f'{batch_size} is not divisible by the number of processes ({world_size})')
    batch_per_process = batch_size // world_size
    batch_gpu = min(batch_gpu or batch_per_process, batch_per_process)
    if batch_per_process % batch_gpu != 0:
        raise BatchSizeError('--batch-gpu', f'{batch_gpu} does not divide the per-process batch {batch_per_process} '
                                            f'(--batch={batch_size} over {world_size} processes)')
    return batch_gpu, batch_per_process // batch_gpu


@dataclasses.dataclass
class Counters:
    """Where the run stands; saved in every training state."""

    cur_nimg: int = 0                   # Images trained on, over all processes.
    cur_step: int = 0                   # Optimizer steps taken.
    cur_tick: int = 0                   # Progress ticks reported.
    tick_start_nimg: int = 0            # cur_nimg when the current tick began.


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


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; a second signal aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        self.group = None
        if distributed.get_world_size() > 1:  # a CPU side channel, so polling never syncs the GPU stream
            self.group = dist.new_group(backend='gloo')

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        saving = ('saving the training state' if self.group is None else
                  'saving the training state if every process is still running (else the newest state stays)')
        print(f'\n{signal.Signals(signum).name}: finishing this step and {saving} (send again to abort)', flush=True)
        self.uninstall()

    def agreed(self):
        """True on every rank when any rank was signalled."""
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def _ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the training process, which stops cleanly and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


WORKER_EXIT_SEC = 5                     # How long DataLoader workers get to end before they are killed.


def _stop_workers(iterator):
    """End the DataLoader workers of `iterator` now; they ignore SIGTERM, so those that linger get SIGKILL.

    Left to interpreter exit, multiprocessing would SIGTERM and then wait for them forever.
    """
    workers = list(getattr(iterator, '_workers', []))
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()  # asks them to end (their "done" event) and waits up to torch's status interval
    deadline = time.monotonic() + WORKER_EXIT_SEC
    for worker in workers:
        worker.join(timeout=max(deadline - time.monotonic(), 0))
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=1)
    multiprocessing.active_children()  # reaps them


def _one_line(err):
    """The gist of an exception in one line. A DataLoader worker's error comes back with the worker's traceback in
    its message, whose last line is the original error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if 'Original Traceback' in str(err):
        return lines[-1]
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


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


def _cpu_sec(process):
    """CPU time this process has used (all threads); beside wall time it shows what other load cost a tick."""
    times = process.cpu_times()
    return times.user + times.system


def _peak_cpu_mem_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


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
    state_dump_ticks    = 500,          # Training state interval in ticks; None = only at the end.
    resume_pkl          = None,         # Snapshot whose parameters start the run (--transfer).
    resume_state        = None,         # Training state to continue exactly (--resume).
    cudnn_benchmark     = True,         # cuDNN autotuning on CUDA.
    allow_tf32          = False,        # TF32 matmuls/convolutions on CUDA (off: float32 stays float32).
    precision           = 'fp32',       # 'fp32', 'fp16' (the network's use_fp16) or 'bf16' (autocast); see PRECISIONS.
    compile             = False,        # torch.compile the inner network.
    device              = None,         # 'cpu' or 'cuda'; None = the device distributed.init() chose.
    nan_policy          = 'stop',       # Non-finite loss or gradients: 'stop' the run or 'skip-step'; see divergence.py.
    resume              = None,         # The state at resume_state when the caller has read it; None = read it here.
    transfer            = None,         # The snapshot at resume_pkl when the caller has read it; None = read it here.
):
    """Train until `total_kimg` or a SIGINT/SIGTERM; returns a summary of the last tick."""
    options = dict(
        run_dir=run_dir, dataset_kwargs=dataset_kwargs, data_loader_kwargs=data_loader_kwargs,
        network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, optimizer_kwargs=optimizer_kwargs,
        augment_kwargs=augment_kwargs, seed=seed, batch_size=batch_size, batch_gpu=batch_gpu, total_kimg=total_kimg,
        ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio, ema_profiles=ema_profiles,
        metric_kwargs=metric_kwargs, tensorboard=tensorboard, lr_rampup_kimg=lr_rampup_kimg,
        loss_scaling=loss_scaling, kimg_per_tick=kimg_per_tick, snapshot_ticks=snapshot_ticks,
        state_dump_ticks=state_dump_ticks, resume_pkl=resume_pkl, resume_state=resume_state,
        cudnn_benchmark=cudnn_benchmark, allow_tf32=allow_tf32, precision=precision, compile=compile, device=device,
        nan_policy=nan_policy)
    options = json.loads(json.dumps(options, default=str))  # plain JSON values, recorded in every state
    start_time = time.time()
    device = _training_device(device)
    rank = distributed.get_rank()
    world_size = distributed.get_world_size()
    _seed_and_configure_torch(seed, rank, world_size, cudnn_benchmark, allow_tf32)
    batch_gpu, num_rounds = batch_rounds(batch_size, batch_gpu, world_size)
    batch_per_process = batch_size // world_size

    if resume is None and resume_state is not None:
        resume = checkpoints.load_training_state(resume_state)
    counters = Counters()
    if resume is not None:
        counters = Counters(cur_nimg=resume['cur_nimg'], cur_step=resume['cur_step'], cur_tick=0,
                            tick_start_nimg=resume['cur_nimg'])

    distributed.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    sampler = _GlobalOrderSampler(dataset, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                                  start_nimg=resume['sampler_nimg'] if resume else 0)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu, worker_init_fn=_ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(seed), **data_loader_kwargs)

    distributed.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if distributed.is_main():
        _print_network_summary(net, batch_gpu, device)

    distributed.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    power_ema = power_ema_lib.PowerEMA(net, ema_profiles) if ema_profiles else None

    if resume_pkl is not None:
        distributed.print0(f'Loading network weights from "{resume_pkl}"...')
        if transfer is None:
            transfer = checkpoints.load_transfer(resume_pkl, net, verbose=distributed.is_main())
        misc.copy_params_and_buffers(src_module=transfer['ema'], dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=transfer['ema'], dst_module=ema, require_all=False)
        del transfer
    time_offset_sec = 0.0                   # training time of the runs this one resumes
    if resume is not None:
        distributed.print0(f'Loading training state from "{resume_state}"...')
        checkpoints.restore_training_state(resume, resume_state, net, ema, optimizer, loss_fn, augment_pipe)
        counters.cur_tick = resume['cur_tick']
        counters.tick_start_nimg = resume['tick_start_nimg']
        time_offset_sec = resume['total_time_sec']
        if power_ema is not None:
            checkpoints.restore_power_ema(resume, resume_state, power_ema)

    ddp = net
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
                                                        broadcast_buffers=False)
    if compile:
        net.model.compile()
    autocast_dtype = PRECISIONS[precision].train_autocast
    autocast = dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    ema_update = _EMAUpdate(net, ema)
    guard = divergence.NonFiniteGuard(net.parameters(), optimizer, nan_policy)
    stop = _StopRequest()

    if resume is not None:
        if resume['world_size'] == world_size:
            checkpoints.set_rng_state(resume['rng_states'][rank], device)
        else:
            distributed.print0(f'Note: the state was written by {resume["world_size"]} processes; '
                               f'random generators start afresh')
        del resume

    def save_state():
        divergence.check_finite('the network to save', net, ema, *(power_ema.emas if power_ema else []))
        rng_states = _gather_objects(checkpoints.rng_state(device))
        digests = _gather_objects(_param_digest(net))
        if any(digest != digests[0] for digest in digests):
            distributed.print0(f'Warning: the processes hold different parameters: {digests}')
        if distributed.is_main():
            checkpoints.save_training_state(
                os.path.join(run_dir, checkpoints.state_name(counters.cur_nimg, kimg_per_tick)), net, ema, optimizer, loss_fn,
                augment_pipe, dataclasses.asdict(counters), time_offset_sec + time.time() - start_time, rng_states,
                world_size, digests, options, power_ema=power_ema)

    metrics = None
    if metric_kwargs is not None:
        metrics = snapshot_metrics.SnapshotMetrics(run_dir=run_dir, device=device, resume_state=resume_state,
                                                   resume_nimg=counters.cur_nimg if resume_state else 0, **metric_kwargs)
    stats_jsonl = None
    if run_dir is not None and distributed.is_main():
        stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
    tb_writer = None
    if tensorboard and run_dir is not None and distributed.is_main():
        from torch.utils.tensorboard import SummaryWriter  # optional package: launch checks it at start-up
        tb_writer = SummaryWriter(run_dir)
    total_nimg = round(total_kimg * 1000)       # whole images, so that 0.048 kimg means 48 images
    nimg_per_tick = max(round(kimg_per_tick * 1000), 1)
    distributed.print0(f'Training for {total_kimg:g} kimg from {counters.cur_nimg / 1000:g} kimg...')
    distributed.print0()
    tick_timer = _TickTimer(start_time, time_offset_sec)
    bar_stream = sys.__stdout__ if distributed.is_main() else None  # the real terminal, not the tee into log.txt
    bar = tick_progress_bar(bar_stream, _tick_nimg(counters, batch_size, nimg_per_tick, total_nimg), counters.cur_tick)
    summary = dnnlib.EasyDict(cur_nimg=counters.cur_nimg, cur_step=counters.cur_step, stopped=False)
    phase = 'step'                              # 'step', 'update' (parameters half-updated), 'snapshot', 'metrics' or 'state'
    dataset_iterator = iter(loader)             # starts the workers: from here on, every exit ends them
    stop.install()
    try:
        while True:
            # One optimizer step over `num_rounds` accumulated passes.
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_rounds):
                with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
                    images, labels = next(dataset_iterator)
                    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
                    labels = labels.to(device, non_blocking=True)
                    torch.manual_seed(_pass_seed(seed, counters.cur_step, rank * num_rounds + round_idx))
                    with torch.autocast(**autocast):
                        loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
                    training_stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / batch_per_process).backward()
            lr = optimizer_kwargs['lr'] * min(counters.cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
            for group in optimizer.param_groups:
                group['lr'] = lr
            phase = 'update'
            guard.step(counters.cur_step)
            loss_fn.advance()
            ema_update(counters.cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)

            counters.cur_nimg += batch_size
            counters.cur_step += 1
            _advance_bar(bar, batch_size, counters, total_nimg, tick_timer.tick_start_time)
            if power_ema is not None:
                power_ema.update(counters.cur_step)
            phase = 'step'
            finished = counters.cur_nimg >= total_nimg
            stopping = stop.agreed()
            if not (finished or stopping or counters.cur_tick == 0
                    or counters.cur_nimg >= counters.tick_start_nimg + nimg_per_tick):
                continue

            bar.close()
            skipped_steps = guard.verdict(batch_size)  # before anything of this tick is written
            summary = _report_tick(tick_timer, counters, total_nimg, device, stopping, skipped_steps)
            # Counters move first, so that a state written now resumes at the next tick.
            ended_tick = counters.cur_tick
            counters.cur_tick += 1
            counters.tick_start_nimg = counters.cur_nimg
            if run_dir is not None:
                if finished or (snapshot_ticks is not None and ended_tick % snapshot_ticks == 0):
                    phase = 'snapshot'
                    divergence.check_finite('the EMA network to save', ema, *(power_ema.emas if power_ema else []))
                    snapshot_nets = _save_snapshots(run_dir, counters.cur_nimg, kimg_per_tick, ema, power_ema, loss_fn,
                                                    augment_pipe, dataset_kwargs, world_size)
                    if metrics is not None:
                        phase = 'metrics'
                        metrics.evaluate(counters.cur_nimg, snapshot_nets)
                    phase = 'step'
                if finished or stopping or (state_dump_ticks is not None and ended_tick % state_dump_ticks == 0
                                            and ended_tick != 0):
                    phase = 'state'
                    save_state()
                    phase = 'step'
            if stats_jsonl is not None:
                stats_jsonl.write(json.dumps(dict(training_stats.default_collector.as_dict(), timestamp=time.time())) + '\n')
                stats_jsonl.flush()
            if tb_writer is not None:
                for name, value in training_stats.default_collector.as_dict().items():
                    tb_writer.add_scalar(name, value.mean, global_step=counters.cur_nimg)
                tb_writer.flush()
            tick_timer.start_tick()
            if finished or stopping:
                break
            bar = tick_progress_bar(bar_stream, _tick_nimg(counters, batch_size, nimg_per_tick, total_nimg), counters.cur_tick)
    except Exception as err:
        _stop_workers(dataset_iterator)  # first: a worker's pending error must not outlive the run
        doing = {'snapshot': ' while writing a network snapshot', 'metrics': ' while measuring the snapshot',
                 'state': ' while writing a training state'}.get(phase, '')
        saved = ''
        if not isinstance(err, divergence.DivergenceError):
            try:
                guard.verdict(batch_size)
            except divergence.DivergenceError as diverged:
                err = diverged  # the diverged weights must not be saved whatever failed afterwards
        if isinstance(err, divergence.DivergenceError):
            doing = ''
            saved = f'; nothing of it was saved{_newest_state_note(run_dir)}'
        elif phase in ('step', 'snapshot', 'metrics') and run_dir is not None and world_size == 1:  # other ranks would wait in gathers
            try:
                save_state()
                saved = f'; training state saved, resume with --resume={run_dir}'
            except Exception as save_err:
                saved = f'; no training state saved ({_one_line(save_err)})'
        elif phase == 'state':
            saved = '; earlier training states are intact'
        elif world_size > 1:
            saved = (f'; no training state saved (a run of {world_size} processes saves one only when all stop '
                     f'together){_newest_state_note(run_dir)}')
        raise TrainingError(f'training failed at {counters.cur_nimg / 1000:g} kimg (step {counters.cur_step}){doing}: '
                            f'{_one_line(err)}{saved}') from err
    finally:
        bar.close()
        stop.uninstall()
        _stop_workers(dataset_iterator)
        if stats_jsonl is not None:
            stats_jsonl.close()
        if tb_writer is not None:
            tb_writer.close()

    if stopping and not finished:
        distributed.print0('Stopped on request; resume with --resume=' + (run_dir or '<run dir>'))
    else:
        distributed.print0('Exiting...')
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


def _print_network_summary(net, batch_gpu, device):
    with torch.no_grad():
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)


class _EMAUpdate:
    """Moves the EMA network towards the trained one after each step; floating-point buffers are copied."""

    def __init__(self, net, ema):
        self.net_params = list(net.parameters())
        self.ema_params = list(ema.parameters())
        self.net_buffers = [b for b in net.buffers() if b.is_floating_point()]
        self.ema_buffers = [b for b in ema.buffers() if b.is_floating_point()]

    def __call__(self, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.net_params, 1 - ema_beta)
            if self.net_buffers:
                torch._foreach_copy_(self.ema_buffers, self.net_buffers)


def _save_snapshots(run_dir, cur_nimg, kimg_per_tick, ema, power_ema, loss_fn, augment_pipe, dataset_kwargs, world_size):
    """Write the EMA snapshot and one pickle per power-EMA profile; returns {name: network} as evaluated at snapshots."""
    _save_snapshot(os.path.join(run_dir, checkpoints.snapshot_name(cur_nimg, kimg_per_tick)), ema, loss_fn, augment_pipe,
                   dataset_kwargs, world_size)
    networks = {'ema': ema}
    if power_ema is not None:
        for record, profile in zip(power_ema.records(cur_nimg), power_ema.emas):
            _save_snapshot(os.path.join(run_dir, checkpoints.power_ema_name(cur_nimg, record['std'], kimg_per_tick)),
                           profile, loss_fn, augment_pipe, dataset_kwargs, world_size, power_ema=record)
            networks[power_ema_lib.profile_network_name(record['std'])] = profile
    return networks


def _save_snapshot(path, ema, loss_fn, augment_pipe, dataset_kwargs, world_size, **extra):
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs), **extra)
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value).eval().requires_grad_(False)
            if world_size > 1:
                misc.check_ddp_consistency(value)
            data[key] = value.cpu()
    if distributed.is_main():
        checkpoints.save_network_pickle(path, data)


class _TickTimer:
    """Wall and CPU time of the current tick, and the maintenance time (snapshots, states) between ticks."""

    def __init__(self, start_time, time_offset_sec):
        self.process = psutil.Process()
        self.start_time = start_time
        self.time_offset_sec = time_offset_sec  # training time of the runs this one resumes
        self.tick_start_time = time.time()
        self.tick_start_cpu_sec = _cpu_sec(self.process)
        self.maintenance_sec = self.tick_start_time - start_time
        self.tick_end_time = None

    def end_tick(self):
        self.tick_end_time = time.time()
        return self.tick_end_time - self.tick_start_time

    def start_tick(self):
        self.tick_start_time = time.time()
        self.tick_start_cpu_sec = _cpu_sec(self.process)
        self.maintenance_sec = self.tick_start_time - self.tick_end_time


def tick_progress_bar(stream, tick_nimg, tick):
    """A tqdm bar of one tick on `stream` when it is a terminal, else a disabled one that writes nothing, so that
    redirected output and log.txt never hold bar redraws."""
    enabled = stream is not None and hasattr(stream, 'isatty') and stream.isatty()
    return tqdm.tqdm(total=tick_nimg, desc=f'tick {tick}', file=stream, unit='img', unit_scale=True, leave=False,
                     dynamic_ncols=True, disable=not enabled)


def _tick_nimg(counters, batch_size, nimg_per_tick, total_nimg):
    """Images of the tick that starts now: tick 0 ends after one step, the last one at the run's end."""
    if counters.cur_tick == 0:
        return batch_size
    return max(min(nimg_per_tick, total_nimg - counters.cur_nimg), 1)


def _advance_bar(bar, batch_size, counters, total_nimg, tick_start_time):
    """Count one step on the bar, with the run's ETA at this tick's pace as postfix."""
    if bar.disable:
        return
    sec_per_img = (time.time() - tick_start_time) / max(counters.cur_nimg - counters.tick_start_nimg, 1)
    bar.set_postfix_str(f'eta {dnnlib.util.format_time(max(total_nimg - counters.cur_nimg, 0) * sec_per_img)}', refresh=False)
    bar.update(batch_size)


def _newest_state_note(run_dir):
    """'; the newest training state is PATH' (the one a resume of `run_dir` picks), or '' when there is none."""
    try:
        return f'; the newest training state is {checkpoints.resolve_resume_path(run_dir)}' if run_dir else ''
    except checkpoints.TrainingStateError:
        return '; no training state was written before'


def _report_tick(timer, counters, total_nimg, device, stopping, skipped_steps):
    """Report the tick's statistics, print its progress line and return the run's summary so far."""
    tick_sec = timer.end_tick()
    tick_nimg = max(counters.cur_nimg - counters.tick_start_nimg, 1)
    sec_per_kimg = tick_sec / tick_nimg * 1000
    cpu_sec_per_kimg = (_cpu_sec(timer.process) - timer.tick_start_cpu_sec) / tick_nimg * 1000
    total_time_sec = timer.time_offset_sec + timer.tick_end_time - timer.start_time
    cpu_mem_gb = timer.process.memory_info().rss / 2**30
    gpu_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    training_stats.report0('Progress/tick', counters.cur_tick)
    training_stats.report0('Progress/kimg', counters.cur_nimg / 1e3)
    training_stats.report0('Timing/total_sec', total_time_sec)
    training_stats.report0('Timing/sec_per_tick', tick_sec)
    training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
    training_stats.report0('Timing/cpu_sec_per_kimg', cpu_sec_per_kimg)
    training_stats.report0('Timing/maintenance_sec', timer.maintenance_sec)
    training_stats.report0('Resources/cpu_mem_gb', cpu_mem_gb)
    training_stats.report0('Resources/peak_cpu_mem_gb', _peak_cpu_mem_gb())
    training_stats.report0('Resources/peak_gpu_mem_gb', gpu_mem_gb)
    training_stats.report0('Progress/skipped_steps', skipped_steps)
    training_stats.default_collector.update()
    loss_mean = training_stats.default_collector.mean('Loss/loss')
    eta_sec = max(total_nimg - counters.cur_nimg, 0) / 1000 * sec_per_kimg
    fields = [
        f'tick {counters.cur_tick:<5d}',
        f'kimg {counters.cur_nimg / 1e3:<9.3f}',
        f'time {dnnlib.util.format_time(total_time_sec):<12s}',
        f'sec/tick {tick_sec:<7.1f}',
        f'sec/kimg {sec_per_kimg:<7.2f}',
        f'eta {dnnlib.util.format_time(eta_sec):<12s}',
        f'maintenance {timer.maintenance_sec:<6.1f}',
        f'cpumem {cpu_mem_gb:<6.2f}',
    ]
    if device.type == 'cuda':
        fields.append(f'gpumem {gpu_mem_gb:<6.2f}')
        torch.cuda.reset_peak_memory_stats(device)
    fields.append(f'loss {loss_mean:<8.4f}')
    if skipped_steps:
        fields.append(f'skipped {skipped_steps}')
    distributed.print0(' '.join(fields))
    return dnnlib.EasyDict(cur_nimg=counters.cur_nimg, cur_step=counters.cur_step, cur_tick=counters.cur_tick,
                           stopped=stopping, sec_per_kimg=sec_per_kimg, peak_cpu_mem_gb=_peak_cpu_mem_gb(),
                           peak_gpu_mem_gb=gpu_mem_gb, loss=loss_mean)
