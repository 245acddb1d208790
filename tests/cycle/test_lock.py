"""One cycle of an object type at a time: the cycle lock, on local storage and on S3 over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from retrain_lib.core.errors import CycleBusy
from retrain_lib.core.storage import Storage, open_storage
from retrain_lib.cycle.lock import DEFAULT_LEASE_H, hold_cycle, lock_state, release_cycle
from tests.conftest import BACKENDS, drop_region, put_folder


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/root")


def test_of_writers_racing_for_a_key_exactly_one_wins(storage: Storage) -> None:
    barrier = threading.Barrier(8)
    won: list[int] = []

    def race(n: int) -> None:
        barrier.wait()
        if storage.create("race/key.json", f'{{"n": {n}}}'.encode()):
            won.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert storage.get_json("race/key.json") == {"n": won[0]}  # the winner's, whole
    assert storage.list("race") == ["race/key.json"]  # no temporary file left


def test_a_second_cycle_of_a_type_waits_for_the_first(storage: Storage) -> None:
    hold_cycle(storage, "vehicle", "c1")
    hold_cycle(storage, "vehicle", "c1")  # a rerun or a retried task of the same cycle
    hold_cycle(storage, "boat", "c9")  # another type is not held up
    with pytest.raises(CycleBusy, match=r"vehicle: cycle c1 is running .*cycle c2 waits for "
                                        r"it to end .*delete .*cycles/vehicle/lock/0+1\.json"):
        hold_cycle(storage, "vehicle", "c2")
    release_cycle(storage, "vehicle", "c2")  # not its lock: nothing happens
    held = lock_state(storage, "vehicle")
    assert held is not None and (held.cycle_id, held.released) == ("c1", False)
    release_cycle(storage, "vehicle", "c1")
    hold_cycle(storage, "vehicle", "c2")
    held = lock_state(storage, "vehicle")
    assert held is not None and (held.cycle_id, held.generation, held.released) == ("c2", 2, False)
    # The superseded generation is gone: one key per type.
    assert storage.list("cycles/vehicle/lock/") == [held.key]


def test_a_cycle_that_stopped_without_a_word_loses_the_lock_with_its_lease(
        storage: Storage) -> None:
    hold_cycle(storage, "vehicle", "killed")
    later = datetime.now(UTC) + timedelta(hours=DEFAULT_LEASE_H + 1)
    hold_cycle(storage, "vehicle", "next", now=later)
    held = lock_state(storage, "vehicle")
    assert held is not None and held.cycle_id == "next"


def _race_to_take_over(storage: Storage, names: list[str], at: datetime) -> tuple[list[str],
                                                                                 list[str]]:
    """Every name calls :func:`hold_cycle` at the same instant: (winners, refused)."""
    barrier = threading.Barrier(len(names))
    won: list[str] = []
    refused: list[str] = []

    def take_over(name: str) -> None:
        barrier.wait()
        try:
            hold_cycle(storage, "vehicle", name, now=at)
            won.append(name)
        except CycleBusy:
            refused.append(name)

    threads = [threading.Thread(target=take_over, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_of_cycles_racing_to_take_over_an_expired_lease_exactly_one_wins(
        storage: Storage) -> None:
    later = datetime.now(UTC)
    for round_ in range(3):
        hold_cycle(storage, "vehicle", f"killed-{round_}", now=later)
        later += timedelta(hours=DEFAULT_LEASE_H + 1)  # its lease has run out
        won, refused = _race_to_take_over(storage, [f"r{round_}-{n}" for n in range(6)], later)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        held = lock_state(storage, "vehicle")
        assert held is not None and held.cycle_id == won[0]
        release_cycle(storage, "vehicle", won[0])


@pytest.mark.slow
def test_the_command_line_refuses_a_cycle_while_another_of_its_type_runs(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(
        {"name": "vehicle", "classes": ["car", "truck"]}))
    storage = open_storage(str(tmp_path / "storage"))
    drop_region(tmp_path / "drop", "vegetated", 1, seed=1)
    put_folder(storage, tmp_path / "drop", "incoming/vehicle/d1")
    before = storage.list()
    hold_cycle(storage, "vehicle", "running-elsewhere")
    env = {**os.environ, "AUTORETRAIN_STORAGE": str(tmp_path / "storage"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("autoretrain")), "cycle", "vehicle", "--configs",
         str(configs), "--cycle-id", "c2", "--force"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output
    assert "error: vehicle: cycle running-elsewhere is running" in output
    # Nothing was touched: the drop still waits, and the lock is the other cycle's.
    held = lock_state(storage, "vehicle")
    assert held is not None and held.cycle_id == "running-elsewhere"
    assert [k for k in storage.list() if k != held.key] == before
