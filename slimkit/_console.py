"""One rich console on stderr for progress and messages, so stdout stays clean for --json."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


@contextlib.contextmanager
def muted():
    """Silence messages and progress inside the block (e.g. the steps of one search trial)."""
    global _quiet
    old, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = old


def info(message: str) -> None:
    if not _quiet:
        console.print(message)


@contextlib.contextmanager
def status(message: str):
    """Show ``message`` while the block runs; then print how long it took."""
    t0 = time.perf_counter()
    if _quiet or not console.is_terminal:
        info(f"{message} ...")
        yield
    else:
        with console.status(message):
            yield
    info(f"{message}: done in {time.perf_counter() - t0:.1f}s")


def progress():
    """A rich progress bar (a no-op display when quiet or not on a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=True,
        disable=_quiet or not console.is_terminal,
    )
