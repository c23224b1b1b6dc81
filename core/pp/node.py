"""``loopserve serve`` on a node other than node 0 (``parallel.node_rank > 0``): run this node's
pipeline stages and wait.

The same command runs on every node (``parallel.nnodes``, ``parallel.node_rank``,
``parallel.dist_init_addr`` = node 0's HOST:PORT); node 0 serves HTTP and runs the
scheduler and stage 0, the other nodes only their stages. Each stage is a child process that
connects to node 0's rendezvous, loads its layers and serves micro-batches until node 0 says
stop or goes away. Exit code: 0 when every stage stopped cleanly, 1 otherwise; SIGTERM or
SIGINT stops the stages.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

from loopserve.core.pp.split import placement, split_layers
from loopserve.core.pp.stage import stage_main, stage_tracing_spec

log = logging.getLogger("loopserve.pp")
STARTUP_TIMEOUT_S = 600.0


def serve_stages(config: Any) -> int:
    from loopserve.plugins.loop_pp import pipeline_parts

    place = placement(config.parallel)
    if place.pp_size < 2:
        raise ValueError("parallel.node_rank > 0 needs parallel.pp_size > 1 (this node runs pipeline stages)")
    name = str(config.worker.name)
    if name not in ("model", "sim"):
        raise ValueError(f"pipeline stages run worker=model or worker=sim; got worker={name}")
    num_layers, _, spec = pipeline_parts(name, config)
    pp_layers = config.parallel.get("pp_layers")
    bounds = split_layers(num_layers, place.pp_size, list(pp_layers) if pp_layers else None)
    threads = max(1, (os.cpu_count() or 1) // len(place.local_ranks))
    from loopserve.core.disagg.staged import stage_disagg_spec

    disagg = stage_disagg_spec(config, bounds)
    tracing = stage_tracing_spec(config)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in place.local_ranks:
        proc = ctx.Process(target=stage_main, name=f"loopserve-pp-{rank}", daemon=True, args=(dict(
            spec, disagg=disagg, tracing=tracing, rank=rank, size=place.pp_size, host=place.host, port=place.port,
            layer_range=bounds[rank],
            timeout_s=float(config.parallel.stage_timeout_s), startup_timeout_s=STARTUP_TIMEOUT_S,
            num_threads=threads), os.getpid()))
        proc.start()
        procs.append(proc)
    log.info("node %d: pipeline stages %s (layers %s) joining %s:%d", place.node_rank, place.local_ranks,
             [bounds[r] for r in place.local_ranks], place.host, place.port)
    stop = threading.Event()

    def on_signal(sig: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # A stage that fails ends the pipeline (node 0 sees its sockets close); the others follow.
    while not stop.is_set() and any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        stop.wait(0.2)
    for p in procs:
        p.join(5.0 if not stop.is_set() else 0.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
    codes = [p.exitcode for p in procs]
    log.info("node %d: stages exited with %s", place.node_rank, codes)
    return 0 if stop.is_set() or all(c == 0 for c in codes) else 1
