"""The client subcommands: their flags (added to `kontextd`'s parser) and what each one does."""

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

COMMANDS = ("generate", "status", "result", "cancel")
DEFAULT_SERVER = "http://127.0.0.1:8000"
TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
EDIT = "fal-ai/flux-pro/kontext"
MULTI_EDIT = "fal-ai/flux-pro/kontext/multi"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg"}


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("KONTEXTD_URL", DEFAULT_SERVER),
        help="the kontextd server [KONTEXTD_URL]",
    )
    parser.add_argument("--key", default=os.environ.get("FAL_KEY"), help="API key [FAL_KEY]")


def add_commands(commands: Any) -> None:
    """`generate`, `status`, `result` and `cancel` on `kontextd`'s subparsers."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    generate = commands.add_parser(
        "generate",
        help="generate or edit images on a kontextd server and save them",
        description="Submit a request, show its progress on stderr, save the images and print their paths "
        "on stdout. Ctrl-C cancels the request on the server.",
        formatter_class=defaults,
    )
    generate.add_argument("prompt")
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="an image to edit: a URL, or a local file (uploaded); repeatable (multi-reference)",
    )
    generate.add_argument(
        "--endpoint",
        metavar="APP_ID",
        help=f"the app id (default: {TEXT_TO_IMAGE}; with one --image {EDIT}; with several {MULTI_EDIT})",
    )
    generate.add_argument("--num-images", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--aspect-ratio", metavar="R", help="e.g. 1:1, 16:9, 9:16")
    generate.add_argument("--format", choices=["jpeg", "png"], dest="output_format")
    generate.add_argument("--steps", type=int, help="denoising steps ([dev] and LoRA endpoints only)")
    generate.add_argument("--output", type=Path, default=Path("."), help="folder the images are saved in")
    _connection_flags(generate)
    for name, text in (
        ("status", "print a request's status"),
        ("result", "save a finished request's images and print their paths"),
        ("cancel", "cancel a request"),
    ):
        command = commands.add_parser(name, help=text, description=text, formatter_class=defaults)
        command.add_argument("request_id")
        command.add_argument(
            "--endpoint",
            metavar="APP_ID",
            help="the request's app id or its owner/alias prefix (default: try fal-ai/flux-pro, "
            "fal-ai/flux-kontext, fal-ai/flux-kontext-lora)",
        )
        if name == "result":
            command.add_argument("--output", type=Path, default=Path("."), help="folder for the images")
        if name in ("status", "result"):
            command.add_argument("--json", action="store_true", help="print the server's JSON body")
        _connection_flags(command)


def main(args: argparse.Namespace) -> int:
    """Run a client command; errors are printed as `kontextd: ...` lines, never as a traceback."""
    from kontextd.client.api import ClientError, QueueClient

    client = QueueClient(args.server, args.key)
    try:
        if args.command == "generate":
            return _generate(client, args)
        request_id = _request_id(args.request_id)
        prefix = queue_prefix(args.endpoint) if args.endpoint else None
        return {"status": _status, "result": _result, "cancel": _cancel}[args.command](
            client, request_id, prefix, args
        )
    except ClientError as error:
        for line in error.message.splitlines() or [""]:
            print(f"kontextd: {line}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def queue_prefix(app_id: str) -> str:
    return "/".join(app_id.strip("/").split("/")[:2])


def _request_id(text: str) -> str:
    """The id in canonical form: it names files and URL paths, so nothing else gets through."""
    from kontextd.client.api import ClientError

    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ClientError(f"not a request id: {text!r}", 2) from None


def _arguments(args: argparse.Namespace, images: list[str]) -> tuple[str, dict[str, Any]]:
    from kontextd.client.api import ClientError

    endpoint = (args.endpoint or "").strip("/") or (
        TEXT_TO_IMAGE if not images else EDIT if len(images) == 1 else MULTI_EDIT
    )
    body: dict[str, Any] = {"prompt": args.prompt}
    if endpoint.endswith("/multi"):
        body["image_urls"] = images
    elif len(images) > 1:
        raise ClientError(f"{endpoint} takes one --image; several go to {MULTI_EDIT}", 2)
    elif images:
        body["image_url"] = images[0]
    # The open-weights endpoints ([dev], LoRA) shape the output with resolution_mode, not aspect_ratio.
    open_weights = endpoint.startswith("fal-ai/flux-kontext")
    ratio_field = "resolution_mode" if open_weights and images else "aspect_ratio"
    for field, value in (
        ("num_images", args.num_images),
        ("seed", args.seed),
        (ratio_field, args.aspect_ratio),
        ("output_format", args.output_format),
        ("num_inference_steps", args.steps),
    ):
        if value is not None:
            body[field] = value
    return endpoint, body


def _generate(client: Any, args: argparse.Namespace) -> int:
    from kontextd.client.api import ClientError
    from kontextd.client.progress import Progress

    progress = Progress()
    images = [image if _is_url(image) else client.upload(Path(image)) for image in args.image]
    endpoint, body = _arguments(args, images)
    envelope = client.submit(endpoint, body)
    request_id = _request_id(str(envelope.get("request_id")))
    progress.line(f"submitted {request_id}")
    try:
        final: dict[str, Any] = envelope
        for status in client.statuses(envelope["status_url"]):
            progress.status(status)
            final = status
        response = client.request("GET", envelope["response_url"])
    except KeyboardInterrupt:
        progress.end()
        try:
            client.request("PUT", envelope["cancel_url"])
        except ClientError as error:
            progress.line(f"kontextd: could not cancel {request_id}: {error.message}")
            return 130
        progress.line(f"cancelled {request_id}")
        return 130
    progress.end()
    if final.get("error") or response.status_code != 200:
        raise ClientError(_failure(final, response))
    return _save(client, request_id, response.json(), args.output, progress)


def _failure(status: dict[str, Any], response: Any) -> str:
    from kontextd.client.api import describe_error

    kind = status.get("error_type")
    reason = describe_error(response) if response.status_code != 200 else str(status.get("error"))
    return f"request failed ({kind}):\n{reason}" if kind else f"request failed:\n{reason}"


def _save(client: Any, request_id: str, output: dict[str, Any], folder: Path, progress: Any) -> int:
    from kontextd.client.api import ClientError

    images = output.get("images") or []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ClientError(f"cannot create {folder}: {error.strerror}", 2) from None
    paths = []
    for index, image in enumerate(images):
        progress.downloading(index + 1, len(images))
        data = client.download(str(image["url"]))
        # Named by the validated request id and our own extension table, never by text from the server.
        extension = _EXTENSIONS.get(str(image.get("content_type")), "bin")
        path = folder / f"{request_id}-{index}.{extension}"
        try:
            path.write_bytes(data)
        except OSError as error:
            raise ClientError(f"cannot write {path}: {error.strerror}") from None
        paths.append(path)
    progress.end()
    for path in paths:
        if not progress.tty:
            progress.line(f"saved {path}")
        print(path, flush=True)
    return 0


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", "data:"))


def _status(client: Any, request_id: str, prefix: str | None, args: argparse.Namespace) -> int:
    from kontextd.client.api import ClientError, describe_error
    from kontextd.client.progress import latest_step

    _, response = client.find(request_id, prefix)
    if response.status_code not in (200, 202):
        raise ClientError(describe_error(response))
    status = response.json()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    state = status.get("status")
    line = str(state)
    if state == "IN_QUEUE":
        line += f" position {status.get('queue_position')}"
    elif state == "IN_PROGRESS" and (step := latest_step(status)):
        line += f" step {step[0]}/{step[1]}"
    elif status.get("error"):
        line += f" {status.get('error_type') or 'error'}: {status['error']}"
    print(line)
    return 0


def _result(client: Any, request_id: str, prefix: str | None, args: argparse.Namespace) -> int:
    from kontextd.client.api import ClientError
    from kontextd.client.progress import Progress

    found, status = client.find(request_id, prefix)
    response = client.request("GET", f"/{found}/requests/{request_id}")
    if response.status_code != 200:
        raise ClientError(_failure(status.json() if status.status_code in (200, 202) else {}, response))
    if args.json:
        print(json.dumps(response.json(), indent=2))
        return 0
    return _save(client, request_id, response.json(), args.output, Progress())


def _cancel(client: Any, request_id: str, prefix: str | None, args: argparse.Namespace) -> int:
    from kontextd.client.api import ClientError, describe_error

    found, _ = client.find(request_id, prefix)
    response = client.request("PUT", f"/{found}/requests/{request_id}/cancel")
    if response.status_code == 202:
        print(f"cancellation requested {request_id}", file=sys.stderr)
        return 0
    raise ClientError(f"{request_id}: {describe_error(response)}")
