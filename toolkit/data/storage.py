"""Where prepared datasets live: a local folder or an S3-compatible prefix (AWS S3, R2, MinIO, GCS's
S3 API), behind one small interface: ``put`` (published whole or not at all), ``get``, ``exists``.

S3 goes through boto3 with the standard AWS configuration: credentials from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``), a credentials file or
an instance role, and a non-AWS endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
or the config's ``endpoint_url``. Credentials are never accepted in a URL or a config value, so
they cannot reach a saved config, a log or a report. A PUT of one object is atomic on S3: a
reader sees a whole shard or none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from toolkit.atomic import atomic_open


class StorageError(RuntimeError):
    """Storage that cannot be used as given: what was tried and what to set."""


def check_url(url: str) -> None:
    """Refuse a location that carries secrets (``s3://key:secret@bucket``, a presigned query)."""
    parsed = urlparse(url)
    if parsed.username or parsed.password or re.search(r"(?i)(signature|credential|token|secret)=", parsed.query):
        raise StorageError(f"{parsed.scheme}://<redacted>: credentials in a storage URL would be saved with the "
                           "run's config and logs; give them in the environment (AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY) or a credentials file (~/.aws/credentials), and the bare "
                           "s3://bucket/prefix here")


def open_store(url: str, endpoint_url: str | None = None) -> LocalStore | S3Store:
    check_url(url)
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url)
    if "://" in url:
        raise StorageError(f"{url}: only local folders and s3:// (any S3-compatible endpoint) are supported")
    return LocalStore(url)


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def put(self, name: str, data: bytes) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.root / name) as f:   # temp file + rename: whole or absent
            f.write(data)

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        self.url, self.bucket, self.prefix = url.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Seconds, not minutes: an unreachable endpoint or a wrong setting fails fast.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        # A session of its own: credentials are read now, from the environment as it is, not cached
        # in boto3's process-wide default session from an earlier store.
        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, err: Exception, what: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{self.url} (endpoint {self.endpoint or 'AWS default'})"
        if isinstance(err, NoCredentialsError):
            return StorageError(f"{what} {where}: no credentials found; set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials)")
        if isinstance(err, EndpointConnectionError):
            return StorageError(f"{what} {where}: cannot connect to the endpoint; set AWS_ENDPOINT_URL (or "
                                "the config's endpoint_url) to your S3-compatible server, e.g. http://host:9000")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "?")
            hint = {"NoSuchBucket": "the bucket does not exist: create it or fix the URL",
                    "404": "the bucket or object does not exist: create the bucket or fix the URL",
                    "InvalidAccessKeyId": "the access key is not known to this endpoint: check AWS_ACCESS_KEY_ID",
                    "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
                    "AccessDenied": "these credentials may not access it: check the key's permissions",
                    "403": "access denied: check the credentials and the key's permissions"}.get(code, "")
            return StorageError(f"{what} {where}: {code} {hint}".rstrip())
        return StorageError(f"{what} {where}: {type(err).__name__}: {err}")

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except (BotoCoreError, ClientError) as err:
            raise self._fail(err, what) from None

    def check(self) -> None:
        """Fail now, naming the URL, if the bucket cannot be reached or used."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "403":
                # A HEAD response has no body, so S3 cannot say which of key, secret or permission
                # is wrong; a one-key listing can (InvalidAccessKeyId, SignatureDoesNotMatch, ...).
                self._call("cannot use", self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix,
                           MaxKeys=1)
            raise self._fail(err, "cannot use") from None
        except BotoCoreError as err:
            raise self._fail(err, "cannot use") from None

    def put(self, name: str, data: bytes) -> None:
        self._call("cannot write to", self.client.put_object, Bucket=self.bucket, Key=self._key(name), Body=data)

    def get(self, name: str) -> bytes:
        return self._call("cannot read from", self.client.get_object, Bucket=self.bucket, Key=self._key(name)
                          )["Body"].read()

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(err, "cannot read from") from None
