"""How commands show results: tables go to stdout through one console, numbers one way."""

from __future__ import annotations

from rich.table import Table

from retrain_lib.core.console import console, err_console

__all__ = ["Table", "console", "err_console", "metric", "warn"]


def metric(value: float | None, digits: int = 4) -> str:
    """A metric as tables show it; empty when undefined."""
    return "" if value is None else f"{value:.{digits}f}"


def warn(message: str, *, label: str = "warning") -> None:
    """One yellow line on stderr."""
    err_console.print(f"[yellow]{label}:[/] {message}", highlight=False, soft_wrap=True)
