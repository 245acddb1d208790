"""Scene rasters: open and check a scene, its 8-bit stretch, and the one windowed reader.

Tiling, inference, ingest and mining all read scenes through this module, so the model sees
at inference exactly what it was trained on.

- **Radiometry.** uint8 scenes pass through unchanged. Other types get a per-band percentile
  stretch to 8 bit, computed once per scene from overviews or from a fixed sample of windows,
  so every chip of a scene (and inference) sees the same mapping.
- **Nodata.** A pixel is invalid where every band holds its nodata value (GDAL's rule), where
  an alpha band or internal mask says so, or where a float band is NaN; invalid pixels read as
  0 in chips.
- **Memory.** GDAL's block cache defaults to 5% of RAM per process; :func:`gdal_env` fixes it
  at :data:`GDAL_CACHE_BYTES`, which still holds the blocks under the overlap of neighbouring
  tiles.
- **Object storage.** A scene on S3 is read in place, window by window, through GDAL's
  ``/vsis3/`` (``Storage.raster_path``), never downloaded whole. :func:`object_storage` gives
  GDAL the storage's endpoint and keys, for this process, its threads and the tiling workers
  it forks; failures name the ``s3://`` object.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags

from retrain_lib.core.config import TilingConfig
from retrain_lib.core.errors import ConfigError, InputError, RetrainError, StorageError
from retrain_lib.core.io import safe_id
from retrain_lib.core.storage import S3Settings, S3Storage
from retrain_lib.geo.crs import scene_gsd_m, to_crs
from retrain_lib.geo.windows import PixelWindow

__all__ = [
    "GDAL_CACHE_BYTES",
    "Chip",
    "SceneInfo",
    "Stretch",
    "as_cog",
    "default_scene_id",
    "gdal_env",
    "inspect_scene",
    "object_storage",
    "open_raster",
    "probe_pixels",
    "raster_fingerprint",
    "raster_uri",
    "read_chip",
    "resolve_tile_px",
    "scene_location",
    "scene_stretch",
]

# rasterio passes an integer GDAL_CACHEMAX to GDALSetCacheMax64, i.e. in bytes, not MB.
GDAL_CACHE_BYTES = 64 * 2**20
STRETCH_SAMPLE_WINDOWS = 8  # per side: 64 windows ...
STRETCH_SAMPLE_PX = 128  # ... of 128 x 128 pixels when the scene has no overviews
_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class SceneInfo:
    """What tiling and inference need to know about a scene, checked on open."""

    path: Path
    scene_id: str
    width: int
    height: int
    count: int
    dtype: str
    crs: pyproj.CRS
    transform: Affine
    gsd_m: float | None

    @property
    def megapixels(self) -> float:
        """Scene size in megapixels."""
        return self.width * self.height / 1e6

    def bounds_text(self) -> str:
        """The scene's extent in its CRS, as messages show it."""
        minx, miny, maxx, maxy = PixelWindow(0, 0, self.width, self.height).map_bounds(
            self.transform)
        return f"x {minx:.6g}..{maxx:.6g}, y {miny:.6g}..{maxy:.6g}"


@contextmanager
def gdal_env() -> Iterator[None]:
    """GDAL settings for reading scenes: a fixed block cache (:data:`GDAL_CACHE_BYTES`)."""
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        yield


_VSIS3 = "/vsis3/"
_object_storage: S3Settings | None = None
"""How GDAL reaches ``/vsis3/`` scenes; process-wide because GDAL reads them in threads and
forked workers too (see :func:`object_storage`)."""


@contextmanager
def object_storage(settings: S3Settings | None) -> Iterator[None]:
    """Let :func:`open_raster` read ``/vsis3/`` scenes with ``settings`` (endpoint, region,
    keys; unset ones come from boto3's usual chain) until the block ends."""
    global _object_storage
    previous, _object_storage = _object_storage, settings or S3Settings.from_env()
    try:
        yield
    finally:
        _object_storage = previous


def _s3_uri(vsi_path: str) -> str:
    return "s3://" + vsi_path[len(_VSIS3):]


def scene_location(text: str) -> Path:
    """What :func:`open_raster` opens for a scene a user names: ``s3://bucket/key`` becomes its
    ``/vsis3/`` path (read in place inside :func:`object_storage`), anything else a path."""
    return Path(_VSIS3 + text[len("s3://"):]) if text.startswith("s3://") else Path(text)


def raster_uri(path: str | os.PathLike[str]) -> str:
    """How a raster is named to people and in records: ``s3://`` for a ``/vsis3/`` path."""
    text = os.fspath(path)
    return _s3_uri(text) if text.startswith(_VSIS3) else text


def _s3_env() -> rasterio.Env:
    """GDAL's options for ``/vsis3/``: keys through rasterio's AWS session (it refuses them as
    plain options), a custom endpoint over path-style HTTP(S), and no directory listings."""
    import boto3
    from rasterio.session import AWSSession

    settings = _object_storage or S3Settings.from_env()
    session = boto3.Session(aws_access_key_id=settings.aws_access_key_id,
                            aws_secret_access_key=settings.aws_secret_access_key,
                            aws_session_token=settings.aws_session_token,
                            region_name=settings.region_name or "us-east-1")
    options: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                               "GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "1"}
    endpoint = None
    if settings.endpoint_url:
        scheme, _, endpoint = settings.endpoint_url.rstrip("/").partition("://")
        options.update(AWS_HTTPS="NO" if scheme == "http" else "YES",
                       AWS_VIRTUAL_HOSTING="FALSE")
    return rasterio.Env(session=AWSSession(session=session, endpoint_url=endpoint), **options)


def open_raster(path: str | os.PathLike[str]) -> Any:
    """Open a raster with rasterio: a local file, or an S3 object by its ``/vsis3/`` path.

    Raises:
        InputError: the file or object is missing or corrupt (the message names it).
        StorageError: the object store refused or did not answer.
    """
    text = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            if text.startswith(_VSIS3):
                # The dataset keeps the session it was opened with for all its reads.
                with _s3_env():
                    return rasterio.open(text)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        if text.startswith(_VSIS3):
            raise _s3_error(text, exc) from None
        if not Path(path).exists():
            raise InputError(f"{path}: scene file not found") from None
        raise InputError(f"{path}: cannot open as a raster; is it a corrupt or unsupported "
                         f"file? ({exc})") from None


def raster_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a raster's bytes cheaply: size and hashes of its first and last MiB for
    a file; size and ETag for an S3 object (its content hash; catalog objects never change).

    Raises:
        InputError: the file or object does not exist.
        StorageError: the object store cannot be reached.
    """
    text = os.fspath(path)
    if not text.startswith(_VSIS3):
        import hashlib

        local = Path(text)
        try:
            size = local.stat().st_size
            with local.open("rb") as handle:
                head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
                handle.seek(max(0, size - (1 << 20)))
                tail = hashlib.sha256(handle.read(1 << 20)).hexdigest()
        except FileNotFoundError:
            raise InputError(f"{text}: scene file not found") from None
        return {"size": size, "head_sha256": head, "tail_sha256": tail}
    bucket, _, key = text[len(_VSIS3):].partition("/")
    stat = S3Storage(f"s3://{bucket}", settings=_object_storage).stat(key)
    return {"size": stat["size"], "etag": stat["etag"]}


def _s3_error(vsi_path: str, exc: Exception) -> RetrainError:
    uri, detail = _s3_uri(vsi_path), str(exc)
    if "does not exist" in detail or "No such file" in detail or "404" in detail:
        return InputError(f"{uri}: scene object not found")
    if "Access Denied" in detail or "403" in detail or "credentials" in detail.lower():
        return StorageError(f"{uri}: access denied; check the S3 keys ({detail})")
    if "not recognized as" in detail or "TIFF" in detail:
        return InputError(f"{uri}: cannot open as a raster; is it a corrupt or unsupported "
                          f"file? ({detail})")
    endpoint = (_object_storage or S3Settings.from_env()).endpoint_url or "AWS S3"
    return StorageError(f"{uri}: cannot read from {endpoint} ({detail})")


def default_scene_id(path: str | os.PathLike[str]) -> str:
    """Scene id derived from a file name: its stem with unsafe characters replaced."""
    return safe_id(Path(path).stem, fallback="scene")


def inspect_scene(path: str | os.PathLike[str], scene_id: str | None = None) -> SceneInfo:
    """Open a scene and check it is a georeferenced raster.

    Raises:
        InputError: the file is missing, unreadable, or has no CRS or geotransform.
    """
    with gdal_env(), open_raster(path) as dataset:
        return scene_info(dataset, Path(path), scene_id)


def scene_info(dataset: Any, path: Path, scene_id: str | None) -> SceneInfo:
    """The :class:`SceneInfo` of an open dataset; InputError when it is not georeferenced."""
    if dataset.crs is None:
        raise InputError(f"{path}: the raster has no CRS; expected a georeferenced GeoTIFF "
                         "with a CRS and a geotransform")
    if dataset.transform.is_identity:
        extra = " (it has ground control points only; warp it first)" if dataset.gcps[0] else ""
        raise InputError(f"{path}: the raster has no geotransform{extra}; expected a "
                         "georeferenced GeoTIFF")
    crs = to_crs(dataset.crs)
    try:
        gsd = scene_gsd_m(dataset.transform, crs,
                          at_px=(dataset.width / 2, dataset.height / 2))
    except InputError:
        gsd = None
    sid = scene_id if scene_id is not None else default_scene_id(path)
    if not _SCENE_ID.fullmatch(sid):
        raise ConfigError(f"scene id {sid!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return SceneInfo(path=path, scene_id=sid, width=dataset.width, height=dataset.height,
                     count=dataset.count, dtype=str(dataset.dtypes[0]), crs=crs,
                     transform=dataset.transform, gsd_m=gsd)



def resolve_tile_px(params: TilingConfig, scene: SceneInfo) -> tuple[int, int]:
    """Tile edge and overlap in pixels for this scene (metre sizes use the scene's GSD).

    Raises:
        ConfigError: the sizes make no valid grid for this scene.
    """
    if params.tile_size_m is not None:
        if scene.gsd_m is None or scene.gsd_m <= 0:
            raise ConfigError(f"{scene.path}: tile_size_m needs the scene's ground sample "
                              "distance, which its CRS does not give; set tile_size in pixels")
        tile_px = round(params.tile_size_m / scene.gsd_m)
        if not 32 <= tile_px <= 4096:
            raise ConfigError(f"{scene.path}: tile_size_m {params.tile_size_m} m at "
                              f"{scene.gsd_m:.3g} m GSD is {tile_px} px; expected 32..4096 px")
    else:
        tile_px = params.tile_size_px_default
    overlap_px = round(params.overlap * tile_px) if params.overlap < 1 else round(params.overlap)
    if overlap_px >= tile_px:
        raise ConfigError(f"overlap {params.overlap} is {overlap_px} px, which is not less than "
                          f"the tile ({tile_px} px)")
    return tile_px, overlap_px



@dataclass(frozen=True)
class Stretch:
    """Band selection and per-band linear stretch to 8-bit RGB, fixed for a whole scene.

    Attributes:
        bands: 1-based band indexes read for R, G, B (one index means grey).
        low: Per-band value mapped to 0.
        high: Per-band value mapped to 255.
        identity: uint8 input passes through unchanged (``low``/``high`` are 0/255).
    """

    bands: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    identity: bool = False

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Map a ``(len(bands), h, w)`` array to a contiguous ``(h, w, 3)`` uint8 image."""
        if self.identity and data.dtype == np.uint8:
            out = data
        else:
            low = np.asarray(self.low, dtype=np.float32)[:, None, None]
            scale = 255.0 / (np.asarray(self.high, dtype=np.float32)[:, None, None] - low)
            scaled = data.astype(np.float32)  # in place from here: one float buffer
            scaled -= low
            scaled *= scale
            np.clip(scaled, 0, 255, out=scaled)
            np.nan_to_num(scaled, copy=False)
            out = np.rint(scaled, out=scaled).astype(np.uint8)
        if out.shape[0] == 1:
            return np.ascontiguousarray(np.repeat(out.transpose(1, 2, 0), 3, axis=2))
        return np.ascontiguousarray(out.transpose(1, 2, 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the tile index."""
        return {"bands": list(self.bands), "low": list(self.low), "high": list(self.high),
                "identity": self.identity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stretch:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["bands"]), tuple(data["low"]), tuple(data["high"]),
                   bool(data.get("identity", False)))


def select_bands(dataset: Any, bands: Sequence[int] | None, source: str) -> tuple[int, ...]:
    """1-based bands read as R, G, B (or grey); the first three (or one) by default."""
    if bands is None:
        return (1, 2, 3) if dataset.count >= 3 else (1,)
    if len(bands) not in (1, 3):
        raise ConfigError(f"bands {list(bands)}: give 1 band (grey) or 3 bands (R, G, B)")
    missing = [b for b in bands if not 1 <= b <= dataset.count]
    if missing:
        raise ConfigError(f"{source}: bands {missing} do not exist; the scene has "
                          f"{dataset.count} band(s), numbered from 1")
    return tuple(int(b) for b in bands)


def _sample_windows(dataset: Any) -> list[PixelWindow]:
    """Windows spread over the scene, each inside one block, so each costs one block decode."""
    block_h, block_w = dataset.block_shapes[0]
    w, h = min(STRETCH_SAMPLE_PX, dataset.width), min(STRETCH_SAMPLE_PX, dataset.height)
    windows = []
    for i in range(STRETCH_SAMPLE_WINDOWS):
        for j in range(STRETCH_SAMPLE_WINDOWS):
            col = round((dataset.width - w) * (j + 0.5) / STRETCH_SAMPLE_WINDOWS)
            row = round((dataset.height - h) * (i + 0.5) / STRETCH_SAMPLE_WINDOWS)
            if w <= block_w and h <= block_h:  # move to the start of the block it begins in
                col = min(col - col % block_w, dataset.width - w)
                row = min(row - row % block_h, dataset.height - h)
            windows.append(PixelWindow(col, row, w, h))
    return sorted(set(windows))


def scene_stretch(dataset: Any, bands: Sequence[int] | None = None,
                  percentiles: tuple[float, float] = (2.0, 98.0)) -> Stretch:
    """The scene's 8-bit stretch, from its overviews or a fixed sample of 64 windows.

    Args:
        dataset: An open rasterio dataset.
        bands: 1-based band indexes (1 or 3); default the first three, or band 1 when the
            scene has fewer than three.
        percentiles: Low and high percentiles of valid pixels mapped to 0 and 255.

    Raises:
        ConfigError: the bands do not exist or are not 1 or 3 of them.
    """
    chosen = select_bands(dataset, bands, str(dataset.name))
    if dataset.dtypes[0] == "uint8" and all(dataset.dtypes[b - 1] == "uint8" for b in chosen):
        return Stretch(chosen, (0.0,) * len(chosen), (255.0,) * len(chosen), identity=True)
    if dataset.overviews(chosen[0]):
        scale = max(dataset.width, dataset.height) / 1024
        out_shape = (len(chosen), max(1, round(dataset.height / scale)),
                     max(1, round(dataset.width / scale)))
        try:
            data = dataset.read(chosen, out_shape=out_shape)
            invalid = invalid_mask(dataset, data, None, chosen, out_shape[1:])
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"{dataset.name}: cannot read the overviews; the file may be "
                             f"corrupt ({exc.__cause__ or exc})") from None
        samples = [(data, invalid)]
    else:
        samples = [read_region(dataset, w, chosen) for w in _sample_windows(dataset)]
    low, high = [], []
    for band in range(len(chosen)):
        values = np.concatenate([
            (d[band] if inv is None else d[band][~inv]).ravel() for d, inv in samples])
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(v) for v in np.percentile(values, percentiles))
        low.append(lo)
        high.append(hi if hi > lo else lo + 1.0)
    return Stretch(chosen, tuple(low), tuple(high))


# --------------------------------------------------------------------------- reading chips


@dataclass(frozen=True)
class Chip:
    """One window of a scene as 8-bit RGB.

    Attributes:
        window: Where the chip lies in the scene.
        rgb: ``(height, width, 3)`` uint8; nodata pixels are 0.
        valid: ``(height, width)`` bool mask of valid pixels, or None when all are valid.
        nodata_fraction: Share of invalid pixels.
    """

    window: PixelWindow
    rgb: np.ndarray
    valid: np.ndarray | None
    nodata_fraction: float


def invalid_mask(dataset: Any, data: np.ndarray, window: PixelWindow | None,
                 bands: Sequence[int], shape: tuple[int, int]) -> np.ndarray | None:
    """Invalid pixels of ``data`` (read from ``window``), or None when all are valid."""
    flags = [dataset.mask_flag_enums[b - 1] for b in bands]
    invalid: np.ndarray | None = None
    if all(f == [MaskFlags.all_valid] for f in flags):
        pass
    elif all(MaskFlags.nodata in f for f in flags):
        # GDAL's rule: a pixel is nodata when every band holds its nodata value.
        per_band = []
        for i, b in enumerate(bands):
            nodata = dataset.nodatavals[b - 1]
            per_band.append(np.isnan(data[i]) if np.isnan(nodata) else data[i] == nodata)
        invalid = np.logical_and.reduce(per_band)
    else:  # alpha band or internal mask
        kwargs: dict[str, Any] = {"out_shape": shape}
        if window is not None:
            kwargs["window"] = window.to_rasterio()
        invalid = dataset.dataset_mask(**kwargs) == 0
    if data.dtype.kind == "f":
        nan = np.isnan(data).any(axis=0)
        invalid = nan if invalid is None else invalid | nan
    return invalid


def read_region(dataset: Any, window: PixelWindow, bands: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw pixels ``(bands, h, w)`` of a window and its invalid mask.

    Raises:
        InputError: the pixels cannot be decoded (corrupt or truncated file).
    """
    try:
        # Read straight into a pixel-interleaved buffer: chips are (h, w, 3), so this saves a
        # transpose copy, and GDAL copies pixel-interleaved blocks faster this way.
        dtype = np.dtype(dataset.dtypes[bands[0] - 1])
        out = np.empty((window.height, window.width, len(bands)), dtype).transpose(2, 0, 1)
        data = dataset.read(list(bands), window=window.to_rasterio(), out=out)
        invalid = invalid_mask(dataset, data, window, bands, (window.height, window.width))
    except rasterio.errors.RasterioError as exc:
        detail = exc.__cause__ or exc  # rasterio's own message only says "Read failed"
        if str(dataset.name).startswith(_VSIS3):
            raise StorageError(f"{_s3_uri(dataset.name)}: cannot read pixels {window.bounds} "
                               f"(col_min, row_min, col_max, row_max) from "
                               f"{(_object_storage or S3Settings.from_env()).endpoint_url or 'S3'}"
                               f" ({detail})") from None
        raise InputError(f"{dataset.name}: cannot read pixels {window.bounds} "
                         f"(col_min, row_min, col_max, row_max); the file may be corrupt "
                         f"or truncated ({detail})") from None
    return data, invalid


def read_chip(dataset: Any, window: PixelWindow, stretch: Stretch) -> Chip:
    """Read one window as an 8-bit RGB chip (nodata pixels 0).

    Raises:
        InputError: the pixels cannot be read (corrupt or truncated file).
    """
    data, invalid = read_region(dataset, window, stretch.bands)
    rgb = stretch.apply(data)
    if invalid is not None:
        rgb[invalid] = 0
    fraction = float(invalid.mean()) if invalid is not None else 0.0
    return Chip(window, rgb, None if invalid is None else ~invalid, fraction)




def probe_pixels(path: str | os.PathLike[str]) -> None:
    """Decode the first and last block, so a truncated or corrupt file is caught early.

    Raises:
        InputError: a block cannot be decoded.
    """
    with gdal_env(), open_raster(path) as dataset:
        block_h, block_w = dataset.block_shapes[0]
        bands = (1,)
        for row, col in ((0, 0), (max(dataset.height - block_h, 0),
                                  max(dataset.width - block_w, 0))):
            window = PixelWindow(col, row, min(block_w, dataset.width),
                                 min(block_h, dataset.height))
            read_region(dataset, window, bands)


def as_cog(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """``path`` if it is a Cloud Optimized GeoTIFF, else its lossless conversion written to
    ``out`` (same pixels, nodata and masks; 512 px internal tiles, DEFLATE, overviews), so
    that windows can be read in place from object storage.

    Raises:
        InputError: the raster cannot be converted.
    """
    from rio_cogeo.cogeo import cog_translate, cog_validate
    from rio_cogeo.profiles import cog_profiles

    source = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rio-cogeo warns about what it then reports
        valid, _errors, _warnings = cog_validate(str(source), quiet=True)
    if valid:
        return source
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with gdal_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = cog_profiles.get("deflate")  # type: ignore[no-untyped-call]
            cog_translate(str(source), str(target), profile, quiet=True,
                          in_memory=False, overview_resampling="average")
    except (rasterio.errors.RasterioError, ValueError, OSError) as exc:
        raise InputError(f"{source}: cannot be written as a Cloud Optimized GeoTIFF "
                         f"({exc})") from None
    return target
