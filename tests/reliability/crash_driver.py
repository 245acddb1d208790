"""Run ``autoretrain`` and kill it with SIGKILL at one named point: a crash a test can aim.

    python -m tests.reliability.crash_driver SPEC -- cycle vehicle --configs ...

``SPEC`` is ``WHEN:MODULE:ATTRIBUTE[@TEXT]``:

- ``before`` / ``after``: the first call of ``MODULE.ATTRIBUTE`` (a function, or a method as
  ``Class.method``) whose arguments' ``repr`` holds ``TEXT`` kills the process just before it
  starts or just after it returns. ``Storage.method`` stands for that method of every storage
  backend.
- ``line``: ``MODULE.ATTRIBUTE`` is a generator of text lines; the first line holding ``TEXT``
  kills the process (a training is killed mid-run when its output says so).

The kill is SIGKILL: no handler, ``finally`` or ``atexit`` runs, as when the machine or the
kernel's OOM killer ends a worker. A point that is never reached lets the command finish,
so a test that expects the kill sees exit code 0 instead of -9 and fails.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

STORAGE_CLASSES = ("LocalStorage", "S3Storage")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(when: str, original: Callable[..., Any], text: str) -> Callable[..., Any]:
    def matches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return not text or text in repr(args) or text in repr(kwargs)

    if when == "line":
        @functools.wraps(original)
        def lines(*args: Any, **kwargs: Any) -> Iterator[str]:
            for line in original(*args, **kwargs):
                yield line
                if text in line:
                    _die()
        return lines

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        hit = matches(args, kwargs)
        if hit and when == "before":
            _die()
        result = original(*args, **kwargs)
        if hit:
            _die()
        return result
    return call


def install(spec: str) -> None:
    """Arm the crash point ``spec`` (see the module docstring)."""
    when, module_name, rest = spec.split(":", 2)
    if when not in ("before", "after", "line"):
        raise SystemExit(f"crash point {spec!r}: expected before:, after: or line:")
    attribute, _, text = rest.partition("@")
    module = importlib.import_module(module_name)
    owner_name, _, method = attribute.rpartition(".")
    if not owner_name:
        setattr(module, attribute, _wrap(when, getattr(module, attribute), text))
        return
    owners = STORAGE_CLASSES if owner_name == "Storage" else (owner_name,)
    for name in owners:
        owner = getattr(module, name)
        setattr(owner, method, _wrap(when, getattr(owner, method), text))


def main() -> None:
    spec, separator, *command = sys.argv[1:]
    if separator != "--":
        raise SystemExit("usage: crash_driver SPEC -- autoretrain arguments...")
    install(spec)
    from retrain_lib.cli.app import main as autoretrain

    sys.argv = ["autoretrain", *command]
    autoretrain()


if __name__ == "__main__":
    main()
