"""Pipeline ranks 1..N-1: load this stage's layers, then run every micro-batch that comes
down the pipeline until rank 0 says stop (or goes away).

On one host the ``PipelineWorker`` starts these as child processes (multiprocessing spawn);
on other nodes ``loopserve serve parallel.node_rank=K`` runs them. Start-up talks to rank 0
through its TCP store: the KV pool size rank 0 chose (every stage needs the same, since rank
0's scheduler hands out the slots), then ``loaded/<rank>`` or ``error/<rank>`` with the
reason, so a stage that cannot load fails the engine's start with a message instead of a
timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

from loopserve.core.server.heap import freeze_startup_heap

STAGE_SPEC_KEYS = ("rank", "size", "host", "port", "layer_range", "timeout_s", "startup_timeout_s",
                   "worker", "worker_kwargs")


def stage_tracing_spec(config: Any) -> dict[str, Any] | None:
    """``config.tracing`` as plain values for the stage processes, or None when not exported."""
    if str(config.tracing.exporter) == "none":
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config.tracing, resolve=True)  # type: ignore[return-value]


class StageTracer:
    """One span per traced micro-batch on this stage (``loopserve.pp.stage_forward``), a child
    of the rank-0 loop iteration that launched it (``ForwardBatch.trace_context``), with the
    stage's rank and the micro-batch id; exported as ``tracing.*`` says."""

    def __init__(self, tracing: dict[str, Any] | None, rank: int) -> None:
        self.rank = rank
        self.telemetry = self.tracer = None
        if not tracing:
            return
        from omegaconf import OmegaConf
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from loopserve.core.telemetry import Telemetry, make_tracer_provider

        provider = make_tracer_provider(OmegaConf.create(tracing))
        if provider is not None:
            self.telemetry = Telemetry(provider, owns_provider=True)
            self.tracer = provider.get_tracer("loopserve.pp")
            self.propagator = TraceContextTextMapPropagator()

    def span(self, fb: Any, mb_id: int, start_ns: int, end_ns: int) -> None:
        if self.tracer is None or not fb.trace_context:
            return
        from loopserve.plugins.tracing import BATCH_SIZE, FORWARD_MODE, MICRO_BATCH, PP_RANK

        parent = self.propagator.extract({"traceparent": fb.trace_context})
        attrs = {PP_RANK: self.rank, MICRO_BATCH: mb_id, BATCH_SIZE: fb.batch_size,
                 FORWARD_MODE: str(fb.forward_mode.name)}
        self.tracer.start_span("loopserve.pp.stage_forward", context=parent, attributes=attrs,
                               start_time=start_ns).end(end_time=end_ns)

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.shutdown()


def connect_store(host: str, port: int, timeout_s: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))


def _watch_parent(parent_pid: int) -> None:
    """A spawned stage must not outlive its engine, even one killed with SIGKILL."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="loopserve-pp-watchdog", daemon=True).start()


def make_stage_worker(spec: dict[str, Any], kv_num_tokens: int) -> Any:
    """The worker that runs this stage's layers (the model worker, or the sim worker's
    per-stage cost model)."""
    if spec["worker"] == "sim":
        from loopserve.core.pp.sim_stage import SimStageWorker

        kwargs = dict(spec["worker_kwargs"], num_kv_slots=kv_num_tokens)
        return SimStageWorker(layer_range=tuple(spec["layer_range"]), **kwargs)
    from loopserve.core.model.worker import ModelWorker

    return ModelWorker(kv_num_tokens=kv_num_tokens, layer_range=tuple(spec["layer_range"]),
                       **spec["worker_kwargs"])


def stage_main(spec: dict[str, Any], parent_pid: int | None = None) -> None:
    """Entry point of one stage process: exits 0 after a stop message, non-zero on error."""
    if parent_pid is not None:
        _watch_parent(parent_pid)
    rank = spec["rank"]
    worker = agent = None
    if spec.get("num_threads"):
        import torch

        torch.set_num_threads(int(spec["num_threads"]))
    try:
        store = connect_store(spec["host"], spec["port"], spec["startup_timeout_s"])
    except Exception as exc:  # noqa: BLE001 - no store: nobody to tell but stderr
        print(f"loopserve pp rank {rank}: cannot reach rank 0 at {spec['host']}:{spec['port']}: {exc}",
              file=sys.stderr)
        sys.exit(1)
    try:
        kv = int(store.get("kv_slots"))
        worker = make_stage_worker(spec, kv)
        if worker.num_kv_slots != kv:
            raise RuntimeError(f"stage {rank} allocated {worker.num_kv_slots} KV slots, rank 0 {kv}")
        if spec.get("disagg"):  # a disaggregated server: this stage moves its own layers' KV
            from loopserve.core.disagg.staged import StageAgent

            args = worker.kv_buffers()
            args.split = [tuple(b) for b in spec["disagg"]["split"]]
            agent = StageAgent(spec["disagg"], rank, args, (spec["host"], spec["port"]), spec["startup_timeout_s"])
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    freeze_startup_heap()
    store.set(f"loaded/{rank}", "1")
    try:
        from loopserve.core.pp.wire import Link

        link = Link(store, rank, spec["size"], spec["host"], spec["timeout_s"])
        tracer = StageTracer(spec.get("tracing"), rank)
        try:
            serve(link, worker, store, tracer)
        finally:
            tracer.close()
    except Exception:  # noqa: BLE001 - the stage dies; its closed sockets tell the others
        traceback.print_exc()
        sys.exit(1)
    finally:
        if agent is not None:
            agent.close()
        worker.shutdown()


STATS_PERIOD_S = 0.25


class StageStats:
    """Busy time of one stage (its compute; a sim stage's modelled link wait excluded), and
    micro-batches run, published to rank 0's store as ``stats/<rank>`` a few times a second
    by a thread of their own (rank 0 reads them for metrics and the benchmark)."""

    def __init__(self, store: Any, rank: int, queued: Any = None) -> None:
        self.store, self.rank = store, rank
        self.queued = queued  # a sim stage's modelled compute not yet run, subtracted
        self.busy_s = 0.0
        self.wait_s = 0.0  # a sim stage's modelled link transfer time
        self.forwards = 0
        self._stop = threading.Event()
        if store is not None:
            threading.Thread(target=self._publish_loop, name="loopserve-pp-stats", daemon=True).start()

    def add(self, busy_s: float, wait_s: float = 0.0) -> None:
        self.busy_s += busy_s
        self.wait_s += wait_s
        self.forwards += 1

    def _publish_loop(self) -> None:
        sent = None
        while not self._stop.wait(STATS_PERIOD_S):
            busy = self.busy_s - (self.queued() if self.queued is not None else 0.0)
            now = (busy, self.forwards, self.wait_s)
            if now != sent:  # with the time of the reading (this host's monotonic clock)
                self.store.set(f"stats/{self.rank}", f"{now[0]!r} {now[1]} {now[2]!r} {time.monotonic()!r}")
                sent = now

    def close(self) -> None:
        self._stop.set()


def serve(link: Any, worker: Any, store: Any = None, tracer: StageTracer | None = None) -> None:
    """Receive, compute, pass on, until the stop message. One micro-batch's sends are waited
    before the next one's start, so at most one is buffered per stage."""
    import torch

    from loopserve.core.pp.wire import wants_extras

    rank, size = link.rank, link.size
    last = rank == size - 1
    hidden_size = worker.hidden_size
    stats = StageStats(store, rank, getattr(worker, "queued_s", None))
    pending: list[Any] = []
    while True:
        fb, mb_id, hidden = link.recv_batch(rank - 1, (0, hidden_size), worker.dtype)
        if fb is None:
            stats.close()
            link.wait_sends(pending)
            if not last:
                link.wait_sends(link.send_batch(rank + 1, None, mb_id, None))
            return
        waited = getattr(worker, "wait_s", 0.0)
        modelled = getattr(worker, "busy_s", None)
        t0 = time.perf_counter()
        start_ns = time.time_ns()
        with torch.inference_mode():
            out = worker.forward_stage(fb, hidden)
        wait = getattr(worker, "wait_s", 0.0) - waited
        if modelled is not None:  # the sim worker: its modelled compute, wherever it runs
            stats.add(worker.busy_s - modelled, wait)
        else:
            stats.add(time.perf_counter() - t0 - wait, wait)
        if tracer is not None:
            tracer.span(fb, mb_id, start_ns, time.time_ns())
        link.wait_sends(pending)
        if last:
            pending = [link.send_tokens(0, out, getattr(worker, "ready_at_ns", 0))]
            if wants_extras(fb):
                extras = getattr(worker, "stage_extras", None)  # a worker without logprobs: none
                pending += link.send_extras(0, extras() if extras is not None else (None, None, None))
        else:
            pending = link.send_batch(rank + 1, fb, mb_id, out)
