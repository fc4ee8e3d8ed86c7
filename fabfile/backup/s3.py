"""Off-site copies on S3-compatible storage (boto3), streamed in 8 MiB parts.

Where the upload runs: in the task's own process. On the server (``inv``, what
cron runs) it reads the backup file directly; from a laptop (``fab -H``) it
streams the file out of the server over an SSH channel (``cat``) and on to
S3. Either way at most one part (8 MiB) is in memory at a time: never the
whole file. Each part is sent with its Content-MD5 (S3 rejects a part that
does not match), the sha256 of every byte sent must equal the manifest's
(so what went off-site is exactly the verified backup), and after the upload
the object's size and ETag (md5 of the part md5s) are compared with what was
sent. The manifest is uploaded last, as in the backup directory.

Bucket, prefix, endpoint and region come from ``backup.s3``; the credentials
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) from the server's ``.env``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from ..addresses import is_loopback
from ..config import Settings
from ..errors import OpsError
from ..host import Host
from ..shell import bash_c, q

PART_SIZE = 8 * 1024 * 1024


def configured(settings: Settings) -> bool:
    return bool(settings.backup.s3.bucket)


def object_key(settings: Settings, kind: str, filename: str) -> str:
    return f"{settings.backup.s3.prefix}{kind}/{filename}"


def url(settings: Settings, key: str) -> str:
    return f"s3://{settings.backup.s3.bucket}/{key}"


def parse_url(value: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not value.startswith("s3://") or "/" not in value[5:]:
        raise OpsError(f"{value} is not an s3://bucket/key URL")
    bucket, _, key = value[5:].partition("/")
    if not bucket or not key:
        raise OpsError(f"{value} is not an s3://bucket/key URL")
    return bucket, key


def check_endpoint(endpoint: str) -> None:
    """Refuse a plain-http endpoint unless it is on this machine (loopback).

    Whoever sits on an http:// link could change the manifests and archives we
    restore from; credentials would cross it in the clear too.
    """
    if not endpoint:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return
    raise OpsError(f"backup.s3.endpoint {endpoint!r} must be an https:// URL (plain http "
                   "only to a loopback address such as http://127.0.0.1:9000)")


def client(settings: Settings, env: dict[str, str]):
    """A boto3 S3 client from ``backup.s3`` and the .env credentials."""
    import boto3
    from botocore.config import Config

    check_endpoint(settings.backup.s3.endpoint)

    key_id = env.get("AWS_ACCESS_KEY_ID", "")
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key_id or not secret:
        why = ("backup.s3.bucket is set but" if settings.backup.s3.bucket
               else "reading from S3 needs credentials:")
        raise OpsError(
            f"{why} AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are empty in "
            f"{settings.env_file}; set them there"
            + (" (or unset backup.s3.bucket)" if settings.backup.s3.bucket else
               ", and backup.s3.endpoint / backup.s3.region if the bucket is not on AWS "
               "us-east-1")
        )
    s3 = settings.backup.s3
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"} if s3.endpoint else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint or None,
        region_name=s3.region or None,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=config,
    )


# --- streaming to and from the server ---------------------------------------------


class ServerReader:
    """Read a file on the target in chunks (``cat`` through :meth:`Host.stream`)."""

    def __init__(self, host: Host, path: str, sudo: bool = True):
        self.host = host
        self.path = path
        self.stream = host.stream(f"cat -- {q(path)}", sudo=sudo)
        self.stream.close_stdin()

    def read(self, size: int) -> bytes:
        parts = []
        got = 0
        while got < size:
            chunk = self.stream.read(min(size - got, 1024 * 1024))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        try:
            self.stream.finish(f"cannot read {self.path} on {self.host.name}")
        finally:
            self.stream.close()


class ServerWriter:
    """Write a file on the target in chunks, fsynced (``cat >`` through :meth:`Host.stream`)."""

    def __init__(self, host: Host, path: str, sudo: bool = True):
        self.host = host
        self.path = path
        self.stream = host.stream(bash_c('umask 077; cat > "$1" && sync -- "$1"', path),
                                  sudo=sudo)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def close(self) -> None:
        try:
            self.stream.finish(f"cannot write {self.path} on {self.host.name}")
        finally:
            self.stream.close()


# --- upload / download -----------------------------------------------------------


@dataclass
class Uploaded:
    key: str
    size: int
    etag: str
    parts: int

    def as_dict(self, settings: Settings) -> dict:
        return {"url": url(settings, self.key), "size": self.size, "etag": self.etag,
                "parts": self.parts}


def expected_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives an object uploaded in these parts (single part: plain md5)."""
    if len(part_md5s) == 1:
        return part_md5s[0].hex()
    return hashlib.md5(b"".join(part_md5s)).hexdigest() + f"-{len(part_md5s)}"  # noqa: S324


def upload(
    s3,
    bucket: str,
    key: str,
    reader,
    *,
    sha256: str,
    size: int,
    part_size: int = PART_SIZE,
    sse: str = "AES256",
) -> Uploaded:
    """Stream ``reader`` to ``bucket/key`` part by part and verify what S3 stored.

    ``sse``: server-side encryption asked for (and checked) on the object; '' for none.
    """
    encryption = {"ServerSideEncryption": sse} if sse else {}
    digest = hashlib.sha256()
    md5s: list[bytes] = []
    upload_id = None
    sent = 0
    metadata = {"sha256": sha256}
    try:
        chunk = reader.read(part_size)
        if len(chunk) < part_size:  # small file: one PUT
            digest.update(chunk)
            md5 = hashlib.md5(chunk).digest()  # noqa: S324 - S3's integrity check
            if digest.hexdigest() != sha256 or len(chunk) != size:
                raise OpsError(f"{key}: the file changed since it was verified "
                               "(checksum differs); not uploaded")
            s3.put_object(Bucket=bucket, Key=key, Body=chunk, Metadata=metadata,
                          ContentMD5=base64.b64encode(md5).decode(), **encryption)
            md5s.append(md5)
            sent = len(chunk)
        else:
            upload_id = s3.create_multipart_upload(
                Bucket=bucket, Key=key, Metadata=metadata, **encryption)["UploadId"]
            parts = []
            number = 1
            while chunk:
                digest.update(chunk)
                md5 = hashlib.md5(chunk).digest()  # noqa: S324
                r = s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=chunk, ContentMD5=base64.b64encode(md5).decode(),
                )
                parts.append({"ETag": r["ETag"], "PartNumber": number})
                md5s.append(md5)
                sent += len(chunk)
                number += 1
                chunk = reader.read(part_size)
            if digest.hexdigest() != sha256 or sent != size:
                raise OpsError(f"{key}: the file changed since it was verified "
                               "(checksum differs); upload abandoned")
            s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            upload_id = None
    except OpsError:
        raise
    except Exception as exc:
        raise OpsError(f"upload of {key} to bucket {bucket} failed: {_why(exc)}") from exc
    finally:
        if upload_id is not None:
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # best effort; a lifecycle rule cleans up otherwise
                pass
    return verify_object(s3, bucket, key, size=sent, etag=expected_etag(md5s), parts=len(md5s),
                         sse=sse)


def verify_object(s3, bucket: str, key: str, *, size: int, etag: str, parts: int = 1,
                  sse: str = "") -> Uploaded:
    """Check that ``bucket/key`` has this size and ETag (and ``sse`` encryption, if given)."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        raise OpsError(f"s3://{bucket}/{key} is missing off-site: {_why(exc)}") from exc
    got_etag = head.get("ETag", "").strip('"')
    if head.get("ContentLength") != size or got_etag != etag:
        raise OpsError(
            f"s3://{bucket}/{key} does not match the backup (size {head.get('ContentLength')} "
            f"vs {size}, ETag {got_etag} vs {etag})")
    if sse and head.get("ServerSideEncryption") != sse:
        raise OpsError(
            f"s3://{bucket}/{key} is stored without {sse} server-side encryption (the service "
            f"reports {head.get('ServerSideEncryption') or 'none'}); set backup.s3.sse to '' "
            "only if this service cannot encrypt")
    return Uploaded(key, size, etag, parts)


def download(s3, bucket: str, key: str, writer) -> tuple[int, str]:
    """Stream ``bucket/key`` into ``writer``; returns (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(1024 * 1024):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    except Exception as exc:
        raise OpsError(f"download of s3://{bucket}/{key} failed: {_why(exc)}") from exc
    return size, digest.hexdigest()


def get_small(s3, bucket: str, key: str) -> bytes:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise OpsError(f"cannot read s3://{bucket}/{key}: {_why(exc)}") from exc


def put_small(s3, bucket: str, key: str, data: bytes, sse: str = "AES256") -> None:
    md5 = hashlib.md5(data).digest()  # noqa: S324
    encryption = {"ServerSideEncryption": sse} if sse else {}
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data,
                      ContentMD5=base64.b64encode(md5).decode(), **encryption)
    except Exception as exc:
        raise OpsError(f"upload of s3://{bucket}/{key} failed: {_why(exc)}") from exc
    verify_object(s3, bucket, key, size=len(data), etag=md5.hex(), sse=sse)


def list_objects(s3, bucket: str, prefix: str) -> list[dict]:
    out = []
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out.extend(page.get("Contents", []))
    except Exception as exc:
        raise OpsError(f"cannot list s3://{bucket}/{prefix}: {_why(exc)}") from exc
    return out


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
