"""Reading a scene's tiles for inference while the model runs.

Reader threads read runs of neighbouring tiles (one windowed read per run; GDAL releases the
GIL) into a bounded queue, and :func:`tile_batches` hands them to the model in grid order.
Memory depends on the batch and queue sizes, not on the scene size.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrain_lib.geo.raster import Stretch, open_raster, read_chip
from retrain_lib.geo.windows import PixelWindow

__all__ = ["MemoryGuard", "RunReader", "TileBatch", "tile_batches", "tile_runs"]

# Windows read in one go: neighbouring tiles of a row share their overlap.
MAX_RUN_TILES = 4


@dataclass(frozen=True)
class TileBatch:
    """Tiles for one forward pass, with the grid tiles they account for."""

    windows: list[PixelWindow]
    pixels: np.ndarray  # (b, h, w, 3) uint8
    consumed: int  # grid tiles accounted for since the previous batch, skipped ones included
    skipped: int  # of which skipped for nodata


def tile_runs(windows: Sequence[PixelWindow]) -> list[list[int]]:
    """Group row-neighbouring tiles (grid order) into runs read with one window each."""
    runs: list[list[int]] = []
    for i, win in enumerate(windows):
        if runs:
            prev = windows[runs[-1][-1]]
            if (len(runs[-1]) < MAX_RUN_TILES and win.row_off == prev.row_off
                    and win.col_off <= prev.col_off + prev.width):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


class RunReader:
    """Reads tile runs in worker threads, one rasterio dataset per thread (GDAL handles must
    not be shared between threads); closed from the caller's thread once reading is over."""

    def __init__(self, path: Path, stretch: Stretch, windows: Sequence[PixelWindow],
                 pad_hw: tuple[int, int]) -> None:
        self.path = path
        self.stretch = stretch
        self.windows = windows
        self.pad_hw = pad_hw
        self.local = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def _dataset(self) -> Any:
        dataset = getattr(self.local, "dataset", None)
        if dataset is None:
            dataset = open_raster(self.path)
            self.local.dataset = dataset
            with self.lock:
                self.opened.append(dataset)
        return dataset

    def read(self, run: list[int]) -> list[tuple[PixelWindow, np.ndarray | None]]:
        """The run's tiles, padded to the batch shape; None for a tile with no valid pixel."""
        first, last = self.windows[run[0]], self.windows[run[-1]]
        union = PixelWindow.from_bounds(first.col_off, first.row_off,
                                        last.col_off + last.width, first.row_off + first.height)
        chip = read_chip(self._dataset(), union, self.stretch)
        out: list[tuple[PixelWindow, np.ndarray | None]] = []
        for i in run:
            win = self.windows[i]
            rows, cols = win.relative_to(union).slices
            # Skip only tiles without a valid pixel: a partly valid tile can still hold objects.
            if chip.valid is not None and not chip.valid[rows, cols].any():
                out.append((win, None))
                continue
            pixels = chip.rgb[rows, cols]
            h, w = self.pad_hw
            if pixels.shape[:2] != (h, w):
                # Ultralytics' letterbox grey; boxes keep their top-left origin.
                padded = np.full((h, w, 3), 114, dtype=np.uint8)
                padded[: pixels.shape[0], : pixels.shape[1]] = pixels
                pixels = padded
            out.append((win, pixels))
        return out

    def close(self) -> None:
        """Close every thread's dataset."""
        with self.lock:
            for dataset in self.opened:
                dataset.close()
            self.opened.clear()


class _InlineExecutor:
    """``readers=0``: read each run in the caller's thread when it is submitted."""

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # re-raised by future.result() in order, like a pool
            future.set_exception(exc)
        return future


def tile_batches(reader: RunReader, runs: list[list[int]], batch: int, readers: int,
                 prefetch_batches: int) -> Iterator[TileBatch]:
    """Yield batches in grid order while reader threads keep up to ``prefetch_batches``
    batches of tiles read ahead (bounded, so memory does not grow with the scene)."""
    in_flight = max(readers, prefetch_batches * batch // MAX_RUN_TILES)
    pending: queue.SimpleQueue[Future[list[tuple[Any, np.ndarray | None]]]] = (
        queue.SimpleQueue())
    executor = (ThreadPoolExecutor(max_workers=readers, thread_name_prefix="tile-reader")
                if readers else _InlineExecutor())
    with executor as pool:
        run_iter = iter(runs)
        n_pending = 0
        for run in run_iter:
            pending.put(pool.submit(reader.read, run))
            n_pending += 1
            if n_pending >= in_flight:
                break
        windows: list[Any] = []
        pixels: list[np.ndarray] = []
        consumed = skipped = 0
        try:
            while n_pending:
                future = pending.get()
                n_pending -= 1
                nxt = next(run_iter, None)
                if nxt is not None:
                    pending.put(pool.submit(reader.read, nxt))
                    n_pending += 1
                for win, px in future.result():
                    consumed += 1
                    if px is None:
                        skipped += 1
                        continue
                    windows.append(win)
                    pixels.append(px)
                    if len(windows) == batch:
                        yield TileBatch(windows, np.stack(pixels), consumed, skipped)
                        windows, pixels, consumed, skipped = [], [], 0, 0
            if windows or consumed:
                stacked = np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
                yield TileBatch(windows, stacked, consumed, skipped)
        finally:
            while n_pending:
                pending.get().cancel()
                n_pending -= 1




class MemoryGuard:
    """Keeps RSS flat in the number of tiles.

    Tiles are allocated by reader threads and freed by the model's thread; with several
    threads, glibc's per-thread heaps keep freed pages, and RSS creeps up with the number of
    tiles (measured: 5120 px scene, 2 torch threads: +370 MiB). When RSS has grown by more
    than ``slack_mib`` since the first batch, freed pages are handed back to the OS
    (``malloc_trim``, glibc only). Not after every batch: the next forward pass would fault
    its activation pages in again, which costs more than it saves.
    """

    def __init__(self, slack_mib: int = 64) -> None:
        import psutil

        self.process = psutil.Process()
        self.slack = slack_mib * 2**20
        self.reference: int | None = None
        self.trims = 0

    def check(self) -> None:
        rss = self.process.memory_info().rss
        if self.reference is None:
            self.reference = rss
        elif rss > self.reference + self.slack:
            trim = _malloc_trim()
            if trim is not None:
                trim(0)
                self.trims += 1


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


