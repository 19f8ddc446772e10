"""Routing: which backend serves each endpoint, from the TOML config file and the environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import UPSTREAM_VARIABLES, free_port

from kontextd.routing import ConfigError, Routing, Secret, load_routing

LOCAL_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
PRO_IDS = (
    "fal-ai/flux-pro/kontext/text-to-image",
    "fal-ai/flux-pro/kontext",
    "fal-ai/flux-pro/kontext/multi",
)
MAX_IDS = (
    "fal-ai/flux-pro/kontext/max/text-to-image",
    "fal-ai/flux-pro/kontext/max",
    "fal-ai/flux-pro/kontext/max/multi",
)
DEV_ID = "fal-ai/flux-kontext/dev"
LORA_IDS = (
    "fal-ai/flux-kontext-lora",
    "fal-ai/flux-kontext-lora/text-to-image",
    "fal-ai/flux-kontext-lora/inpaint",
)
ALL_IDS = (*PRO_IDS, *MAX_IDS, DEV_ID, *LORA_IDS)


def routes_of(routing: Routing) -> dict[str, tuple[str, str]]:
    return {app_id: (route.backend, route.model) for app_id, route in routing.routes.items()}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kontextd.toml"
    path.write_text(text)
    return path


def test_with_no_key_every_endpoint_runs_on_the_local_model() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={})
    assert routes_of(routing) == {app_id: ("local", LOCAL_MODEL) for app_id in ALL_IDS}
    assert routing.lanes() == ["local"] and routing.upstreams == {}


def test_a_bfl_key_sends_pro_and_max_to_bfl_and_keeps_dev_local() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={"BFL_API_KEY": " bfl-secret \n"})
    routes = routes_of(routing)
    assert all(routes[app_id] == ("bfl", "flux-kontext-pro") for app_id in PRO_IDS)
    assert all(routes[app_id] == ("bfl", "flux-kontext-max") for app_id in MAX_IDS)
    assert all(routes[app_id] == ("local", LOCAL_MODEL) for app_id in (DEV_ID, *LORA_IDS))  # open weights
    bfl = routing.upstreams["bfl"]
    assert bfl.key.value == "bfl-secret" and bfl.base_url == "https://api.bfl.ai"
    assert (bfl.max_active, dict(bfl.max_active_per_model)) == (24, {"flux-kontext-max": 6})
    assert routing.lanes() == ["bfl", "local"]


def test_plain_fal_key_is_the_clients_variable_and_routes_nothing_upstream() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={"FAL_KEY": "local"})
    assert {backend for backend, _ in routes_of(routing).values()} == {"local"}


def test_an_explicit_server_side_fal_key_sends_pro_and_max_to_fal_under_their_own_app_ids() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={"KONTEXTD_FAL_KEY": "fal-secret"})
    routes = routes_of(routing)
    assert all(routes[app_id] == ("fal", app_id) for app_id in PRO_IDS + MAX_IDS)
    assert routes[DEV_ID] == ("local", LOCAL_MODEL)
    assert routing.upstreams["fal"].base_url == "https://queue.fal.run"


def test_bfl_wins_over_fal_when_both_keys_are_set() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={"KONTEXTD_FAL_KEY": "f", "BFL_API_KEY": "b"})
    assert routes_of(routing)[PRO_IDS[0]] == ("bfl", "flux-kontext-pro")


def test_config_file_routes_settings_and_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "bfl.key"
    key_file.write_text("from-a-file\n")
    config = write(
        tmp_path,
        f"""
[routes]
"fal-ai/flux-pro/kontext" = "local"
"fal-ai/flux-pro/kontext/max" = {{ backend = "fal", model = "fal-ai/flux-pro/kontext/max" }}
"fal-ai/flux-kontext/dev" = {{ backend = "fal" }}

[bfl]
key_file = "{key_file}"
base_url = "http://127.0.0.1:9/"
max_active = 3
max_active_per_model = {{ "flux-kontext-max" = 1 }}
task_timeout = 5

[fal]
workers = 2
""",
    )
    env = {"FAL_KEY": "fal-from-the-environment"}  # read because the file routes to fal
    routing = load_routing(config, LOCAL_MODEL, env=env)
    routes = routes_of(routing)
    assert routes["fal-ai/flux-pro/kontext"] == ("local", LOCAL_MODEL)
    assert routes["fal-ai/flux-pro/kontext/max"] == ("fal", "fal-ai/flux-pro/kontext/max")
    assert routes[DEV_ID] == ("fal", DEV_ID)
    assert routes["fal-ai/flux-pro/kontext/text-to-image"] == ("bfl", "flux-kontext-pro")  # the default
    bfl = routing.upstreams["bfl"]
    assert (bfl.key.value, bfl.key.source) == ("from-a-file", str(key_file))
    assert (bfl.base_url, bfl.max_active, bfl.task_timeout) == ("http://127.0.0.1:9", 3, 5.0)
    assert bfl.workers == 3  # one request per active slot unless set
    fal = routing.upstreams["fal"]
    assert (fal.key.value, fal.key.source, fal.workers) == ("fal-from-the-environment", "FAL_KEY", 2)


def test_environment_overrides_the_file_for_keys_and_base_urls(tmp_path: Path) -> None:
    key_file = tmp_path / "bfl.key"
    key_file.write_text("file-key")
    config = write(tmp_path, f'[bfl]\nkey_file = "{key_file}"\nbase_url = "http://127.0.0.1:9"\n')
    env = {"BFL_API_KEY": "env-key", "KONTEXTD_BFL_BASE_URL": "http://127.0.0.1:10"}
    bfl = load_routing(config, LOCAL_MODEL, env=env).upstreams["bfl"]
    assert (bfl.key.value, bfl.base_url) == ("env-key", "http://127.0.0.1:10")


def test_a_key_never_shows_in_reprs_or_strings() -> None:
    routing = load_routing(None, LOCAL_MODEL, env={"BFL_API_KEY": "sk-very-secret"})
    for text in (
        repr(routing),
        str(routing),
        repr(routing.upstreams["bfl"]),
        str(routing.upstreams["bfl"].key),
    ):
        assert "sk-very-secret" not in text
    assert str(Secret("sk-very-secret", "BFL_API_KEY")) == "<key from BFL_API_KEY>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[routes\n", "not valid TOML"),
        ("[proxy]\n", "unknown section(s) ['proxy']"),
        ('[routes]\n"fal-ai/nope" = "local"\n', 'routes."fal-ai/nope": unknown app id'),
        ('[routes]\n"fal-ai/flux-pro/kontext" = "replicate"\n', "backend must be one of local, bfl, fal"),
        ('[routes]\n"fal-ai/flux-pro/kontext" = { backend = "bfl", gpu = 1 }\n', "expected"),
        ('[routes]\n"fal-ai/flux-pro/kontext" = "bfl"\n', "no bfl key is configured (set BFL_API_KEY"),
        ('[bfl]\nkey = "inline"\n', "keys are not read from the config file"),
        ('[bfl]\nkey_file = "/nonexistent/kontextd-key"\n', "cannot read it"),
    ],
)
def test_bad_config_is_refused_naming_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_routing(write(tmp_path, text), LOCAL_MODEL, env={})
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("max_active = 0", "max_active must be a whole number of at least 1"),
        ('max_active_per_model = { "flux-kontext-max" = -1 }', "max_active_per_model.flux-kontext-max"),
        ("task_timeout = 0", "task_timeout must be a positive number"),
        ('base_url = "ftp://127.0.0.1"', "must be an http(s) URL"),
        ("retries = 3", "unknown setting(s) ['retries']"),
    ],
)
def test_bad_upstream_settings_are_refused(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_routing(write(tmp_path, f"[bfl]\n{section}\n"), LOCAL_MODEL, env={"BFL_API_KEY": "k"})
    assert message in str(raised.value)


def test_dev_cannot_go_to_bfl_without_naming_a_model(tmp_path: Path) -> None:
    config = write(tmp_path, '[routes]\n"fal-ai/flux-kontext/dev" = "bfl"\n')
    with pytest.raises(ConfigError, match=r"no open \[dev\] model"):
        load_routing(config, LOCAL_MODEL, env={"BFL_API_KEY": "k"})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_routing(tmp_path / "absent.toml", LOCAL_MODEL, env={})


def test_the_server_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    config = write(tmp_path, '[routes]\n"fal-ai/flux-pro/kontext/max" = "bfl"\n')
    environment = {name: value for name, value in os.environ.items() if name not in UPSTREAM_VARIABLES}
    finished = subprocess.run(
        [sys.executable, "-m", "kontextd", "serve", "--backend", "tiny", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment | {"KONTEXTD_DATA_DIR": str(tmp_path / "data"), "KONTEXTD_PORT": str(free_port())},
    )
    assert finished.returncode != 0
    assert "no bfl key is configured" in finished.stderr
    assert "Traceback" not in finished.stderr
