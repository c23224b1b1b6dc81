"""The FastAPI app: the OpenAI and SGLang routers, ``/health`` and ``/metrics``, and one ASGI
middleware for what every route shares (API-key auth, the request id header, HTTP metrics)."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loopserve.core.server.errors import APIError
from loopserve.core.server.frontend import Frontend

OPEN_PATHS = ("/health",)  # reachable without the API key (load balancers' probes)
HEALTH_TIMEOUT_S = 5.0


class HTTPMetrics:
    """The frontend's own Prometheus metrics (the scheduler's come over ZMQ)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loopserve_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("loopserve_http_request_duration_seconds",
                                 "Time to the end of the HTTP response (streams included)", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")


class CommonMiddleware:
    """Pure ASGI (no response buffering, so streams and disconnects pass straight through)."""

    def __init__(self, app: Any, api_key: str | None, metrics: HTTPMetrics, routes: set[str]) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id")
        status = [500]

        async def send_wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                hs = list(message.get("headers") or [])
                if rid is not None and not any(k.lower() == b"x-request-id" for k, _ in hs):
                    hs.append((b"x-request-id", rid))
                message = {**message, "headers": hs}
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorized(headers):
                err = APIError(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                               code="invalid_api_key")
                await err.response()(scope, receive, send_wrapped)
                return
            await self.app(scope, receive, send_wrapped)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def make_app(frontend: Frontend, api_key: str | None = None) -> FastAPI:
    from loopserve.core.server import openai_api, sglang_api

    app = FastAPI(title="loopserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.frontend = frontend
    metrics = HTTPMetrics()
    app.include_router(openai_api.router)
    app.include_router(sglang_api.router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    @app.get("/health")
    async def health() -> Response:
        client = frontend.client
        if client.dead:
            return Response(status_code=503)  # at once: the process is gone
        reply = await client.ask("health", HEALTH_TIMEOUT_S)
        return Response(status_code=200 if reply is not None and reply.ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        reply = await frontend.client.ask("metrics", HEALTH_TIMEOUT_S)
        scheduler_text = reply.text if reply is not None else "# the scheduler process did not answer\n"
        return PlainTextResponse(scheduler_text + metrics.text(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(CommonMiddleware, api_key=api_key, metrics=metrics, routes=routes)
    return app
