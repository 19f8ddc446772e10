"""Which backend serves each endpoint: the local model, or an upstream API (Black Forest Labs, fal).

Read from an optional TOML file (`--config`) and the environment. With no file, the defaults follow what is
configured: a BFL key sends the [pro]/[max] endpoints to BFL; otherwise an explicit KONTEXTD_FAL_KEY sends
them to fal; otherwise the local model serves every endpoint (and the response header says which model).
Plain FAL_KEY never changes the defaults: it is the *client's* variable (`export FAL_KEY=local` is what
this server prints), so it is read as the upstream fal key only when routing to fal is asked for.
"""

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kontextd.catalogue.endpoints import BY_APP_ID, ENDPOINTS

LOCAL = "local"
BFL = "bfl"
FAL = "fal"
BACKENDS = (LOCAL, BFL, FAL)

BFL_MODELS = {"pro": "flux-kontext-pro", "max": "flux-kontext-max"}


class ConfigError(ValueError):
    """The routing configuration cannot work; the message names the setting and the reason."""


@dataclass(frozen=True)
class Secret:
    """An API key. Its repr names where it came from, never the value, so it cannot leak into logs."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<key from {self.source}>"


@dataclass(frozen=True)
class UpstreamConfig:
    kind: str  # "bfl" or "fal"
    base_url: str
    key: Secret
    max_active: int  # upstream tasks in flight at once for this key
    max_active_per_model: Mapping[str, int]  # tighter limits for some models (BFL allows ~6 for [max])
    request_timeout: float  # one HTTP exchange with the upstream
    task_timeout: float  # one upstream task, submit to downloaded image
    workers: int  # requests handled at once (each may hold several tasks)


@dataclass(frozen=True)
class Route:
    app_id: str
    backend: str  # "local", "bfl" or "fal"
    model: str  # what serves it: the local model, a BFL model name, or a fal app id


@dataclass(frozen=True)
class Routing:
    routes: Mapping[str, Route]
    upstreams: Mapping[str, UpstreamConfig]

    def route(self, app_id: str) -> Route:
        return self.routes[app_id]

    def lanes(self) -> list[str]:
        """The backends some endpoint is routed to, each with its own queue lane and workers."""
        return sorted({route.backend for route in self.routes.values()})


_UPSTREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    BFL: {
        "base_url": "https://api.bfl.ai",
        "max_active": 24,
        "max_active_per_model": {"flux-kontext-max": 6},
        "request_timeout": 30.0,
        "task_timeout": 600.0,
    },
    FAL: {
        "base_url": "https://queue.fal.run",
        "max_active": 16,
        "max_active_per_model": {},
        "request_timeout": 30.0,
        "task_timeout": 900.0,
    },
}

# Where each upstream's key may come from, in order of precedence (the config file's key_file comes last).
_KEY_VARIABLES = {
    BFL: ("BFL_API_KEY", "KONTEXTD_BFL_API_KEY"),
    FAL: ("KONTEXTD_FAL_KEY", "FAL_KEY"),
}
_KEY_FILE_VARIABLES = {BFL: "BFL_API_KEY_FILE", FAL: "KONTEXTD_FAL_KEY_FILE"}
_BASE_URL_VARIABLES = {BFL: "KONTEXTD_BFL_BASE_URL", FAL: "KONTEXTD_FAL_BASE_URL"}


def load_routing(config_file: Path | None, local_model: str, env: Mapping[str, str] | None = None) -> Routing:
    env = os.environ if env is None else env
    config = read_toml(config_file) if config_file is not None else {}
    unknown = set(config) - {"routes", BFL, FAL, "safety"}  # [safety]: kontextd.safety.config
    if unknown:
        raise ConfigError(
            f"{config_file}: unknown section(s) {sorted(unknown)}; expected routes, bfl, fal, safety"
        )

    explicit = _explicit_routes(config.get("routes", {}), config_file)
    wanted = {route.backend for route in explicit.values()} | ({BFL, FAL} & set(config))
    upstreams: dict[str, UpstreamConfig] = {}
    for kind in (BFL, FAL):
        # FAL_KEY alone must not send traffic to fal: only an explicit server-side key or an explicit ask.
        variables = _KEY_VARIABLES[kind] if kind in wanted else _KEY_VARIABLES[kind][:1]
        key = _read_key(kind, config.get(kind, {}), variables, env, config_file)
        if key is not None:
            upstreams[kind] = _upstream(kind, config.get(kind, {}), key, env, config_file)
        elif kind in {route.backend for route in explicit.values()}:
            names = " or ".join(_KEY_VARIABLES[kind] + (_KEY_FILE_VARIABLES[kind],))
            raise ConfigError(
                f"{config_file}: routes send endpoints to {kind}, but no {kind} key is configured "
                f"(set {names}, or key_file in the [{kind}] section)"
            )

    default_upstream = BFL if BFL in upstreams else FAL if FAL in upstreams else None
    routes = {}
    for endpoint in ENDPOINTS:
        route = explicit.get(endpoint.app_id)
        if route is None:
            backend = default_upstream if endpoint.family in BFL_MODELS and default_upstream else LOCAL
            route = Route(endpoint.app_id, backend, "")
        routes[endpoint.app_id] = Route(
            route.app_id, route.backend, route.model or _default_model(route, local_model)
        )
    return Routing(routes, upstreams)


def _default_model(route: Route, local_model: str) -> str:
    if route.backend == BFL:
        family = BY_APP_ID[route.app_id].family
        if family not in BFL_MODELS:
            raise ConfigError(
                f"routes: {route.app_id} goes to bfl, which has no open [dev] model; "
                'name one with model = "…" or route it to local'
            )
        return BFL_MODELS[family]
    if route.backend == FAL:
        return route.app_id  # the same app on fal's hosted queue
    return local_model


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML: {error}") from None


def _explicit_routes(table: Any, config_file: Path | None) -> dict[str, Route]:
    if not isinstance(table, dict):
        raise ConfigError(f"{config_file}: [routes] must be a table of app id = backend")
    routes = {}
    for app_id, value in table.items():
        where = f'{config_file}: routes."{app_id}"'
        if app_id not in BY_APP_ID:
            raise ConfigError(f"{where}: unknown app id; known: {', '.join(BY_APP_ID)}")
        if isinstance(value, str):
            value = {"backend": value}
        if not isinstance(value, dict) or set(value) - {"backend", "model"}:
            raise ConfigError(f'{where}: expected "backend" or {{ backend = "…", model = "…" }}')
        backend = value.get("backend")
        if backend not in BACKENDS:
            raise ConfigError(f"{where}: backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        model = value.get("model", "")
        if not isinstance(model, str):
            raise ConfigError(f"{where}: model must be a string")
        routes[app_id] = Route(app_id, backend, model)
    return routes


def _read_key(
    kind: str,
    section: dict[str, Any],
    variables: tuple[str, ...],
    env: Mapping[str, str],
    config_file: Path | None,
) -> Secret | None:
    for variable in variables:
        if env.get(variable, "").strip():
            return Secret(env[variable].strip(), variable)
    key_file = env.get(_KEY_FILE_VARIABLES[kind]) or section.get("key_file")
    if not key_file:
        if "key" in section:
            raise ConfigError(
                f"{config_file}: [{kind}] key: keys are not read from the config file; "
                f'use key_file = "/path" or {variables[0]}'
            )
        return None
    path = Path(key_file).expanduser()
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"{kind} key_file {path}: cannot read it ({error.strerror})") from None
    if not value:
        raise ConfigError(f"{kind} key_file {path}: the file is empty")
    return Secret(value, str(path))


def _upstream(
    kind: str, section: dict[str, Any], key: Secret, env: Mapping[str, str], config_file: Path | None
) -> UpstreamConfig:
    known = set(_UPSTREAM_DEFAULTS[kind]) | {"key_file", "workers"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{config_file}: [{kind}] unknown setting(s) {sorted(unknown)}")
    merged = _UPSTREAM_DEFAULTS[kind] | {name: value for name, value in section.items() if name != "key_file"}
    base_url = str(env.get(_BASE_URL_VARIABLES[kind]) or merged["base_url"]).rstrip("/")
    if not base_url.startswith(("https://", "http://")):
        raise ConfigError(f"[{kind}] base_url {base_url!r}: must be an http(s) URL")
    limits = merged["max_active_per_model"]
    numbers = {
        "max_active": merged["max_active"],
        **{f"max_active_per_model.{m}": n for m, n in limits.items()},
    }
    for name, number in numbers.items():
        if not isinstance(number, int) or number < 1:
            raise ConfigError(f"[{kind}] {name} must be a whole number of at least 1, not {number!r}")
    for name in ("request_timeout", "task_timeout"):
        if not isinstance(merged[name], int | float) or merged[name] <= 0:
            raise ConfigError(f"[{kind}] {name} must be a positive number of seconds")
    workers = merged.get("workers", merged["max_active"])
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"[{kind}] workers must be a whole number of at least 1")
    return UpstreamConfig(
        kind=kind,
        base_url=base_url,
        key=key,
        max_active=merged["max_active"],
        max_active_per_model=dict(limits),
        request_timeout=float(merged["request_timeout"]),
        task_timeout=float(merged["task_timeout"]),
        workers=workers,
    )
