"""The ``autoretrain`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input. Errors derived from
:class:`retrain_lib.errors.RetrainError` are printed as one readable message; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from retrain_lib import __version__
from retrain_lib.errors import RetrainError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="autoretrain",
    help="Continuous retraining of object detectors for overhead imagery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Object-type configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def handle_errors(func: F) -> F:
    """Turn RetrainError into one red line and its exit code (1 failed work, 2 bad input)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RetrainError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True,
                              soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"autoretrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                          is_eager=True, help="Print the version.")] = False,
) -> None:
    """AutoRetrain keeps detectors for satellite and aerial imagery improving as data arrives."""


@config_app.command("validate")
@handle_errors
def config_validate(
    paths: Annotated[list[Path], typer.Argument(help="Object-type YAML files or directories.")],
) -> None:
    """Validate object-type configs; print one line per problem."""
    from retrain_lib.config import load_object_type_config
    from retrain_lib.errors import ConfigError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise ConfigError(f"{path}: no *.yaml config files in this directory")
            files.extend(found)
        else:
            files.append(path)
    table = Table("config", "type", "classes", "schedule", "runner", title=None)
    problems: list[str] = []
    for file in files:
        try:
            cfg = load_object_type_config(file)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        table.add_row(str(file), cfg.name, ", ".join(cfg.classes), str(cfg.schedule),
                      cfg.runner.kind)
    if table.row_count:
        console.print(table)
    if problems:
        raise ConfigError("\n".join(problems))
    console.print(f"[green]{len(files)} config(s) valid[/]")


@config_app.command("docs")
@handle_errors
def config_docs(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the config reference (Markdown) generated from the config models."""
    from retrain_lib.config import config_reference_markdown

    text = config_reference_markdown()
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        console.print(f"wrote {out}")


# --- stage commands are registered below (one block per stage) ---------------------------


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
