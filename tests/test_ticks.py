"""training/ticks.py: the progress bar of a tick draws only on a terminal."""

import io

from training import ticks


class _FakeStream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_tick_progress_bar_draws_only_on_a_terminal():
    tty, pipe = _FakeStream(tty=True), _FakeStream(tty=False)
    for stream in (tty, pipe):
        bar = ticks.tick_progress_bar(stream, tick_nimg=16, tick=3)
        bar.update(8)
        bar.close()
    assert 'tick 3' in tty.getvalue() and 'img' in tty.getvalue()
    assert pipe.getvalue() == ''
    assert ticks.tick_progress_bar(None, tick_nimg=16, tick=0).disable
