"""Child processes that stop when their parent stops.

A command that starts child processes (the demo's ``airflow dags test``, ``autoretrain up``'s
servers, the local runner's training) must stop them when it is stopped: by Ctrl-C, by
SIGTERM, or killed outright. Three pieces make that true:

- :func:`stop_on_sigterm` turns SIGTERM into :class:`SystemExit` in the main thread, so the
  ``finally`` and ``except BaseException`` blocks that stop children run (Python's default
  SIGTERM ends the process without running them).
- :func:`start_process` starts a child in its own process group (so the whole group, workers
  included, can be signalled at once) that Linux also sends SIGTERM when its parent dies,
  even by SIGKILL.
- :func:`stop_process_group` stops that group and every descendant (servers start some in
  groups of their own): SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["start_process", "stop_on_sigterm", "stop_process_group", "stop_process_groups"]

_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (None
    elsewhere). The libc function is looked up here, before any fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(143)

    return arm


def start_process(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None, stdout: int | IO[Any] | None = None,
                  stderr: int | IO[Any] | None = None, text: bool = False
                  ) -> subprocess.Popen[Any]:
    """Start ``command`` in its own process group, bound to die with this process."""
    return subprocess.Popen(
        list(command), env=None if env is None else dict(env), cwd=cwd, stdout=stdout,
        stderr=stderr, text=text, errors="replace" if text else None,
        start_new_session=True, preexec_fn=_parent_death_signal())


def stop_process_group(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM a child's process group and every descendant (a server may start some in
    groups of their own; a training marks its MLflow run KILLED), then SIGKILL what is left
    after ``grace_s``."""
    stop_process_groups([proc], grace_s)


def stop_process_groups(procs: Sequence[subprocess.Popen[Any]], grace_s: float = 30.0) -> None:
    """:func:`stop_process_group` for several children at once: all are signalled first, so
    they shut down side by side within one ``grace_s``."""
    import psutil

    running = [p for p in procs if p.poll() is None]
    descendants: list[psutil.Process] = []
    for proc in running:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(proc.pid).children(recursive=True)
    deadline = time.monotonic() + grace_s
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread (a no-op elsewhere, or when
    a handler other than the default is installed already)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return

    def _stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
