"""GPU speed in one table: training images/s per precision and memory format, sampling images/s per solver,
Inception feature images/s. Prints a markdown table and writes JSON.

Training times one optimizer step of the published CIFAR-10 network (fdm_edm, DDPM++, 10 classes, augmentation,
dropout 0.13, batch 512) as train.py configures it (`launch.build_config`): the same network, loss, augmentation
pipe, fused Adam, TF32 flags and autocast, on random images already on the device (data loading and the EMA
update are left out). Sampling reuses sample_speed.py's timing, the detector row fid_speed.py's. Each row is
isolated: a failure shows `error: …` in its cell and the others still run. The torch.compile rows run last and
only while the time budget allows; their compilation is the warm-up time reported beside them.

    bash benchmarks/gpu_bench.sh                                        # ~6 minutes on one H100/H200
    bash benchmarks/gpu_bench.sh --smoke --device=cpu --out=/tmp/x.json   # tiny sizes, every row, seconds
"""

import dataclasses
import gc
import pathlib
import re
import sys
import time

import click

START_SEC = time.perf_counter()  # the budget counts from start-up, imports and CUDA initialisation included

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_utils import cpu_runtime  # noqa: E402  (imports no torch)

cpu_runtime.prepare_process()  # before torch loads OpenMP, as train.py does

import torch  # noqa: E402

import dnnlib  # noqa: E402  (the repository root must be on the path first)
from benchmarks import common  # noqa: E402
from benchmarks import fid_speed  # noqa: E402
from benchmarks import sample_speed  # noqa: E402
from training import launch  # noqa: E402
from training import metrics  # noqa: E402
from training.precision import PRECISIONS, default_sampling_precision  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
NUM_CLASSES = 10
BASELINE = ('fp32', False, False)       # the published code's network: fp32, no channels-last, not compiled
COMPILE_ESTIMATE_SEC = 150              # what a compile row may take, to decide whether it fits the budget
CELL_CHARS = 60                         # longer notes are cut in the table (the JSON keeps them whole)


@dataclasses.dataclass
class Sizes:
    resolution: int             # Image size in pixels (training and sampling).
    cbase: int                  # --cbase; None = the ddpmpp preset's.
    cres: list                  # --cres; None = the preset's.
    train_batch: int            # Images per optimizer step (halved on CUDA out-of-memory).
    min_train_batch: int        # Smallest batch the halving may reach.
    warmup_steps: int           # Untimed steps first (cuDNN autotuning, compilation).
    min_timed_steps: int        # Timed steps at least ...
    min_timed_sec: float        # ... and seconds at least.
    sample_batch: int           # Images per sampling batch.
    sample_steps: int           # Solver steps.
    detector_batch: int         # Images per detector batch.
    detector_batches: int       # Timed detector batches.


SIZES = {
    'full':  Sizes(resolution=32, cbase=None, cres=None, train_batch=512, min_train_batch=64, warmup_steps=2,
                   min_timed_steps=3, min_timed_sec=5, sample_batch=256, sample_steps=18,
                   detector_batch=256, detector_batches=10),
    'smoke': Sizes(resolution=16, cbase=16, cres=[1, 2], train_batch=4, min_train_batch=4, warmup_steps=1,
                   min_timed_steps=1, min_timed_sec=0, sample_batch=4, sample_steps=2,
                   detector_batch=4, detector_batches=1),
}

# Training rows in table order: (precision, channels-last, torch.compile). 'tf32' is train.py's fp32 with --tf32.
TRAIN_ROWS = [
    ('fp32', False, False),
    ('tf32', False, False), ('tf32', True, False),
    ('fp16', False, False), ('fp16', True, False),
    ('bf16', False, False), ('bf16', True, False),
    ('bf16', False, True),  ('bf16', True, True),
]

HEADERS = ['measure', 'precision', 'channels-last', 'compile', 'batch', 'img/s', 'x fp32', 'NFE/img', 'warm-up s']


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def set_tf32(enabled):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled


def device_slug(device):
    """'cpu', or the GPU's name in lower case with dashes (NVIDIA H200 → nvidia-h200)."""
    if device.type != 'cuda':
        return device.type
    return re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(device).lower()).strip('-')


def one_line(error):
    return f'{type(error).__name__}: ' + (str(error).strip().splitlines() or [''])[0]


def train_config(precision, device, sizes, batch):
    """train.py's config dict for the published CIFAR-10 run at this precision ('tf32' = fp32 with --tf32)."""
    opts = dnnlib.EasyDict(launch.DEFAULTS, cond=True, data=None, device=device.type, batch=batch,
                           precision='fp32' if precision == 'tf32' else precision, tf32=(precision == 'tf32'),
                           cbase=sizes.cbase, cres=sizes.cres)
    return launch.build_config(opts, world_size=1)


def build_network(network_kwargs, sizes, device):
    torch.manual_seed(0)
    return dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=sizes.resolution, img_channels=3,
                                               label_dim=NUM_CLASSES).to(device)


def time_training(precision, channels_last, compile, device, sizes, batch):
    """Images/s of optimizer steps as the training loop takes them, after `warmup_steps` untimed ones."""
    c = train_config(precision, device, sizes, batch)
    torch.backends.cudnn.benchmark = c.cudnn_benchmark
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # as the training loop sets it
    set_tf32(c.allow_tf32)
    net = build_network(c.network_kwargs, sizes, device).train().requires_grad_(True)
    net.channels_last = channels_last
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**c.augment_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    if compile:
        net.model.compile()
    autocast_dtype = PRECISIONS[c.precision].train_autocast
    autocast = dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand([batch, 3, sizes.resolution, sizes.resolution], generator=generator) * 2 - 1).to(device)
    labels = torch.eye(NUM_CLASSES)[torch.randint(NUM_CLASSES, [batch], generator=generator)].to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment_pipe)
        loss.sum().mul(c.loss_scaling / batch).backward()
        optimizer.step()
        loss_fn.advance()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start_sec = time.perf_counter()
    for _ in range(sizes.warmup_steps):
        step()
    synchronize(device)
    warmup_sec = time.perf_counter() - start_sec
    num_steps, start_sec = 0, time.perf_counter()
    while True:
        step()
        synchronize(device)
        num_steps += 1
        elapsed_sec = time.perf_counter() - start_sec
        if num_steps >= sizes.min_timed_steps and elapsed_sec >= sizes.min_timed_sec:
            break
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    return dict(images_per_s=batch * num_steps / elapsed_sec, timed_steps=num_steps, warmup_sec=warmup_sec,
                compile_sec=warmup_sec if compile else None, peak_gpu_mem_gb=peak_gb, batch=batch, num_params=sum(p.numel() for p in net.parameters()))


def time_training_fitting_memory(precision, channels_last, compile, device, sizes):
    """`time_training` at the configured batch, halved while CUDA runs out of memory."""
    batch = sizes.train_batch
    while True:
        try:
            return time_training(precision, channels_last, compile, device, sizes, batch)
        except torch.cuda.OutOfMemoryError:
            if batch // 2 < sizes.min_train_batch:
                raise
        batch //= 2
        free_memory(device)


def time_sampling(solver, precision, device, sizes):
    c = train_config('fp32', device, sizes, sizes.train_batch)
    net = build_network(c.network_kwargs, sizes, device).eval().requires_grad_(False)
    images_per_s, nfe = sample_speed.time_solver(net, solver, sizes.sample_steps, sizes.sample_batch, 1, device, precision)
    return dict(images_per_s=images_per_s, nfe=nfe, batch=sizes.sample_batch)


def time_features(detector, device, sizes):
    set_tf32(False)
    try:
        detector_net = metrics.load_detector(detector, device=device)
    except metrics.DetectorError as e:
        return dict(status=f'skipped: {e}')
    images_per_s = fid_speed.time_features(detector_net, sizes.resolution, sizes.detector_batch, sizes.detector_batches, device)
    return dict(images_per_s=images_per_s, detector=detector_net.identity, batch=sizes.detector_batch)


def free_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def plan_rows(device, sizes, detector, no_compile):
    """Every row in table order, paired with its measurement (a function of nothing; None: the row has a status)."""
    rows = []
    for precision, channels_last, compile in TRAIN_ROWS:
        row = dict(kind='train', measure='train step', precision=precision, channels_last=channels_last, compile=compile)
        measure = None
        if device.type != 'cuda' and precision != 'fp32':
            row['status'] = 'n/a (needs CUDA)'
        elif compile and no_compile:
            row['status'] = 'skipped (--no-compile)'
        else:
            measure = lambda p=precision, cl=channels_last, co=compile: time_training_fitting_memory(p, cl, co, device, sizes)
        rows.append((row, measure))
    for precision in (default_sampling_precision(device), 'bf16'):
        for solver in sample_speed.SOLVERS:
            row = dict(kind='sample', measure=f'sample {solver}, {sizes.sample_steps} steps', solver=solver,
                       precision=precision, channels_last=device.type == 'cpu', compile=False)
            measure = None
            if device.type != 'cuda' and precision != 'fp32':
                row['status'] = 'n/a (needs CUDA)'
            else:
                measure = lambda s=solver, p=precision: time_sampling(s, p, device, sizes)
            rows.append((row, measure))
    rows.append((dict(kind='features', measure=f'Inception features, {sizes.resolution}x{sizes.resolution}', precision='fp32',
                      channels_last=False, compile=False), lambda: time_features(detector, device, sizes)))
    return rows


def run_rows(planned, device, budget_sec, on_row_done):
    """Measure the rows, compile rows last; a row that raises or would pass the budget gets a status instead."""
    for row, measure in sorted(planned, key=lambda pair: pair[0]['compile']):
        if measure is None:
            continue
        elapsed_sec = time.perf_counter() - START_SEC
        if elapsed_sec + (COMPILE_ESTIMATE_SEC if row['compile'] else 0) > budget_sec:
            row['status'] = f'skipped (time budget: {elapsed_sec:.0f} of {budget_sec:g} s used)'
        else:
            try:
                row.update(measure())
            except Exception as e:
                row['status'] = f'error: {one_line(e)}'
            free_memory(device)
        on_row_done(row)


def add_ratios(rows):
    """Each training row's images/s over the published fp32 network's (None where either is missing)."""
    baseline = next(row for row in rows if row['kind'] == 'train' and
                    (row['precision'], row['channels_last'], row['compile']) == BASELINE)
    for row in rows:
        if row['kind'] == 'train':
            measured = 'images_per_s' in row and 'images_per_s' in baseline
            row['ratio_to_fp32'] = row['images_per_s'] / baseline['images_per_s'] if measured else None


def on_off(value):
    return 'on' if value else 'off'


def table(rows):
    cells = []
    for row in rows:
        status = row.get('status')
        images_per_s = row.get('images_per_s') if status is None else status[:CELL_CHARS]
        cells.append([row['measure'], row['precision'], on_off(row['channels_last']), on_off(row['compile']),
                      row.get('batch'), images_per_s, row.get('ratio_to_fp32'), row.get('nfe'),
                      row.get('warmup_sec') if row['kind'] == 'train' else None])
    return common.markdown_table(HEADERS, cells, digits=[None, None, None, None, None, 1, 2, None, 1])


def row_progress(row):
    name = f'{row["measure"]}, {row["precision"]}, channels-last {on_off(row["channels_last"])}, compile {on_off(row["compile"])}'
    result = row.get('status') or f'{row["images_per_s"]:.1f} img/s'
    return f'{name}: {result}'


@click.command()
@click.option('--device', 'device_name', help='Where to measure (auto: cuda if present)', type=click.Choice(['auto', 'cuda', 'cpu']), default='auto', show_default=True)
@click.option('--smoke', help='Tiny network and batches: check every row in seconds', is_flag=True)
@click.option('--detector', help='Inception detector: offline or a TorchScript file', metavar='offline|PATH', default='offline', show_default=True)
@click.option('--budget-sec', help='Skip rows that would start after this many seconds', type=click.FloatRange(min=0), default=420, show_default=True)
@click.option('--no-compile', help='Skip the torch.compile rows', is_flag=True)
@click.option('--out', 'out_path', help='JSON results  [default: benchmarks/results/gpu_bench-DEVICE.json]', metavar='PATH')
def main(device_name, smoke, detector, budget_sec, no_compile, out_path):
    """Training, sampling and Inception images/s on one device, in one table."""
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_name == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('no CUDA device is available', param_hint='--device')
    device = torch.device(device_name)
    sizes = SIZES['smoke' if smoke else 'full']
    out_path = pathlib.Path(out_path or RESULTS_DIR / f'gpu_bench-{device_slug(device)}{"-smoke" if smoke else ""}.json')
    out_path.parent.mkdir(parents=True, exist_ok=True)
    machine = common.machine_description()
    print(f'{machine.get("gpu") or machine["cpu"]}, torch {torch.__version__}, {device}, budget {budget_sec:g} s')

    planned = plan_rows(device, sizes, detector, no_compile)
    rows = [row for row, _ in planned]

    def save(row=None):
        if row is not None:
            print(row_progress(row))
        add_ratios(rows)
        common.write_json(out_path, dict(date=machine['date'], machine=machine, device=str(device),
                                         device_slug=device_slug(device), smoke=smoke, sizes=dataclasses.asdict(sizes),
                                         budget_sec=budget_sec, total_sec=time.perf_counter() - START_SEC, rows=rows))

    run_rows(planned, device, budget_sec, save)
    save()
    print()
    print(table(rows))
    bf16 = [row['ratio_to_fp32'] for row in rows if row['kind'] == 'train' and row['precision'] == 'bf16']
    measured = [ratio for ratio in bf16 if ratio is not None]
    if measured:
        print(f'\nFastest bf16 training: {max(measured):.2f}x the fp32 network (goal: at least 2x)')
    print(f'warm-up s: the {sizes.warmup_steps} untimed steps of a training row; with compile on, the compilation')
    print(f'Total {time.perf_counter() - START_SEC:.0f} s. Wrote {out_path}')


if __name__ == '__main__':
    main()
