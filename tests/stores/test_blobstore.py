"""Blob stores: the local folder, and S3 against moto's real S3-protocol server on 127.0.0.1."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stores.blobstore import LocalBlobStore, S3BlobStore, image_key, open_blob_store
from core.imageio import content_hash, load_rgb
from core.settings import Settings


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _roundtrip(store, tmp_path):
    rgb = _image(0)
    key = store.put_image(rgb)
    assert key == f"{content_hash(rgb)[:16]}.png" == image_key(rgb.copy())
    assert store.exists(key) and not store.exists("0000000000000000.png")
    np.testing.assert_array_equal(load_rgb(store.get(key)), rgb)  # lossless: same pixels, same hash
    path = store.local_path(key)
    assert path.is_absolute() and path.is_file()
    np.testing.assert_array_equal(load_rgb(path), rgb)
    assert store.put_image(rgb) == key  # idempotent
    other = store.put_image(_image(1))
    assert other != key
    assert store.delete(key) is True and store.delete(key) is False and not store.exists(key)
    with pytest.raises(KeyError):
        store.get(key)
    with pytest.raises(KeyError):
        store.local_path(key)
    with pytest.raises(ValueError):
        store.get("../etc/passwd")
    return other


def test_local_blob_store(tmp_path):
    store = LocalBlobStore(tmp_path / "images")
    other = _roundtrip(store, tmp_path)
    assert store.uri(other).startswith("file://") and not list((tmp_path / "images").glob(".*.tmp"))


def test_s3_blob_store_on_a_real_s3_server(s3_endpoint, aws_env, tmp_path):
    store = S3BlobStore.from_uri("s3://defects/gallery/v1", endpoint_url=s3_endpoint, cache_dir=tmp_path / "cache")
    other = _roundtrip(store, tmp_path)
    assert store.uri(other) == f"s3://defects/gallery/v1/{other}"
    # the object really is in the bucket under the prefix (read with a separate client)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket="defects").get("Contents", [])]
    assert listed == [f"gallery/v1/{other}"]
    with pytest.raises(ValueError):
        S3BlobStore.from_uri("http://defects/x")


def test_open_blob_store_from_settings(s3_endpoint, aws_env, tmp_path):
    base = dataclasses.replace(Settings.from_env(), state_dir=tmp_path / "state")
    assert isinstance(open_blob_store(dataclasses.replace(base, blob_store="local")), LocalBlobStore)
    s3 = open_blob_store(dataclasses.replace(base, blob_store="s3://bkt/p", s3_endpoint_url=s3_endpoint))
    assert isinstance(s3, S3BlobStore) and s3.exists(s3.put_image(_image(2)))
    with pytest.raises(ValueError):
        open_blob_store(dataclasses.replace(base, blob_store="ftp://x"))
