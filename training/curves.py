"""Training curves: loss and FID of run directories against training images, drawn with matplotlib.

A run directory holds `training_options.json`, `stats.jsonl` (one line per tick) and, with --metrics,
`metrics.jsonl` (one line per snapshot and network); `read_run` turns them into series and `plot_panels`
draws side-by-side panels into a PNG.
"""

import json
import os

from training import recipes
from training import snapshot_metrics


def _read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path, 'rt') as f:
        return [json.loads(text) for text in f if text.strip()]


def preconditioner_name(options):
    """The --precond of a run's training_options.json (the recipe with its network and loss classes), or the class name."""
    network = options.get('network_kwargs', {}).get('class_name')
    loss = options.get('loss_kwargs', {}).get('class_name')
    for name, recipe in recipes.RECIPES.items():
        if (recipe.network, recipe.loss) == (network, loss):
            return name
    return str(network).rsplit('.', 1)[-1]


def read_run(run_dir):
    """{label, loss: [(kimg, mean loss of the tick)], fid: {network: [(kimg, FID)]}} of a run directory."""
    options_path = os.path.join(run_dir, 'training_options.json')
    if not os.path.isfile(options_path):
        raise ValueError(f'{run_dir}: no training_options.json; not a run directory of train.py')
    with open(options_path, 'rt') as f:
        options = json.load(f)
    loss = [(line['Progress/kimg']['mean'], line['Loss/loss']['mean'])
            for line in _read_jsonl(os.path.join(run_dir, 'stats.jsonl')) if 'Loss/loss' in line and 'Progress/kimg' in line]
    fid = {}
    for line in _read_jsonl(os.path.join(run_dir, snapshot_metrics.METRICS_FILE)):
        if line.get('metric') == 'fid':
            fid.setdefault(line['network'], []).append((line['kimg'], line['value']))
    label = f'{preconditioner_name(options)} {os.path.basename(os.path.normpath(run_dir))}'
    return dict(label=label, loss=sorted(loss), fid={name: sorted(points) for name, points in fid.items()})


def plot_panels(path, panels, width_in=6.0, height_in=4.0):
    """Write a PNG with one panel per dict(series={name: [(x, y)]}, x_label, y_label, title, log_y) side by side."""
    import matplotlib
    matplotlib.use('Agg')  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt
    panels = [panel for panel in panels if any(panel['series'].values())]
    if not panels:
        raise ValueError('nothing to plot: the runs have no loss or FID values yet')
    figure, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), height_in), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, points in panel['series'].items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker='o', markersize=3, label=name)
        if panel.get('log_y') and all(y > 0 for points in panel['series'].values() for _, y in points):
            ax.set_yscale('log')
        ax.set_xlabel(panel['x_label'])
        ax.set_ylabel(panel['y_label'])
        ax.set_title(panel['title'])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize='small')
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_panels(runs):
    """The loss panel and, when any run measured FID, the FID panel of `read_run` results."""
    loss = {run['label']: run['loss'] for run in runs}
    fid = {}
    for run in runs:
        for network, points in run['fid'].items():
            fid[run['label'] if network == 'ema' else f'{run["label"]} ({network})'] = points
    panels = [dict(series=loss, x_label='training images (kimg)', y_label='loss (mean of a tick)', title='Training loss', log_y=True)]
    if fid:
        panels.append(dict(series=fid, x_label='training images (kimg)', y_label='FID', title='FID at snapshots', log_y=True))
    return panels
