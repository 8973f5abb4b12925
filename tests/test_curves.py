"""training/curves.py and plot_runs.py: one PNG with loss and FID panels for several run directories."""

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import plot_runs
from test_fid import assert_one_line_error
from training import curves


def test_read_run_labels_by_preconditioner_and_directory(posthoc_runs):
    run = curves.read_run(posthoc_runs['straight'])
    assert run['label'] == 'fdm_edm straight'
    assert [kimg for kimg, _ in run['loss']] == pytest.approx([0.008, 0.024, 0.032]) and all(loss > 0 for _, loss in run['loss'])
    assert [kimg for kimg, _ in run['fid']['ema']] == [0.008, 0.024, 0.032]


def test_plot_runs_writes_a_png_of_two_runs(posthoc_runs, tmp_path):
    dest = tmp_path / 'curves.png'
    result = CliRunner().invoke(plot_runs.main, [str(posthoc_runs['straight']), str(posthoc_runs['resumed']), f'--dest={dest}'])
    assert result.exit_code == 0, result.output
    with PIL.Image.open(dest) as image:
        assert image.format == 'PNG' and image.size == (1200, 400)  # loss and FID panels, 6×4 inches each at 100 dpi
        pixels = np.asarray(image.convert('RGB'))
    coloured = np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert coloured.sum() > 500  # the lines are drawn in colour; a blank or grey-only image has none


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    assert_one_line_error(CliRunner().invoke(plot_runs.main, [str(tmp_path), f'--dest={tmp_path / "x.png"}']), 'training_options.json')
