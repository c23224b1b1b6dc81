"""The bootstrap HTTP server that runs beside a prefill server (``disaggregation.bootstrap_port``).

A decode server knows only the prefill's host and bootstrap port (the router adds them to each
request). It asks ``GET /route`` here for the prefill's transfer endpoint and KV layout, then
talks to that endpoint directly. The prefill's KV manager publishes itself with ``PUT /route``.
``GET /health`` answers 200 once the server runs. Standard library only; one thread.

``GET /route`` answers 503 until an endpoint is registered, so a decode server that races a
starting prefill server retries instead of failing. A prefill server with pipeline stages
registers one endpoint per stage (``pp_rank``, ``pp_size`` and ``layers`` in the body); the
answer is then stage 0's endpoint with every stage's under ``ranks``, and 503 until all are in.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loopserve.core.disagg.base import url_host

__all__ = ["BootstrapServer", "fetch_route", "put_route"]

# A route is a few hundred bytes per pipeline stage.
MAX_ROUTE_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by design
        pass

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._reply(200, {"status": "ok"})
        elif path == "/route":
            route = self.server.layout()
            if route is None:
                self._reply(503, {"error": "the prefill server has not registered its endpoints yet"})
            else:
                self._reply(200, route)
        else:
            self._reply(404, {"error": f"no such path {path}; use /route or /health"})

    def do_PUT(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/route":
            self._reply(404, {"error": "PUT only /route"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_ROUTE_BYTES:
                raise ValueError(f"the body must be 0-{MAX_ROUTE_BYTES} bytes (Content-Length {length})")
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict) or "rank_ip" not in body or "rank_port" not in body:
                raise ValueError("the body must be a JSON object with rank_ip and rank_port")
            rank, size = body.get("pp_rank", 0), body.get("pp_size", 1)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rank, size)) or not 0 <= rank < size:
                raise ValueError("pp_rank must be an integer in [0, pp_size)")
        except ValueError as exc:
            self._reply(400, {"error": str(exc)})
            return
        with self.server.lock:
            if size != self.server.pp_size:
                self.server.routes = {}
                self.server.pp_size = size
            self.server.routes[rank] = body
        self._reply(200, {"status": "ok"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.routes: dict[int, dict[str, Any]] = {}
        self.pp_size = 1

    def layout(self) -> dict[str, Any] | None:
        """Stage 0's route plus every stage's under ``ranks``; None until all registered."""
        with self.lock:
            if len(self.routes) < self.pp_size:
                return None
            ranks = [self.routes[r] for r in range(self.pp_size)]
        return dict(ranks[0], ranks=ranks)


class BootstrapServer:
    """Serves ``/route`` and ``/health`` on ``host:port`` (port 0 picks a free one; ``port``
    is the bound port afterwards). ``close()`` stops it; idempotent."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8998) -> None:
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise ValueError(f"cannot bind the bootstrap server to {host}:{port} ({exc}); set "
                             "disaggregation.bootstrap_port to a free port") from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="loopserve-bootstrap", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def put_route(url: str, route: dict[str, Any], timeout: float = 5.0) -> None:
    req = urllib.request.Request(f"{url}/route", data=json.dumps(route).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


def fetch_route(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """The prefill's registered endpoint, or None while it is not (yet) reachable."""
    try:
        with urllib.request.urlopen(f"http://{url_host(host)}:{port}/route", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
