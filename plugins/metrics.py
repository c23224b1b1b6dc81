"""``metrics``: Prometheus metrics of one engine, on the engine's own ``CollectorRegistry``
(``Telemetry.metrics_registry``; never prometheus-client's global registry). ``Engine.metrics()``
returns the text exposition; the server will serve it at ``/metrics``.

What costs what:

- Read at scrape time from the scheduler (nothing on the hot path): ``loopserve_num_running_requests``,
  ``loopserve_num_queued_requests``, ``loopserve_kv_cache_usage_ratio`` (share of KV pages held
  by requests; evictable cached pages count as free), ``loopserve_cache_hit_rate`` (prompt
  tokens reused from the prefix cache / prompt tokens admitted), the counters
  ``loopserve_prompt_tokens_total``, ``loopserve_prompt_tokens_cached_total``,
  ``loopserve_prefill_tokens_total`` (computed, recomputation included),
  ``loopserve_generation_tokens_total``, ``loopserve_forward_passes_total``,
  ``loopserve_forward_time_seconds_total``, ``loopserve_retractions_total``,
  ``loopserve_preemptions_total``, ``loopserve_plugin_errors_total`` (plugin-hook exceptions the
  engine contained and kept serving; ``loopserve_plugin_hook_errors_total{plugin,hook}`` splits
  them), and ``loopserve_busy_fraction`` (worker forward time / wall
  time since start; ``rate(loopserve_forward_time_seconds_total[1m])`` is the same over a window);
  with ``loop=pp`` also ``loopserve_pp_stage_busy_fraction{pp_rank}`` (each stage's compute time
  / wall time; the other stages report it a few times a second).
- Per finished request (``loopserve_requests_finished``, called per step, never per token):
  ``loopserve_requests_finished_total{finish_reason}`` and the histograms
  ``loopserve_time_to_first_token_seconds``, ``loopserve_inter_token_latency_seconds`` (the
  request's mean gap between output tokens after the first: (e2e - ttft) / (outputs - 1)),
  ``loopserve_e2e_request_latency_seconds``, ``loopserve_queue_time_seconds``.
- Only with ``metrics.stage_times=true`` (off by default: it puts a wrapper around every stage
  of every iteration): ``loopserve_stage_duration_seconds{stage}`` and
  ``loopserve_iteration_duration_seconds``.

``metrics.enabled=false`` registers nothing at all.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from loopserve.core import hookimpl

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                 0.05, 0.1, 0.25, 1.0)


class SchedulerCollector:
    """Gauges and counters read from the scheduler when the registry is scraped."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.scheduler: Any = None
        self.start_time = time.perf_counter()
        self.labels = labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = GaugeMetricFamily("loopserve_engine_info", "Loop, policy, worker and model of this engine",
                                 labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1)
        yield info
        s = self.scheduler
        if s is None:
            return
        stats = s.stats

        def stat(name: str) -> float:
            # Defensive: a scheduler without a counter reports 0 (e.g. no prefix cache).
            return float(getattr(stats, name, 0) or 0)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("loopserve_num_running_requests", "Requests in the running (decode) set", len(s.running))
        yield gauge("loopserve_num_queued_requests", "Requests waiting for admission", len(s.waiting_queue))
        kv_usage = getattr(s, "kv_usage", None)
        yield gauge("loopserve_kv_cache_usage_ratio",
                    "Share of KV-cache pages held by requests (evictable cached pages count as free)",
                    float(kv_usage()) if kv_usage is not None else 0.0)
        prompt = stat("num_prompt_tokens")
        cached = stat("num_cached_prompt_tokens")
        yield gauge("loopserve_cache_hit_rate", "Prompt tokens reused from the prefix cache / prompt tokens admitted",
                    cached / prompt if prompt else 0.0)
        yield counter("loopserve_prompt_tokens", "Prompt tokens of admitted requests", prompt)
        yield counter("loopserve_prompt_tokens_cached", "Prompt tokens reused from the prefix cache", cached)
        yield counter("loopserve_prefill_tokens", "Prompt tokens computed by forward passes (recomputation included)",
                      stat("num_prefill_tokens"))
        yield counter("loopserve_generation_tokens", "Output tokens generated", stat("num_generated_tokens"))
        yield counter("loopserve_forward_passes", "Forward passes run by the worker", stat("num_forwards"))
        forward_s = stat("forward_time_s")
        yield counter("loopserve_forward_time_seconds", "Time the worker spent in forward passes", forward_s)
        yield counter("loopserve_retractions", "Requests retracted to the queue for KV memory", stat("num_retractions"))
        yield counter("loopserve_preemptions", "Requests preempted by the batching policy", stat("num_preemptions"))
        errors = getattr(stats, "plugin_errors", None)
        counts = dict(errors.counts) if errors is not None else {}
        yield counter("loopserve_plugin_errors", "Plugin-hook exceptions contained (the engine kept serving)",
                      float(sum(counts.values())))
        by_hook = CounterMetricFamily("loopserve_plugin_hook_errors", "Contained plugin-hook exceptions by plugin and hook",
                                      labels=["plugin", "hook"])
        for (plugin, hook), n in sorted(counts.items()):
            by_hook.add_metric([plugin, hook], float(n))
        yield by_hook
        wall = time.perf_counter() - self.start_time
        yield gauge("loopserve_busy_fraction", "Worker forward time / wall time since the engine started",
                    min(1.0, forward_s / wall) if wall > 0 else 0.0)
        stage_stats = getattr(s.worker, "stage_stats", None)
        if stage_stats is not None:  # loop=pp: one series per pipeline stage
            busy = GaugeMetricFamily("loopserve_pp_stage_busy_fraction",
                                     "Pipeline stage compute time / wall time since the engine started",
                                     labels=["pp_rank"])
            for st in stage_stats():
                busy.add_metric([str(st["pp_rank"])], st["busy_fraction"])
            yield busy


class MetricsPlugin:
    """Scrape-time scheduler metrics and per-finished-request counters and histograms."""

    def __init__(self, registry: Any, labels: dict[str, str] | None = None) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = registry
        self.collector = SchedulerCollector(labels or {})
        registry.register(self.collector)
        self.finished = Counter("loopserve_requests_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=registry)
        for reason in ("stop", "length", "abort"):
            self.finished.labels(reason)  # exported as 0 before the first one finishes
        self.ttft = Histogram("loopserve_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("loopserve_inter_token_latency_seconds",
                             "Mean time between output tokens after the first, per finished request",
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("loopserve_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("loopserve_queue_time_seconds", "Arrival to first admission into a batch",
                               buckets=LATENCY_BUCKETS, registry=registry)

    @hookimpl
    def loopserve_startup(self, scheduler, loop):
        self.collector.scheduler = scheduler
        self.collector.labels["loop"] = str(getattr(loop, "name", self.collector.labels.get("loop", "")))
        self.collector.start_time = time.perf_counter()

    @hookimpl
    def loopserve_requests_finished(self, scheduler, reqs):
        for req in reqs:
            reason = req.finished_reason
            self.finished.labels(reason.kind.value if reason is not None else "unknown").inc()
            arrival = req.arrival_time
            if req.schedule_time is not None:
                self.queue.observe(req.schedule_time - arrival)
            if req.finish_time is not None:
                self.e2e.observe(req.finish_time - arrival)
            first = req.first_token_time
            if first is not None:
                self.ttft.observe(first - arrival)
                n = len(req.output_ids)
                if n > 1 and req.finish_time is not None:
                    self.itl.observe((req.finish_time - first) / (n - 1))


class StageTimer:
    """``metrics.stage_times``: a histogram of every stage's and every iteration's duration."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Histogram

        self.stages = Histogram("loopserve_stage_duration_seconds", "Duration of one scheduler stage",
                                ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.iterations = Histogram("loopserve_iteration_duration_seconds", "Duration of one loop iteration",
                                    buckets=STAGE_BUCKETS, registry=registry)
        self._children: dict[str, Any] = {}

    @hookimpl(wrapper=True)
    def loopserve_run_iteration(self, loop):
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            self.iterations.observe(time.perf_counter() - t0)

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, stage):
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            child = self._children.get(stage)
            if child is None:
                child = self._children[stage] = self.stages.labels(stage)
            child.observe(time.perf_counter() - t0)


@hookimpl
def loopserve_register_observers(config, telemetry):
    registry = telemetry.metrics_registry
    if registry is None:
        return None
    labels = {"loop": str(config.loop.name), "policy": str(config.policy.name), "worker": str(config.worker.name)}
    observers: dict[str, object] = {"metrics.collector": MetricsPlugin(registry, labels)}
    if bool(config.metrics.stage_times):
        observers["metrics.stage_timer"] = StageTimer(registry)
    return observers
