"""``autoretrain config``: validate object-type configs and print their reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrain_lib.cli.render import Table, console
from retrain_lib.core.console import handle_errors

__all__ = ["config_docs", "config_validate"]


@handle_errors
def config_validate(
    paths: Annotated[list[Path], typer.Argument(help="Object-type YAML files or directories.")],
) -> None:
    """Validate object-type configs; print one line per problem."""
    from retrain_lib.core.config import load_object_type_config
    from retrain_lib.core.errors import ConfigError

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


@handle_errors
def config_docs(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the config reference (Markdown) generated from the config models."""
    from retrain_lib.core.config_docs import config_reference_markdown

    text = config_reference_markdown()
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        console.print(f"wrote {out}")

