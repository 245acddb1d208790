"""``python -m retrain_lib.cli``: the same as ``autoretrain``."""

from retrain_lib.cli.app import main

main()
