"""Per-engine observability: the OpenTelemetry tracer provider and the Prometheus registry.

At import this module needs opentelemetry-api only. The SDK, the span exporters and
prometheus-client are imported inside ``setup_telemetry`` when the config asks for them, never at
import time. Nothing here touches the global tracer provider or the global Prometheus registry:
each ``Engine`` owns one ``Telemetry`` (its own ``TracerProvider`` and ``CollectorRegistry``),
hands it to the plugins through ``loopserve_register_observers``, and flushes and shuts it down
in ``Engine.shutdown``.

``tracing.exporter``:

- ``none`` (default): no provider; the tracing plugin registers nothing, so no loop has a stage
  wrapper and no span object is ever created.
- ``console``: spans printed as JSON to stderr (stdout stays the command's output).
- ``otlp``: OTLP over http/protobuf to ``tracing.endpoint`` (unset: ``$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
  or ``http://localhost:4318/v1/traces``) with ``tracing.headers``.

Both exporters sit behind a ``BatchSpanProcessor``: spans are queued on the loop thread and
exported from the processor's own thread.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)
EXPORTERS = ("none", "console", "otlp")
# Bounded export on shutdown: an unreachable collector must not hang Engine.shutdown.
EXPORT_TIMEOUT_S = 10.0


def loopserve_version() -> str:
    try:
        from importlib.metadata import version

        return version("loopserve")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


class Telemetry:
    """What one engine's observability plugins share.

    :param tracer_provider: where spans go; None means tracing is off.
    :param owns_provider: shut the provider down in ``shutdown`` (the Engine built it); a
        provider passed in by the caller is only flushed.
    :param sample_ratio: share of loop iterations that get spans (``tracing.sample_ratio``);
        request spans are not sampled by it.
    :param metrics_registry: the engine's ``prometheus_client.CollectorRegistry``; None means
        metrics are off.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None, *, owns_provider: bool = False,
                 sample_ratio: float = 0.02, metrics_registry: Any = None) -> None:
        self.tracer_provider = tracer_provider
        self.owns_provider = owns_provider
        self.sample_ratio = float(sample_ratio)
        self.metrics_registry = metrics_registry
        self.start_time = time.perf_counter()
        self._closed = False

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    @property
    def metrics(self) -> bool:
        return self.metrics_registry is not None

    def metrics_text(self) -> str:
        """The Prometheus text exposition of the engine's registry ("" when metrics are off)."""
        if self.metrics_registry is None:
            return ""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics_registry).decode("utf-8")

    def flush(self, timeout_s: float = EXPORT_TIMEOUT_S) -> bool:
        """Export the spans queued so far; False if the exporter did not finish in time."""
        provider = self.tracer_provider
        flush = getattr(provider, "force_flush", None)
        if flush is None:
            return True
        done, result = _bounded(lambda: flush(int(timeout_s * 1000)), timeout_s, "flush")
        return done and bool(result)

    def shutdown(self, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        """Flush queued spans, then shut the provider down if this object built it. Idempotent.

        Bounded by about ``2 * timeout_s`` whatever the collector does: the SDK's force_flush
        and shutdown may ignore their timeouts (an exporter retrying an unresponsive collector),
        so each runs in a daemon thread that is abandoned when its time is up."""
        if self._closed:
            return
        self._closed = True
        if self.tracer_provider is None:
            return
        try:
            self.flush(timeout_s)
        finally:
            if self.owns_provider:
                shutdown = getattr(self.tracer_provider, "shutdown", None)
                if shutdown is not None:
                    _bounded(shutdown, timeout_s, "shutdown")


def _bounded(fn: Any, timeout_s: float, what: str) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; ``(finished, result)`` after at most ``timeout_s``.
    An exception of ``fn`` is re-raised; one that is still running is left behind (a daemon
    thread does not keep the process alive)."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box.append((False, exc))

    thread = threading.Thread(target=run, name=f"loopserve-telemetry-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        log.warning("telemetry %s did not finish within %.1f s (unresponsive collector?); not waiting longer",
                    what, timeout_s)
        return False, None
    ok, value = box[0]
    if not ok:
        raise value
    return True, value


def make_tracer_provider(tracing: Any) -> TracerProvider | None:
    """An SDK ``TracerProvider`` for the ``tracing`` config node, or None for ``exporter=none``.

    Its resource names the service (``tracing.service_name``); its sampler is the SDK default
    (parent-based, always on), so a request whose ``traceparent`` says "not sampled" stays
    unsampled. Iteration sampling (``tracing.sample_ratio``) is the tracing plugin's, not the
    provider's.
    """
    exporter_name = str(tracing.exporter)
    if exporter_name not in EXPORTERS:
        raise ValueError(f"tracing.exporter must be one of {', '.join(EXPORTERS)}; got {exporter_name!r}")
    if exporter_name == "none":
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter: Any = ConsoleSpanExporter(out=sys.stderr)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("tracing.exporter=otlp needs opentelemetry-exporter-otlp-proto-http; "
                             "pip install opentelemetry-exporter-otlp-proto-http") from None
        headers = {str(k): str(v) for k, v in dict(tracing.headers or {}).items()}
        exporter = OTLPSpanExporter(endpoint=None if tracing.endpoint is None else str(tracing.endpoint),
                                    headers=headers or None, timeout=EXPORT_TIMEOUT_S)
    resource = Resource.create({SERVICE_NAME: str(tracing.service_name), SERVICE_VERSION: loopserve_version()})
    # Engine.shutdown shuts it down (which also drops the SDK's atexit hook); the hook stays
    # as a backstop for an engine that is never shut down.
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_S * 1000))
    return provider


def setup_telemetry(config: Any, tracer_provider: TracerProvider | None = None) -> Telemetry:
    """Build one engine's telemetry from ``config.tracing`` and ``config.metrics``.

    :param tracer_provider: use this provider instead of building one from
        ``tracing.exporter`` (tests pass one with an in-memory exporter; an application may
        pass its own). The caller keeps ownership: it is flushed on shutdown, not shut down.
    """
    owns = False
    if tracer_provider is None:
        tracer_provider = make_tracer_provider(config.tracing)
        owns = tracer_provider is not None
    registry = None
    metrics = config.get("metrics")
    if metrics is not None and bool(metrics.enabled):
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
    return Telemetry(tracer_provider, owns_provider=owns, sample_ratio=float(config.tracing.sample_ratio),
                     metrics_registry=registry)
