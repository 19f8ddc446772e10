"""The two processes: `kontextd serve` (HTTP API and runtime) and `kontextd worker` (runtime alone)."""

import asyncio
import logging
import os
import signal
import sys
import uuid
from urllib.parse import urlsplit

import uvicorn

from kontextd import logs
from kontextd.api.app import create_app, create_health_app
from kontextd.api.auth import Authenticator
from kontextd.api.metrics_route import serve_metrics_port
from kontextd.api.queue import RUN_PREFIX
from kontextd.api.services import Services
from kontextd.api.upload_signing import SECRET_NAME as UPLOAD_SIGNING_SECRET
from kontextd.api.upload_signing import UploadSigner
from kontextd.backends import TINY_MODEL, BackendPlan, BackendUnavailable, plan_backend
from kontextd.config import Settings
from kontextd.datadir import DataDir
from kontextd.fetch.addresses import AllowList
from kontextd.fetch.guard import FetchLimits, GuardedFetcher
from kontextd.jobs.factory import open_store
from kontextd.jobs.postgres import SchemaTooNew
from kontextd.jobs.sqlite import DataDirInUse, SQLiteJobStore
from kontextd.jobs.store import JobStore, StoreUnavailable
from kontextd.routing import LOCAL, ConfigError, Routing, load_routing
from kontextd.runtime import Runtime, recover_at_start
from kontextd.safety.config import SafetyConfig, load_safety
from kontextd.storage.factory import open_storage
from kontextd.storage.s3 import StorageConfigError
from kontextd.storage.urls import FileUrls
from kontextd.tls import ensure_self_signed
from kontextd.webhooks.signing import WebhookSigner

log = logging.getLogger("kontextd.server")

WEBHOOK_KEY_SECRET = "webhook-signing-key"  # its name among the store's secrets


def client_environment(settings: Settings, ca_file: str | None) -> list[str]:
    """The lines a user exports so the unmodified fal-client talks to this server."""
    # fal-client hosts may carry a path prefix: keep the one a --public-url behind a reverse proxy has.
    base = urlsplit(settings.base_url)
    authority = base.netloc + base.path.rstrip("/")
    lines = []
    if ca_file is not None:
        lines.append(f"export SSL_CERT_FILE={ca_file}")
    lines += [
        f"export FAL_RUN_HOST={authority}{RUN_PREFIX}",
        f"export FAL_QUEUE_RUN_HOST={authority}",
        "export FAL_KEY=<one of your --api-key values>"
        if settings.api_keys or settings.admin_keys
        else "export FAL_KEY=local",
    ]
    return lines


def client_instructions(settings: Settings, ca_file: str | None) -> list[str]:
    """What to print at start-up: the lines for fal-client, or, on plain HTTP, why it cannot connect."""
    if urlsplit(settings.base_url).scheme == "https":
        lines = client_environment(settings, ca_file)
        return ["kontextd: point fal-client at this server with:", *(f"  {line}" for line in lines)]
    # fal-client builds https:// URLs from its host variables whatever they say: over plain HTTP its
    # requests fail with WRONG_VERSION_NUMBER, so printing export lines would only mislead.
    return [
        "kontextd: fal-client speaks only HTTPS and cannot use this plain-HTTP address. To use it, either",
        "  restart with --tls-self-signed (a local CA; the lines to export are printed then),",
        "  give --tls-cert and --tls-key, or serve behind an HTTPS proxy with --public-url https://...",
        f"  curl works as is: curl {settings.base_url}/health",
    ]


class StartupError(Exception):
    """A configuration or a dependency that keeps this process from starting, said in one line."""


def _plan_and_routing(settings: Settings) -> tuple[BackendPlan, Routing]:
    try:
        plan = plan_backend(
            settings.backend,
            settings.model,
            settings.device,
            gpus=settings.gpus,
            workers=settings.workers,
            offload=settings.offload,
            weights=settings.weights,
            compile=settings.compile,
        )
        routing = load_routing(settings.config_file, plan.model or TINY_MODEL)
    except (BackendUnavailable, ConfigError) as error:
        raise StartupError(str(error)) from error
    if LOCAL in routing.lanes() and settings.workers > 0:
        print(f"kontextd: backend {plan.kind} on {plan.device} ({plan.reason})", flush=True)
    for route in routing.routes.values():
        print(f"kontextd: {route.app_id} -> {route.backend} ({route.model})", flush=True)
    return plan, routing


def _safety(settings: Settings) -> SafetyConfig:
    try:
        return load_safety(settings.config_file, settings.safety_checker)
    except ConfigError as error:
        raise StartupError(str(error)) from error


def _open_store(settings: Settings, data: DataDir) -> JobStore:
    try:
        if settings.store is None:
            return SQLiteJobStore(data.database, poll_cache=settings.poll_cache)
        return open_store(settings.store, settings.poll_cache)
    except DataDirInUse as error:
        raise StartupError(str(error)) from error
    except StoreUnavailable as error:  # a full disk, a database that is down: said, not a traceback
        raise StartupError(f"the job store cannot be used: {error}") from error
    except (SchemaTooNew, ValueError) as error:
        raise StartupError(f"--store: {error}") from error


def _signer(settings: Settings, store: JobStore, data: DataDir) -> WebhookSigner:
    """One signing key for the deployment: a key file when given; else the database's when the store is
    shared (every node then publishes the same JWKS), else the data dir's."""
    if settings.webhook_key_file is not None:
        return WebhookSigner.load_or_create(settings.webhook_key_file)
    if store.shared:
        return WebhookSigner.from_pem(store.secret(WEBHOOK_KEY_SECRET, WebhookSigner.generate_pem))
    return WebhookSigner.load_or_create(data.webhook_key)


def build_services(settings: Settings) -> tuple[Services, DataDir]:
    """Everything one process (API node or worker) works with, after start-up recovery; StartupError
    says what keeps it from starting."""
    plan, routing = _plan_and_routing(settings)
    safety = _safety(settings)
    data = DataDir(settings.data_dir.resolve())
    try:
        data.prepare(sqlite=settings.store is None)
    except (OSError, ValueError) as error:
        raise StartupError(f"data dir {data.root}: {error}") from error
    store = _open_store(settings, data)
    try:
        storage = open_storage(settings.storage, data.files, settings.presign_endpoint)
        urls = FileUrls(settings.file_urls, storage, settings.public_url)
    except (StorageConfigError, ValueError) as error:
        store.close()
        raise StartupError(f"--storage: {error}") from error
    try:
        signer = _signer(settings, store, data)
        services = Services(
            settings=settings,
            store=store,
            storage=storage,
            urls=urls,
            authenticator=Authenticator(settings.api_keys, settings.admin_keys),
            signer=signer,
            # Deployment-wide, like the webhook key: any API node accepts an upload URL another one signed.
            uploads=UploadSigner(store.secret(UPLOAD_SIGNING_SECRET, UploadSigner.generate)),
            fetcher=GuardedFetcher(
                AllowList.parse(settings.fetch_allow),
                FetchLimits(max_bytes=settings.fetch_max_bytes, timeout_seconds=settings.fetch_timeout),
            ),
            plan=plan,
            routing=routing,
            safety=safety,
            instance_id=f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        )
        recover_at_start(services)
    except (StoreUnavailable, ValueError) as error:
        store.close()
        raise StartupError(f"start-up: {error}") from error
    data.make_private()  # the key just written, and the journal files SQLite made: 0600 whatever came before
    return services, data


def serve(settings: Settings) -> None:
    """`kontextd serve`: the HTTP API, with the runtime (workers, dispatcher, sweeper) beside it."""
    logs.configure(settings.log_level)
    try:
        services, data = build_services(settings)
    except StartupError as error:
        sys.exit(f"kontextd: {error}")
    ssl_files: dict[str, str] = {}
    ca_file = None
    if settings.tls_self_signed:
        hosts = ["localhost", "127.0.0.1", "::1", settings.host, urlsplit(settings.base_url).hostname or ""]
        tls = ensure_self_signed(
            data.tls, [host for host in dict.fromkeys(hosts) if host not in ("", "0.0.0.0", "::")]
        )
        ssl_files = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        ca_file = str(tls.ca_cert)
    elif settings.tls_cert is not None and settings.tls_key is not None:
        ssl_files = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.host in ("0.0.0.0", "::") and not settings.public_url:
        log.warning(
            "bound to all interfaces without --public-url: webhooks will name loopback in image URLs; "
            "set --public-url to the address clients use",
            extra={"base_url": settings.base_url},
        )
    if not (settings.api_keys or settings.admin_keys):
        log.warning("no API key configured: every client on the bound address can use this server")
    print(*client_instructions(settings, ca_file), sep="\n", flush=True)
    print(f"kontextd: serving on {settings.base_url} (API docs at {settings.base_url}/docs)", flush=True)
    runtime = Runtime(services)
    try:
        serve_metrics_port(services)  # --metrics-port: /metrics on loopback, beside the API
        uvicorn.run(
            create_app(services, lifespan=lambda _app: runtime.running()),
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=5,
            **ssl_files,
        )
    finally:
        services.close()


def run_worker(settings: Settings) -> None:
    """`kontextd worker`: the runtime without the HTTP API, on a store shared with the API nodes."""
    logs.configure(settings.log_level)
    if settings.store is None or settings.store.startswith("sqlite:"):
        sys.exit(
            "kontextd: a worker needs the job store the API nodes use: --store postgresql://... "
            "(SQLite is one process's: run `kontextd serve` alone instead)"
        )
    try:
        services, _ = build_services(settings)
    except StartupError as error:
        sys.exit(f"kontextd: {error}")
    runtime = Runtime(services)
    print(f"kontextd: worker {services.instance_id} started", flush=True)
    try:
        serve_metrics_port(services)  # --metrics-port: /metrics on loopback
        if settings.health_port:
            app = create_health_app(services, lifespan=lambda _app: runtime.running())
            uvicorn.run(app, host="127.0.0.1", port=settings.health_port, log_config=None)
        else:
            asyncio.run(_until_signalled(runtime))
    finally:
        services.close()


async def _until_signalled(runtime: Runtime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with runtime.running():
        await stop.wait()
