"""Which state a run continues, decided once at launch: `--resume` (a state or a run directory), `--resume=auto`
(the newest state of the same command, whatever its process count) and `--transfer` (a snapshot's weights), each
read once and checked against the run's config. Part of the command-line layer: its errors name the options.
"""

import json
import os
import re

import click

from torch_utils import distributed
from torch_utils import misc
from training import training_state


def read_resume(c, resume, resume_force=False):
    """Resolve --resume to a state, read it once, take the run's seed from it if none given.

    Returns the state and the options that differ from those it was written with; a different dataset or network
    is refused unless `resume_force`.
    """
    try:
        c.resume_state = training_state.resolve_resume_path(resume)
        state = training_state.load_training_state(c.resume_state, mmap=True)
    except training_state.TrainingStateError as err:
        raise click.ClickException(f'--resume: {err}')
    if c.seed is None:
        c.seed = state['options']['seed']
    changes = changed_options(state['options'], c)
    meaning = [change for change in changes if change.startswith(_RESUME_MEANING_OPTIONS)
               and not change.startswith(_RESUME_MEANING_EXCEPT)]
    if meaning and not resume_force:
        raise click.ClickException(f'--resume: {c.resume_state} was trained on other data or another network '
                                   f'({"; ".join(meaning)}); give --resume-force to continue it anyway')
    return state, changes


# Options whose change makes a resumed run train something else (refused without --resume-force), less their
# performance settings.
_RESUME_MEANING_OPTIONS = ('dataset_kwargs.', 'network_kwargs.')
_RESUME_MEANING_EXCEPT = ('dataset_kwargs.cache:', 'network_kwargs.use_fp16:')


# Options that a resumed run may set afresh without changing what it trains: where it runs, how fast, how it reports.
_RESUME_FREE_OPTIONS = ('run_dir', 'resume_state', 'resume_pkl', 'data_loader_kwargs', 'batch_gpu', 'total_kimg',
                        'kimg_per_tick', 'snapshot_ticks', 'snapshot_format', 'state_dump_ticks', 'cudnn_benchmark', 'compile', 'device',
                        'tensorboard', 'nan_policy')


def changed_options(state_options, c):
    """'name: old → new' for every option of `c` that differs from the state's, nested ones by their dotted path."""
    def flatten(value, prefix):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f'{prefix}.{key}').items()}
        return {prefix: json.dumps(value, sort_keys=True, default=str)}
    old, new = {}, {}
    for key in c:
        if key not in _RESUME_FREE_OPTIONS:
            old.update(flatten(state_options.get(key), key))
            new.update(flatten(c[key], key))
    return [f'{key}: {old.get(key, "unset")} → {new.get(key, "unset")}' for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


_PROCESS_COUNT_RE = re.compile(r'-gpus\d+-')   # the part of a run's description that a requeue may change


def same_command(run_desc, desc):
    """True when the run directory description `run_desc` is that of `desc` but for the number of processes
    (`gpus{N}`): the global batch, which fixes what is trained, is part of both."""
    return _PROCESS_COUNT_RE.sub('-gpus*-', run_desc) == _PROCESS_COUNT_RE.sub('-gpus*-', desc)


def find_auto_resume(outdir, desc, nosubdir):
    """--resume=auto: the newest training state of the newest run directory `{id}-{desc}` in `outdir` that has
    one (`outdir` itself with --nosubdir), whatever number of processes wrote it; None when there is none, so that
    the first launch starts afresh."""
    if not os.path.isdir(outdir):
        return None
    if nosubdir:
        candidates = [outdir]
    else:
        runs = [(int(m.group(1)), name) for name in os.listdir(outdir)
                if (m := re.fullmatch(r'(\d+)-(.*)', name)) and same_command(m.group(2), desc)]
        candidates = [os.path.join(outdir, name) for _, name in sorted(runs, reverse=True)]
    for run_dir in candidates:
        try:
            return training_state.resolve_resume_path(run_dir)
        except training_state.TrainingStateError:
            continue
    return None


def read_transfer(path, net):
    """Load a snapshot (ours or a published one, without executing code) once and check that it fits the network."""
    try:
        data = training_state.load_transfer(path, net, verbose=distributed.is_main())
    except training_state.TrainingStateError as err:
        raise click.ClickException(f'--transfer={err}')
    if problem := misc.nonfinite_problem(data['ema']):
        raise click.ClickException(f'--transfer={path}: {problem}')
    return data
