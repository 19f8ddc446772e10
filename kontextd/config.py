"""Server settings: one dataclass, filled from `kontextd serve` flags and KONTEXTD_* environment variables."""

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from kontextd.backends import DEFAULT_MODEL
from kontextd.storage.urls import check_mode as check_file_urls
from kontextd.storage.urls import check_presign_endpoint

SEVEN_DAYS = 7 * 24 * 3600.0
# Ten tries over about two hours, as fal retries webhooks: the gaps between tries, in seconds.
DEFAULT_LORA_MAX_BYTES = 2 * 1024**3  # a rank-128 FLUX LoRA is about 700 MB; a full fine-tune is no LoRA
DEFAULT_LORA_CACHE_BYTES = 20 * 1024**3
LORA_FETCH_SECONDS = 600.0  # a LoRA is fetched once, and may be large: the image fetch timeout is too short
WEBHOOK_BACKOFF = (15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3300.0)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("kontextd-data")
    public_url: str | None = None
    store: str | None = None  # job store URL; None: sqlite:///<data dir>/jobs.sqlite3
    storage: str | None = None  # image storage URL; None: files in <data dir>/files
    file_urls: str = "proxy"  # how clients reach stored files (kontextd.storage.urls)
    presign_endpoint: str | None = None  # S3 endpoint presigned URLs are signed for; None: the one used
    webhook_key_file: Path | None = None  # None: the data dir's key (SQLite) or the database's (PostgreSQL)
    health_port: int | None = None  # `kontextd worker`: serve /health on 127.0.0.1 at this port
    metrics_port: int | None = None  # also serve /metrics on 127.0.0.1 at this port, without a key
    config_file: Path | None = None  # TOML routing each endpoint to a backend (see kontextd.routing)
    backend: str = "auto"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    gpus: str | None = None  # "all" or "0,1"; None: every GPU, or the one --device names
    offload: str = "auto"
    weights: str = "bf16"
    compile: str = "auto"
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # API keys that also read every key's usage (GET /v1/usage)
    insecure: bool = False
    tls_self_signed: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    workers: int = 1
    fetch_allow: str = ""
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_timeout: float = 20.0
    lora_dir: Path | None = None  # LoRA files requests may name by file name
    lora_max_bytes: int = DEFAULT_LORA_MAX_BYTES  # the largest LoRA fetched from a URL
    lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES  # fetched LoRAs kept, least recently used evicted
    output_ttl: float = SEVEN_DAYS
    sweep_interval: float = 30.0
    lease_seconds: float = 60.0  # a running request's worker renews it every third of this
    record_retention: float = SEVEN_DAYS  # a finished request's tombstone outlives its outputs this long
    webhook_backoff: tuple[float, ...] = WEBHOOK_BACKOFF
    webhook_concurrency: int = 4  # tries in flight at once to one receiver (scheme, host and port)
    sse_ping_interval: float = 10.0
    poll_cache: float = 1.0  # seconds a node may answer a status poll from memory (0: never)
    tiny_step_seconds: float = 0.0
    safety_checker: bool = True  # False: --no-safety-checker (warned at start-up; see kontextd.safety)
    log_level: str = "info"

    @property
    def uses_tls(self) -> bool:
        return self.tls_self_signed or self.tls_cert is not None

    @property
    def base_url(self) -> str:
        """Where clients reach us: --public-url, else the bound address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.uses_tls else "http"
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    def binds_only_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """Refuse configurations that would be unsafe or cannot work, saying which setting and why."""
        if not (self.api_keys or self.admin_keys) and not self.binds_only_loopback() and not self.insecure:
            raise ValueError(
                f"--host {self.host}: refusing to serve beyond loopback with no API key configured. "
                "Set --api-key (or KONTEXTD_API_KEYS), or pass --insecure to serve without authentication."
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_self_signed and self.tls_cert is not None:
            raise ValueError("--tls-self-signed and --tls-cert are exclusive")
        if self.workers < 0:
            raise ValueError("--workers must be 0 or more")
        if not 0 < self.lease_seconds < math.inf:
            raise ValueError(f"--lease-seconds must be more than 0 seconds, not {self.lease_seconds}")
        if not 0 <= self.record_retention < math.inf:
            raise ValueError(f"--record-retention must be 0 or more seconds, not {self.record_retention}")
        if not 0 <= self.poll_cache < math.inf:
            raise ValueError(f"--poll-cache must be 0 or more seconds, not {self.poll_cache}")
        if len(self.webhook_backoff) < 1:
            raise ValueError("KONTEXTD_WEBHOOK_BACKOFF needs at least one delay")
        if self.lora_max_bytes < 1 or self.lora_cache_bytes < 0:
            raise ValueError("--lora-max-bytes must be 1 or more, --lora-cache-bytes 0 or more")
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise ValueError(f"--lora-dir {self.lora_dir}: not a directory")
        if self.webhook_concurrency < 1:
            raise ValueError("--webhook-concurrency must be 1 or more")
        check_file_urls(self.file_urls)
        check_presign_endpoint(self.file_urls, self.presign_endpoint)
