"""HTTP client for URLs supplied by API callers (input images, webhooks) that refuses to reach internal hosts.

Every hop is resolved and checked here, then connected to by IP so the resolver cannot answer differently a
second time (DNS rebinding). The original host name still goes out in the Host header and as the TLS server
name, so virtual hosting and certificate verification work as usual.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from kontextd import metrics
from kontextd.fetch.addresses import AllowList, IPAddress, refusal_reason

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DISPLAY_URL_MAX = 200


class FetchError(Exception):
    """A fetch failed; ``error_type`` is the fal.ai validation error type to report. ``refused``: the URL
    itself is refused (malformed, a scheme or an address the guard never allows), so trying it again
    cannot succeed; anything else (resolving, connecting, a timeout, an answer) may pass later."""

    def __init__(
        self, error_type: str, message: str, ctx: dict | None = None, *, refused: bool = False
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.ctx = ctx if ctx is not None else {}
        self.refused = refused


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 20 * 1024 * 1024
    timeout_seconds: float = 20.0
    max_redirects: int = 5


@dataclass(frozen=True)
class _Target:
    """A checked hop: requests go to one of ``ips`` while naming ``url``'s host."""

    url: httpx.URL
    ips: tuple[IPAddress, ...]

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    @property
    def authority(self) -> str:
        host = self.url.host
        port = self.url.port or (443 if self.url.scheme == "https" else 80)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def extensions(self) -> dict[str, str]:
        # Without this httpcore would verify the certificate against the IP we put in the URL.
        return {"sni_hostname": self.url.raw_host.decode("ascii")} if self.url.scheme == "https" else {}


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve with the system resolver, off the event loop thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # Link-local results carry a zone ("fe80::1%eth0"); the zone does not change the classification.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def _display(url: str | httpx.URL) -> str:
    """The URL as shown in error messages: no credentials, bounded length."""
    try:
        text = str(httpx.URL(str(url)).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        text = str(url)
    return text if len(text) <= _DISPLAY_URL_MAX else text[: _DISPLAY_URL_MAX - 3] + "..."


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n // mib} MB" if n % mib == 0 else f"{n} bytes"


def _connect_failure(exc: BaseException) -> str:
    """Why a connection failed, worded to precede the host; TLS problems are worth telling apart."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "could not verify the TLS certificate of"
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed with"
        cause = cause.__cause__ or cause.__context__
    return "could not connect to"


def _download_error(message: str, *, refused: bool = False) -> FetchError:
    if refused:
        metrics.fetch_refused()
    return FetchError("file_download_error", message, refused=refused)


def _ssl_context(verify: ssl.SSLContext | bool | str) -> ssl.SSLContext | bool:
    # httpx deprecates CA paths as strings; build the context the way it recommends.
    if isinstance(verify, str):
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return verify


class GuardedFetcher:
    """Fetches untrusted URLs, refusing non-public addresses unless the allow-list names them."""

    def __init__(
        self,
        allow: AllowList,
        limits: FetchLimits = FetchLimits(),
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool | str = True,
    ) -> None:
        self._allow = allow
        self._limits = limits
        self._resolve = resolver or system_resolver
        self._client = httpx.AsyncClient(
            verify=_ssl_context(verify),
            follow_redirects=False,  # each hop must be checked before we connect
            trust_env=False,  # a proxy would do the connecting, and to a name we did not check
            timeout=limits.timeout_seconds,
            # Pooled connections are keyed by IP here; reusing one verified for another host name would
            # bypass certificate checks for this one.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": "kontextd"},
        )

    async def __aenter__(self) -> GuardedFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, url: str) -> bytes:
        """GET ``url`` following up to ``max_redirects`` checked redirects; the body is size-limited."""
        try:
            async with asyncio.timeout(self._limits.timeout_seconds):
                return await self._get(url)
        except TimeoutError:
            raise self._timeout_error(url) from None

    async def check(self, url: str) -> None:
        """Raise the FetchError a fetch of ``url`` would fail with before sending anything (bad URL, refused
        address, unresolvable host), so a URL kept for later (a webhook) can be refused when it is given.
        A fetch re-checks: what the name resolves to may change in between."""
        try:
            async with asyncio.timeout(self._limits.timeout_seconds):
                await self._check(url, url)
        except TimeoutError:
            raise self._timeout_error(url) from None

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> int:
        """POST to ``url`` without following redirects; returns the status code."""
        try:
            async with asyncio.timeout(self._limits.timeout_seconds):
                target = await self._check(url, url)
                response = await self._send("POST", target, url, headers=headers, content=content)
                # The body is of no interest and its size is not ours to trust.
                await response.aclose()
                return response.status_code
        except TimeoutError:
            raise self._timeout_error(url) from None

    async def _get(self, url: str) -> bytes:
        current = url
        for _ in range(self._limits.max_redirects + 1):
            target = await self._check(current, url)
            response = await self._send("GET", target, url)
            try:
                if response.status_code not in _REDIRECT_STATUSES:
                    if not 200 <= response.status_code < 300:
                        raise _download_error(f"Failed to fetch {_display(url)}: HTTP {response.status_code}")
                    return await self._read_body(response, url)
                location = response.headers.get("Location")
                if not location:
                    raise _download_error(
                        f"Failed to fetch {_display(url)}: HTTP {response.status_code} without a Location"
                    )
                try:
                    current = str(target.url.join(location))
                except httpx.InvalidURL:
                    raise _download_error(
                        f"Failed to fetch {_display(url)}: invalid redirect location"
                    ) from None
            finally:
                await response.aclose()
        raise _download_error(
            f"Failed to fetch {_display(url)}: more than {self._limits.max_redirects} redirects"
        )

    async def _check(self, url: str, original: str) -> _Target:
        """Parse, resolve and vet one hop; returns the addresses we may connect to."""
        shown = (
            _display(url) if url == original else f"{_display(url)} (redirected from {_display(original)})"
        )
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise _download_error(f"Invalid URL: {shown}", refused=True) from None
        if parsed.scheme not in ("http", "https"):
            raise _download_error(
                f"Refused to fetch {shown}: only http and https URLs are supported", refused=True
            )
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise _download_error(f"Invalid URL: {shown}", refused=True)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)

        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except (OSError, UnicodeError):  # UnicodeError: the name fails IDNA encoding (label too long)
                addresses = []
            if not addresses:
                raise _download_error(f"Failed to fetch {shown}: could not resolve {host}") from None

        # One bad answer refuses the lot: which address a client ends up on is the attacker's choice.
        for ip in addresses:
            reason = refusal_reason(ip)
            if reason is not None and not self._allow.allows(host, ip):
                article = "an" if reason[0] in "aeiou" else "a"
                raise _download_error(
                    f"Refused to fetch {shown}: {ip} is {article} {reason} address", refused=True
                )
        return _Target(parsed, tuple(addresses))

    async def _send(
        self,
        method: str,
        target: _Target,
        original: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send to the checked addresses in resolver order, moving on only when one refuses the connection."""
        request_headers = httpx.Headers(headers)
        request_headers["Host"] = target.host_header
        failure = "could not connect to"
        try:
            for ip in target.ips:
                request = self._client.build_request(
                    method,
                    target.url.copy_with(host=str(ip)),
                    headers=request_headers,
                    content=content,
                    extensions=target.extensions,
                )
                try:
                    return await self._client.send(request, stream=True)
                except httpx.ConnectError as exc:
                    failure = _connect_failure(exc)
            raise _download_error(f"Failed to fetch {_display(original)}: {failure} {target.authority}")
        except httpx.TimeoutException:
            raise self._timeout_error(original) from None
        except httpx.HTTPError:
            raise _download_error(
                f"Failed to fetch {_display(original)}: connection to {target.authority} failed"
            ) from None

    async def _read_body(self, response: httpx.Response, url: str) -> bytes:
        limit = self._limits.max_bytes
        too_large = _download_error(f"Download from {_display(url)} exceeds {_size_text(limit)}")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        received = 0
        try:
            # Decoded bytes are counted, so a compressed body cannot expand past the limit either.
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > limit:
                    raise too_large
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise self._timeout_error(url) from None
        except httpx.HTTPError:
            raise _download_error(
                f"Failed to fetch {_display(url)}: connection lost while downloading"
            ) from None
        return b"".join(chunks)

    def _timeout_error(self, url: str) -> FetchError:
        return _download_error(
            f"Timed out fetching {_display(url)} after {self._limits.timeout_seconds:g} seconds"
        )
