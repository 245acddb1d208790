"""Storage: one interface over a local directory or an S3 bucket/prefix.

Keys are POSIX-style relative paths (``catalog/vehicle/scenes/s1/manifest.json``) under one
root. Every write is atomic for readers: locally a temp file in the target directory is
renamed over the final name; on S3 an object becomes visible only when its single PUT (or
multipart upload) completes. A reader therefore never sees half of a manifest.

Moves copy first and delete the source only after every copy succeeded, so an interrupted
move leaves a duplicate, never a loss.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from retrain_lib.core.errors import StorageError
from retrain_lib.core.io import atomic_path, atomic_write_bytes, is_in_flight, stream_sha256
from retrain_lib.core.layout import join_key
from retrain_lib.core.settings import ENV_S3_ENDPOINT

__all__ = [
    "LocalStorage",
    "S3Settings",
    "S3Storage",
    "Storage",
    "open_storage",
]


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}: expected a relative path like "
                           "'catalog/vehicle/manifest.json'")
    parts = PurePosixPath(key).parts
    if any(p in ("..", ".") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: '.' and '..' are not allowed")
    return "/".join(parts)


class Storage(ABC):
    """Operations every backend provides. Keys are relative to the backend's root."""

    uri: str

    def url(self, key: str) -> str:
        """Full URI of ``key`` (for logs, manifests and MLflow tags)."""
        return f"{self.uri.rstrip('/')}/{_check_key(key)}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Atomically publish ``data`` at ``key``."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Publish ``data`` at ``key`` only if no object is there; False if one is. Of two
        writers racing for a key, exactly one wins (a lock can be built on it)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the object at ``key``; StorageError if missing."""

    @abstractmethod
    def put_file(self, local_path: str | Path, key: str) -> None:
        """Atomically upload a local file to ``key``."""

    @abstractmethod
    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Download ``key`` to ``local_path`` (complete or not at all)."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """All keys under ``prefix`` (recursive, sorted)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at exactly ``key``."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy one object; the destination appears atomically."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object (missing objects are fine)."""

    def links(self, prefix: str = "") -> dict[str, str]:
        """Symbolic links at or under ``prefix``, key to where each points; never followed.

        Object stores hold none; a local folder may (an analyst's ``ln -s``)."""
        return {}

    def move_link(self, src: str, dst: str) -> None:
        """Move a link itself (not what it points to) to ``dst``."""
        raise StorageError(f"{self.url(src)}: this storage holds no links")

    def empty_folders(self, prefix: str) -> dict[str, float]:
        """Folders directly under ``prefix`` that hold no file, with when each last changed
        (seconds since the epoch). Object stores have no folders, so none are empty."""
        return {}

    def remove_empty_folder(self, key: str) -> None:  # noqa: B027 (no folders: nothing to do)
        """Remove a folder of :meth:`empty_folders` (and empty folders inside it)."""

    # -- derived operations, shared by all backends ------------------------------------

    def publish(self, key: str, data: bytes) -> None:
        """Atomically publish a finished object (alias of :meth:`put_bytes`, named for intent)."""
        self.put_bytes(key, data)

    def put_json(self, key: str, obj: Any) -> None:
        """Publish ``obj`` as pretty JSON, atomically."""
        self.put_bytes(key, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
                       .encode("utf-8"))

    def get_json(self, key: str) -> Any:
        """Read a JSON object; StorageError names the key when it is missing or not JSON."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.url(key)}: not valid JSON ({exc})") from None

    def list_children(self, prefix: str) -> builtins.list[str]:
        """Names of the immediate 'folders' and objects under ``prefix``."""
        base = join_key(prefix)
        start = len(base) + 1 if base else 0
        return sorted({key[start:].split("/", 1)[0] for key in self.list(base)})

    def move(self, src: str, dst: str) -> None:
        """Move one object: copy, then delete the source."""
        self.copy(src, dst)
        self.delete(src)

    def move_prefix(self, src_prefix: str, dst_prefix: str) -> builtins.list[str]:
        """Move every object under ``src_prefix`` to ``dst_prefix``; returns the new keys.

        All copies finish before any source is deleted, so an interruption duplicates rather
        than loses data, and re-running finishes the job.
        """
        src_base, dst_base = join_key(src_prefix), join_key(dst_prefix)
        keys = self.list(src_base)
        moved = []
        for key in keys:
            target = join_key(dst_base, key[len(src_base):])
            self.copy(key, target)
            moved.append(target)
        for key in keys:
            self.delete(key)
        return moved

    def put_tree(self, local_dir: str | Path, prefix: str, *, last: str | None = None
                 ) -> builtins.list[str]:
        """Upload every file under ``local_dir`` to ``prefix``; returns the keys written.

        ``last`` names a file (relative to ``local_dir``) uploaded after all others, so that
        its presence marks the tree complete (e.g. a shard's ``index.json``).
        """
        root = Path(local_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if last is not None:
            files.sort(key=lambda p: p.relative_to(root).as_posix() == last)
        keys = []
        for path in files:
            key = join_key(prefix, path.relative_to(root).as_posix())
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_tree(self, prefix: str, local_dir: str | Path) -> Path:
        """Download every object under ``prefix`` into ``local_dir`` (same relative layout)."""
        root = Path(local_dir)
        base = join_key(prefix)
        for key in self.list(base):
            self.get_file(key, root / key[len(base) + 1:])
        return root

    def raster_path(self, key: str) -> str:
        """Where GDAL reads the raster at ``key`` in place, window by window: a local path,
        or ``/vsis3/<bucket>/<key>`` (see ``retrain_lib.geo.raster.object_storage``)."""
        raise StorageError(f"{self.url(key)}: this storage cannot be read in place")

    def sha256(self, key: str) -> str:
        """Hex SHA-256 of the object at ``key``, streamed: nothing is written to disk."""
        with self.open_stream(key) as stream:
            return stream_sha256(stream)

    @contextmanager
    def open_stream(self, key: str) -> Iterator[IO[bytes]]:
        """The object at ``key`` as a readable binary stream."""
        yield io.BytesIO(self.get_bytes(key))

    @contextmanager
    def local_copy(self, key: str, scratch: str | Path | None = None) -> Iterator[Path]:
        """Yield a local path holding ``key``: the file itself locally, a download on S3."""
        with tempfile.TemporaryDirectory(dir=scratch, prefix="autoretrain-") as tmp:
            yield self.get_file(key, Path(tmp) / PurePosixPath(key).name)


class LocalStorage(Storage):
    """A directory on a local or mounted filesystem; the embedded default."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def path(self, key: str) -> Path:
        """Filesystem path of ``key`` (local backend only)."""
        return self.root / _check_key(key)

    def url(self, key: str) -> str:
        return str(self.path(key))

    def _parent(self, key: str) -> Path:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{target.parent}: cannot create directory ({exc})") from None
        return target

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._parent(key)
        try:
            atomic_write_bytes(target, data)
        except OSError as exc:
            raise StorageError(f"{target}: cannot write ({exc})") from None

    def create(self, key: str, data: bytes) -> bool:
        target = self._parent(key)
        tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
        try:
            atomic_write_bytes(tmp, data)
            os.link(tmp, target)  # fails if the key exists: complete content, or nothing
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"{target}: cannot write ({exc})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _readable(self, key: str) -> Path:
        """The path of ``key``, refused when a link leads it out of the storage root."""
        path = self.path(key)
        real = path.resolve()
        if real != self.root and not real.is_relative_to(self.root):
            raise StorageError(f"{path}: a symbolic link out of the storage root (to {real}); "
                               "links out of the root are never followed")
        return path

    def links(self, prefix: str = "") -> dict[str, str]:
        found: dict[str, str] = {}
        key = _check_key(prefix) if prefix else ""
        # The prefix itself, or a folder above it, may be the link.
        parts = PurePosixPath(key).parts
        for depth in range(1, len(parts) + 1):
            path = self.root.joinpath(*parts[:depth])
            if path.is_symlink():
                return {"/".join(parts[:depth]): os.readlink(path)}
        base = self.root / key if key else self.root
        if not base.is_dir():
            return found
        for dirpath, dirs, files in os.walk(base):  # os.walk never enters a linked folder
            for name in [*dirs, *files]:
                path = Path(dirpath, name)
                if path.is_symlink():
                    found[path.relative_to(self.root).as_posix()] = os.readlink(path)
        return found

    def move_link(self, src: str, dst: str) -> None:
        source = self.path(src)
        if not source.is_symlink():
            raise StorageError(f"{source}: not a symbolic link")
        target = self._parent(dst)
        try:
            source.rename(target)
        except OSError as exc:
            raise StorageError(f"{source} -> {target}: cannot move the link ({exc})") from None

    def empty_folders(self, prefix: str) -> dict[str, float]:
        base = self.path(prefix)
        if base.is_symlink() or not base.is_dir():
            return {}
        return {child.name: child.stat().st_mtime for child in sorted(base.iterdir())
                if child.is_dir() and not child.is_symlink()
                and not any(files for _, _, files in os.walk(child))}

    def remove_empty_folder(self, key: str) -> None:
        path = self.path(key)
        for dirpath, _dirs, files in os.walk(path, topdown=False):
            if files:
                raise StorageError(f"{dirpath}: not empty; nothing removed")
            Path(dirpath).rmdir()

    def get_bytes(self, key: str) -> bytes:
        path = self._readable(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{path}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{path}: cannot read ({exc})") from None

    def put_file(self, local_path: str | Path, key: str) -> None:
        target = self._parent(key)
        try:
            with atomic_path(target) as tmp:
                shutil.copyfile(local_path, tmp)
        except OSError as exc:
            raise StorageError(f"{local_path} -> {target}: cannot copy ({exc})") from None

    def get_file(self, key: str, local_path: str | Path) -> Path:
        source = self._readable(key)
        local_path = Path(local_path)
        if not source.is_file():
            raise StorageError(f"{source}: no such object")
        try:
            with atomic_path(local_path) as tmp:
                shutil.copyfile(source, tmp)
        except OSError as exc:
            raise StorageError(f"{source} -> {local_path}: cannot copy ({exc})") from None
        return local_path

    @contextmanager
    def local_copy(self, key: str, scratch: str | Path | None = None) -> Iterator[Path]:
        path = self._readable(key)
        if not path.is_file():
            raise StorageError(f"{path}: no such object")
        yield path

    def raster_path(self, key: str) -> str:
        return str(self._readable(key))

    @contextmanager
    def open_stream(self, key: str) -> Iterator[IO[bytes]]:
        path = self._readable(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise StorageError(f"{path}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{path}: cannot read ({exc})") from None
        with handle:
            yield handle

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            return [_check_key(prefix)]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if is_in_flight(name):
                    continue  # an unfinished atomic write
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def copy(self, src: str, dst: str) -> None:
        source = self._readable(src)
        if not source.is_file():
            raise StorageError(f"{source}: no such object to copy")
        self.put_file(source, dst)

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        # Remove now-empty folders up to the root so listings stay clean.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3. Unset fields fall back to boto3's usual sources."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        """Endpoint from AUTORETRAIN_S3_ENDPOINT_URL or AWS_ENDPOINT_URL; region and keys
        from the AWS variables (unset ones fall back to boto3's chain)."""
        return cls(endpoint_url=os.environ.get(ENV_S3_ENDPOINT)
                   or os.environ.get("AWS_ENDPOINT_URL_S3")
                   or os.environ.get("AWS_ENDPOINT_URL"),
                   region_name=os.environ.get("AWS_DEFAULT_REGION"),
                   aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
                   aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                   aws_session_token=os.environ.get("AWS_SESSION_TOKEN"))

    def environment(self) -> tuple[dict[str, str], dict[str, str]]:
        """``(public, private)`` variables that give a child process (a training, a container)
        the same S3 access; private ones hold secrets. MLflow's S3 artifacts use it too."""
        public: dict[str, str] = {}
        private: dict[str, str] = {}
        if self.endpoint_url:
            public[ENV_S3_ENDPOINT] = self.endpoint_url
            public["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url
        if self.region_name:
            public["AWS_DEFAULT_REGION"] = self.region_name
        for name, value in (("AWS_ACCESS_KEY_ID", self.aws_access_key_id),
                            ("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key),
                            ("AWS_SESSION_TOKEN", self.aws_session_token)):
            if value:
                private[name] = value
        return public, private


class S3Storage(Storage):
    """A bucket and key prefix on S3 or an S3-compatible server (MinIO, moto)."""

    def __init__(self, uri: str, settings: S3Settings | None = None) -> None:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri}: expected an s3://bucket[/prefix] URI")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: the bucket name is missing")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.settings = settings or S3Settings.from_env()
        import boto3
        from botocore.config import Config

        self._client = boto3.client(
            "s3",
            endpoint_url=self.settings.endpoint_url,
            region_name=self.settings.region_name or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            aws_access_key_id=self.settings.aws_access_key_id,
            aws_secret_access_key=self.settings.aws_secret_access_key,
            aws_session_token=self.settings.aws_session_token,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, read_timeout=120),
        )

    def _key(self, key: str) -> str:
        return join_key(self.prefix, _check_key(key))

    def raster_path(self, key: str) -> str:
        return f"/vsis3/{self.bucket}/{self._key(key)}"

    def stat(self, key: str) -> dict[str, Any]:
        """``{"size", "etag"}`` of the object at ``key`` (one HEAD request)."""
        head = self._call("read", key, self._client.head_object, Bucket=self.bucket,
                          Key=self._key(key))
        return {"size": int(head["ContentLength"]), "etag": str(head["ETag"]).strip('"')}

    @contextmanager
    def open_stream(self, key: str) -> Iterator[IO[bytes]]:
        response = self._call("read", key, self._client.get_object, Bucket=self.bucket,
                              Key=self._key(key))
        body = response["Body"]
        try:
            yield body
        finally:
            body.close()

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{self.url(key)}: no such object")
            if code == "NoSuchBucket":
                return StorageError(f"s3://{self.bucket}: bucket does not exist")
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                        "SignatureDoesNotMatch"):
                return StorageError(f"{self.url(key)}: access denied ({code}); check the S3 "
                                    "keys and the bucket's policy")
            return StorageError(f"{self.url(key)}: cannot {what} ({code}: "
                                f"{exc.response.get('Error', {}).get('Message', '')})")
        endpoint = self.settings.endpoint_url or "the default AWS endpoint"
        return StorageError(f"{self.url(key)}: cannot {what}; S3 at {endpoint} is unreachable "
                            f"({exc})")

    def _call(self, what: str, key: str, func: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return func(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(what, key, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self._client.put_object, Bucket=self.bucket,
                   Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                    IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                              "ConditionalRequestConflict"):
                return False
            raise self._fail("write", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("write", key, exc) from None

    def get_bytes(self, key: str) -> bytes:
        response = self._call("read", key, self._client.get_object, Bucket=self.bucket,
                              Key=self._key(key))
        body: bytes = response["Body"].read()
        return body

    def put_file(self, local_path: str | Path, key: str) -> None:
        if not Path(local_path).is_file():
            raise StorageError(f"{local_path}: no such local file to upload")
        self._call("upload", key, self._client.upload_file, Filename=str(local_path),
                   Bucket=self.bucket, Key=self._key(key))

    def get_file(self, key: str, local_path: str | Path) -> Path:
        local_path = Path(local_path)
        with atomic_path(local_path) as tmp:
            self._call("download", key, self._client.download_file, Bucket=self.bucket,
                       Key=self._key(key), Filename=str(tmp))
        return local_path

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = join_key(self.prefix, _check_key(prefix)) if prefix else self.prefix
        query = f"{base}/" if base else ""
        paginator = self._client.get_paginator("list_objects_v2")
        keys: builtins.list[str] = []
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=query):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            if prefix and not keys and self.exists(prefix):
                return [_check_key(prefix)]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list", prefix or ".", exc) from None
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("check", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("check", key, exc) from None
        return True

    def copy(self, src: str, dst: str) -> None:
        self._call("copy", src, self._client.copy,
                   CopySource={"Bucket": self.bucket, "Key": self._key(src)},
                   Bucket=self.bucket, Key=self._key(dst))

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Bucket=self.bucket,
                   Key=self._key(key))


def open_storage(uri: str | Path, *, s3: S3Settings | None = None) -> Storage:
    """Open the storage root at ``uri``: a local path, ``file://`` URI or ``s3://bucket/prefix``.

    For S3, ``s3`` gives endpoint and keys (inside Airflow, from the connection named by
    AUTORETRAIN_S3_CONN_ID); without it they come from the environment and boto3's chain.
    """
    text = str(uri)
    if text.startswith("s3://"):
        return S3Storage(text, s3)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"{text}: unsupported storage URI; use a local path, file:// or "
                           "s3://bucket/prefix")
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        text = unquote(urlparse(text).path)
    return LocalStorage(text)
