"""``tracing``: OpenTelemetry spans for loop iterations, their stages, and finished requests.

Spans (names are fixed, low cardinality):

- ``loopserve.iteration``: one per traced loop iteration, a new trace each, with one child per
  stage the loop ran: ``loopserve.recv_requests``, ``loopserve.process_input_requests``,
  ``loopserve.get_next_batch_to_run``, ``loopserve.run_batch``,
  ``loopserve.process_batch_result``, ``loopserve.self_check_during_idle`` (any loop, third-party
  ones included, gets them: they come from the ``loopserve_run_iteration`` /
  ``loopserve_run_stage`` wrapper hooks). Iteration attributes: ``loopserve.loop.name``,
  ``loopserve.iteration.did_work``, and for the batch it scheduled ``loopserve.batch.forward_mode``,
  ``loopserve.batch.size``, ``loopserve.batch.num_tokens``; ``loopserve.scheduler.running`` and
  ``loopserve.scheduler.queued`` at its end. Stage spans carry no attributes, except a
  ``loopserve.process_batch_result`` that processes a batch launched by an earlier iteration
  (overlap loop): it has that batch's attributes and a link (below). With ``loop=pp`` the
  iteration also carries ``loopserve.pp.rank`` and batch attributes ``loopserve.pp.micro_batch_id``.
- ``loopserve.request``: one per finished request (kind SERVER), from its arrival to its finish,
  parented on the W3C ``traceparent`` it came with (``Engine.generate(traceparent=...)``; the
  HTTP header once a server exists), with ``gen_ai.*`` attributes (below).

Cost control:

- Nothing is registered unless tracing is on (``tracing.exporter`` is not ``none``, or the
  Engine got a ``tracer_provider``): the module-level hook below returns no wrapper object, so
  ``has_wrappers`` is False and the loop calls its stages directly — no span object, no hook
  call on the hot path.
- Iterations are sampled with probability ``tracing.sample_ratio``. An unsampled iteration
  creates no span object. When this plugin is the only stage and iteration wrapper (the
  usual case: ``metrics.stage_times`` off), unsampled iterations do not even call a hook:
  after each sampled iteration it draws how many iterations to skip (geometric, so every
  iteration is still sampled with probability ``sample_ratio``) and sets
  ``loop.skip_wrappers`` to that count and ``loop.wrap_stages`` to False; the loop counts
  down with a plain integer and calls its stages directly. With other wrappers present it
  falls back to one plain boolean per iteration. Idle polls (no work before, none queued,
  none pending) are not traced, except the first idle iteration after work (the one that
  runs the idle self-check). A sample that falls on an idle poll is kept for the next
  iteration, so with skipping the first busy iteration after an idle stretch is traced.
- Attributes are computed only ``if span.is_recording()``, and kept few: each one costs SDK
  checks on the loop thread and protobuf encoding in the exporter.
- In a traced iteration the stage wrapper only takes timestamps; the stage spans are created
  together when the iteration ends, with those start and end times (cheaper than creating
  each between the stages' own work). So they are not the current span while their stage runs.

Overlap loop (results processed one iteration after launch): the ``run_batch`` wrapper here
remembers the launching iteration's span context for the batch (in this plugin, not on the
batch: a few entries, as many as batches are in flight), for any loop, third-party included. The ``loopserve.process_batch_result`` span of a later iteration gets a ``Link``
to that context (attribute ``loopserve.link.kind=launched_by``), so a collector shows which
iteration launched the batch whose result is being processed. In the normal loop launch and
processing share an iteration (the parent), so no link is added.

Request attributes use the semantic-convention constants where one exists
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.request.max_tokens`` /
``temperature`` / ``top_p`` / ``top_k`` / ``seed``, ``gen_ai.response.id``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.usage.cache_read.input_tokens``). Server-side latencies have no semantic convention;
they use vLLM's keys, in seconds: ``gen_ai.latency.time_in_queue``,
``gen_ai.latency.time_to_first_token``, ``gen_ai.latency.e2e``; ``gen_ai.request.id`` (vLLM's)
repeats the request id. loopserve's own, set only when not zero / empty:
``loopserve.request.priority``, ``loopserve.request.retractions``,
``loopserve.request.abort_message``. (No span events: the latency attributes carry the same
times, and events cost about a third of a request span to create and export.)
"""

from __future__ import annotations

import collections

import math
import os
import random
import sys
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loopserve.core import hookimpl
from loopserve.core.plugin_manager import CORE_DEFAULTS_NAME
from loopserve.core.telemetry import loopserve_version

ITERATION_SPAN = "loopserve.iteration"
REQUEST_SPAN = "loopserve.request"
STAGES = ("recv_requests", "process_input_requests", "get_next_batch_to_run", "run_batch",
          "process_batch_result", "self_check_during_idle")
STAGE_SPANS = {stage: f"loopserve.{stage}" for stage in STAGES}

# loopserve's attributes (no semantic convention covers a scheduler's internals).
LOOP_NAME = "loopserve.loop.name"
DID_WORK = "loopserve.iteration.did_work"
FORWARD_MODE = "loopserve.batch.forward_mode"
BATCH_SIZE = "loopserve.batch.size"
NUM_TOKENS = "loopserve.batch.num_tokens"
RUNNING = "loopserve.scheduler.running"
QUEUED = "loopserve.scheduler.queued"
LINK_KIND = "loopserve.link.kind"
PP_RANK = "loopserve.pp.rank"  # loop=pp: the stage whose loop this is (rank 0 schedules)
MICRO_BATCH = "loopserve.pp.micro_batch_id"  # loop=pp: the micro-batch's id down the pipeline
REQ_PRIORITY = "loopserve.request.priority"
REQ_RETRACTIONS = "loopserve.request.retractions"
REQ_ABORT_MESSAGE = "loopserve.request.abort_message"
# Server-side latencies and the request id: no semantic convention; vLLM's keys.
GEN_AI_REQUEST_ID = "gen_ai.request.id"
GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"

_EMPTY = Context()  # parent of iteration spans and of requests without a traceparent: a new trace
_NOTHING = object()


def model_name(config: Any) -> str:
    """The model id that request spans report: ``model.served_name``, else the checkpoint
    directory's name, else the embedded tiny model's name (or the worker's name)."""
    model = config.model
    if model.get("served_name"):
        return str(model.served_name)
    if model.get("path"):
        path = str(model.path).rstrip("/\\")
        return os.path.basename(path) or path
    if str(config.worker.name) == "model":
        from loopserve.core.model.tiny import TINY_MODEL_NAME

        return TINY_MODEL_NAME
    return str(config.worker.name)


def _is_batch(x: Any) -> bool:
    return x is not None and hasattr(x, "forward_mode") and hasattr(x, "reqs")


# Attributes go in one dict per span (at creation where they are known): each separate
# set_attribute call takes the span's lock and costs about as much as a small span.


def _batch_attributes(attrs: dict[str, Any], batch: Any) -> dict[str, Any]:
    mode = batch.forward_mode
    attrs[FORWARD_MODE] = str(getattr(mode, "name", mode))
    attrs[BATCH_SIZE] = len(batch.reqs)
    attrs[NUM_TOKENS] = int(sum(getattr(batch, "extend_lens", ()) or ()))
    mb_id = getattr(batch, "mb_id", None)
    if mb_id is not None:
        attrs[MICRO_BATCH] = mb_id
    return attrs


def _queue_attributes(attrs: dict[str, Any], loop: Any) -> dict[str, Any]:
    sched = getattr(loop, "scheduler", None)
    if sched is not None:
        attrs[RUNNING] = len(getattr(sched, "running", ()))
        attrs[QUEUED] = len(getattr(sched, "waiting_queue", ()))
    return attrs


def _record_error(span: Any, exc: BaseException) -> None:
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class TracingPlugin:
    """The span wrappers and the request-span hook of one engine.

    Registered only when tracing is on (see ``loopserve_register_observers`` below); tests and
    embedding applications may also register one directly with a provider of their own.

    :param tracer_provider: an OpenTelemetry ``TracerProvider`` (never the global one).
    :param sample_ratio: probability that an iteration gets spans.
    :param model: the model id for ``gen_ai.request.model``.
    :param seed: seeds the iteration sampler (tests).

    One engine runs its iterations on one thread, so the per-iteration state lives here.
    """

    def __init__(self, tracer_provider: Any, *, sample_ratio: float = 0.02, model: str = "unknown",
                 seed: int | None = None) -> None:
        self.tracer = trace.get_tracer("loopserve", loopserve_version(), tracer_provider=tracer_provider)
        self.sample_ratio = float(sample_ratio)
        self.model = model
        self._random = random.Random(seed).random
        self._propagator = TraceContextTextMapPropagator()
        self._loop: Any = None
        # This plugin is the only stage wrapper: it switches the loop's stage hook off for
        # unsampled iterations (``loop.wrap_stages``). The only iteration wrapper too: it
        # skips the iteration hook until the next sampled iteration (``loop.skip_wrappers``).
        self._owns_stages = False
        self._owns_loop = False
        self._last_did_work = False
        # The traced iteration in progress (None / False between iterations).
        self._traced = False
        self._stages: list[tuple] = []
        # id(batch) -> (batch, span context of the iteration that launched it), for batches
        # launched in a traced iteration and not processed yet; bounded (see _remember_launch).
        self._launched: collections.OrderedDict[int, tuple[Any, Any]] = collections.OrderedDict()
        self._iter_ctx: Context | None = None
        self._iter_sc: Any = None
        self._batch: Any = None

    # ------------------------------------------------------------------ iterations
    def _attach(self, loop: Any) -> None:
        self._loop = loop
        self._last_did_work = False
        pm = getattr(loop, "pm", None)

        def others(hook: Any) -> bool:
            return any(i.plugin_name != CORE_DEFAULTS_NAME and i.plugin is not self for i in hook.get_hookimpls())

        self._owns_stages = (pm is not None and not others(pm.hook.loopserve_run_stage)
                             and getattr(loop, "wrap_stages", None) is True)
        self._owns_loop = (self._owns_stages and not others(pm.hook.loopserve_run_iteration)
                           and isinstance(getattr(loop, "skip_wrappers", None), int))

    def _skip_count(self) -> int:
        """Unsampled iterations before the next sampled one: geometric, so each iteration is
        sampled with probability ``sample_ratio``, drawn once per sampled iteration."""
        p = self.sample_ratio
        if p >= 1.0:
            return 0
        if p <= 0.0:
            return sys.maxsize
        return int(math.log(1.0 - self._random()) / math.log(1.0 - p))

    def _expects_work(self, loop: Any) -> bool:
        """Whether this iteration is more than an idle poll: the last one did work, work is
        pending, or messages wait in the inbox."""
        if self._last_did_work or loop.has_pending():
            return True
        size = getattr(getattr(getattr(loop, "scheduler", None), "inbox", None), "size", None)
        return size is None or size() > 0

    @hookimpl(wrapper=True)
    def loopserve_run_iteration(self, loop):
        if loop is not self._loop:
            self._attach(loop)
        ratio = self.sample_ratio
        if self._owns_loop:  # the loop skipped the unsampled iterations: this one is sampled
            drawn = ratio > 0.0
        else:
            drawn = ratio > 0.0 and (ratio >= 1.0 or self._random() < ratio)
        span = None
        idle_poll = drawn and not self._expects_work(loop)
        if drawn and not idle_poll:
            span = self.tracer.start_span(ITERATION_SPAN, context=_EMPTY)
            if not span.is_recording():  # the provider's sampler dropped it: no children either
                span.end()
                span = None
        if span is None:
            if self._owns_stages:
                loop.wrap_stages = False
            try:
                did_work = yield
                self._last_did_work = bool(did_work)
                return did_work
            finally:
                if self._owns_loop:
                    # An idle poll: look again next iteration. Otherwise skip to the next draw.
                    loop.skip_wrappers = 0 if idle_poll else self._skip_count()
                elif self._owns_stages:
                    loop.wrap_stages = True
        if self._owns_stages:
            loop.wrap_stages = True
        self._iter_ctx = trace.set_span_in_context(span, _EMPTY)
        self._iter_sc = span.get_span_context()
        self._batch = None
        self._stages = []
        self._traced = True
        did_work: Any = _NOTHING
        # The iteration is the current span while it runs, so code it calls (the pipeline
        # worker, which passes it down to the other stages) can propagate it.
        token = otel_context.attach(self._iter_ctx)
        try:
            did_work = yield
            return did_work
        except BaseException as exc:
            _record_error(span, exc)
            raise
        finally:
            otel_context.detach(token)
            self._traced = False
            self._last_did_work = did_work is _NOTHING or bool(did_work)
            try:
                self._emit_stage_spans()
                if span.is_recording():
                    attrs: dict[str, Any] = {LOOP_NAME: str(getattr(loop, "name", type(loop).__name__))}
                    pp_rank = getattr(loop, "pp_rank", None)
                    if pp_rank is not None:
                        attrs[PP_RANK] = pp_rank
                    if did_work is not _NOTHING:
                        attrs[DID_WORK] = bool(did_work)
                    if self._batch is not None:
                        _batch_attributes(attrs, self._batch)
                    span.set_attributes(_queue_attributes(attrs, loop))
            finally:
                span.end()
                self._iter_ctx = self._iter_sc = self._batch = None
                self._stages = []
                if self._owns_loop:
                    loop.wrap_stages = False
                    loop.skip_wrappers = self._skip_count()

    # ------------------------------------------------------------------ stages
    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, loop, stage, args):
        if not self._traced:
            return (yield)
        # Only timestamps here; the stage spans are created together when the iteration ends
        # (with these start/end times), which costs about half as much as creating each one
        # between the stages' own work.
        batch = args[0] if args and _is_batch(args[0]) else None
        start = time.time_ns()
        result: Any = _NOTHING
        error: BaseException | None = None
        try:
            result = yield
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            end = time.time_ns()
            if stage == "get_next_batch_to_run" and batch is None and _is_batch(result):
                batch = result
            earlier = None  # (batch, launch context) launched earlier, processed now (overlap)
            if batch is not None:
                if stage != "process_batch_result":
                    self._batch = batch
                    if stage == "run_batch":
                        self._remember_launch(batch)
                elif batch is not self._batch:
                    earlier = (batch, self._pop_launch(batch))
            self._stages.append((stage, start, end, earlier, error))

    _MAX_LAUNCHED = 64  # in-flight batches are a handful; older entries were never processed

    def _remember_launch(self, batch: Any) -> None:
        launched = self._launched
        launched[id(batch)] = (batch, self._iter_sc)
        while len(launched) > self._MAX_LAUNCHED:
            launched.popitem(last=False)

    def _pop_launch(self, batch: Any) -> Any:
        item = self._launched.pop(id(batch), None)
        return item[1] if item is not None and item[0] is batch else None

    def launch_context(self, batch: Any) -> Any:
        """The span context of the traced iteration that launched ``batch`` and whose result
        is not processed yet (None otherwise)."""
        item = self._launched.get(id(batch))
        return item[1] if item is not None and item[0] is batch else None

    def _emit_stage_spans(self) -> None:
        """The iteration's batch attributes are on the iteration span; a stage span carries
        the batch only when it processes one launched by an earlier iteration (then with a
        link to that iteration). Every attribute costs (SDK checks, export encoding)."""
        tracer, ctx, iter_sc = self.tracer, self._iter_ctx, self._iter_sc
        for stage, start, end, earlier, error in self._stages:
            attrs = links = None
            if earlier is not None:
                batch, launched = earlier
                attrs = _batch_attributes({}, batch)
                if launched is not None and launched != iter_sc and launched.is_valid:
                    links = [Link(launched, {LINK_KIND: "launched_by"})]
            span = tracer.start_span(STAGE_SPANS.get(stage) or f"loopserve.{stage}", context=ctx, links=links,
                                     attributes=attrs, start_time=start)
            if error is not None:
                _record_error(span, error)
            span.end(end_time=end)

    # ------------------------------------------------------------------ requests
    @hookimpl
    def loopserve_requests_finished(self, scheduler, reqs):
        for req in reqs:
            self.request_span(req)

    def request_span(self, req: Any) -> None:
        """Emit the span of one finished request: from its arrival (wall clock) to its finish."""
        parent = _EMPTY
        # A frontend that skipped validation may pass anything: only a string is a traceparent.
        if req.traceparent and isinstance(req.traceparent, str):
            parent = self._propagator.extract({"traceparent": req.traceparent}, context=_EMPTY)
        start_ns = int(req.wall_arrival_time * 1e9)
        end = req.finish_time if req.finish_time is not None else time.perf_counter()
        # Attributes at creation, in one dict: the cheapest way through the SDK.
        span = self.tracer.start_span(REQUEST_SPAN, context=parent, kind=SpanKind.SERVER, start_time=start_ns,
                                      attributes=self._request_attributes(req, end))
        span.end(end_time=start_ns + int((end - req.arrival_time) * 1e9))

    def _request_attributes(self, req: Any, end: float) -> dict[str, Any]:
        from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA

        sp = req.sampling_params
        reason = req.finished_reason
        attrs: dict[str, Any] = {
            GA.GEN_AI_OPERATION_NAME: GA.GenAiOperationNameValues.TEXT_COMPLETION.value,
            GA.GEN_AI_REQUEST_MODEL: self.model,
            GA.GEN_AI_RESPONSE_ID: req.rid,
            GEN_AI_REQUEST_ID: req.rid,
            GA.GEN_AI_USAGE_INPUT_TOKENS: len(req.input_ids),
            GA.GEN_AI_USAGE_OUTPUT_TOKENS: len(req.output_ids),
            GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: int(req.num_cached_tokens),
            GA.GEN_AI_REQUEST_MAX_TOKENS: int(sp.max_new_tokens),
            GA.GEN_AI_REQUEST_TEMPERATURE: float(sp.temperature),
            GA.GEN_AI_REQUEST_TOP_P: float(sp.top_p),
            GEN_AI_LATENCY_E2E: end - req.arrival_time,
        }
        if req.priority:
            attrs[REQ_PRIORITY] = int(req.priority)
        if req.num_retractions:
            attrs[REQ_RETRACTIONS] = int(req.num_retractions)
        if sp.top_k > 0:
            attrs[GA.GEN_AI_REQUEST_TOP_K] = int(sp.top_k)
        if sp.seed is not None:
            attrs[GA.GEN_AI_REQUEST_SEED] = int(sp.seed)
        if reason is not None:
            attrs[GA.GEN_AI_RESPONSE_FINISH_REASONS] = (reason.kind.value,)
            if reason.message:
                attrs[REQ_ABORT_MESSAGE] = reason.message
        if req.schedule_time is not None:
            attrs[GEN_AI_LATENCY_TIME_IN_QUEUE] = req.schedule_time - req.arrival_time
        if req.first_token_time is not None:
            attrs[GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] = req.first_token_time - req.arrival_time
        return attrs


@hookimpl
def loopserve_register_observers(config, telemetry):
    if not telemetry.tracing:
        return None
    return {"tracing.spans": TracingPlugin(telemetry.tracer_provider, sample_ratio=telemetry.sample_ratio,
                                          model=model_name(config))}
