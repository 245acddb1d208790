"""Dataset versions as training reads them: ``data.yaml``, image lists, images and labels.

A dataset version is a folder (local, ``file://`` or ``s3://``) holding ``data.yaml`` with
``train``, ``val`` (list files or folders) and ``names``; labels sit at the images' paths with
``images`` -> ``labels`` and a ``.txt`` suffix (Ultralytics' rule). :func:`prepare_dataset`
checks it and lays it out in scratch for Ultralytics.
"""

from __future__ import annotations

import os
import posixpath
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from retrain_lib.core.errors import ConfigError, InputError
from retrain_lib.core.storage import Storage, open_storage

__all__ = ["DATA_FILE", "IMAGE_SUFFIXES", "DatasetSummary", "prepare_dataset"]

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
DATA_FILE = "data.yaml"


class _DatasetSource(ABC):
    """Read-only access to the files of one dataset version, by path relative to its folder."""

    description: str

    @abstractmethod
    def read_text(self, rel: str) -> str:
        """Text of a file; InputError/StorageError when missing."""

    @abstractmethod
    def list_files(self, rel_dir: str) -> list[str]:
        """Relative paths of every file under a folder (recursive)."""

    @abstractmethod
    def existing(self, rels: Sequence[str]) -> set[str]:
        """The subset of ``rels`` that exist."""

    @abstractmethod
    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        """Make each file available locally at ``dest_of(rel)`` (symlink or download)."""

    @property
    @abstractmethod
    def version_name(self) -> str:
        """Name of the dataset folder (the default dataset version)."""


def _norm_rel(rel: str, where: str) -> str:
    rel = rel.strip().replace("\\", "/")
    rel = rel.removeprefix("./")
    if not rel or rel.startswith("/"):
        raise InputError(f"{where}: {rel!r} must be a path relative to the dataset folder")
    return posixpath.normpath(rel)


class _LocalSource(_DatasetSource):
    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.description = str(self.folder)

    def _path(self, rel: str) -> Path:
        return self.folder / rel

    def read_text(self, rel: str) -> str:
        path = self._path(rel)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None

    def list_files(self, rel_dir: str) -> list[str]:
        base = self._path(rel_dir)
        if not base.is_dir():
            raise InputError(f"{base}: image folder not found")
        return sorted(posixpath.join(rel_dir, p.relative_to(base).as_posix())
                      for p in base.rglob("*") if p.is_file())

    def existing(self, rels: Sequence[str]) -> set[str]:
        return {r for r in rels if self._path(r).is_file()}

    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        # Symlinks: no copy of the chips, and Ultralytics' label cache lands in scratch instead
        # of inside the immutable dataset version.
        for rel in rels:
            dest = dest_of(rel)
            if dest.is_symlink() or dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(self._path(rel).resolve(), dest)

    @property
    def version_name(self) -> str:
        return self.folder.name


class _StorageSource(_DatasetSource):
    """A dataset folder in S3 (or any Storage), addressed from the bucket root."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.description = storage.url(self.prefix) if self.prefix else storage.uri

    def _key(self, rel: str) -> str:
        key = posixpath.normpath(posixpath.join(self.prefix, rel))
        if key.startswith("..") or key.startswith("/"):
            raise InputError(f"{self.description}: {rel!r} points outside the bucket")
        return key

    def read_text(self, rel: str) -> str:
        data = self.storage.get_bytes(self._key(rel))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            url = self.storage.url(self._key(rel))
            raise InputError(f"{url}: not UTF-8 text ({exc})") from None

    def list_files(self, rel_dir: str) -> list[str]:
        base = self._key(rel_dir)
        keys = self.storage.list(base)
        if not keys:
            raise InputError(f"{self.storage.url(base)}: image folder is empty or missing")
        return sorted(posixpath.join(rel_dir, k[len(base) + 1:]) for k in keys)

    def existing(self, rels: Sequence[str]) -> set[str]:
        # One listing per folder instead of one request per file.
        by_dir: dict[str, list[str]] = {}
        for rel in rels:
            by_dir.setdefault(posixpath.dirname(self._key(rel)), []).append(rel)
        found: set[str] = set()
        for folder, members in by_dir.items():
            keys = set(self.storage.list(folder))
            found.update(r for r in members if self._key(r) in keys)
        return found

    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        todo = [r for r in rels if not dest_of(r).exists()]  # a retry downloads only what's new

        def one(rel: str) -> None:
            self.storage.get_file(self._key(rel), dest_of(rel))

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(one, todo))

    @property
    def version_name(self) -> str:
        return posixpath.basename(self.prefix) or "dataset"


def _open_dataset(data: str) -> tuple[_DatasetSource, str]:
    """The dataset source and the name of its data.yaml, from a folder or data.yaml location."""
    is_yaml = data.lower().endswith((".yaml", ".yml"))
    if data.startswith("s3://"):
        bucket, _, key = data[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"--data {data}: the bucket name is missing")
        key = key.strip("/")
        folder, name = (posixpath.dirname(key), posixpath.basename(key)) if is_yaml else (key,
                                                                                         DATA_FILE)
        return _StorageSource(open_storage(f"s3://{bucket}"), folder), name
    if "://" in data and not data.startswith("file://"):
        raise ConfigError(f"--data {data}: unsupported location; use a local path, file:// or "
                          "s3://bucket/prefix")
    if data.startswith("file://"):
        from urllib.parse import unquote, urlparse

        data = unquote(urlparse(data).path)
    path = Path(data).expanduser()
    if is_yaml:
        return _LocalSource(path.parent), path.name
    return _LocalSource(path), DATA_FILE


def _label_rel(image_rel: str) -> str:
    # Ultralytics' rule: the last 'images' folder becomes 'labels', the suffix becomes .txt.
    head, sep, tail = ("/" + image_rel).rpartition("/images/")
    if not sep:
        raise InputError(f"image {image_rel!r} is not inside a folder named 'images'; YOLO "
                         "datasets keep labels at the same path with 'images' -> 'labels'")
    label = f"{head}/labels/{tail}".lstrip("/")
    return label.rsplit(".", 1)[0] + ".txt"


def _dest_rel(rel: str) -> str:
    # '..' segments stay unique but cannot climb out of the scratch folder.
    return "/".join("_up" if part == ".." else part for part in rel.split("/"))


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset version as training sees it, after checking it."""

    location: str
    version: str
    names: tuple[str, ...]
    train_images: int
    """Entries of the train list, repeats (oversampling) included."""
    val_images: int
    train_instances: tuple[int, ...]
    val_instances: tuple[int, ...]
    data_yaml: Path
    """The rewritten data.yaml in scratch, with absolute paths."""


def _parse_names(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        try:
            indexed = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise InputError(f"{where}: names: keys must be class indexes 0..n-1") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise InputError(f"{where}: names: indexes must be 0..{len(indexed) - 1} without gaps")
        names = [indexed[i] for i in range(len(indexed))]
    else:
        raise InputError(f"{where}: names: expected a list of class names, got "
                         f"{type(raw).__name__}")
    if not names:
        raise InputError(f"{where}: names: the dataset lists no classes")
    return tuple(names)


def _split_images(source: _DatasetSource, spec: Any, split: str, where: str) -> list[str]:
    specs = spec if isinstance(spec, list) else [spec]
    images: list[str] = []
    for item in specs:
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"{where}: {split}: expected a list file (.txt) or a folder, got "
                             f"{item!r}")
        rel = _norm_rel(item, f"{where}: {split}")
        if rel.lower().endswith(".txt"):
            list_where = f"{source.description}/{rel}"
            for number, line in enumerate(source.read_text(rel).splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    images.append(_norm_rel(line, f"{list_where} line {number}"))
        else:
            images.extend(p for p in source.list_files(rel)
                          if posixpath.splitext(p)[1].lower() in IMAGE_SUFFIXES)
    return images


def _count_labels(path: Path, nc: int, names: Sequence[str], where: str) -> list[int]:
    counts = [0] * nc
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: cannot read label file ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"{where} line {number}: expected 'class x_center y_center width "
                             f"height' numbers, got {line.strip()!r}") from None
        if len(values) < 5 or values[0] != int(values[0]):
            raise InputError(f"{where} line {number}: expected 'class x_center y_center width "
                             f"height' with an integer class, got {line.strip()!r}")
        cls = int(values[0])
        if not 0 <= cls < nc:
            raise InputError(f"{where} line {number}: class id {cls} but the dataset has {nc} "
                             f"class(es) ({', '.join(names)}); class-count mismatch between "
                             "labels and data.yaml")
        counts[cls] += 1
    return counts


def prepare_dataset(data: str, scratch: Path, classes: Sequence[str] | None = None,
                    version: str | None = None) -> DatasetSummary:
    """Check a dataset version and lay it out in ``scratch`` for Ultralytics.

    Local images are symlinked, remote ones downloaded (a retry fetches only what is missing).
    The returned data.yaml uses absolute paths, so Ultralytics resolves nothing against the
    working directory.

    Raises:
        InputError: data.yaml is malformed, a listed image is missing, labels use class ids
            outside the class list, a split has no labelled object, or the classes differ from
            ``classes``.
        StorageError: the dataset's storage cannot be reached.
    """
    source, data_name = _open_dataset(data)
    where = f"{source.description}/{data_name}"
    try:
        spec = yaml.safe_load(source.read_text(data_name))
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected a mapping with train, val and names")
    for key in ("train", "val", "names"):
        if key not in spec:
            raise InputError(f"{where}: '{key}' is missing (see the dataset-version contract "
                             "in docs/training.md)")
    names = _parse_names(spec["names"], where)
    if "nc" in spec and spec["nc"] != len(names):
        raise InputError(f"{where}: nc is {spec['nc']} but names lists {len(names)} classes "
                         f"({', '.join(names)}); class-count mismatch")
    if classes is not None and tuple(classes) != names:
        raise InputError(f"{where}: the dataset's classes [{', '.join(names)}] differ from the "
                         f"object type's classes [{', '.join(classes)}] ({len(names)} vs "
                         f"{len(classes)}); class-count or order mismatch — rebuild the dataset "
                         "version for the current object-type config")
    nc = len(names)
    root = scratch / "data"
    files = root / "files"
    summary: dict[str, tuple[int, list[int]]] = {}
    for split in ("train", "val"):
        # Repeated entries are the dataset's oversampling: they stay in the list Ultralytics
        # reads, while each file is checked and fetched once.
        entries = _split_images(source, spec[split], split, where)
        images = list(dict.fromkeys(entries))
        if not images:
            raise InputError(f"{where}: the {split} split lists no images")
        bad = [i for i in images if posixpath.splitext(i)[1].lower() not in IMAGE_SUFFIXES]
        if bad:
            raise InputError(f"{where}: {split}: {bad[0]!r} is not an image "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        labels = {img: _label_rel(img) for img in images}
        present_images = source.existing(images)
        missing = [i for i in images if i not in present_images]
        if missing:
            raise InputError(f"{where}: {split}: {len(missing)} listed image(s) do not exist, "
                             f"e.g. {source.description}/{missing[0]}")
        present_labels = source.existing(list(labels.values()))
        if not present_labels:
            raise InputError(f"{where}: the dataset has no labels: none of the {len(images)} "
                             f"{split} images has a label file (expected e.g. "
                             f"{source.description}/{labels[images[0]]})")
        source.fetch([*images, *sorted(present_labels)], lambda rel: files / _dest_rel(rel))
        repeats = Counter(entries)
        counts = [0] * nc
        for image, label in labels.items():
            if label in present_labels:
                found = _count_labels(files / _dest_rel(label), nc, names,
                                      f"{source.description}/{label}")
                for i, n in enumerate(found):
                    counts[i] += n * repeats[image]
        if not sum(counts):
            raise InputError(f"{where}: the dataset has no labels: the {split} split's "
                             f"{len(present_labels)} label file(s) contain no objects")
        (root / f"{split}.txt").write_text(
            "".join(f"{files / _dest_rel(img)}\n" for img in entries), encoding="utf-8")
        summary[split] = (len(entries), counts)
    data_yaml = root / DATA_FILE
    data_yaml.write_text(yaml.safe_dump({
        "path": str(root), "train": str(root / "train.txt"), "val": str(root / "val.txt"),
        "nc": nc, "names": dict(enumerate(names)),
    }, sort_keys=False), encoding="utf-8")
    return DatasetSummary(
        location=where, version=version or source.version_name, names=names,
        train_images=summary["train"][0], val_images=summary["val"][0],
        train_instances=tuple(summary["train"][1]), val_instances=tuple(summary["val"][1]),
        data_yaml=data_yaml)


