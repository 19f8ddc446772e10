"""`kontextd` command line: `kontextd serve` with flags, each also settable as a KONTEXTD_* variable."""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kontextd.backends import COMPILE_MODES, DEFAULT_MODEL
from kontextd.backends.memory import OFFLOAD_MODES, WEIGHTS
from kontextd.client import commands as client
from kontextd.config import (
    DEFAULT_LORA_CACHE_BYTES,
    DEFAULT_LORA_MAX_BYTES,
    SEVEN_DAYS,
    WEBHOOK_BACKOFF,
    Settings,
)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KONTEXTD_{name}", default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").lower() in ("1", "true", "yes", "on")


def _add_http_flags(add: Callable[..., object]) -> None:
    """Flags of the HTTP API alone (`serve`)."""
    add("--host", default=_env("HOST", "127.0.0.1"), help="address to bind [KONTEXTD_HOST]")
    add("--port", type=int, default=int(_env("PORT", "8000")), help="port to bind [KONTEXTD_PORT]")
    add(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accept this key as 'Authorization: Key KEY' or 'Bearer KEY'; repeatable "
        "[KONTEXTD_API_KEYS, comma-separated]",
    )
    add(
        "--admin-key",
        action="append",
        dest="admin_keys",
        metavar="KEY",
        help="an API key that also reads every key's usage (GET /v1/usage); repeatable "
        "[KONTEXTD_ADMIN_KEYS, comma-separated]",
    )
    add(
        "--insecure",
        action="store_true",
        default=_env_flag("INSECURE"),
        help="allow binding a non-loopback address with no API key [KONTEXTD_INSECURE]",
    )
    add(
        "--tls-self-signed",
        action="store_true",
        default=_env_flag("TLS_SELF_SIGNED"),
        help="serve HTTPS with a local CA and certificate created in the data dir, and print the "
        "environment lines that point fal-client here [KONTEXTD_TLS_SELF_SIGNED]",
    )
    add(
        "--tls-cert",
        type=Path,
        default=_env("TLS_CERT"),
        help="serve HTTPS with this certificate chain [KONTEXTD_TLS_CERT]",
    )
    add("--tls-key", type=Path, default=_env("TLS_KEY"), help="private key for --tls-cert [KONTEXTD_TLS_KEY]")
    add(
        "--output-ttl",
        type=float,
        default=float(_env("OUTPUT_TTL", str(SEVEN_DAYS))),
        help="seconds finished outputs are kept unless X-Fal-Object-Lifecycle-Preference says otherwise "
        "[KONTEXTD_OUTPUT_TTL]",
    )
    add(
        "--poll-cache",
        type=float,
        default=float(_env("POLL_CACHE", "1.0")),
        help="seconds at most that this node answers a request polled again from memory between changes "
        "(every change drops what it affects: this process's at once, other nodes' when PostgreSQL "
        "announces them); 0: read the store on every poll [KONTEXTD_POLL_CACHE]",
    )
    add(
        "--sse-ping-interval",
        type=float,
        default=float(_env("SSE_PING_INTERVAL", "10")),
        help="seconds between ': ping' keep-alives on status streams [KONTEXTD_SSE_PING_INTERVAL]",
    )


def _add_work_flags(add: Callable[..., object]) -> None:
    """Flags of everything that concerns the work (`serve` and `worker` alike): store, storage, backend,
    model, GPUs, fetch allow-list, webhooks, housekeeping."""
    add(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", "kontextd-data")),
        help="SQLite database, stored images, webhook key and TLS files [KONTEXTD_DATA_DIR]",
    )
    add(
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT", "0")) or None,
        help="also serve Prometheus /metrics on 127.0.0.1 at this port, without an API key (the API's "
        "own /metrics takes one when keys are set) [KONTEXTD_METRICS_PORT]",
    )
    add(
        "--public-url",
        default=_env("PUBLIC_URL"),
        help="base of the URLs handed to clients, e.g. https://kontext.example.com (default: the origin "
        "each client called; webhooks and workers use the bound address) [KONTEXTD_PUBLIC_URL]",
    )
    add(
        "--config",
        dest="config_file",
        type=Path,
        default=_env("CONFIG"),
        help="TOML file routing endpoints to backends (local, bfl, fal) and configuring the upstream APIs; "
        "default: [pro]/[max] go to BFL when BFL_API_KEY is set, else everything runs on the local model "
        "[KONTEXTD_CONFIG]",
    )
    add(
        "--backend",
        default=_env("BACKEND", "auto"),
        choices=["auto", "diffusers", "tiny"],
        help="model backend: diffusers = FLUX.1 Kontext [dev] through diffusers (--model, --device); "
        "tiny = the same pipeline with tiny random weights (CPU, offline); auto = diffusers when CUDA and "
        "the model are available, else tiny, saying why [KONTEXTD_BACKEND]",
    )
    add(
        "--model",
        default=_env("MODEL", DEFAULT_MODEL),
        help="weights for --backend diffusers: a Hugging Face hub id (HF_TOKEN for gated repos), a local "
        "pipeline directory (offline), or a .safetensors transformer [KONTEXTD_MODEL]",
    )
    add(
        "--device",
        default=_env("DEVICE", "auto"),
        help="torch device for --backend diffusers: auto or cuda (every GPU, or those --gpus names), "
        "cuda:N, or cpu (--workers pipelines) [KONTEXTD_DEVICE]",
    )
    add(
        "--gpus",
        default=_env("GPUS"),
        help="GPUs for --backend diffusers, one pipeline and one worker each: all, or indices like 0,1 "
        "(default: every GPU, or the one --device cuda:N names) [KONTEXTD_GPUS]",
    )
    add(
        "--offload",
        default=_env("OFFLOAD", "auto"),
        choices=["auto", *OFFLOAD_MODES],
        help="memory mode on the GPU: none = all resident (fastest); model = each component on the GPU "
        "only while used (T5 leaves after encoding); sequential = layer by layer (slow, a few GiB); "
        "auto = none if it fits in free memory, else model [KONTEXTD_OFFLOAD]",
    )
    add(
        "--weights",
        default=_env("WEIGHTS", "bf16"),
        choices=list(WEIGHTS),
        help="storage of the transformer's weights: bf16, or fp8 (half the memory, computed in bf16, "
        "slightly lossy) [KONTEXTD_WEIGHTS]",
    )
    add(
        "--compile",
        default=_env("COMPILE", "auto"),
        choices=list(COMPILE_MODES),
        help="torch.compile the transformer blocks at start-up (warm-up before ready): auto = on with "
        "CUDA, off on the CPU [KONTEXTD_COMPILE]",
    )
    add(
        "--workers",
        type=int,
        default=int(_env("WORKERS", "1")),
        help="in-process workers, each with its own pipeline on the CPU; with CUDA one per GPU instead; "
        "0 serves the API only and leaves the queue to others [KONTEXTD_WORKERS]",
    )
    add(
        "--fetch-allow",
        default=_env("FETCH_ALLOW", ""),
        help="hosts or CIDRs that image and webhook URLs may reach although they are private or loopback, "
        "comma-separated [KONTEXTD_FETCH_ALLOW]",
    )
    add(
        "--lora-dir",
        type=Path,
        default=_env("LORA_DIR"),
        help="a folder of LoRA .safetensors files that requests may name by file name [KONTEXTD_LORA_DIR]",
    )
    add(
        "--lora-max-bytes",
        type=int,
        default=int(_env("LORA_MAX_BYTES", str(DEFAULT_LORA_MAX_BYTES))),
        help="the largest LoRA file fetched from a URL [KONTEXTD_LORA_MAX_BYTES]",
    )
    add(
        "--lora-cache-bytes",
        type=int,
        default=int(_env("LORA_CACHE_BYTES", str(DEFAULT_LORA_CACHE_BYTES))),
        help="fetched LoRA files kept in <data dir>/loras; the least recently used go beyond this "
        "[KONTEXTD_LORA_CACHE_BYTES]",
    )
    add(
        "--sweep-interval",
        type=float,
        default=float(_env("SWEEP_INTERVAL", "30")),
        help="seconds between sweeps for expired outputs and missed start deadlines "
        "[KONTEXTD_SWEEP_INTERVAL]",
    )
    add(
        "--lease-seconds",
        type=float,
        default=float(_env("LEASE_SECONDS", "60")),
        help="a running request's lease: its worker renews it every third of this; one not renewed for "
        "this long (a hung worker) is run again, counted as its own failure [KONTEXTD_LEASE_SECONDS]",
    )
    add(
        "--record-retention",
        type=float,
        default=float(_env("RECORD_RETENTION", str(SEVEN_DAYS))),
        help="seconds a finished request's record (status, error; its logs and bodies go with its outputs) "
        "is kept after its outputs expire; then it is unknown (404) [KONTEXTD_RECORD_RETENTION]",
    )
    add(
        "--webhook-backoff",
        default=_env("WEBHOOK_BACKOFF", ",".join(f"{d:g}" for d in WEBHOOK_BACKOFF)),
        help="seconds between webhook tries, comma-separated; tries = gaps + 1 [KONTEXTD_WEBHOOK_BACKOFF]",
    )
    add(
        "--webhook-concurrency",
        type=int,
        default=int(_env("WEBHOOK_CONCURRENCY", "4")),
        help="webhook tries in flight at once to one receiver (scheme, host and port) "
        "[KONTEXTD_WEBHOOK_CONCURRENCY]",
    )
    add(
        "--tiny-step-seconds",
        type=float,
        default=float(_env("TINY_STEP_SECONDS", "0")),
        help="pace the tiny model to at least this many seconds per step, like a GPU would "
        "(demos and tests of progress and cancel) [KONTEXTD_TINY_STEP_SECONDS]",
    )
    add(
        "--no-safety-checker",
        action="store_true",
        default=_env_flag("NO_SAFETY_CHECKER"),
        help="return the local model's images unchecked (logged as a warning: the FLUX.1 [dev] licence "
        "requires filters or manual review of outputs); also [safety] enabled = false in --config "
        "[KONTEXTD_NO_SAFETY_CHECKER]",
    )
    add(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="[KONTEXTD_LOG_LEVEL]",
    )
    add(
        "--store",
        default=_env("STORE"),
        help="job store: sqlite:///PATH (default: jobs.sqlite3 in --data-dir; one process) or "
        "postgresql://user:password@host/db (shared by any number of API nodes and workers) [KONTEXTD_STORE]",
    )
    add(
        "--storage",
        default=_env("STORAGE"),
        help="image storage: default files in --data-dir, or s3://bucket[/prefix] with the standard AWS "
        "configuration (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, AWS_REGION); "
        "a missing bucket is created when permitted [KONTEXTD_STORAGE]",
    )
    add(
        "--file-urls",
        default=_env("FILE_URLS", "proxy"),
        help="how clients reach stored images: proxy (streamed by kontextd under /files/; works with a "
        "private bucket), presigned (S3 URLs signed per response), or a CDN / public bucket base URL "
        "[KONTEXTD_FILE_URLS]",
    )
    add(
        "--presign-endpoint",
        default=_env("PRESIGN_ENDPOINT"),
        help="with --file-urls presigned: the S3 endpoint clients reach, when it is not the one this process "
        "uses (AWS_ENDPOINT_URL), e.g. a public host for a bucket reached on a private network; presigned "
        "URLs are signed for it [KONTEXTD_PRESIGN_ENDPOINT]",
    )
    add(
        "--webhook-key-file",
        type=Path,
        default=_env("WEBHOOK_KEY_FILE"),
        help="Ed25519 PEM key that signs webhooks (created if missing); default: the data dir's with "
        "SQLite, the database's with PostgreSQL, so every node publishes one JWKS "
        "[KONTEXTD_WEBHOOK_KEY_FILE]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kontextd",
        description="Self-hosted FLUX.1 Kontext server speaking the fal.ai queue API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API with in-process workers",
        description="Run the API server with in-process workers (--workers 0: the API alone). Every flag "
        "has a KONTEXTD_* variable (shown in brackets); flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_http_flags(serve.add_argument)
    _add_work_flags(serve.add_argument)
    worker = commands.add_parser(
        "worker",
        help="run workers only (no public HTTP), on a shared store",
        description="Run workers, the webhook dispatcher and the sweeper without the HTTP API, on a store "
        "shared with `kontextd serve` nodes (--store postgresql://...). Every flag has a KONTEXTD_* "
        "variable (shown in brackets); flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_work_flags(worker.add_argument)
    worker.add_argument(
        "--health-port",
        type=int,
        default=int(_env("HEALTH_PORT", "0")) or None,
        help="answer GET /health (loading, ready or failed, as the API does) on 127.0.0.1 at this port "
        "[KONTEXTD_HEALTH_PORT]",
    )
    client.add_commands(commands)  # generate, status, result, cancel: a client of a running server
    return parser


def parse(argv: Sequence[str]) -> tuple[str, Settings]:
    """The command (serve or worker) and its settings; flags a command lacks keep their defaults."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        for name in ("api_keys", "admin_keys"):
            keys = args[name] or (_env(name.upper()) or "").split(",")
            args[name] = tuple(key.strip() for key in keys if key.strip())
    args["safety_checker"] = not args.pop("no_safety_checker")
    args["webhook_backoff"] = tuple(
        float(part) for part in args["webhook_backoff"].split(",") if part.strip()
    )
    return command, Settings(**args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in client.COMMANDS:
        sys.exit(client.main(_parser().parse_args(argv)))
    command, settings = parse(argv)
    try:
        settings.check()
    except ValueError as error:
        sys.exit(f"kontextd: {error}")
    # Heavy imports (torch) only once the flags are known good.
    from kontextd.server import run_worker, serve

    (serve if command == "serve" else run_worker)(settings)
