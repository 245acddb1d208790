"""``python -m retrain_lib.training``: the training entrypoint (see
:mod:`retrain_lib.training.entrypoint`)."""

from retrain_lib.training.entrypoint import main

main()
