"""Progress of a run, tick by tick: the terminal's bar, the timer, the progress line and the statistics files.

A tick is the interval between two progress lines (--tick kimg; tick 0 ends after the first step). Its line and
its `stats.jsonl` record come from `training_stats`, reduced over all processes; rank 0 prints and writes them.
"""

import json
import os
import resource
import sys
import time

import psutil
import torch
import tqdm

import dnnlib
from torch_utils import distributed
from torch_utils import training_stats


def _cpu_sec(process):
    """CPU time this process has used (all threads); beside wall time it shows what other load cost a tick."""
    times = process.cpu_times()
    return times.user + times.system


def _peak_cpu_mem_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class TickLog:
    """Each tick's statistics appended to stats.jsonl (and TensorBoard events) by rank 0."""

    def __init__(self, run_dir, tensorboard):
        self.stats_jsonl = self.tb_writer = None
        if run_dir is not None and distributed.is_main():
            self.stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # optional package: launch checks it at start-up
                self.tb_writer = SummaryWriter(run_dir)

    def write(self, cur_nimg):
        stats = training_stats.default_collector.as_dict()
        if self.stats_jsonl is not None:
            self.stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            self.stats_jsonl.flush()
        if self.tb_writer is not None:
            for name, value in stats.items():
                self.tb_writer.add_scalar(name, value.mean, global_step=cur_nimg)
            self.tb_writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for writer in (self.stats_jsonl, self.tb_writer):
            if writer is not None:
                writer.close()


class TickBar:
    """The progress bar of the current tick on the terminal (rank 0), with the run's ETA at this tick's pace."""

    def __init__(self, counters, batch_size, nimg_per_tick, total_nimg):
        self.counters, self.batch_size, self.nimg_per_tick, self.total_nimg = counters, batch_size, nimg_per_tick, total_nimg
        self.stream = sys.__stdout__ if distributed.is_main() else None  # the real terminal, not the tee into log.txt
        self.start()

    def start(self):
        """A bar for the tick that starts now: tick 0 ends after one step, the last one at the run's end."""
        counters = self.counters
        tick_nimg = self.batch_size if counters.cur_tick == 0 else max(min(self.nimg_per_tick, self.total_nimg - counters.cur_nimg), 1)
        self.bar = tick_progress_bar(self.stream, tick_nimg, counters.cur_tick)

    def advance(self, tick_start_time):
        if self.bar.disable:
            return
        done = max(self.counters.cur_nimg - self.counters.tick_start_nimg, 1)
        sec_per_img = (time.time() - tick_start_time) / done
        eta = dnnlib.util.format_time(max(self.total_nimg - self.counters.cur_nimg, 0) * sec_per_img)
        self.bar.set_postfix_str(f'eta {eta}', refresh=False)
        self.bar.update(self.batch_size)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TickTimer:
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


def report_tick(timer, counters, total_nimg, device, stopping, skipped_steps):
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
