"""`kontextd serve`: build the embedded services and run them under uvicorn."""

import logging
import os
import sys
import time
import uuid
from urllib.parse import urlsplit

import uvicorn

from kontextd import logs
from kontextd.api.app import create_app
from kontextd.api.auth import Authenticator
from kontextd.api.queue import RUN_PREFIX
from kontextd.api.services import Services
from kontextd.backends import TINY_MODEL, BackendUnavailable, plan_backend
from kontextd.config import Settings
from kontextd.datadir import DataDir
from kontextd.fetch.addresses import AllowList
from kontextd.fetch.guard import FetchLimits, GuardedFetcher
from kontextd.jobs.sqlite import DataDirInUse, SQLiteJobStore
from kontextd.jobs.store import StoreUnavailable
from kontextd.routing import LOCAL, ConfigError, load_routing
from kontextd.storage.local import LocalStorage
from kontextd.tls import ensure_self_signed
from kontextd.webhooks.signing import WebhookSigner

log = logging.getLogger("kontextd.server")


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
        "export FAL_KEY=<one of your --api-key values>" if settings.api_keys else "export FAL_KEY=local",
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


def serve(settings: Settings) -> None:
    logs.configure(settings.log_level)
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
    except BackendUnavailable as error:
        sys.exit(f"kontextd: {error}")
    try:
        routing = load_routing(settings.config_file, plan.model or TINY_MODEL)
    except ConfigError as error:
        sys.exit(f"kontextd: {error}")
    if LOCAL in routing.lanes():
        print(f"kontextd: backend {plan.kind} on {plan.device} ({plan.reason})", flush=True)
    for route in routing.routes.values():
        print(f"kontextd: {route.app_id} -> {route.backend} ({route.model})", flush=True)
    data = DataDir(settings.data_dir.resolve())
    try:
        data.prepare()
    except (OSError, ValueError) as error:
        sys.exit(f"kontextd: data dir {data.root}: {error}")

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

    try:
        store = SQLiteJobStore(data.database)
        # Not counted against them: the process stopped, not the requests (up to a limit of such stops).
        requeued = store.recover_after_restart(time.time())
    except DataDirInUse as error:
        sys.exit(f"kontextd: {error}")
    except StoreUnavailable as error:  # a full disk, say: say so rather than print a traceback
        sys.exit(f"kontextd: the job store at {data.database} cannot be written: {error}")
    if requeued:
        log.warning("re-queued requests the last process stopped under", extra={"count": requeued})
    # After the re-queue: a request interrupted on a backend no longer routed to must move as well.
    moved = store.move_to_lanes({route.app_id: route.backend for route in routing.routes.values()})
    if moved:
        log.warning(
            "moved queued requests to the backend their endpoint is now routed to", extra={"count": moved}
        )

    services = Services(
        settings=settings,
        store=store,
        storage=LocalStorage(data.files, settings.base_url),
        authenticator=Authenticator(settings.api_keys),
        signer=WebhookSigner.load_or_create(data.webhook_key),
        fetcher=GuardedFetcher(
            AllowList.parse(settings.fetch_allow),
            FetchLimits(max_bytes=settings.fetch_max_bytes, timeout_seconds=settings.fetch_timeout),
        ),
        plan=plan,
        routing=routing,
        instance_id=f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
    )
    data.make_private()  # the key just written, and the journal files SQLite made: 0600 whatever came before
    if settings.host in ("0.0.0.0", "::") and not settings.public_url:
        log.warning(
            "bound to all interfaces without --public-url: image URLs will name loopback; "
            "set --public-url to the address clients use",
            extra={"base_url": settings.base_url},
        )
    if not settings.api_keys:
        log.warning("no API key configured: every client on the bound address can use this server")
    print(*client_instructions(settings, ca_file), sep="\n", flush=True)
    print(f"kontextd: serving on {settings.base_url} (API docs at {settings.base_url}/docs)", flush=True)
    try:
        uvicorn.run(
            create_app(services),
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=5,
            **ssl_files,
        )
    finally:
        store.close()
