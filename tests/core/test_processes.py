"""Children stop with the command that started them: SIGTERM, Ctrl-C, or SIGKILL of the parent.

Real processes only: a parent Python process starts a child through the project's helpers,
then the parent is signalled, and the child must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

PARENT = """
import signal, subprocess, sys, time
from retrain_lib.core.processes import start_process, stop_on_sigterm, stop_process_group
# A suite started in the background (``cmd &``) inherits SIGINT ignored; Ctrl-C is the case here.
signal.signal(signal.SIGINT, signal.default_int_handler)
stop_on_sigterm()
child = start_process([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, flush=True)
try:
    child.wait()
except BaseException:
    stop_process_group(child, grace_s=5)
    raise
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for a reaper that never comes is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout_s: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _start_parent() -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    return parent, child


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)])
def test_a_stopped_parent_stops_its_child(sig: signal.Signals, code: int) -> None:
    parent, child = _start_parent()
    parent.send_signal(sig)
    # SIGTERM exits with 143, as after a shell's kill; an uncaught Ctrl-C ends by SIGINT.
    assert parent.wait(timeout=30) == code
    assert _wait_gone([child]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_child_dies_with_a_parent_killed_outright() -> None:
    parent, child = _start_parent()
    parent.kill()  # SIGKILL: no handler runs in the parent
    parent.wait(timeout=30)
    assert _wait_gone([child]) == []


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (e.g. one stack's AIRFLOW_HOME)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0") and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def sigterm_stops_every_process(proc: subprocess.Popen[Any], marker: str) -> None:
    """SIGTERM ``proc`` (a command that started servers or runs) and check that it exits as
    after a shell's kill and that every process of its stack (those whose environment holds
    ``marker``) is gone with it."""
    started = _processes_with(marker)
    assert len(started) >= 2, started  # the command and what it started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert _wait_gone(started) == []
    assert _processes_with(marker) == []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_sigterm_to_the_demo_mid_training_stops_airflow_and_the_trainer(tmp_path: Path) -> None:
    """What ``make demo`` runs, stopped while its first training runs: the ``airflow dags test``
    process and the training process below it must go with it (they held both cores)."""
    root = tmp_path / "demo"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("autoretrain")), "demo", "--root", str(root),
         "--scenes", "2", "--size", "256", "--objects-per-class", "4", "--epochs", "50",
         "--finetune-epochs", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    marker = f"AIRFLOW_HOME={root.resolve() / 'airflow'}"
    try:
        deadline = time.monotonic() + 480
        trainers: list[int] = []
        while not trainers:  # wait until the demo's DAG run is training
            assert proc.poll() is None and time.monotonic() < deadline, "never trained"
            time.sleep(1)
            trainers = [pid for pid in _processes_with(marker)
                        if b"retrain_lib.training" in _cmdline(pid)]
        sigterm_stops_every_process(proc, marker)  # airflow dags test, the trainer below it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
