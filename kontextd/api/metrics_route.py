"""GET /metrics: the process's Prometheus metrics (kontextd.metrics) on the API, or on the worker's health
port; and `--metrics-port`, the same on a loopback port of its own.

On the API's port /metrics takes the API key when the server has keys, as every other route but /health
and the JWKS does: that port may face the internet, and traffic and queue figures are the operator's, not
the clients'. Prometheus sends one as `authorization: {type: Bearer, credentials: ...}`. Where scraping
with a key is unwanted, `--metrics-port` serves the metrics without one, bound to 127.0.0.1 only (a local
agent or a sidecar scrapes it).
"""

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CollectorRegistry

from kontextd import metrics
from kontextd.api.deps import Owner
from kontextd.api.responses import UNAUTHORIZED
from kontextd.api.services import Services

METRICS_ROUTE: dict[str, Any] = {
    "tags": ["server"],
    "summary": "Prometheus metrics of this process (text exposition format 0.0.4)",
    "description": "Every name starts with `kontextd_`; the README lists them. Each process counts its own: "
    "scrape every API node and worker. Needs the API key when the server has keys.",
    "response_class": Response,
    "responses": {
        200: {
            "description": "The metrics, in Prometheus' text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **UNAUTHORIZED,
    },
}


def registry_for(services: Services) -> CollectorRegistry:
    """The process's metrics plus this store's queue, per lane of the routing."""
    queue = metrics.QueueCollector(services.store.queue_depths, services.routing.lanes())
    return metrics.scrape_registry(queue)


async def metrics_endpoint(request: Request, _owner: Owner) -> Response:
    # Made in a thread: the queue is a store read, which may go over the network.
    body = await run_in_threadpool(metrics.exposition, request.app.state.metrics)
    return Response(body, media_type=metrics.CONTENT_TYPE)


def install(app: FastAPI, services: Services) -> None:
    app.state.metrics = registry_for(services)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], **METRICS_ROUTE)


def serve_metrics_port(services: Services) -> None:
    """`--metrics-port`: start serving, or exit saying why (the port taken)."""
    port = services.settings.metrics_port
    if not port:
        return
    try:
        metrics.serve_on(port, registry_for(services))
    except OSError as error:
        sys.exit(f"kontextd: --metrics-port {port}: {error}")
