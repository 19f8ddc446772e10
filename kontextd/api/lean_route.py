"""Routes that clients poll, resolved by a plan made once instead of FastAPI's per-request solver.

Status is what a fal client asks most (every half second per request, by default), then the result and
the status stream. FastAPI resolves a route's parameters per request with general code (walking the tree
of dependencies, inspecting each field's type, bookkeeping in the scope); on the status route that was
about 40 % of the CPU of a poll (docs/performance.md). A LeanRoute keeps everything FastAPI derives from
the endpoint's signature (the OpenAPI operation, the security scheme, the response model's docs) and
replaces only the per-request resolution, with a plan made when the route is made, for the few kinds of
parameters these routes have: the Request, `str` path parameters, optional query parameters, and the
services and caller dependencies of kontextd.api.deps. A signature with anything else is refused then,
so a later edit cannot lose a validation silently.
"""

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from kontextd.api.auth import authorization_header
from kontextd.api.deps import owner_of, require_owner, services_of

# The dependencies a lean route may name, each resolved from the request alone.
_RESOLVERS: dict[Callable[..., Any], Callable[[Request], Any]] = {
    services_of: lambda request: request.app.state.services,
    require_owner: lambda request: owner_of(
        request.app.state.services, request.headers.get(authorization_header.model.name)
    ),
}


@dataclass(frozen=True)
class _Query:
    name: str  # the endpoint's parameter
    alias: str  # the query key
    default: Any
    adapter: TypeAdapter[Any]


class LeanRoute(APIRoute):
    """An APIRoute whose endpoint is called with arguments resolved by a plan made at start-up."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        # APIRoute.__init__ asks for the handler once (to wrap it in request_response): the plan is made
        # then, and kept for the app below.
        self._handler: Callable[[Request], Coroutine[Any, Any, Response]] | None = None
        super().__init__(path, endpoint, **options)
        handler = self.get_route_handler()

        # In place of FastAPI's request_response, whose two AsyncExitStacks per request serve dependencies
        # with `yield` (a LeanRoute has none) and whose exception wrapper repeats what the app's
        # ExceptionMiddleware does with the same handlers when an exception reaches it.
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        if self._handler is None:
            self._handler = self._planned_handler()
        return self._handler

    def _planned_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        unsupported = [
            kind
            for kind, fields in (
                ("header", dependant.header_params),
                ("cookie", dependant.cookie_params),
                ("body", dependant.body_params),
            )
            if fields
        ]
        if unsupported or dependant.response_param_name or dependant.background_tasks_param_name:
            kinds = ", ".join(unsupported) or "response or background-task"
            raise TypeError(f"{self.path}: a LeanRoute takes no {kinds} parameters")
        paths = []
        for field in dependant.path_params:
            if field.field_info.annotation is not str:
                raise TypeError(f"{self.path}: path parameter {field.name} must be a str")
            paths.append(field.name)
        queries = []
        for field in dependant.query_params:
            if field.field_info.is_required():
                raise TypeError(f"{self.path}: query parameter {field.name} must have a default")
            # A value given is a string, never None: validate it against the type without the None, so
            # its error names the field alone, as FastAPI's does.
            adapter = TypeAdapter(_without_none(field.field_info.annotation))
            queries.append(_Query(field.name, field.alias, field.field_info.get_default(), adapter))
        resolved = []
        for sub in dependant.dependencies:
            resolver = _RESOLVERS.get(sub.call)  # type: ignore[arg-type]
            if resolver is None or sub.name is None:
                raise TypeError(f"{self.path}: a LeanRoute cannot resolve the dependency {sub.call!r}")
            resolved.append((sub.name, resolver))
        request_name = dependant.request_param_name
        endpoint = self.endpoint
        if not inspect.iscoroutinefunction(endpoint):  # FastAPI would run it in a thread: not lean
            raise TypeError(f"{self.path}: a LeanRoute's endpoint must be async")

        async def handler(request: Request) -> Response:
            # Dependencies first, as FastAPI does: a caller without a key is told so before anything else.
            arguments: dict[str, Any] = {name: resolver(request) for name, resolver in resolved}
            arguments |= {name: request.path_params[name] for name in paths}
            if queries and request.scope["query_string"]:
                arguments |= _query_arguments(queries, request)
            else:
                arguments |= {query.name: query.default for query in queries}
            if request_name is not None:
                arguments[request_name] = request
            return await endpoint(**arguments)

        return handler


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        kept = tuple(member for member in get_args(annotation) if member is not type(None))
        return Union[kept] if len(kept) > 1 else kept[0]  # noqa: UP007 (a tuple of members)
    return annotation


def _query_arguments(queries: list[_Query], request: Request) -> dict[str, Any]:
    """Each query parameter validated as FastAPI would: its default when absent, a 422 naming it when
    its value does not fit its type (the last value counts when a key is repeated, as in FastAPI)."""
    given = request.query_params
    arguments, errors = {}, []
    for query in queries:
        value = given.get(query.alias)
        if value is None:
            arguments[query.name] = query.default
            continue
        try:
            arguments[query.name] = query.adapter.validate_python(value)
        except ValidationError as error:
            errors += [entry | {"loc": ("query", query.alias, *entry["loc"])} for entry in error.errors()]
    if errors:
        raise RequestValidationError(errors)
    return arguments
