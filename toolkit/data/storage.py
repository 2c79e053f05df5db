"""Where prepared datasets live: a local folder or an S3-compatible prefix (AWS S3, R2, MinIO, GCS's
S3 API), behind one small interface: ``put`` (a small object), ``staged`` (a file of any size,
written to local disk and published whole on success), ``get`` (a small object, read only below
a cap), ``open_read`` (a stream, for files of any size), ``exists``.

S3 goes through boto3 with the standard AWS configuration: credentials from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``), a credentials file or
an instance role, and a non-AWS endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
or the config's ``endpoint_url``. Credentials are never accepted in a URL (bucket or endpoint) or
a config value, so they cannot reach a saved config, a log or a report. Files are uploaded with
boto3's managed transfer (``upload_file``: multipart above ``multipart_mb``, so a shard of any
size uploads, past S3's 5 GB limit on one PUT); an upload, whole or multipart, is atomic on S3:
a reader sees a whole shard or none. A local store reads only under its root, after resolving
symbolic links (``toolkit.data.names.inside``), and only regular files (a FIFO would block the
reader forever, a folder is no file). Every S3 error a reader or writer meets (no credentials, an
unreachable endpoint, a refusal) is one ``StorageError`` naming the URL and what to set.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from toolkit.atomic import atomic_open
from toolkit.config import has_credentials, redact_url
from toolkit.data.names import MAX_JSON_BYTES, check_schema, inside

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")   # boto3's own order


class StorageError(RuntimeError):
    """Storage that cannot be used as given: what was tried and what to set."""


def check_url(url: str, what: str = "a storage URL") -> None:
    """Refuse a location that carries secrets (``s3://key:secret@bucket``, an endpoint
    ``http://user:pass@host``, a presigned query), redacted in the message."""
    if has_credentials(url):
        raise StorageError(f"{redact_url(url)}: credentials in {what} would be saved with the run's config and "
                           "logs; give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a "
                           "credentials file (~/.aws/credentials), and the bare URL here")


def open_store(url: str, endpoint_url: str | None = None, multipart_mb: float | None = None) -> LocalStore | S3Store:
    """The store at ``url``; ``multipart_mb``: an upload above this size goes in parts of this size."""
    check_url(url)
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url, multipart_mb)
    if "://" in url:
        raise StorageError(f"{url}: only local folders and s3:// (any S3-compatible endpoint) are supported")
    return LocalStore(url)


def too_large(url: str, name: str, limit: int) -> StorageError:
    return StorageError(f"{url}/{name} is larger than {limit:,} bytes, the cap on a prepared set's JSON files "
                        "(toolkit.data.names.MAX_JSON_BYTES); refused before reading it: the set may have been "
                        "tampered with")


def read_json(store: LocalStore | S3Store, name: str, schema: Any) -> Any:
    """A JSON file of a store, read whole only below ``MAX_JSON_BYTES`` and checked against
    ``schema`` (``toolkit.data.names.check_schema``); refused, naming it, when larger, not JSON or
    of another shape."""
    return parse_json(store.get(name), f"{store.url}/{name}", schema)


def parse_json(data: bytes, where: str, schema: Any) -> Any:
    """``data`` as JSON of the shape ``schema``, or a refusal naming ``where`` (a document nested
    deeper than Python's recursion limit is one too, not a ``RecursionError``)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise StorageError(f"{where} is not JSON ({err}); refused: the set may have been damaged or tampered "
                           "with") from None
    except RecursionError:
        raise StorageError(f"{where} is nested too deeply to be read (no file task=prepare writes is); refused: the "
                           "set may have been damaged or tampered with") from None
    return check_schema(doc, schema, where)


def regular_file(path: Path, where: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (checked on the open file, so it cannot
    change in between; opened non-blocking, so a FIFO does not hang the open), else a refusal."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise StorageError(f"{where} is {what}, not a file; refused: the set may have been damaged or tampered with")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def path(self, name: str) -> Path:
        """Where ``name`` lies: under the root, symbolic links resolved (else ``UnsafeName``)."""
        return inside(self.root, name, self.url)

    def put(self, name: str, data: bytes) -> None:
        with atomic_open(self.path(name)) as f:   # temp file + rename: whole or absent
            f.write(data)

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[IO[bytes]]:
        """A file to write ``name`` into (read back too: ``w+b``), published by a rename on success."""
        with atomic_open(self.path(name), "w+b") as f:
            yield f

    def get(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        with regular_file(self.path(name), f"{self.url}/{name}") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise too_large(self.url, name, limit)
            data = f.read(limit + 1)   # never past the cap, even if the file grew since
        if len(data) > limit:
            raise too_large(self.url, name, limit)
        return data

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        with regular_file(self.path(name), f"{self.url}/{name}") as f:
            yield f

    def exists(self, name: str) -> bool:
        """Whether something is there by that name (a reader then refuses it if it is no file)."""
        return self.path(name).exists()

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    def __init__(self, url: str, endpoint_url: str | None = None, multipart_mb: float | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        parsed = urlparse(url)
        self.url, self.bucket, self.prefix = url.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        for where, value in (("endpoint_url", endpoint_url), *((v, os.environ.get(v)) for v in ENDPOINT_VARS)):
            if value:   # refused before any request (botocore's errors name the endpoint)
                check_url(value, f"the S3 endpoint ({where})")
        self.endpoint = endpoint_url or next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
        # Parts of multipart_mb (boto3's default, 8 MB, when None): S3 takes at most 10,000 parts,
        # so 64 MB parts carry an object of up to 640 GB; upload_file reads each part from the file
        # as it is sent (memory stays flat whatever the shard's size).
        if multipart_mb is not None and multipart_mb < 5:
            raise StorageError(f"prepare.multipart_mb={multipart_mb}: S3 refuses parts under 5 MB; use at least 5")
        part = int(multipart_mb * 2**20) if multipart_mb else None
        self.transfer = TransferConfig(**({"multipart_threshold": part, "multipart_chunksize": part} if part else {}))
        # Seconds, not minutes: an unreachable endpoint or a wrong setting fails fast.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        # A session of its own: credentials are read now, from the environment as it is, not cached
        # in boto3's process-wide default session from an earlier store.
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
        except (BotoCoreError, ValueError) as err:   # botocore: ValueError("Invalid endpoint: ...")
            raise self._fail(err, "cannot open") from None

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

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[IO[bytes]]:
        """A local temp file (``$TMPDIR``) to write ``name`` into; uploaded with boto3's managed
        transfer on success (multipart above ``multipart_mb``), then deleted."""
        with tempfile.NamedTemporaryFile(prefix="toolkit-upload-", suffix=f"-{Path(name).name}") as f:
            yield f
            f.flush()
            self._call("cannot write to", self.client.upload_file, Filename=f.name, Bucket=self.bucket,
                       Key=self._key(name), Config=self.transfer)

    def get(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        body = self._call("cannot read from", self.client.get_object, Bucket=self.bucket, Key=self._key(name))["Body"]
        with contextlib.closing(body):
            data = body.read(limit + 1)   # never more than the cap, whatever the server sends
        if len(data) > limit:
            raise too_large(self.url, name, limit)
        return data

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        """The object as a stream (read in chunks by the caller: memory stays flat)."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        body = self._call("cannot read from", self.client.get_object, Bucket=self.bucket, Key=self._key(name))["Body"]
        try:
            with contextlib.closing(body):
                yield body
        except (BotoCoreError, HTTPError) as err:   # the connection broke mid-object
            raise self._fail(err, f"cannot read {name} from") from None

    def exists(self, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(err, "cannot read from") from None
        except BotoCoreError as err:   # no credentials, an unreachable endpoint: the first request a reader makes
            raise self._fail(err, "cannot read from") from None
