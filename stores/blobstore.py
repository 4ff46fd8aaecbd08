"""Image blobs stored by content hash: local file system (default) or S3-compatible object storage.

Keys are content addresses: ``<first 16 hex of sha256>.png`` where the sha256 is
:func:`core.imageio.content_hash` of the **decoded, normalised RGB pixels**
(shape + bytes), not of the uploaded file's bytes. So the same picture sent as PNG,
as a re-saved PNG with other metadata, or as an array gets the same key (duplicate
detection works across formats), while a lossy re-encoding (JPEG) is a new image.
Blobs are written as PNG (lossless), so a blob decodes to exactly the pixels
whose hash named it.

Backends (``DRA_BLOB_STORE``):

* ``local`` (default): files under ``<index_dir>/images/``, written to a temp file
  and moved into place with ``os.replace`` (a reader never sees half a file).
* ``s3://bucket/prefix``: boto3 ``put_object`` / ``get_object`` / ``head_object`` /
  ``delete_object``; ``DRA_S3_ENDPOINT_URL`` points at MinIO or any S3-compatible
  server (empty: AWS). Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``
  / ``AWS_SECRET_ACCESS_KEY`` environment variables, profiles, instance roles).
  :meth:`S3BlobStore.local_path` downloads a blob once into a local cache folder
  (the UI and the embedders need files).
"""

from __future__ import annotations

import io
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from stores.atomic import atomic_write_bytes
from core.imageio import content_hash


def image_key(rgb: np.ndarray) -> str:
    """Content address of an RGB uint8 image ``(H, W, 3)``: ``"<16 hex>.png"``."""
    return f"{content_hash(rgb)[:16]}.png"


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless PNG encoding of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def _check_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(ABC):
    """Content-addressed blob storage (keys from :func:`image_key`)."""

    def put_image(self, rgb: np.ndarray) -> str:
        """Store an RGB uint8 image as PNG under its content address; returns the key (idempotent)."""
        key = image_key(rgb)
        if not self.exists(key):
            self.put(key, png_bytes(rgb))
        return key

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` (replacing any previous blob)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Bytes of a blob. Raises KeyError for a missing key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob exists."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove a blob; False if it did not exist."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """An absolute local file holding the blob (downloaded to a cache for remote stores).

        Raises:
            KeyError: missing key.
        """

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where the blob lives (``file://...`` or ``s3://bucket/prefix/key``)."""


class LocalBlobStore(BlobStore):
    """Blobs as files in one folder (``root/<key>``), written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / _check_key(key), data, fsync=False)

    def get(self, key: str) -> bytes:
        path = self.root / _check_key(key)
        if not path.is_file():
            raise KeyError(key)
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return (self.root / _check_key(key)).is_file()

    def delete(self, key: str) -> bool:
        path = self.root / _check_key(key)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def local_path(self, key: str) -> Path:
        path = self.root / _check_key(key)
        if not path.is_file():
            raise KeyError(key)
        return path

    def uri(self, key: str) -> str:
        return (self.root / _check_key(key)).as_uri()


class S3BlobStore(BlobStore):
    """Blobs as objects ``s3://bucket/prefix/<key>`` through boto3 (AWS S3, MinIO, moto, ...).

    Args:
        bucket: bucket name (created when missing and ``create_bucket``).
        prefix: key prefix inside the bucket ("" for none).
        endpoint_url: S3-compatible endpoint (MinIO: ``http://host:9000``); None: AWS.
        cache_dir: local folder for :meth:`local_path` downloads.
        client: a ready boto3 S3 client (else one is created from the arguments).
        create_bucket: create the bucket if it does not exist.
        region: region for the client / bucket (default ``us-east-1``).
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 cache_dir: str | Path | None = None, client=None, create_bucket: bool = True,
                 region: str = "us-east-1"):
        import boto3
        from botocore.exceptions import ClientError

        self._ClientError = ClientError
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region)
        self.cache_dir = Path(cache_dir or tempfile.gettempdir()) / "s3-blobs" / bucket / (self.prefix or "_")
        if create_bucket:
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                self.client.create_bucket(Bucket=bucket)

    @classmethod
    def from_uri(cls, uri: str, **kwargs) -> "S3BlobStore":
        """``s3://bucket/prefix`` -> store. Raises ValueError for another scheme or no bucket."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        return cls(bucket, prefix, **kwargs)

    def _object(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc) -> bool:
        return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType="image/png")
        cached = self.cache_dir / key
        if cached.exists():
            cached.unlink()

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()
        except self._ClientError as exc:
            if self._missing(exc):
                raise KeyError(key) from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except self._ClientError as exc:
            if self._missing(exc):
                return False
            raise

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        if existed:
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))
        cached = self.cache_dir / key
        if cached.exists():
            cached.unlink()
        return existed

    def local_path(self, key: str) -> Path:
        path = self.cache_dir / _check_key(key)
        if not path.is_file():
            atomic_write_bytes(path, self.get(key), fsync=False)
        return path.resolve()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(key)}"


def open_blob_store(settings) -> BlobStore:
    """The store configured in ``settings.blob_store``: ``"local"`` (``<index_dir>/images``) or
    ``"s3://bucket/prefix"`` (endpoint ``settings.s3_endpoint_url``; cache under ``<state_dir>/blob_cache``).

    Raises:
        ValueError: an unknown value.
    """
    spec = getattr(settings, "blob_store", "local") or "local"
    if spec == "local":
        return LocalBlobStore(Path(settings.index_dir) / "images")
    if spec.startswith("s3://"):
        return S3BlobStore.from_uri(spec, endpoint_url=getattr(settings, "s3_endpoint_url", "") or None,
                                    cache_dir=Path(settings.state_dir) / "blob_cache")
    raise ValueError(f"DRA_BLOB_STORE={spec!r}: expected 'local' or 's3://bucket/prefix'")
