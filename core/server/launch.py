"""``loopserve serve [overrides]``: start the scheduler process, then the HTTP frontend in this
process, and stop both in order.

Exit codes: 0 after SIGTERM/SIGINT (in-flight requests get ``server.shutdown_timeout_s`` to
finish, the rest are aborted, the scheduler process is stopped and joined); 1 if the scheduler
process died (``/health`` answers 503 for a few seconds first, so probes and routers see it); 2
for a bad config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

log = logging.getLogger("loopserve.server")

START_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes
DEATH_EXIT_DELAY_S = 3.0


def _make_server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after a graceful shutdown, which would end the
        process with the signal's status; a signal here means "shut down cleanly, exit 0"."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                log.info("received %s: finishing in-flight requests, then stopping",
                         signal.Signals(sig).name)
                self.should_exit = True

    return Server(config)


def resolve_api_key(config: Any) -> str | None:
    return config.server.api_key or os.environ.get("LOOPSERVE_API_KEY") or None


async def _serve(overrides: list[str], config: Any) -> int:
    import uvicorn

    from loopserve.core.server.heap import freeze_startup_heap
    from loopserve.core.server.app import make_app
    from loopserve.core.server.client import SchedulerClient
    from loopserve.core.server.frontend import Frontend

    sc = config.server
    client = SchedulerClient(overrides)
    exit_code = 0
    try:
        log.info("starting the scheduler process")
        info = await client.start(START_TIMEOUT_S)
        log.info("scheduler process pid %d ready: loop=%s policy=%s worker=%s model=%s context=%d kv_tokens=%d",
                 info.pid, info.loop, info.policy, info.worker, info.model_path, info.context_len, info.kv_slots)
        frontend = Frontend(client, config)
        app = make_app(frontend, resolve_api_key(config))
        server = _make_server(uvicorn.Config(
            app, host=str(sc.host), port=int(sc.port), log_level="info", access_log=False,
            timeout_graceful_shutdown=float(sc.shutdown_timeout_s), lifespan="off"))

        def on_death() -> None:
            nonlocal exit_code
            exit_code = 1
            loop = asyncio.get_running_loop()
            loop.call_later(DEATH_EXIT_DELAY_S, lambda: setattr(server, "should_exit", True))

        client.on_death(on_death)
        frontend.gc_frozen_objects = freeze_startup_heap()
        log.info("serving %s on http://%s:%d (OpenAI API under /v1, SGLang API, /health, /metrics)",
                 frontend.served_model_name, sc.host, int(sc.port))
        await server.serve()
        if not server.started and exit_code == 0:
            exit_code = 1  # could not bind (uvicorn logged why)
    finally:
        code = await client.close(float(sc.shutdown_timeout_s) + 10.0)
        log.info("scheduler process exited with code %s", code)
    return exit_code


def serve(args: list[str]) -> int:
    from loopserve.core.config import compose_config
    from loopserve.core.loop.build import disabled_plugins
    from loopserve.core.plugin_manager import make_plugin_manager

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Compose here too: a bad override fails before any process starts, and server.* is read here.
    config = compose_config(args, make_plugin_manager(disable=disabled_plugins(args)))
    if int(config.parallel.node_rank) > 0:  # another node of a pipeline: its stages only
        from loopserve.core.pp.node import serve_stages

        return serve_stages(config)
    sc = config.server
    if not 0 <= int(sc.port) <= 65535:
        raise ValueError(f"server.port must be in 0..65535; got {sc.port}")
    if sc.max_queued_requests is not None and int(sc.max_queued_requests) < 1:
        raise ValueError(f"server.max_queued_requests must be >= 1 or null; got {sc.max_queued_requests}")
    if float(sc.shutdown_timeout_s) < 0:
        raise ValueError(f"server.shutdown_timeout_s must be >= 0; got {sc.shutdown_timeout_s}")
    try:
        import uvloop  # the frontend's event loop: 11-20% less frontend CPU with httptools
    except ImportError:  # not on this platform: asyncio's own loop
        return asyncio.run(_serve(args, config))
    return uvloop.run(_serve(args, config))
