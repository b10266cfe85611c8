"""The progress bar: drawn on a terminal, silent on a pipe and with --quiet."""

from __future__ import annotations

import io

from biotemplate.cli.progress import WIDTH, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_drawn_on_a_terminal_and_ended_with_a_newline() -> None:
    tty = Terminal()
    with progress_bar("enrolling", tty, quiet=False) as bar:
        bar(0, 4)
        bar(4, 4)  # the last call always draws
    text = tty.getvalue()
    assert text.startswith("\renrolling [") and text.endswith("4/4 100%\n")
    assert f"[{'#' * WIDTH}]" in text


def test_silent_on_a_pipe_with_quiet_and_without_calls() -> None:
    pipe = io.StringIO()  # isatty() is False
    with progress_bar("enrolling", pipe, quiet=False) as bar:
        bar(4, 4)
    quiet = Terminal()
    with progress_bar("enrolling", quiet, quiet=True) as bar:
        bar(4, 4)
    idle = Terminal()
    with progress_bar("enrolling", idle, quiet=False):
        pass
    assert pipe.getvalue() == quiet.getvalue() == idle.getvalue() == ""


def test_an_empty_total_draws_full() -> None:
    tty = Terminal()
    with progress_bar("rebuilding", tty, quiet=False) as bar:
        bar(0, 0)
    assert "0/0 100%" in tty.getvalue()
