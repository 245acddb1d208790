"""The ``autoretrain`` command line: one Typer app, one module per command group.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input. Errors derived from
:class:`retrain_lib.core.errors.RetrainError` are printed as one readable message; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from retrain_lib import __version__
from retrain_lib.cli import (
    config,
    cycle,
    data,
    demo,
    history,
    inference,
    mining,
    models,
    trace,
)
from retrain_lib.cli.render import console
from retrain_lib.core.processes import stop_on_sigterm
from retrain_lib.training.entrypoint import train_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="autoretrain",
    help="Continuous retraining of object detectors for overhead imagery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Object-type configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


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



config_app.command("validate")(config.config_validate)
config_app.command("docs")(config.config_docs)
_COMMANDS: dict[str, Callable[..., None]] = {
    "synth": data.synth, "tile": data.tile_command,
    "detect": inference.detect_command, "evaluate": inference.evaluate_command,
    "train": train_command, "mine": mining.mine_command,
    "models": models.models_command, "promote": models.promote_command,
    "rollback": models.rollback_command, "cycle": cycle.cycle_command,
    "history": history.history_command,
    "demo": demo.demo_command, "up": demo.up_command, "trace": trace.trace_command,
}
for _name, _command in _COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    """Console-script entry point. SIGTERM stops a command as Ctrl-C does: the children it
    started (servers, DAG runs, trainings) are stopped with it."""
    stop_on_sigterm()
    app()
