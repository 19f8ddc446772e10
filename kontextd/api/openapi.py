"""The OpenAPI document, as FastAPI builds it plus the fix-ups that make it describe the wire exactly."""

from typing import Any

from fastapi import FastAPI


def install_openapi(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _parameters_never_null(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _parameters_never_null(document: dict[str, Any]) -> dict[str, Any]:
    """An optional header or query parameter is typed `T | None` in Python, which FastAPI publishes as
    `anyOf: [T, null]`. On the wire a parameter is absent or a string, never JSON null: publish `T` alone,
    so clients and contract tests do not send the text "null"."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
                if "anyOf" in schema and len(options) == 1:
                    rest = {key: value for key, value in schema.items() if key != "anyOf"}
                    parameter["schema"] = {**options[0], **rest}
    return document
