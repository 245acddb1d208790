"""Terminal output shared by every command: the consoles, one-line errors and progress bars.

Progress bars go to stderr, so stdout stays for results (the training entrypoint's last line
is its result JSON). Piped output (logs, CI) gets a wide fixed width so tables are not cut.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console

from retrain_lib.core.errors import RetrainError

__all__ = ["Progress", "console", "err_console", "handle_errors", "progress_bar"]

F = TypeVar("F", bound=Callable[..., Any])

console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def handle_errors(func: F) -> F:
    """Turn a RetrainError into one red ``error:`` line and its exit code (1 failed work,
    2 bad input); Ctrl-C exits with 130. Other exceptions are bugs and keep their traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RetrainError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True,
                              soft_wrap=True)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


class Progress:
    """One progress bar's handle; does nothing when the bar is disabled."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar = bar
        self._task = task

    def advance(self, steps: int = 1, *, total: int | None = None) -> None:
        """Move forward by ``steps`` (and set a new total, when it grew)."""
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, total=total)

    def update(self, completed: int, total: int | None = None) -> None:
        """Set the absolute position."""
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)


@contextmanager
def progress_bar(description: str, *, total: int | None = None, enabled: bool = True,
                 unit: str = "", remaining: bool = False) -> Iterator[Progress]:
    """A transient progress bar on stderr: ``description``, bar, done/total, elapsed time.

    Args:
        description: What is being done, e.g. ``tiling scene-1``.
        total: Steps in all; None until known.
        enabled: False yields a handle that does nothing.
        unit: Word shown after the counts, e.g. ``tiles``.
        remaining: Also show the estimated time remaining.
    """
    if not enabled:
        yield Progress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    columns: list[ProgressColumn | str] = [TextColumn("{task.description}"), BarColumn(),
                                           MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    with RichProgress(*columns, console=err_console, transient=True) as bar:
        yield Progress(bar, bar.add_task(description, total=total))
