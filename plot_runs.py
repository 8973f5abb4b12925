"""Draw loss and FID against training images for one or several run directories, one line per run
(labelled by its preconditioner and directory name), so that EDM and EDM-FDM runs share one picture."""

import click

from training import curves


@click.command()
@click.argument('run_dirs', nargs=-1, required=True, metavar='RUN_DIR...')
@click.option('--dest', help='PNG to write', metavar='PNG', type=str, required=True)
def main(run_dirs, dest):
    """Plot the training curves of RUN_DIR... into --dest.

    \b
    python plot_runs.py training-runs/00000-*-edm-* training-runs/00001-*-fdm_edm-* --dest=curves.png
    """
    try:
        runs = [curves.read_run(run_dir) for run_dir in run_dirs]
        curves.plot_panels(dest, curves.run_panels(runs))
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Saved {dest}')


if __name__ == '__main__':
    main()
