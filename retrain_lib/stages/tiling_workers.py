"""The worker side of tiling: processes that read runs of tiles and write chips and labels.

A run is up to ``MAX_RUN_TILES`` neighbouring tiles of one grid row, read as one window; a work
unit (chunk) stacks the runs of a few grid rows (see :func:`retrain_lib.stages.tiling_plan.
work_chunks`). Each worker opens the scene once; fork starts workers in milliseconds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import geometry_mask

from retrain_lib.geo.raster import GDAL_CACHE_BYTES, Stretch, open_raster, read_region
from retrain_lib.geo.windows import PixelWindow

__all__ = ["RunTask", "TileExecutor", "TileTask", "WorkerSetup", "tile_count"]

TileOutcome = tuple[int, str, float]
"""``(tile index, "written" | "nodata", nodata fraction)``."""


@dataclass(frozen=True)
class TileTask:
    """One chip to write: its window, label lines and what to black out."""

    index: int
    tile_id: str
    window: PixelWindow
    label_text: str
    mask_rings: tuple[np.ndarray, ...] = ()  # tile-local pixel rings to black out
    region_wkb: bytes | None = None  # tile-local valid region when the AOI cuts the tile


@dataclass(frozen=True)
class RunTask:
    """Neighbouring tiles of one grid row, read as one window."""

    window: PixelWindow  # union of the tiles' windows: read once
    tiles: tuple[TileTask, ...]


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker needs: the scene, its stretch and where and how to write chips."""

    scene_path: str
    stretch: Stretch
    shard_dir: str
    image_format: str
    jpeg_quality: int
    max_nodata_fraction: float


_WORKER: dict[str, Any] = {}


def _worker_init(setup: WorkerSetup) -> None:
    cv2.setNumThreads(1)  # parallelism comes from processes
    env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)
    env.__enter__()
    _WORKER.update(setup=setup, env=env, dataset=open_raster(setup.scene_path))


def _worker_close() -> None:
    if "dataset" in _WORKER:
        _WORKER.pop("dataset").close()
        _WORKER.pop("env").__exit__(None, None, None)
        _WORKER.clear()


def _process_chunk(chunk: tuple[RunTask, ...]) -> list[TileOutcome]:
    return [result for run in chunk for result in _process_run(run)]


def _process_run(run: RunTask) -> list[TileOutcome]:
    setup: WorkerSetup = _WORKER["setup"]
    data, invalid = read_region(_WORKER["dataset"], run.window, setup.stretch.bands)
    rgb = setup.stretch.apply(data)
    del data
    if invalid is not None:
        rgb[invalid] = 0
    shard = Path(setup.shard_dir)
    if setup.image_format == "jpg":
        ext, encode_args = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, setup.jpeg_quality]
    else:
        ext, encode_args = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    results: list[TileOutcome] = []
    for tile in run.tiles:
        rows, cols = tile.window.relative_to(run.window).slices
        chip = rgb[rows, cols]
        chip_invalid = None if invalid is None else invalid[rows, cols]
        if tile.region_wkb is not None:
            outside = geometry_mask([shapely.from_wkb(tile.region_wkb)],
                                    out_shape=chip.shape[:2], transform=Affine.identity())
            chip = chip.copy()  # overlapping tiles share ``rgb``
            chip[outside] = 0
            chip_invalid = outside if chip_invalid is None else chip_invalid | outside
        fraction = float(chip_invalid.mean()) if chip_invalid is not None else 0.0
        if fraction > setup.max_nodata_fraction:
            results.append((tile.index, "nodata", fraction))
            continue
        if tile.mask_rings:
            chip = chip.copy() if tile.region_wkb is None else chip
            cv2.fillPoly(chip, list(tile.mask_rings), (0, 0, 0))
        ok, encoded = cv2.imencode(ext, chip[:, :, ::-1], encode_args)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"OpenCV could not encode tile {tile.tile_id}")
        (shard / "images" / f"{tile.tile_id}{ext}").write_bytes(encoded.tobytes())
        (shard / "labels" / f"{tile.tile_id}.txt").write_text(tile.label_text, encoding="utf-8")
        results.append((tile.index, "written", fraction))
    return results




def mp_context() -> BaseContext:
    """The multiprocessing context of tile workers."""
    # fork starts workers in milliseconds and does not re-import the caller's __main__ (spawn
    # would demand an ``if __name__ == "__main__"`` guard of every script). It is safe here: no
    # dataset is open in the parent when the pool starts, and workers open their own.
    return get_context("fork" if sys.platform == "linux" else "spawn")


class TileExecutor:
    """Runs tile runs in worker processes (or in-process for one worker)."""

    def __init__(self, setup: WorkerSetup, workers: int) -> None:
        self.setup = setup
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> TileExecutor:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=mp_context(),
                initializer=_worker_init, initargs=(self.setup,))
            # Start the workers now, before the caller starts threads (a progress bar): fork
            # copies only the forking thread.
            self.pool.submit(int).result()
        else:
            _worker_init(self.setup)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            _worker_close()

    def run(self, chunks: Sequence[tuple[RunTask, ...]], on_done: Callable[[int], None]
            ) -> list[TileOutcome]:
        """Process work units; ``on_done(tiles)`` after each one."""
        results: list[TileOutcome] = []
        if self.pool is None:
            for chunk in chunks:
                results.extend(_process_chunk(chunk))
                on_done(tile_count(chunk))
            return results
        # Bounded submission keeps queued tasks (and their label payloads) small.
        pending: dict[Future[list[TileOutcome]], int] = {}
        queue = iter(chunks)
        for chunk in queue:
            pending[self.pool.submit(_process_chunk, chunk)] = tile_count(chunk)
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                results.extend(future.result())
                on_done(pending.pop(future))
                nxt = next(queue, None)
                if nxt is not None:
                    pending[self.pool.submit(_process_chunk, nxt)] = tile_count(nxt)
        return results


def tile_count(chunk: tuple[RunTask, ...]) -> int:
    """Tiles in a work unit."""
    return sum(len(run.tiles) for run in chunk)

