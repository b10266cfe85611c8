"""A progress bar for long operations, drawn on a terminal only.

The library reports progress through ``progress(done, total)`` callbacks (``enroll_many``,
``rebuild_index``, ``TemplateStore.open`` when it rebuilds, ``rotate_keys``). This draws
them as one line on stderr, redrawn in place, when stderr is a terminal and ``--quiet``
was not given: a pipe, a log file or a script's capture gets nothing (no control
characters in logs), and stdout stays clean for ``--json``.
"""

from __future__ import annotations

import time
from typing import TextIO

WIDTH = 30
_REDRAW_S = 0.1  # at most ten redraws a second: a callback per batch can be frequent


class ProgressBar:
    """``bar(done, total)`` draws ``label [#####.....]  done/total  pct``; call
    :meth:`finish` (or use it as a context manager) to end the line."""

    def __init__(self, label: str, stream: TextIO, *, enabled: bool) -> None:
        self._label, self._stream, self._enabled = label, stream, enabled
        self._drawn = False
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < _REDRAW_S:
            return
        self._last = now
        filled = WIDTH if total <= 0 else min(WIDTH, WIDTH * done // total)
        pct = 100 if total <= 0 else min(100, 100 * done // total)
        self._stream.write(f"\r{self._label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                           f"{done}/{total} {pct:3d}%")
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the bar's line (if one was drawn), so the next output starts clean."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def progress_bar(label: str, stream: TextIO, *, quiet: bool) -> ProgressBar:
    """A bar that draws only when ``stream`` is a terminal and output is not quiet."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: no bar
        tty = False
    return ProgressBar(label, stream, enabled=tty and not quiet)
