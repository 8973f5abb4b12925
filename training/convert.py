"""Convert a network file between formats: `python -m training.convert SRC DEST`.

SRC is any network file generate.py reads (our snapshots, published FDM/EDM pickles, safetensors files), read
without running code from it; DEST is written as safetensors when it ends in .safetensors, else as a pickle.
A published pickle is converted into this project's classes (docs/compatibility.md#pickles), so the safetensors
file samples what the pickle samples.
"""

import click

import dnnlib
from training import checkpoints


@click.command()
@click.argument('src', metavar='SRC')
@click.argument('dest', metavar='DEST')
def main(src, dest):
    """Convert the network file SRC (path or URL) into DEST (.safetensors or .pkl)."""
    try:
        with dnnlib.util.open_url(src, verbose=False) as f:
            data = checkpoints.load_network(f)
    except (OSError, ValueError, EOFError) as err:
        raise click.ClickException(f'{src}: {type(err).__name__}: {err}'.replace('\n', ' '))
    try:
        if dest.endswith(checkpoints.SUFFIXES['safetensors']):
            checkpoints.save_network_safetensors(dest, data)
        else:
            checkpoints.save_network_pickle(dest, data)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'{dest}: {err}'.replace('\n', ' '))
    click.echo(f'Wrote {dest}')


if __name__ == '__main__':
    main()
