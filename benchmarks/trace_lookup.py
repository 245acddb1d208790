"""Finding the chips under a detection: the dataset version's chip index against scanning tile
indexes.

A synthetic dataset version of ``--chips`` chips (default 100,000: ``--shards`` scenes of
equal share, 640 px chips at 0.5 m in UTM zones 32 to 35 N) is written two ways:

- ``chip index``: ``chips.gpkg`` as dataset assembly writes it (stages.chip_index), queried
  with :func:`query_chip_index` (the GeoPackage's R-tree);
- ``scan tile indexes`` (the baseline): every shard's ``index.json`` in the tiler's format,
  each read, parsed and its tiles' bounds reprojected to lon/lat and tested, which is what
  finding the chips takes without the index.

Both answer the same random points (each on a chip); the answers must agree. Reported: the
time to write the index, its size, and per lookup the median and slowest time (the first
lookup includes opening the file).

``python benchmarks/trace_lookup.py --write-docs`` replaces the "Trace: chips under a
detection" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from docs_section import write_section
from tiling import machine

REPO_ROOT = Path(__file__).resolve().parents[1]
TILE_M = 320.0  # 640 px at 0.5 m
ZONES = (32, 33, 34, 35)


def _chips(n_chips: int, shards: int) -> list[dict[str, Any]]:
    """Shard records: a scene per shard on a grid of its UTM zone, its chips in rows."""
    per_shard = n_chips // shards
    side = int(per_shard ** 0.5) + 1
    out = []
    for s in range(shards):
        zone = ZONES[s % len(ZONES)]
        x0, y0 = 300_000.0 + (s // len(ZONES)) % 20 * side * TILE_M, 4_000_000.0 + (
            s // len(ZONES) // 20) * side * TILE_M
        tiles = []
        for t in range(per_shard):
            col, row = t % side, t // side
            minx, miny = x0 + col * TILE_M, y0 + row * TILE_M
            tiles.append({"id": f"t{t}", "map_bounds": [minx, miny, minx + TILE_M,
                                                         miny + TILE_M],
                          "status": "written", "objects": {"car": 1},
                          "image": f"images/t{t}.jpg", "label": f"labels/t{t}.txt"})
        out.append({"scene_id": f"scene-{s:04d}", "crs": f"EPSG:326{zone}", "tiles": tiles})
    return out


def _write_index(shards: list[dict[str, Any]], path: Path) -> float:
    from retrain_lib.stages.chip_index import IndexedChip, bounds_to_lonlat, write_chip_index

    started = time.perf_counter()
    chips = []
    by_crs: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:  # one reprojection per CRS, as dataset assembly does
        by_crs.setdefault(shard["crs"], []).append(shard)
    for crs, group in by_crs.items():
        tiles = [(shard, t) for shard in group for t in shard["tiles"]]
        lonlat = bounds_to_lonlat([tuple(t["map_bounds"]) for _, t in tiles], crs)
        for (shard, t), b in zip(tiles, lonlat, strict=True):
            prefix = f"chips/vehicle/p/{shard['scene_id']}"
            chips.append(IndexedChip(
                image_key=f"{prefix}/{t['image']}", scene_id=shard["scene_id"], region="r",
                split="train", source="regular", reason="", mining_cycle="", repeats=1,
                shard_prefix=prefix, shard_sha256="0" * 64, labels_sha256="0" * 64,
                bounds_lonlat=b))
    write_chip_index(path, chips)
    return time.perf_counter() - started


def _write_shards(shards: list[dict[str, Any]], root: Path) -> None:
    for shard in shards:
        folder = root / shard["scene_id"]
        folder.mkdir(parents=True)
        (folder / "index.json").write_text(json.dumps({
            "format_version": 1, "scene_id": shard["scene_id"],
            "scene": {"crs": shard["crs"]}, "tiles": shard["tiles"]}, separators=(",", ":")))


def _scan(root: Path, lon: float, lat: float) -> set[str]:
    """The baseline: read every tile index and test each chip."""
    from retrain_lib.stages.chip_index import bounds_to_lonlat

    found = set()
    for index_path in sorted(root.glob("*/index.json")):
        index = json.loads(index_path.read_text())
        tiles = [t for t in index["tiles"] if t["status"] == "written"]
        boxes = bounds_to_lonlat([tuple(t["map_bounds"]) for t in tiles], index["scene"]["crs"])
        for tile, (west, south, east, north) in zip(tiles, boxes, strict=True):
            if west <= lon <= east and south <= lat <= north:
                found.add(f"chips/vehicle/p/{index['scene_id']}/{tile['image']}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chips", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--points", type=int, default=50, help="Lookups with the index.")
    parser.add_argument("--scan-points", type=int, default=3, help="Lookups by scanning.")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import random

    from retrain_lib.stages.chip_index import bounds_to_lonlat, query_chip_index

    shards = _chips(args.chips, args.shards)
    rng = random.Random(7)
    points = []
    for _ in range(args.points):
        shard = rng.choice(shards)
        tile = rng.choice(shard["tiles"])
        minx, miny = tile["map_bounds"][:2]
        # A point inside the chip, away from its edges (neighbours overlap nothing here).
        [(west, south, east, north)] = bounds_to_lonlat(
            [(minx + 0.4 * TILE_M, miny + 0.4 * TILE_M, minx + 0.6 * TILE_M,
              miny + 0.6 * TILE_M)], shard["crs"])
        points.append(((west + east) / 2, (south + north) / 2,
                       f"chips/vehicle/p/{shard['scene_id']}/{tile['image']}"))
    with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
        scratch = Path(tmp)
        index_path = scratch / "chips.gpkg"
        # The first GeoPackage a process writes pays GDAL's start-up: measured apart.
        startup_s = _write_index([{**shards[0], "tiles": shards[0]["tiles"][:1]}],
                                 scratch / "first.gpkg")
        write_s = _write_index(shards, index_path)
        _write_shards(shards, scratch / "shards")
        index_times, answers = [], []
        for lon, lat, expected in points:
            started = time.perf_counter()
            found = {c.image_key for c in query_chip_index(index_path, lon, lat)}
            index_times.append(time.perf_counter() - started)
            answers.append(found)
            assert expected in found, (expected, found)
        scan_times = []
        for (lon, lat, _), found in list(zip(points, answers, strict=True))[:args.scan_points]:
            started = time.perf_counter()
            scanned = _scan(scratch / "shards", lon, lat)
            scan_times.append(time.perf_counter() - started)
            assert scanned == found, (scanned, found)
        size_mb = index_path.stat().st_size / 1e6
    result = {"chips": len(shards) * len(shards[0]["tiles"]), "shards": len(shards),
              "write_s": write_s, "startup_s": startup_s, "size_mb": size_mb,
              "index_first_s": index_times[0],
              "index_median_s": statistics.median(index_times),
              "index_max_s": max(index_times), "scan_median_s": statistics.median(scan_times),
              "scan_max_s": max(scan_times), "points": len(points),
              "scan_points": len(scan_times)}
    print(json.dumps(result))
    if args.write_docs:
        write_section(render(result), "trace-lookup")


def render(r: dict[str, Any]) -> str:
    index_row = (f"| chip index (`query_chip_index`) | {r['points']} | "
                 f"{r['index_median_s'] * 1000:.1f} ms | {r['index_max_s'] * 1000:.1f} ms "
                 f"(first: {r['index_first_s'] * 1000:.1f} ms) |")
    scan_row = (f"| scan tile indexes (baseline) | {r['scan_points']} | "
                f"{r['scan_median_s']:.2f} s | {r['scan_max_s']:.2f} s |")
    speedup = r["scan_median_s"] / r["index_median_s"]
    verdict = ("met" if r["index_max_s"] < 1.0 else "**not met**") + \
        f" (slowest lookup {r['index_max_s'] * 1000:.0f} ms)"
    return f"""<!-- trace-lookup:begin -->
## Trace: chips under a detection

`autoretrain trace` finds the chips of a dataset version that lie under a detection through the
version's chip index (`chips.gpkg`, a GeoPackage with an R-tree, written with the dataset card).
Baseline: reading every shard's tile index and testing each chip, which is what the lookup
would cost without the index. A synthetic version of {r['chips']:,} chips in {r['shards']}
shards (scenes in four UTM zones); both arms answer the same points and must agree.

| arm | lookups | median | slowest |
|---|---|---|---|
{index_row}
{scan_row}

The index answers {speedup:,.0f}× faster than the scan. Target, under 1 s per lookup on 100k
chips: {verdict}. Writing it at assembly took {r['write_s']:.2f} s ({r['size_mb']:.1f} MB
for {r['chips']:,} chips), plus {r['startup_s']:.1f} s for the first GeoPackage a process writes
(GDAL's start-up). On S3 storage, trace downloads the index once per call (it is
immutable, like its version). Machine: {machine()}.

Reproduce: `python benchmarks/trace_lookup.py --write-docs`.
<!-- trace-lookup:end -->
"""


if __name__ == "__main__":
    main()
