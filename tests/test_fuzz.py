"""Fuzzing every loader: a small valid file of each kind (our snapshot, a published pickle, a training state, a
dataset ZIP, FID statistics) with seeded random byte flips and truncations. Each load must succeed or end in the
loader's own one-line error: never another exception, a hang, an allocation of gigabytes, or code run.

The cases run in one child process under a 3 GB address-space limit; a watchdog ends it if one case takes longer
than CASE_TIMEOUT_SEC, naming the case. Run this file as a script to see the outcomes.
"""

import copy
import faulthandler
import io
import json
import os
import pickle
import random
import resource
import subprocess
import sys
import traceback
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLIPS_PER_FILE = 40         # files with 1–4 random bytes replaced
TRUNCATIONS_PER_FILE = 10   # files cut at a random length
CASE_TIMEOUT_SEC = 20
MEMORY_LIMIT_BYTES = 3 << 30


def mutations(data, seed):
    """(name, bytes) of the seeded flips and truncations of `data`."""
    rng = random.Random(seed)
    for i in range(FLIPS_PER_FILE):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(data))] ^= rng.randint(1, 255)
        yield f'flip{i}', bytes(mutated)
    for i in range(TRUNCATIONS_PER_FILE):
        yield f'cut{i}', data[:rng.randrange(len(data))]


def valid_files(workdir):
    """{kind: (bytes of a small valid file, function loading a path, the error class it may raise)}."""
    import numpy as np
    import PIL.Image
    import torch
    from torch_utils import persistence
    from training import checkpoints, dataset, loss, metrics, networks, training_state

    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[8], dropout=0.0)
    snapshot = pickle.dumps(dict(ema=net, loss_fn=loss.EDMLoss(), dataset_kwargs=dict(path='x.zip')))

    marker = os.path.join(workdir, 'marker')
    module_src = f'import pathlib\npathlib.Path({marker!r}).write_text("executed")\n'

    class PublishedPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not getattr(type(obj), '_persistent', False):
                return NotImplemented
            meta = dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__, state=dict(vars(obj)))
            return (persistence._reconstruct_persistent_obj, (meta,))

    published = io.BytesIO()
    PublishedPickler(published).dump(dict(ema=net))

    optimizer = torch.optim.Adam(net.parameters())
    net(torch.zeros([1, 1, 8, 8]), torch.ones([1]), torch.zeros([1, 2])).sum().backward()
    optimizer.step()
    state = io.BytesIO()
    path = os.path.join(workdir, 'state.pt')
    training_state.save_training_state(path, net, copy.deepcopy(net), optimizer, loss.EDMLoss(), None,
                                    dict(cur_nimg=64, cur_step=1, cur_tick=1, tick_start_nimg=32), 1.5,
                                    [training_state.rng_state(torch.device('cpu'))], 1, None, dict(seed=7, batch_size=32))
    with open(path, 'rb') as f:
        state = f.read()

    images = io.BytesIO()
    with zipfile.ZipFile(images, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        for i in range(3):
            png = io.BytesIO()
            PIL.Image.fromarray(np.full([8, 8, 3], 40 * i, dtype=np.uint8)).save(png, format='png')
            archive.writestr(f'{i:05d}.png', png.getvalue())
        archive.writestr('dataset.json', json.dumps(dict(labels=[[f'{i:05d}.png', i % 2] for i in range(3)])))

    stats = io.BytesIO()
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4), detector=np.array('nvidia'), num_images=np.array(10),
             features=np.ones([3, 4], dtype=np.float32))

    def read_dataset(path):
        data = dataset.ImageFolderDataset(path, use_labels=True)
        for i in range(len(data)):
            data[i]
        data.close()

    def read_statistics(path):
        with open(path, 'rb') as f:
            metrics.load_statistics(f, path)

    return dict(
        snapshot=(snapshot, checkpoints.load_network_pickle, ValueError),
        published=(published.getvalue(), checkpoints.load_network_pickle, ValueError),
        state=(state, training_state.load_training_state, training_state.TrainingStateError),
        dataset=(images.getvalue(), read_dataset, dataset.DatasetError),
        statistics=(stats.getvalue(), read_statistics, metrics.StatisticsError),
    )


def run_cases(workdir):
    """Load every mutation of every file; returns {kind: [[case, outcome, message]]} with outcome 'loaded',
    'error' (the loader's own class, one line) or 'bad' (anything else, with its traceback)."""
    results = {}
    for seed, (kind, (data, load, error_class)) in enumerate(valid_files(workdir).items()):
        results[kind] = []
        for case, mutated in [('valid', data), *mutations(data, seed)]:
            path = os.path.join(workdir, f'{kind}-{case}')
            with open(path, 'wb') as f:
                f.write(mutated)
            faulthandler.dump_traceback_later(CASE_TIMEOUT_SEC, exit=True)
            print(f'{kind} {case}', file=sys.stderr, flush=True)  # the last line names a case that hangs
            try:
                load(path)
                outcome, message = 'loaded', ''
            except error_class as e:
                message = str(e)
                outcome = 'error' if '\n' not in message and len(message) <= 2000 and path in message else 'bad'
            except BaseException as e:  # noqa: B036 — MemoryError and RecursionError are what this looks for
                outcome, message = 'bad', ''.join(traceback.format_exception(e))
            faulthandler.cancel_dump_traceback_later()
            results[kind].append([case, outcome, message])
            os.remove(path)
    return results


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('fuzz')
    result = subprocess.run([sys.executable, __file__, str(workdir)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES,) * 2))
    assert result.returncode == 0, 'fuzz run died (hang or crash), last lines:\n' + result.stderr[-3000:]
    assert not (workdir / 'marker').exists(), 'a published module_src ran'
    return json.loads(result.stdout)


@pytest.mark.parametrize('kind', ['snapshot', 'published', 'state', 'dataset', 'statistics'])
def test_every_mutation_loads_or_gives_the_loaders_one_line_error(outcomes, kind):
    cases = outcomes[kind]
    assert cases[0][:2] == ['valid', 'loaded'], cases[0]
    assert len(cases) == 1 + FLIPS_PER_FILE + TRUNCATIONS_PER_FILE
    bad = [f'{case}: {message}' for case, outcome, message in cases if outcome == 'bad']
    assert not bad, f'{len(bad)} of {len(cases)} cases:\n' + '\n'.join(bad[:3])


if __name__ == '__main__':
    print(json.dumps(run_cases(sys.argv[1])))
