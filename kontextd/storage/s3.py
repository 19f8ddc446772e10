"""Images in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Cloudflare R2, ...): `s3://bucket[/prefix]`.

boto3 is the reference S3 client: request signing, presigned URLs and bounded retries are done the way
every S3-compatible server is tested against, and the standard AWS configuration comes for free. Nothing
here is kontextd-specific configuration: the endpoint (`AWS_ENDPOINT_URL`, or `AWS_ENDPOINT_URL_S3`), the
credentials (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance or container roles) and
the region (`AWS_REGION`) are read from the environment and ~/.aws exactly as the AWS CLI reads them; so
are the knobs some S3-compatible servers need (e.g. `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`).

An object's key is `<prefix>/<key>` (just `<key>` without a prefix), where `<key>` is one that
kontextd.storage.keys makes; nothing else is ever asked for, so a client-supplied name cannot reach any
other object. S3 PUTs are atomic: an object is stored whole or not at all. Requests are bounded (a few
tries, timeouts on connecting and reading), so a store that is down makes a write fail with
StorageUnavailable in seconds, never hang.
"""

import logging
import math
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NoReturn, cast
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError, ValidationError

from kontextd.storage import keys
from kontextd.storage.base import StorageConfigError, StorageUnavailable, StoredFile

log = logging.getLogger("kontextd.storage")

# A DeleteObjects request names at most this many keys (the S3 limit).
DELETE_BATCH = 1000
# The longest a presigned URL may last with SigV4 (seven days).
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600
# Codes S3 answers with when there is no such object (HEAD answers a bare status code).
_MISSING = ("NoSuchKey", "404", "NotFound")
_NO_BUCKET = ("NoSuchBucket", "404", "NotFound")
# botocore's own complaints about the arguments: a bug here, not the store being unavailable.
_BUGS = (ParamValidationError, ValidationError)


class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        presign_endpoint: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        create_bucket: bool = True,
    ) -> None:
        """Check that `bucket` can be reached, creating it when it is missing (and `create_bucket` and
        the credentials allow); raises StorageConfigError saying which bucket, which endpoint and why when
        it cannot be used. `endpoint_url` overrides the configured one (tests). `presign_endpoint`: where
        clients reach the same store, when not where kontextd does (a public host for a bucket kontextd
        reaches on a private network): presigned URLs are signed for it. Signing is local, so it is
        never contacted from here."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
        )
        session = boto3.session.Session()
        self.client: BaseClient = _client(session, endpoint_url, config)
        # The host is part of what SigV4 signs: a URL for another host must be signed for that host.
        self._presigner = (
            self.client if presign_endpoint is None else _client(session, presign_endpoint, config)
        )
        try:
            self._check_bucket(create_bucket)
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def __repr__(self) -> str:
        where = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        return f"S3Storage({where!r} at {self.endpoint})"

    def _object_key(self, key: str) -> str:
        if not keys.is_valid(key):
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _check_bucket(self, create: bool) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _code(error) not in _NO_BUCKET:
                self._config_error(_bucket_refusal(error), error)
            if not create:
                self._config_error("it does not exist (and creating it is turned off)", error)
        except _BUGS as error:
            self._config_error(f"the name is refused: {error}", error)
        except BotoCoreError as error:
            self._config_error(f"cannot reach it: {error}", error)
        region = self.client.meta.region_name
        location = {}
        if region and region not in ("us-east-1", "aws-global"):
            location = {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            self.client.create_bucket(Bucket=self.bucket, **location)
        except ClientError as error:
            if _code(error) != "BucketAlreadyOwnedByYou":  # made meanwhile by another of our servers
                self._config_error(f"it does not exist and cannot be created: {_reason(error)}", error)
        except BotoCoreError as error:
            self._config_error(f"it does not exist and cannot be created: {error}", error)

    def _config_error(self, reason: str, error: Exception) -> NoReturn:
        raise StorageConfigError(f"S3 bucket {self.bucket!r} at {self.endpoint}: {reason}") from error

    def _unavailable(self, action: str, error: Exception) -> NoReturn:
        if isinstance(error, _BUGS):
            raise error
        # A connection error's text names the endpoint's address: clients see only its kind (the 503 detail),
        # operators the whole of it in the log.
        reason = _reason(error) if isinstance(error, ClientError) else type(error).__name__
        if not isinstance(error, ClientError):
            log.warning("object store unreachable", extra={"action": action, "reason": str(error)})
        message = f"object store: {action} failed in bucket {self.bucket}: {reason}"
        raise StorageUnavailable(message) from error

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            self._unavailable("checking the bucket", error)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        object_key = self._object_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as error:
            # Down, timing out, throttling, answering 5xx or refusing us: nothing was stored (S3 PUTs are
            # whole or nothing), and it may work again later.
            self._unavailable(f"storing {key}", error)

    def open(self, key: str) -> StoredFile | None:
        if not keys.is_valid(key):
            return None  # never asked: the answer must not depend on what else is in the bucket
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as error:
            if _code(error) in _MISSING:
                return None
            self._unavailable(f"reading {key}", error)
        except BotoCoreError as error:
            self._unavailable(f"reading {key}", error)
        # The body streams from the connection: read in chunks, and closed by the caller.
        body = cast(BinaryIO, response["Body"])
        return StoredFile(body, int(response["ContentLength"]), keys.content_type(key))

    def delete(self, keys: Iterable[str]) -> None:
        for batch in _batches(self._valid_object_keys(keys), DELETE_BATCH):
            objects = [{"Key": object_key} for object_key in batch]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as error:
                self._unavailable(f"deleting {len(batch)} object(s)", error)
            # Missing keys are no error in S3; what is listed here (refused, failed) is still there.
            if errors := response.get("Errors"):
                first = errors[0]
                raise StorageUnavailable(
                    f"object store: {len(errors)} of {len(batch)} object(s) in bucket {self.bucket} were not "
                    f"deleted: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )

    def _valid_object_keys(self, keys_given: Iterable[str]) -> Iterator[str]:
        seen: set[str] = set()
        for key in keys_given:
            if keys.is_valid(key) and key not in seen:
                seen.add(key)
                yield self._object_key(key)

    def presigned_url(self, key: str, expires_in: float) -> str | None:
        """A GET URL for `key` signed for `expires_in` seconds (rounded up to whole seconds, at most seven
        days; temporary credentials may end it sooner)."""
        seconds = math.ceil(expires_in)
        if not 0 < seconds <= MAX_PRESIGNED_SECONDS:
            raise ValueError(f"a presigned URL lasts 1 s to {MAX_PRESIGNED_SECONDS} s, not {expires_in!r}")
        params = {"Bucket": self.bucket, "Key": self._object_key(key)}
        return self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)

    def close(self) -> None:
        self.client.close()
        if self._presigner is not self.client:
            self._presigner.close()


def _client(session: boto3.session.Session, endpoint_url: str | None, config: Config) -> BaseClient:
    client = session.client("s3", endpoint_url=endpoint_url, config=config)
    if not _custom_endpoint(client.meta.endpoint_url):
        return client
    # SeaweedFS, MinIO and most other servers have no wildcard DNS for `<bucket>.<host>`: the bucket goes
    # in the path. (AWS itself keeps virtual-hosted addressing.)
    client.close()
    return session.client(
        "s3", endpoint_url=endpoint_url, config=config.merge(Config(s3={"addressing_style": "path"}))
    )


def _custom_endpoint(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _reason(error: ClientError) -> str:
    """`<code> <message>` (HTTP <status>), short; S3 error responses carry no credentials."""
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = error.response.get("Error", {}).get("Message", "")
    text = " ".join(part for part in (_code(error), message) if part and part != str(status))
    return f"{text} (HTTP {status})" if status else text


def _bucket_refusal(error: ClientError) -> str:
    """Why HEAD on the bucket failed, in words: HEAD responses have no body, only a status."""
    code = _code(error)
    if code in ("403", "AccessDenied", "Forbidden"):
        return "access denied (check the credentials, e.g. AWS_ACCESS_KEY_ID, and the bucket's policy)"
    if code in ("301", "PermanentRedirect"):
        return "it is in another region (set AWS_REGION to the bucket's region)"
    if code == "400":
        return "the request was refused as bad (HTTP 400): check AWS_REGION and the endpoint"
    return f"it cannot be checked: {_reason(error)}"


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
