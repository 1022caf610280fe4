"""Both storage backends through the same tests: a directory and moto's real S3 server."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from masactrl_jobs.settings import CommonSettings
from masactrl_jobs.storage import (
    FileStorage,
    InvalidKey,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StorageUnavailable,
    content_type_for,
    result_key,
    results_prefix,
    storage_from_settings,
    validate_key,
)
from tests.conftest import S3Server, free_port

SECRET = b"k" * 32


def make_s3(server: S3Server, prefix: str, **overrides: object) -> S3Storage:
    options: dict[str, object] = {
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "region": server.region,
    }
    options.update(overrides)
    return S3Storage(server.bucket, prefix, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "file":
        yield FileStorage(tmp_path / "storage", signing_key=SECRET)
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        # A fresh prefix per test keeps tests independent on the session's one bucket.
        yield make_s3(server, f"t-{uuid.uuid4().hex}")


def test_backends_satisfy_the_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_put_get_roundtrip_and_overwrite(storage: Storage) -> None:
    storage.put("inputs/abc.png", b"first", "image/png")
    assert storage.get("inputs/abc.png") == b"first"
    storage.put("inputs/abc.png", b"second", "image/png")
    assert storage.get("inputs/abc.png") == b"second"
    assert storage.exists("inputs/abc.png")


def test_empty_objects_are_objects(storage: Storage) -> None:
    storage.put("results/j1/empty.bin", b"")
    assert storage.exists("results/j1/empty.bin")
    assert storage.get("results/j1/empty.bin") == b""


def test_missing_keys_raise_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match="no object stored under 'inputs/none.png'"):
        storage.get("inputs/none.png")
    with pytest.raises(KeyError):  # ObjectNotFound is a KeyError for dict-like callers
        storage.get("inputs/none.png")
    assert not storage.exists("inputs/none.png")


def test_delete_is_idempotent(storage: Storage) -> None:
    storage.put("cache/x.bin", b"1")
    storage.delete("cache/x.bin")
    storage.delete("cache/x.bin")
    assert not storage.exists("cache/x.bin")


def test_list_and_delete_prefix(storage: Storage) -> None:
    for key in (
        "results/job1/source_0.png",
        "results/job1/target_0.png",
        "results/job1/target_1.png",
        "results/job10/target_0.png",
        "inputs/keep.png",
    ):
        storage.put(key, key.encode(), "image/png")
    assert storage.list_prefix("results/job1/") == [
        "results/job1/source_0.png",
        "results/job1/target_0.png",
        "results/job1/target_1.png",
    ]
    # A prefix without a slash is a string prefix, as in S3.
    assert len(storage.list_prefix("results/job1")) == 4
    assert storage.delete_prefix("results/job1/") == 3
    assert storage.list_prefix("results/") == ["results/job10/target_0.png"]
    assert storage.exists("inputs/keep.png")
    assert storage.delete_prefix("results/nothing/") == 0


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside.png",
        "inputs/../../outside.png",
        "inputs/./a.png",
        "inputs//a.png",
        "inputs/a.png/",
        "inputs\\a.png",
        "inputs/a b.png",
        "inputs/\x00.png",
        "inputs/.tmp-a",
        "x" * 600,
    ],
)
def test_unsafe_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        storage.put(key, b"x")
    with pytest.raises(InvalidKey):
        storage.get(key)


def test_empty_prefix_is_refused(storage: Storage) -> None:
    with pytest.raises(InvalidKey):
        storage.delete_prefix("")


def test_healthy(storage: Storage) -> None:
    assert storage.healthy() is True


def test_url_serves_the_object(storage: Storage) -> None:
    storage.put("results/j/target_0.png", b"\x89PNG-ish", "image/png")
    url = storage.url("results/j/target_0.png", expires_in=60)
    if isinstance(storage, S3Storage):
        response = httpx.get(url, timeout=10, trust_env=False)
        assert response.status_code == 200
        assert response.content == b"\x89PNG-ish"
        assert response.headers["content-type"] == "image/png"
    else:
        assert isinstance(storage, FileStorage)
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        assert parts.path == "/v1/files/results/j/target_0.png"
        assert storage.verify("results/j/target_0.png", query["expires"][0], query["signature"][0])


def test_validate_key_accepts_the_layout_names() -> None:
    for key in (
        "inputs/" + "a" * 64 + ".png",
        "results/0192f1d2-7c3b-7cc0-9e1e-2d2f1a0b3c4d/target_3.png",
        "cache/inversions/abc=1+2.safetensors",
    ):
        assert validate_key(key) == key
    assert validate_key("results/job/", prefix=True) == "results/job/"


def test_content_types() -> None:
    assert content_type_for("a/b.png") == "image/png"
    assert content_type_for("a/b.JPG") == "image/jpeg"
    assert content_type_for("a/b.webp") == "image/webp"
    assert content_type_for("a/b") == "application/octet-stream"


# --------------------------------------------------------------------------- file backend


@pytest.fixture()
def files(tmp_path: Path) -> FileStorage:
    return FileStorage(
        tmp_path / "storage",
        signing_key=SECRET,
        public_base_url="https://api.example/",
        default_expires_in=300,
    )


def _signed(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key = parts.path.removeprefix("/v1/files/")
    return key, query["expires"][0], query["signature"][0]


def test_file_url_shape_and_expiry(files: FileStorage) -> None:
    import time

    before = int(time.time())
    url = files.url("inputs/a.png")
    assert url.startswith("https://api.example/v1/files/inputs/a.png?expires=")
    key, expires, signature = _signed(url)
    assert before + 300 <= int(expires) <= int(time.time()) + 300
    assert len(signature) == 64
    assert files.verify(key, expires, signature)
    assert files.verify(key, int(expires), signature.upper())  # hex case does not matter


def test_file_signature_rejects_tampering_and_expiry(files: FileStorage, tmp_path: Path) -> None:
    key, expires, signature = _signed(files.url("results/j/target_0.png", expires_in=60))
    assert files.verify(key, expires, signature)
    assert not files.verify("results/j/target_1.png", expires, signature)  # other key
    assert not files.verify(key, str(int(expires) + 3600), signature)  # extended expiry
    assert not files.verify(key, expires, signature[:-1] + ("0" if signature[-1] != "0" else "1"))
    assert not files.verify(key, expires, "")
    assert not files.verify(key, "soon", signature)
    assert not files.verify("../etc/passwd", expires, signature)
    # Past its expiry the same signature stops working.
    assert not files.verify(key, expires, signature, now=int(expires) + 1)
    assert files.verify(key, expires, signature, now=int(expires) - 1)
    # Another secret (another deployment) does not accept it.
    other = FileStorage(tmp_path / "other", signing_key=b"o" * 32)
    assert not other.verify(key, expires, signature)


def test_file_writes_are_atomic_and_leave_no_temporaries(files: FileStorage) -> None:
    files.put("results/j/target_0.png", b"a" * 1000)
    files.put("results/j/target_0.png", b"b" * 10)
    directory = files.root / "results" / "j"
    assert sorted(os.listdir(directory)) == ["target_0.png"]
    assert (directory / "target_0.png").read_bytes() == b"b" * 10


def test_file_listing_skips_half_written_files(files: FileStorage) -> None:
    files.put("results/j/target_0.png", b"x")
    (files.root / "results" / "j" / ".tmp-abc123").write_bytes(b"partial")
    assert files.list_prefix("results/") == ["results/j/target_0.png"]


def test_file_delete_prefix_prunes_empty_directories(files: FileStorage) -> None:
    files.put("results/j/target_0.png", b"x")
    files.delete_prefix("results/j/")
    assert not (files.root / "results").exists()
    assert files.root.is_dir()


def test_file_keys_cannot_escape_through_symlinks(files: FileStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (files.root / "inputs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey, match="outside the storage root"):
        files.get("inputs/secret.png")


def test_file_storage_unwritable_is_unavailable(files: FileStorage) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    files.root.chmod(0o500)
    try:
        with pytest.raises(StorageUnavailable):
            files.put("inputs/a.png", b"x")
        assert files.healthy() is False
    finally:
        files.root.chmod(0o700)


def test_file_storage_write_error_is_unavailable(files: FileStorage) -> None:
    # A regular file where a directory must be created: an OSError that is not "not found".
    (files.root / "results").write_bytes(b"in the way")
    with pytest.raises(StorageUnavailable, match="cannot write"):
        files.put("results/j/target_0.png", b"x")


# --------------------------------------------------------------------------- S3 backend


def test_s3_keys_live_under_the_prefix(s3_server: S3Server) -> None:
    import boto3

    prefix = f"deploy-{uuid.uuid4().hex}/masactrl"
    storage = make_s3(s3_server, prefix + "/")
    storage.put("inputs/a.png", b"x", "image/png")
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    assert [item["Key"] for item in listed["Contents"]] == [f"{prefix}/inputs/a.png"]
    head = client.head_object(Bucket=s3_server.bucket, Key=f"{prefix}/inputs/a.png")
    assert head["ContentType"] == "image/png"
    assert storage.list_prefix("inputs/") == ["inputs/a.png"]


def test_s3_delete_prefix_handles_more_than_one_batch(s3_server: S3Server) -> None:
    storage = make_s3(s3_server, f"t-{uuid.uuid4().hex}")
    # DeleteObjects takes at most 1000 keys per call, so this needs two calls.
    keys = [f"cache/inversions/{i:04d}.bin" for i in range(1003)]
    for key in keys:
        storage.put(key, b"")
    assert storage.delete_prefix("cache/") == 1003
    assert storage.list_prefix("cache/") == []


def test_s3_public_endpoint_is_used_for_presigned_urls(s3_server: S3Server) -> None:
    storage = make_s3(
        s3_server, "p", public_endpoint_url="https://files.example.com", default_expires_in=120
    )
    url = storage.url("results/j/target_0.png")
    assert url.startswith("https://files.example.com/masactrl-test/p/results/j/target_0.png?")
    assert "X-Amz-Expires=120" in url


def test_s3_unreachable_endpoint_is_unavailable() -> None:
    storage = S3Storage(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="a",
        secret_access_key="b",
        region="us-east-1",
        connect_timeout=0.5,
    )
    with pytest.raises(StorageUnavailable):
        storage.put("inputs/a.png", b"x")
    with pytest.raises(StorageUnavailable):
        storage.get("inputs/a.png")
    assert storage.healthy() is False


def test_s3_missing_bucket_is_a_permanent_error(s3_server: S3Server) -> None:
    storage = make_s3(s3_server, "")
    storage.bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as caught:
        storage.put("inputs/a.png", b"x")
    assert not isinstance(caught.value, StorageUnavailable)
    assert storage.healthy() is False


def test_s3_wrong_credentials_are_a_permanent_error(s3_server: S3Server) -> None:
    # moto accepts any credentials unless told otherwise, so check the classification directly.
    from botocore.exceptions import ClientError

    storage = make_s3(s3_server, "")
    denied = ClientError(
        {
            "Error": {"Code": "AccessDenied", "Message": "no"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "PutObject",
    )
    slow = ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"
    )
    assert type(storage._translate(denied, "put", "k")) is StorageError
    assert isinstance(storage._translate(slow, "put", "k"), StorageUnavailable)


# --------------------------------------------------------------------------- from settings


def test_storage_from_settings_file(tmp_path: Path) -> None:
    settings = CommonSettings(
        _env_file=None,
        environment="development",
        storage_url=(tmp_path / "objects").as_uri(),
        public_base_url="http://gateway:8000/",
        presigned_url_ttl_seconds=42,
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, FileStorage)
    assert storage.root == (tmp_path / "objects").resolve()
    url = storage.url("inputs/a.png")
    assert url.startswith("http://gateway:8000/v1/files/inputs/a.png?")
    # Another process with the same settings verifies what this one signed.
    twin = storage_from_settings(
        CommonSettings(_env_file=None, environment="development", storage_url=settings.storage_url)
    )
    assert twin.verify(*_signed(url))


def test_storage_from_settings_s3(s3_server: S3Server) -> None:
    prefix = f"t-{uuid.uuid4().hex}"
    settings = CommonSettings(
        _env_file=None,
        environment="development",
        storage_url=f"s3://{s3_server.bucket}/{prefix}",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_region=s3_server.region,
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    assert storage.prefix == prefix
    storage.put("inputs/a.png", b"x")
    assert storage.get("inputs/a.png") == b"x"
    assert storage.healthy()


def test_result_keys_have_one_layout() -> None:
    assert results_prefix("j1") == "results/j1/"
    assert result_key("j1", "target", 2) == "results/j1/target_2.png"
    assert validate_key(result_key("j1", "source", 0)).startswith(results_prefix("j1"))


def test_put_copies_from_a_file(storage: Storage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)  # more than one copy chunk
    with tempfile.TemporaryFile() as file:
        file.write(data)  # left at its end: put copies from the start all the same
        storage.put("inputs/from-file.bin", file)
    assert storage.get("inputs/from-file.bin") == data
