"""LeanRoute against FastAPI's own resolution: the same endpoint behind both answers the same, byte for byte,
for absent, valid, invalid and repeated values and for missing or wrong keys; and a signature it cannot
resolve is refused when the route is made, not discovered on a request."""

from types import SimpleNamespace
from typing import Annotated, Literal

import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from kontextd.api.auth import Authenticator
from kontextd.api.deps import Owner, ServicesDep
from kontextd.api.errors import install_error_handlers
from kontextd.api.lean_route import LeanRoute

Flag = Annotated[Literal["1", "0", "true", "false"] | None, Query(description="a flag")]


async def endpoint(
    request: Request, group: str, item: str, services: ServicesDep, owner: Owner, logs: Flag = None
) -> JSONResponse:
    return JSONResponse(
        {"group": group, "item": item, "owner": owner, "logs": logs, "path": request.url.path},
        headers={"x-keys": str(len(services.authenticator._keys))},
    )


def app_with(route_class: type) -> FastAPI:
    app = FastAPI()
    app.state.services = SimpleNamespace(authenticator=Authenticator(("right-key",)))
    install_error_handlers(app)
    router = APIRouter(route_class=route_class)
    router.add_api_route("/{group}/things/{item}", endpoint, methods=["GET"])
    app.include_router(router)
    return app


CASES = [
    ("/g/things/i", "Key right-key"),
    ("/g/things/i?logs=1", "Key right-key"),
    ("/g/things/i?logs=0", "Bearer right-key"),
    ("/g/things/i?logs=", "Key right-key"),  # empty: not one of the values
    ("/g/things/i?logs=2", "Key right-key"),
    ("/g/things/i?logs=1&logs=bogus", "Key right-key"),  # the last value counts
    ("/g/things/i?logs=bogus&logs=true", "Key right-key"),
    ("/g/things/i?other=1", "Key right-key"),
    ("/g/things/i?logs=%00", "Key right-key"),
    ("/g/things/%C3%A9t%C3%A9", "Key right-key"),
    ("/g/things/i", None),
    ("/g/things/i", "Key wrong-key"),
    ("/g/things/i", "Basic right-key"),
    ("/g/things/i?logs=bogus", None),  # which error wins when both are wrong
]


@pytest.mark.parametrize(("path", "authorization"), CASES)
def test_lean_route_answers_exactly_as_fastapi_does(path: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    lean = TestClient(app_with(LeanRoute)).get(path, headers=headers)
    general = TestClient(app_with(APIRoute)).get(path, headers=headers)
    assert (lean.status_code, lean.content) == (general.status_code, general.content)
    assert lean.headers.get("www-authenticate") == general.headers.get("www-authenticate")


def test_lean_route_documents_what_fastapi_documents() -> None:
    lean = app_with(LeanRoute).openapi()["paths"]
    general = app_with(APIRoute).openapi()["paths"]
    assert lean == general
    parameters = {p["name"] for p in lean["/{group}/things/{item}"]["get"]["parameters"]}
    assert parameters == {"group", "item", "logs"}


async def with_header(item: str, x_thing: Annotated[str | None, Header()] = None) -> JSONResponse:
    return JSONResponse({})


async def with_required_query(item: str, page: int) -> JSONResponse:
    return JSONResponse({})


async def with_int_path(item: int) -> JSONResponse:
    return JSONResponse({})


def not_async(item: str) -> JSONResponse:
    return JSONResponse({})


def unknown_dependency() -> str:
    return "x"


async def with_unknown_dependency(
    item: str, value: Annotated[str, Depends(unknown_dependency)]
) -> JSONResponse:
    return JSONResponse({})


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (with_header, "header"),
        (with_required_query, "must have a default"),
        (with_int_path, "must be a str"),
        (not_async, "must be async"),
        (with_unknown_dependency, "cannot resolve"),
    ],
)
def test_a_signature_it_cannot_resolve_is_refused_when_the_route_is_made(
    handler: object, reason: str
) -> None:
    router = APIRouter(route_class=LeanRoute)
    with pytest.raises(TypeError, match=reason):
        router.add_api_route("/things/{item}", handler, methods=["GET"])  # type: ignore[arg-type]
