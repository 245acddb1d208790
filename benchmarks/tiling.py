"""Tiling benchmark: AutoRetrain's tiler against the read+encode floor and SAHI's slice_image.

Every arm runs in its own subprocess on the same synthetic scene, with the same tile size and
overlap, and the parent samples the resident memory of that process and all its children:

- ``tiler``: :func:`retrain_lib.stages.tiling.tile_scene` writing every grid tile (background_ratio
  high enough that no tile is dropped), so it writes the same chips as the floor plus labels.
- ``tiler_default``: the tiler with the default policy (chips where there are objects, plus
  0.2 background chips per positive chip): what a training cycle actually runs.
- ``floor``: read every window with rasterio and encode it as JPEG, no label work, same
  worker processes and JPEG settings as the tiler. The tiler cannot do less than this.
- ``sahi``: ``sahi.slicing.slice_image`` writing JPEG slices. It decodes the whole scene
  into memory; a run that goes over ``--sahi-max-rss-gb`` is stopped and reported as such.

Throughput is scene megapixels per second of wall time (chips overlap, so more pixels are
encoded than the scene has). Run ``python benchmarks/tiling.py --size 4000`` for a quick look;
``--write-docs`` replaces the "Tiling" section of docs/benchmarks.md with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from docs_section import write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- tiling:begin -->"
SECTION_END = "<!-- tiling:end -->"
ARMS = ("floor", "tiler", "tiler_default", "sahi")
TILE_PX = 640
OVERLAP = 0.2
JPEG_QUALITY = 92  # TilingConfig's default
CLASSES = ("car", "truck")


# --------------------------------------------------------------------------- scene


def make_scene(out_dir: Path, size: int) -> tuple[Path, Path]:
    """The benchmark scene (cached): size x size, 3-band uint8, 1 object per 0.5 ha."""
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    scene_id = f"bench{size}"
    drop = out_dir / "scenes"
    tif, geojson = drop / f"{scene_id}.tif", drop / f"{scene_id}.geojson"
    if tif.exists() and geojson.exists():
        return tif, geojson
    # About a third of the tiles hold an object, so the default policy (positive chips plus a
    # capped share of background) writes fewer chips than the all-tiles arm.
    per_class = max(20, size * size // 2_000_000)
    spec = SceneSpec(scene_id=scene_id, width=size, height=size, gsd_m=0.5,
                     classes=CLASSES, objects_per_class=per_class, decoys=per_class // 4,
                     seed=7)
    started = time.perf_counter()
    make_drop(drop, [spec], progress=sys.stderr.isatty())
    print(f"wrote {tif} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return tif, geojson


# --------------------------------------------------------------------------- arms (children)


_FLOOR: dict[str, Any] = {}


def _floor_init(scene: str, out_dir: str) -> None:
    import cv2
    import rasterio

    cv2.setNumThreads(1)
    from retrain_lib.geo.raster import GDAL_CACHE_BYTES

    env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)  # the tiler's block cache
    env.__enter__()
    _FLOOR.update(env=env, dataset=rasterio.open(scene), out=Path(out_dir))


def _floor_chunk(windows: list[tuple[int, int, int, int]]) -> int:
    import cv2
    from rasterio.windows import Window

    dataset, out = _FLOOR["dataset"], _FLOOR["out"]
    for col, row, width, height in windows:
        data = dataset.read([1, 2, 3], window=Window(col, row, width, height))
        rgb = data.transpose(1, 2, 0)
        ok, encoded = cv2.imencode(".jpg", rgb[:, :, ::-1],
                                   [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        (out / f"{col}_{row}.jpg").write_bytes(encoded.tobytes())
    return len(windows)


def run_floor(scene: Path, out_dir: Path, workers: int) -> dict[str, Any]:
    """Read every window and encode it: the least work any tiler has to do."""
    import rasterio

    from retrain_lib.geo.windows import tile_grid
    from retrain_lib.stages.tiling_workers import mp_context

    with rasterio.open(scene) as dataset:
        width, height = dataset.width, dataset.height
    overlap_px = round(OVERLAP * TILE_PX)
    windows = [(w.col_off, w.row_off, w.width, w.height)
               for w in tile_grid(width, height, TILE_PX, overlap_px)]
    chunks = [windows[i:i + 8] for i in range(0, len(windows), 8)]
    out_dir.mkdir(parents=True)
    if workers == 1:
        _floor_init(str(scene), str(out_dir))
        written = sum(_floor_chunk(c) for c in chunks)
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=_floor_init,
                                 initargs=(str(scene), str(out_dir))) as pool:
            written = sum(pool.map(_floor_chunk, chunks))
    return {"chips": written}


def run_tiler(scene: Path, labels: Path, out_dir: Path, workers: int, every_tile: bool
              ) -> dict[str, Any]:
    from retrain_lib.core.config import TilingConfig
    from retrain_lib.stages.tiling import tile_scene

    params = TilingConfig(tile_size=TILE_PX, overlap=OVERLAP, jpeg_quality=JPEG_QUALITY,
                          background_ratio=1e6 if every_tile else 0.2, workers=workers)
    result = tile_scene(scene, labels, list(CLASSES), out_dir, params)
    return {"chips": result.tiles_written, "positive": result.positive_tiles,
            "background": result.background_tiles, "boxes": result.boxes_written,
            "skipped": dict(result.skipped)}


def run_sahi(scene: Path, out_dir: Path) -> dict[str, Any]:
    from sahi.slicing import slice_image

    result = slice_image(image=str(scene), output_file_name="slice", output_dir=str(out_dir),
                         slice_height=TILE_PX, slice_width=TILE_PX,
                         overlap_height_ratio=OVERLAP, overlap_width_ratio=OVERLAP,
                         out_ext=".jpg", verbose=False)
    return {"chips": len(result)}


def _cpu_s() -> float:
    import resource

    own, reaped = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


def child_main(args: argparse.Namespace) -> None:
    out_dir = Path(args.arm_out)
    cpu_before = _cpu_s()
    started = time.perf_counter()
    if args.arm == "floor":
        info = run_floor(Path(args.scene), out_dir, args.workers)
    elif args.arm in ("tiler", "tiler_default"):
        info = run_tiler(Path(args.scene), Path(args.labels), out_dir, args.workers,
                         every_tile=args.arm == "tiler")
    else:
        info = run_sahi(Path(args.scene), out_dir)
    info["elapsed_s"] = time.perf_counter() - started
    info["cpu_s"] = _cpu_s() - cpu_before  # worker processes included once they are joined
    print("RESULT " + json.dumps(info), flush=True)


# --------------------------------------------------------------------------- parent


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS over the process and its children, largest single RSS), in bytes."""
    rss = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss.append(p.memory_info().rss)
        except psutil.Error:
            continue
    return sum(rss), max(rss, default=0)


def run_arm(arm: str, scene: Path, labels: Path, out_dir: Path, workers: int,
            max_rss_gb: float | None, timeout_s: float) -> dict[str, Any]:
    arm_out = out_dir / "arms" / arm
    shutil.rmtree(arm_out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--arm", arm, "--scene", str(scene),
           "--labels", str(labels), "--arm-out", str(arm_out), "--workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)
    watched = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    failure = None
    while proc.poll() is None:
        total, largest = _tree_rss(watched)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        if max_rss_gb is not None and total > max_rss_gb * 2**30:
            failure = f"stopped at {total / 2**30:.1f} GiB RSS (limit {max_rss_gb} GiB)"
        elif time.perf_counter() - started > timeout_s:
            failure = f"stopped after {timeout_s:.0f} s"
        if failure:
            for child in watched.children(recursive=True):
                child.kill()
            proc.kill()
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"arm": arm, "peak_rss_mib": peak_sum / 2**20,
                              "peak_rss_one_process_mib": peak_one / 2**20, "wall_s": wall}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if failure is None and proc.returncode == 0 and lines:
        result.update(json.loads(lines[-1].removeprefix("RESULT ")))
    else:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        result["failed"] = failure or f"exit {proc.returncode}: {tail}"
    shutil.rmtree(arm_out, ignore_errors=True)  # chips of a 20000 px scene fill gigabytes
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cv2
    import rasterio

    ram = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM, Python "
            f"{platform.python_version()}, rasterio {rasterio.__version__} (GDAL "
            f"{rasterio.__gdal_version__}), OpenCV {cv2.__version__}")


def render(results: list[dict[str, Any]], size: int, workers: int, scene_mb: float,
           command: str) -> str:
    megapixels = size * size / 1e6
    floor = next((r for r in results if r["arm"] == "floor" and "failed" not in r), None)
    rows = []
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['arm']} | - | - | failed: {r['failed']} | "
                        f"{r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | - |")
            continue
        rate = megapixels / r["elapsed_s"]
        share = f"{100 * floor['elapsed_s'] / r['elapsed_s']:.0f} %" if floor else "-"
        rows.append(f"| {r['arm']} | {rate:.1f} | {share} | {r['chips']} chips | "
                    f"{r['peak_rss_mib']:.0f} | {r['elapsed_s']:.1f} | {r['cpu_s']:.1f} |")
    table = "\n".join([
        "| arm | MP/s | of floor | output | peak RSS (MiB) | time (s) | CPU (s) |",
        "|---|---:|---:|---|---:|---:|---:|", *rows])
    findings = ""
    by_arm = {r["arm"]: r for r in results}
    tiler, sahi = by_arm.get("tiler"), by_arm.get("sahi")
    if floor and tiler and "failed" not in tiler:
        findings += (f"- Target (>= 80 % of the floor's throughput, flat memory): the tiler "
                     f"ran at {100 * floor['elapsed_s'] / tiler['elapsed_s']:.0f} % of the "
                     f"floor with {tiler['peak_rss_mib']:.0f} MiB peak RSS over all its "
                     "processes.\n")
    if sahi and "failed" in sahi:
        findings += f"- SAHI could not cope: {sahi['failed']}.\n"
    elif sahi:
        findings += (f"- SAHI decodes the whole scene into one array first: "
                     f"{sahi['peak_rss_mib']:.0f} MiB peak for a "
                     f"{size * size * 3 / 2**20:.0f} MiB raster, growing with the scene.\n")
    return f"""{SECTION_BEGIN}
## Tiling

Scene: synthetic {size} x {size} px ({megapixels:.0f} MP), 3-band uint8, deflate-compressed
512 px blocks ({scene_mb:.0f} MB on disk), 0.5 m GSD, objects of two classes. Tiles
{TILE_PX} px with {OVERLAP} overlap, JPEG quality {JPEG_QUALITY} (SAHI: Pillow's default 75),
{workers} worker process(es) for the tiler and the floor; SAHI is single-process.

Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when the run ended (other jobs
shared the machine, so compare arms within a run rather than absolute rates across runs).

{table}

- **MP/s**: scene megapixels per second of wall time inside the arm (imports and process
  start excluded). **of floor**: floor time / arm time. **CPU**: user + system seconds of
  the arm and its workers (less sensitive than wall time to other load on the machine).
- **peak RSS**: sum over the arm's process and its worker processes, sampled every 50 ms
  (forked workers share pages with their parent, so the sum overstates a little).
- `tiler` writes every grid tile, like the floor, plus labels and the tile index;
  `tiler_default` is the training policy (positive chips + 0.2 background per positive).
- The floor reads each window on its own; the tiler reads a row of up to 8 neighbouring
  tiles in one go and walks down columns of tiles so that GDAL's block cache still holds the
  blocks under the vertical overlap, which is how it does the label work and still beats it.
{findings}
Reproduce: `{command}`
{SECTION_END}
"""


def write_docs(section: str) -> None:
    write_section(section, "tiling")


def parent_main(args: argparse.Namespace) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene, labels = make_scene(out_dir, args.size)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    results = []
    for arm in arms:
        result = run_arm(arm, scene, labels, out_dir, args.workers,
                         args.sahi_max_rss_gb if arm == "sahi" else None, args.timeout_s)
        results.append(result)
        print(json.dumps(result), flush=True)
    command = "python benchmarks/tiling.py " + " ".join(args.raw_args)
    section = render(results, args.size, args.workers, scene.stat().st_size / 1e6, command)
    print(section)
    (out_dir / f"tiling_{args.size}.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write_docs:
        write_docs(section)
        print(f"updated {DOCS}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="Scene edge in pixels.")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes.")
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated arms to run.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Scratch folder (gitignored).")
    parser.add_argument("--sahi-max-rss-gb", type=float, default=8.0,
                        help="Stop SAHI when its RSS passes this many GiB.")
    parser.add_argument("--timeout-s", type=float, default=1800, help="Per-arm time limit.")
    parser.add_argument("--write-docs", action="store_true",
                        help="Replace the Tiling section of docs/benchmarks.md.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.raw_args = [a for a in sys.argv[1:] if a != "--write-docs"]
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
