"""The ``autoretrain`` command line (see :mod:`retrain_lib.cli.app`)."""

from retrain_lib.cli.app import app, main

__all__ = ["app", "main"]
