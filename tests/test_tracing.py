"""Tracing: iteration and stage spans for every installed loop, request spans parented on a W3C
traceparent, OTLP export to a local receiver, no span objects with ``tracing.exporter=none``,
and the console exporter from the CLI. Spans go to an ``InMemorySpanExporter`` on a provider
passed in, never the global provider."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
from types import SimpleNamespace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loopserve.core import FinishKind, Req, SamplingParams, hookimpl
from loopserve.core.config import compose_config
from loopserve.core.loop import EventLoop, available_loops
from loopserve.core.plugin_manager import has_wrappers, make_plugin_manager
from loopserve.plugins.tracing import ITERATION_SPAN, REQUEST_SPAN, STAGE_SPANS, TracingPlugin

from fake_worker import Stepped, reference_tokens

TIMEOUT = 30.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ALL_STAGES = set(STAGE_SPANS.values())
# Loops that serve requests on their own; the disaggregated roles need a paired server and are
# covered (tracing included) by tests/test_disagg.py.
INSTALLED_LOOPS = sorted(name for name, cls in available_loops(make_plugin_manager()).items()
                         if getattr(cls.scheduler_cls, "role", None) is None)


@pytest.fixture
def memory():
    """A provider of our own with an in-memory exporter (never the global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_name(spans):
    out: dict[str, list] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def check_tree(spans):
    """Every iteration span is a root; every stage span is the child of an iteration span of
    the same trace; returns {iteration span id: [its stage spans]}."""
    iterations = {s.context.span_id: s for s in spans if s.name == ITERATION_SPAN}
    children: dict[int, list] = {sid: [] for sid in iterations}
    for s in spans:
        if s.name == ITERATION_SPAN:
            assert s.parent is None
        elif s.name in ALL_STAGES:
            assert s.parent is not None and s.parent.span_id in iterations, f"orphan stage span {s.name}"
            assert s.context.trace_id == iterations[s.parent.span_id].context.trace_id
            children[s.parent.span_id].append(s)
    return iterations, children


BATCH_KEYS = ("loopserve.batch.forward_mode", "loopserve.batch.size", "loopserve.batch.num_tokens")


def check_launch_links(spans, *, deferred: bool) -> int:
    """Every ``process_batch_result`` span that links somewhere links to the iteration just
    before its own (the one that launched the batch), and carries that iteration's batch
    attributes. With ``deferred`` (results processed one iteration after launch, all
    iterations traced) every processed real batch must have that link. Returns the number
    of links checked."""
    iterations, _ = check_tree(spans)
    order = sorted(iterations.values(), key=lambda s: s.start_time)
    previous = {b.context.span_id: a for a, b in zip(order, order[1:])}
    checked = 0
    for s in by_name(spans).get(STAGE_SPANS["process_batch_result"], []):
        if not s.links:
            if deferred:
                assert s.attributes.get("loopserve.batch.forward_mode") in (None, "DUMMY_FIRST"), dict(s.attributes)
            continue
        (link,) = s.links
        launcher = previous[s.parent.span_id]
        assert link.context == launcher.context, "the link must point at the previous (launching) iteration"
        assert link.attributes["loopserve.link.kind"] == "launched_by"
        assert {k: s.attributes[k] for k in BATCH_KEYS} == {k: launcher.attributes[k] for k in BATCH_KEYS}
        checked += 1
    return checked


# ------------------------------------------------------------------------- stage spans


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_iteration_and_stage_spans_for_every_installed_loop(memory, loop_name):
    provider, exporter = memory
    tracing = TracingPlugin(provider, sample_ratio=1.0, model="m")
    st = Stepped(f"loop={loop_name}", plugins=[("tracing.spans", tracing)])
    try:
        prompts = [[3, 4, 5, 6], [7, 8]]
        reqs = st.submit(*prompts, max_new_tokens=3)
        st.run_until_done(reqs)
        st.settle()
        for req, prompt in zip(reqs, prompts):
            assert req.output_ids == reference_tokens(prompt, 3)  # results pass through the wrappers
    finally:
        st.loop.close()
    spans = exporter.get_finished_spans()
    iterations, children = check_tree(spans)
    assert iterations
    names = {s.name for s in spans}
    # Every stage of the loop got its span, the idle self-check included (the first idle
    # iteration after work is traced).
    assert {STAGE_SPANS[s] for s in ("recv_requests", "process_input_requests", "get_next_batch_to_run",
                                     "run_batch", "process_batch_result", "self_check_during_idle")} <= names
    assert names <= ALL_STAGES | {ITERATION_SPAN, REQUEST_SPAN}
    for it in iterations.values():
        assert it.attributes["loopserve.loop.name"] == loop_name
        assert "loopserve.scheduler.running" in it.attributes and "loopserve.scheduler.queued" in it.attributes
        # Children lie within their iteration.
        for child in children[it.context.span_id]:
            assert it.start_time <= child.start_time <= child.end_time <= it.end_time
    # The prefill iteration: both requests, all prompt tokens.
    prefill = [it for it in iterations.values() if it.attributes.get("loopserve.batch.forward_mode") == "EXTEND"]
    assert prefill and prefill[0].attributes["loopserve.batch.size"] == 2
    assert prefill[0].attributes["loopserve.batch.num_tokens"] == 6
    assert any(it.attributes.get("loopserve.batch.forward_mode") == "DECODE" for it in iterations.values())
    for s in spans:  # stage spans are lean: attributes only on processing an earlier launch
        if s.name in ALL_STAGES - {STAGE_SPANS["process_batch_result"]}:
            assert not s.attributes, (s.name, s.attributes)
    # Links from a result's processing to the iteration that launched the batch: never to
    # the span's own parent, always to an iteration span that started earlier.
    linked = [s for s in by_name(spans)[STAGE_SPANS["process_batch_result"]] if s.links]
    for s in linked:
        (link,) = s.links
        assert s.attributes["loopserve.batch.size"] >= 1 and s.attributes["loopserve.batch.num_tokens"] >= 1
        assert link.attributes["loopserve.link.kind"] == "launched_by"
        assert link.context.span_id in iterations and link.context.span_id != s.parent.span_id
        assert iterations[link.context.span_id].start_time < iterations[s.parent.span_id].start_time
    if loop_name == "normal":
        assert not linked  # launched and processed in the same iteration
    if loop_name == "overlap":
        # Results are processed one iteration after launch: prefill + 2 decode steps.
        assert len(linked) >= 3
        assert check_launch_links(spans, deferred=True) == len(linked)
    assert len(by_name(spans)[REQUEST_SPAN]) == 2


def test_normal_loop_stores_the_iteration_context_on_its_batch(memory):
    provider, exporter = memory
    plugin = TracingPlugin(provider, sample_ratio=1.0)
    st = Stepped("loop=normal", plugins=[("tracing.spans", plugin)])
    st.submit([5, 6, 7], max_new_tokens=2)
    st.scheduler.max_running = 1  # the launch context of a batch processed in its own iteration
    assert st.step() is True
    batch = st.scheduler.last_batch
    (it,) = [s for s in exporter.get_finished_spans() if s.name == ITERATION_SPAN]
    # Launched and processed in the same iteration: remembered for it, and no link needed.
    assert plugin.launch_context(batch) == it.context
    spans = exporter.get_finished_spans()
    assert all(not s.links for s in spans)


def test_overlap_link_points_at_the_launching_iteration(memory):
    if "overlap" not in INSTALLED_LOOPS:
        pytest.skip("the overlap loop is not installed")
    provider, exporter = memory
    plugin = TracingPlugin(provider, sample_ratio=1.0)
    st = Stepped("loop=overlap", plugins=[("tracing.spans", plugin)])
    try:
        st.submit([5, 6, 7], max_new_tokens=4)
        st.step()  # launches the prefill
        launched_batch = st.scheduler.last_batch
        first = [s for s in exporter.get_finished_spans() if s.name == ITERATION_SPAN]
        launched = SimpleNamespace(trace_context=plugin.launch_context(launched_batch))
        assert launched.trace_context == first[-1].context
        st.step()  # launches decode 1, processes the prefill
        spans = exporter.get_finished_spans()
        processed = [s for s in spans if s.name == STAGE_SPANS["process_batch_result"]][-1]
        assert processed.attributes["loopserve.batch.forward_mode"] == "EXTEND"
        assert [link.context for link in processed.links] == [launched.trace_context]
        assert processed.parent.span_id != launched.trace_context.span_id
    finally:
        st.loop.close()


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_iteration_attributes_follow_the_batch_and_the_queues(memory, loop_name):
    """Loop name, forward mode, batch size, token count, running and queued counts, checked
    against the scheduler after every step (one request runs, one waits: nonzero counts)."""
    provider, exporter = memory
    st = Stepped(f"loop={loop_name}", "scheduler.max_running_requests=1",
                 plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=1.0))])
    seen = []
    try:
        reqs = st.submit([3, 4, 5, 6], [7, 8], max_new_tokens=3)
        for _ in range(50):
            st.step()
            its = [s for s in exporter.get_finished_spans() if s.name == ITERATION_SPAN]
            assert len(its) == len(seen) + 1  # every busy iteration is traced at ratio 1
            a = dict(its[-1].attributes)
            seen.append(a)
            s = st.scheduler
            assert a["loopserve.loop.name"] == loop_name
            assert a["loopserve.scheduler.running"] == len(s.running)
            assert a["loopserve.scheduler.queued"] == len(s.waiting_queue)
            batch = s.last_batch
            if batch is None:
                assert "loopserve.batch.forward_mode" not in a
            else:
                assert a["loopserve.batch.forward_mode"] == batch.forward_mode.name
                assert a["loopserve.batch.size"] == len(batch.reqs)
                assert a["loopserve.batch.num_tokens"] == sum(batch.extend_lens)
            if all(r.finished for r in reqs):
                break
    finally:
        st.loop.close()
    # The first iteration admits the 4-token prompt alone; the other one waits.
    assert {k: seen[0][k] for k in BATCH_KEYS} == {"loopserve.batch.forward_mode": "EXTEND",
                                                 "loopserve.batch.size": 1, "loopserve.batch.num_tokens": 4}
    assert seen[0]["loopserve.scheduler.running"] == 1 and seen[0]["loopserve.scheduler.queued"] == 1
    decodes = [a for a in seen if a.get("loopserve.batch.forward_mode") == "DECODE"]
    assert decodes and all(a["loopserve.batch.num_tokens"] == a["loopserve.batch.size"] == 1 for a in decodes)
    prefills = [a for a in seen if a.get("loopserve.batch.forward_mode") == "EXTEND"]
    assert [a["loopserve.batch.num_tokens"] for a in prefills] == [4, 2]


class _DeferredLoop(EventLoop):
    """A third-party loop the tracing plugin knows nothing about: it launches a batch in one
    iteration and processes its result in the next (the overlap loop's shape, no threads),
    and stores no trace context itself."""

    name = "deferred"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending = None

    def has_pending(self):
        return self.pending is not None or self.scheduler.has_work

    def iteration(self):
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        if self.pending is not None:
            batch, result = self.pending
            self.pending = None
            self.stage("process_batch_result", s.process_batch_result, batch, result)
            return True
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        s.last_batch = batch
        if batch is None:
            self.stage("self_check_during_idle", s.self_check_during_idle)
            return bool(received)
        self.pending = (batch, self.stage("run_batch", s.run_batch, batch))
        return True


class _DeferredLoopPlugin:
    @hookimpl
    def loopserve_register_loops(self):
        return {"deferred": _DeferredLoop}


def test_a_third_party_loop_gets_stage_spans_and_launch_links(memory):
    provider, exporter = memory
    st = Stepped("loop.name=deferred", plugins=[("deferred_loop", _DeferredLoopPlugin()),
                                               ("tracing.spans", TracingPlugin(provider, sample_ratio=1.0))])
    assert type(st.loop) is _DeferredLoop
    prompts = [[3, 4, 5, 6], [7, 8]]
    reqs = st.submit(*prompts, max_new_tokens=3)
    st.run_until_done(reqs)
    st.settle()
    for req, prompt in zip(reqs, prompts):
        assert req.output_ids == reference_tokens(prompt, 3)
    spans = exporter.get_finished_spans()
    iterations, children = check_tree(spans)
    assert ALL_STAGES <= {s.name for s in spans}
    assert all(it.attributes["loopserve.loop.name"] == "deferred" for it in iterations.values())
    assert all(children[sid] for sid in iterations)
    # The run_batch wrapper stored the launching iteration on the batch; each result's
    # processing (prefill + 2 decodes) links back to it.
    assert check_launch_links(spans, deferred=True) == 3


def test_overlap_links_with_sampled_iterations(memory):
    """Sampled: a result's processing links to its launch only when both were traced, and
    then to the launching iteration (never to one that was not exported)."""
    if "overlap" not in INSTALLED_LOOPS:
        pytest.skip("the overlap loop is not installed")
    provider, exporter = memory
    st = Stepped("loop=overlap", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=0.5, seed=11))])
    try:
        reqs = st.submit([3, 4, 5], max_new_tokens=80)
        st.run_until_done(reqs)
        st.settle()
    finally:
        st.loop.close()
    spans = exporter.get_finished_spans()
    iterations, _ = check_tree(spans)
    assert 0 < len(iterations) < st.loop.num_iterations
    assert check_launch_links(spans, deferred=False) >= 5
    assert reqs[0].output_ids == reference_tokens([3, 4, 5], 80)


def test_sampled_iterations_only_and_no_orphans(memory):
    provider, exporter = memory
    tracing = TracingPlugin(provider, sample_ratio=0.5, seed=7)
    st = Stepped("loop=normal", plugins=[("tracing.spans", tracing)])
    reqs = st.submit([3, 4, 5], max_new_tokens=120)
    steps = st.run_until_done(reqs)
    spans = exporter.get_finished_spans()
    iterations, children = check_tree(spans)  # no stage span without its iteration
    assert 0.25 * steps < len(iterations) < 0.75 * steps
    for kids in children.values():
        assert kids  # a traced iteration has its stage spans
    assert reqs[0].output_ids == reference_tokens([3, 4, 5], 120)


def _hook_calls(st) -> Counter:
    calls: Counter[str] = Counter()
    st.pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.update([name]),
                                  lambda outcome, name, impls, kwargs: None)
    return calls


def test_unsampled_iterations_call_no_hook(memory):
    provider, exporter = memory
    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=0.0))])
    calls = _hook_calls(st)
    reqs = st.submit([3, 4, 5], max_new_tokens=5)
    steps = st.run_until_done(reqs)
    assert steps >= 5 and st.loop._wrap_stage and st.loop._wrap_iteration
    # One iteration call to learn the loop; after it the loop skips the wrappers itself.
    assert calls["loopserve_run_iteration"] == 1 and calls["loopserve_run_stage"] == 0
    assert st.loop.wrap_stages is False and st.loop.skip_wrappers > 10**9
    assert [s.name for s in exporter.get_finished_spans()] == [REQUEST_SPAN]  # request spans are not sampled


def test_sampled_iterations_are_the_only_hook_calls(memory):
    provider, exporter = memory
    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=0.2, seed=3))])
    calls = _hook_calls(st)
    reqs = st.submit([3, 4, 5], max_new_tokens=200)
    steps = st.run_until_done(reqs)
    iterations = [s for s in exporter.get_finished_spans() if s.name == ITERATION_SPAN]
    assert calls["loopserve_run_iteration"] == len(iterations) < 0.4 * steps
    assert calls["loopserve_run_stage"] == 5 * len(iterations)
    assert reqs[0].output_ids == reference_tokens([3, 4, 5], 200)


def test_with_another_iteration_wrapper_sampling_is_per_iteration(memory):
    from loopserve.core import hookimpl

    class Counting:
        n = 0

        @hookimpl(wrapper=True)
        def loopserve_run_iteration(self, loop):
            Counting.n += 1
            return (yield)

    provider, exporter = memory
    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=0.0)),
                                         ("counting", Counting())])
    calls = _hook_calls(st)
    reqs = st.submit([3, 4, 5], max_new_tokens=5)
    steps = st.run_until_done(reqs)
    assert Counting.n == steps  # the other wrapper sees every iteration
    assert calls["loopserve_run_stage"] == 0 and st.loop.skip_wrappers == 0
    assert st.loop.wrap_stages is True  # restored after each iteration


def test_another_stage_wrapper_keeps_the_stage_hook_on(memory):
    provider, exporter = memory
    seen = []

    class Recorder:
        from loopserve.core import hookimpl

        @hookimpl(wrapper=True)
        def loopserve_run_stage(self, stage):
            seen.append(stage)
            return (yield)

    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=0.0)),
                                         ("recorder", Recorder())])
    reqs = st.submit([3, 4, 5], max_new_tokens=2)
    st.run_until_done(reqs)
    assert "run_batch" in seen
    assert [s.name for s in exporter.get_finished_spans()] == [REQUEST_SPAN]


def test_idle_polls_are_not_traced(memory):
    provider, exporter = memory
    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=1.0))])
    for _ in range(5):
        assert st.step() is False
    assert exporter.get_finished_spans() == ()
    reqs = st.submit([3, 4], max_new_tokens=2)
    st.run_until_done(reqs)
    busy = len([s for s in exporter.get_finished_spans() if s.name == ITERATION_SPAN])
    assert busy == 2  # the first request's iteration came after idle polls and is traced
    for _ in range(5):
        st.step()
    spans = exporter.get_finished_spans()
    idle = [s for s in spans if s.name == ITERATION_SPAN][busy:]
    assert len(idle) == 1 and idle[0].attributes["loopserve.iteration.did_work"] is False
    assert sum(s.name == STAGE_SPANS["self_check_during_idle"] for s in spans) == 1


def test_a_failing_stage_marks_its_spans_and_propagates(memory):
    provider, exporter = memory
    st = Stepped("loop=normal", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=1.0))])

    def broken(*args):
        raise RuntimeError("scheduler exploded")

    # A failing forward only fails its batch (tests/test_runner.py); a scheduler stage that
    # raises is a bug and propagates, marked on its stage span and the iteration span.
    st.scheduler.get_next_batch_to_run = broken
    st.submit([3, 4], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="exploded"):
        st.step()
    spans = by_name(exporter.get_finished_spans())
    assert spans[STAGE_SPANS["get_next_batch_to_run"]][0].status.status_code.name == "ERROR"
    assert spans[ITERATION_SPAN][0].status.status_code.name == "ERROR"


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_a_failing_result_processing_propagates_through_the_wrappers(memory, loop_name):
    provider, exporter = memory
    st = Stepped(f"loop={loop_name}", plugins=[("tracing.spans", TracingPlugin(provider, sample_ratio=1.0))])

    def broken(*args):
        raise RuntimeError("resolve exploded")

    st.scheduler.resolve_batch = broken
    st.submit([3, 4], max_new_tokens=3)
    try:
        with pytest.raises(RuntimeError, match="resolve exploded"):
            for _ in range(5):  # the overlap loop processes a result one iteration late
                st.step()
    finally:
        st.loop.close()
    failed = [s for s in exporter.get_finished_spans() if s.status.status_code.name == "ERROR"]
    assert {s.name for s in failed} == {STAGE_SPANS["process_batch_result"], ITERATION_SPAN}


# ------------------------------------------------------------------------- request spans


def test_request_span_is_parented_on_the_traceparent(fake_engine, memory):
    provider, exporter = memory
    engine = fake_engine("loop=normal", "model.served_name=my-model", tracer_provider=provider)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0)
    called_ns = time.time_ns()
    (out,) = engine.generate(input_ids=[[3, 4, 5]], sampling_params=sp, traceparent=TRACEPARENT, timeout=TIMEOUT)
    returned_ns = time.time_ns()
    (plain,) = engine.generate(input_ids=[[9, 8]], sampling_params=sp, timeout=TIMEOUT)
    (bad,) = engine.generate(input_ids=[[9, 7]], sampling_params=sp, traceparent="not-a-traceparent",
                             timeout=TIMEOUT)
    spans = {s.attributes["gen_ai.response.id"]: s for s in exporter.get_finished_spans() if s.name == REQUEST_SPAN}
    span = spans[out.rid]
    assert span.kind is SpanKind.SERVER
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent.span_id == int(PARENT_ID, 16) and span.parent.is_remote
    # Started at the request's arrival (wall clock), ended at its finish.
    assert span.start_time == int(out.metrics.arrival_time * 1e9)
    assert span.end_time - span.start_time == pytest.approx(out.metrics.e2e_latency_s * 1e9, abs=2000)
    # ... i.e. within the generate call, not at the finish (the span covers the request's life).
    assert called_ns - 1_000_000 <= span.start_time < span.end_time <= returned_ns + 1_000_000
    a = span.attributes
    assert a["gen_ai.request.model"] == "my-model"
    assert a["gen_ai.request.id"] == out.rid
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.latency.time_in_queue"] == pytest.approx(out.metrics.queue_time_s)
    assert a["gen_ai.latency.time_to_first_token"] == pytest.approx(out.metrics.time_to_first_token_s)
    assert a["gen_ai.latency.e2e"] == pytest.approx(out.metrics.e2e_latency_s)
    assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert "loopserve.request.priority" not in a and "loopserve.request.retractions" not in a  # zero
    # Without a (valid) traceparent: a root span of a trace of its own.
    for rid in (plain.rid, bad.rid):
        assert spans[rid].parent is None and spans[rid].context.trace_id != int(TRACE_ID, 16)


def test_request_span_of_an_aborted_request(memory):
    provider, exporter = memory
    tracing = TracingPlugin(provider, model="m")
    req = Req(rid="r1", input_ids=[1, 2, 3], sampling_params=SamplingParams(max_new_tokens=8, seed=3, top_k=5))
    req.finish(FinishKind.ABORT, message="aborted by the client")
    tracing.request_span(req)
    (span,) = exporter.get_finished_spans()
    a = span.attributes
    assert a["gen_ai.response.finish_reasons"] == ("abort",)
    assert a["loopserve.request.abort_message"] == "aborted by the client"
    assert a["gen_ai.request.seed"] == 3 and a["gen_ai.request.top_k"] == 5
    assert "gen_ai.latency.time_to_first_token" not in a and "gen_ai.latency.time_in_queue" not in a
    assert span.events == ()


def test_engine_flushes_a_provider_passed_in_but_does_not_shut_it_down(fake_engine, memory):
    provider, exporter = memory
    engine = fake_engine("loop=normal", tracer_provider=provider)
    assert engine.telemetry.tracer_provider is provider and not engine.telemetry.owns_provider
    engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=1), timeout=TIMEOUT)
    engine.shutdown()
    with provider.get_tracer("t").start_as_current_span("after-shutdown"):
        pass
    assert "after-shutdown" in [s.name for s in exporter.get_finished_spans()]


def test_engine_shuts_down_the_provider_it_built(fake_engine, capsys):
    engine = fake_engine("loop=normal", "tracing=console")
    provider = engine.telemetry.tracer_provider
    assert engine.telemetry.owns_provider and provider is not None
    calls = []
    original = provider.shutdown
    provider.shutdown = lambda: (calls.append(1), original())[1]
    engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=1), timeout=TIMEOUT)
    engine.shutdown()
    engine.shutdown()
    assert calls == [1]
    assert '"name": "loopserve.request"' in capsys.readouterr().err  # flushed before shutdown


def test_register_observers_runs_before_the_loop_is_built(fake_plugin):
    """A third-party observer registered through the hook wraps stages like a built-in one."""
    from loopserve.core import hookimpl

    class Observer:
        def __init__(self):
            self.stages = []

        @hookimpl(wrapper=True)
        def loopserve_run_stage(self, stage):
            self.stages.append(stage)
            return (yield)

    observer = Observer()

    class Provider:
        @hookimpl
        def loopserve_register_observers(self, config, telemetry):
            assert telemetry.tracer_provider is None and telemetry.metrics_registry is not None
            return {"my-observer": observer}

    from loopserve.core import Engine

    with Engine(overrides=["worker=fake", "loop=normal"],
                plugins=[("fake_worker", fake_plugin), ("provider", Provider())]) as engine:
        assert engine.pm.get_plugin("my-observer") is observer and engine.loop._wrap_stage
        engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=1), timeout=TIMEOUT)
    assert "run_batch" in observer.stages


# ------------------------------------------------------------------------- exporter none


def _count_span_objects(monkeypatch) -> list[str]:
    """Count every span object and start_span call of the API and the SDK."""
    import opentelemetry.sdk.trace as sdk_trace
    import opentelemetry.trace as api_trace

    made: list[str] = []

    def counting(cls, attr):
        original = getattr(cls, attr)

        def wrapper(*args, **kwargs):
            made.append(f"{cls.__name__}.{attr}")
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, attr, wrapper)

    for cls, attr in ((sdk_trace.Span, "__init__"), (api_trace.NonRecordingSpan, "__init__"),
                      (sdk_trace.Tracer, "start_span"), (api_trace.NoOpTracer, "start_span"),
                      (api_trace.ProxyTracer, "start_span")):
        counting(cls, attr)
    return made


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_exporter_none_creates_no_span_objects_on_the_hot_path(fake_engine, monkeypatch, memory, loop_name):
    made = _count_span_objects(monkeypatch)
    # Default config: tracing.exporter=none (metrics on, without stage times).
    engine = fake_engine(f"loop={loop_name}")
    calls = _hook_calls(engine)
    assert engine.config.tracing.exporter == "none" and engine.telemetry.tracer_provider is None
    assert engine.pm.get_plugin("tracing") is not None  # the plugin is installed ...
    assert engine.pm.get_plugin("tracing.spans") is None  # ... but registered no wrappers
    assert not has_wrappers(engine.pm.hook.loopserve_run_iteration)
    assert not has_wrappers(engine.pm.hook.loopserve_run_stage)
    assert engine.loop._wrap_iteration is False and engine.loop._wrap_stage is False
    outs = engine.generate(input_ids=[[3, 4, 5], [6, 7]], sampling_params=SamplingParams(max_new_tokens=8),
                           traceparent=TRACEPARENT, timeout=TIMEOUT)
    assert all(len(o.token_ids) == 8 for o in outs)
    assert made == []
    # Not even a wrapper hook call: the loop called its stages directly.
    assert calls["loopserve_run_iteration"] == 0 and calls["loopserve_run_stage"] == 0
    assert calls["loopserve_requests_finished"] >= 1  # (the monitor does see the loop's hook calls)
    # The counter does count: the same traffic with tracing on makes spans.
    provider, _ = memory
    traced = fake_engine(f"loop={loop_name}", "tracing.sample_ratio=1.0", tracer_provider=provider)
    traced.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=2), timeout=TIMEOUT)
    assert made


def test_nothing_observes_with_tracing_and_metrics_off(fake_engine):
    engine = fake_engine("loop=normal", "metrics.enabled=false")
    assert engine.scheduler._finish_hook is False
    assert not has_wrappers(engine.pm.hook.loopserve_run_stage)
    assert engine.metrics() == ""


def test_core_and_plugins_import_only_the_api():
    code = textwrap.dedent("""
        import sys
        import loopserve.core.engine, loopserve.core.telemetry, loopserve.core.cli
        import loopserve.plugins.tracing, loopserve.plugins.metrics
        from loopserve.core.plugin_manager import make_plugin_manager
        make_plugin_manager()
        heavy = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                                         "prometheus_client", "opentelemetry.semconv"))]
        assert not heavy, heavy
        assert "opentelemetry.trace" in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _module_level_imports(path):
    """Modules imported by ``path`` outside any function body (i.e. at import time)."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            elif isinstance(child, ast.Import) and not in_function:
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not in_function and child.module:
                found.append(child.module)
            else:
                visit(child, in_function)

    visit(tree, False)
    return found


def test_no_module_of_core_or_plugins_imports_the_sdk_at_import_time():
    """Every module, not just the ones the import test loads: the SDK, exporters and
    prometheus-client only inside functions (setup code the Engine/CLI calls); and no code
    sets the global tracer provider."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted((root / "core").rglob("*.py")) + sorted((root / "plugins").glob("*.py"))
    assert len(files) > 20
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "prometheus_client")
    offenders = {str(f.relative_to(root)): bad for f in files
                 if (bad := [m for m in _module_level_imports(f) if m.startswith(heavy)])}
    assert offenders == {}
    assert _module_level_imports(root / "core" / "telemetry.py")  # the scanner does see imports
    setters = [str(f.relative_to(root)) for f in files
               if "set_tracer_provider" in f.read_text(encoding="utf-8")]
    assert setters == []


def test_the_global_tracer_provider_is_never_set(fake_engine, capsys):
    from opentelemetry import trace

    engine = fake_engine("loop=normal", "tracing=console", "tracing.sample_ratio=1.0")
    engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=2), timeout=TIMEOUT)
    engine.shutdown()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert engine.telemetry.tracer_provider is not trace.get_tracer_provider()
    assert '"name": "loopserve.iteration"' in capsys.readouterr().err


def test_sample_ratio_and_service_name_come_from_config(fake_engine, memory):
    provider, exporter = memory
    default = fake_engine("loop=normal", "tracing=console")
    assert default.pm.get_plugin("tracing.spans").sample_ratio == 0.02 == default.telemetry.sample_ratio
    named = fake_engine("loop=normal", "tracing.exporter=console", "tracing.service_name=my-svc")
    assert named.telemetry.tracer_provider.resource.attributes["service.name"] == "my-svc"
    off = fake_engine("loop=normal", "tracing.sample_ratio=0.0", tracer_provider=provider)
    assert off.pm.get_plugin("tracing.spans").sample_ratio == 0.0
    off.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=20), timeout=TIMEOUT)
    assert [s.name for s in exporter.get_finished_spans()] == [REQUEST_SPAN]  # no iteration sampled
    exporter.clear()
    on = fake_engine("loop=normal", "tracing.sample_ratio=1.0", tracer_provider=provider)
    on.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=20), timeout=TIMEOUT)
    assert sum(s.name == ITERATION_SPAN for s in exporter.get_finished_spans()) >= 20


def test_engine_shutdown_flushes_batched_spans_of_a_provider_passed_in(fake_engine):
    """A batch processor that would wait a minute: the spans are exported by the engine's
    shutdown (flush), not by the processor's timer."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    try:
        engine = fake_engine("loop=normal", "tracing.sample_ratio=1.0", tracer_provider=provider)
        engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=2), timeout=TIMEOUT)
        assert exporter.get_finished_spans() == ()  # still queued in the processor
        engine.shutdown()
        names = {s.name for s in exporter.get_finished_spans()}
        assert {REQUEST_SPAN, ITERATION_SPAN} <= names
    finally:
        provider.shutdown()


def test_unknown_exporter_is_rejected_at_compose_time():
    with pytest.raises(ValueError, match="tracing.exporter must be none, console or otlp"):
        compose_config(["tracing.exporter=zipkin"])
    cfg = compose_config(["tracing=otlp", "tracing.endpoint=http://127.0.0.1:4318/v1/traces"])
    assert cfg.tracing.exporter == "otlp" and cfg.tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert compose_config(["tracing=console"]).tracing.exporter == "console"


# ------------------------------------------------------------------------- OTLP export


class _Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.bodies: list[bytes] = []
        self.headers_seen: list[dict[str, str]] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.bodies.append(body)
        self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        self.server.paths.append(self.path)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def decode_otlp(bodies):
    """The spans of OTLP/http protobuf bodies: [(service names, scope name, span)]."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    out = []
    for body in bodies:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            services = {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                out.extend((frozenset(services), ss.scope.name, span) for span in ss.spans)
    return out


def check_otlp_tree(decoded):
    """Stage spans are children of iteration spans of the same trace; iteration spans carry
    the loop name. Returns {span name: count}."""
    spans = [span for _, _, span in decoded]
    iterations = {(sp.trace_id, sp.span_id): sp for sp in spans if sp.name == ITERATION_SPAN}
    for sp in spans:
        if sp.name in ALL_STAGES:
            assert (sp.trace_id, sp.parent_span_id) in iterations, f"orphan stage span {sp.name}"
    for it in iterations.values():
        assert not it.parent_span_id
        assert any(a.key == "loopserve.loop.name" and a.value.string_value for a in it.attributes)
    return Counter(sp.name for sp in spans)


@pytest.mark.parametrize("exporter_override", ["tracing=otlp", "tracing.exporter=otlp"])
def test_otlp_export_reaches_a_local_receiver(fake_engine, receiver, exporter_override):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    port = receiver.server_address[1]
    engine = fake_engine("loop=normal", exporter_override, f"tracing.endpoint=http://127.0.0.1:{port}/v1/traces",
                         "tracing.sample_ratio=1.0", "tracing.service_name=otlp-test",
                         "+tracing.headers.x-loopserve-test=yes")
    outs = engine.generate(input_ids=[[3, 4, 5], [6, 7]], sampling_params=SamplingParams(max_new_tokens=3),
                           traceparent=TRACEPARENT, timeout=TIMEOUT)
    engine.shutdown()  # flushes the batch processor (bounded)
    assert receiver.bodies, "nothing was exported"
    assert set(receiver.paths) == {"/v1/traces"}
    assert all(h.get("x-loopserve-test") == "yes" for h in receiver.headers_seen)
    assert all(h.get("content-type") == "application/x-protobuf" for h in receiver.headers_seen)
    names: Counter[str] = Counter()
    services = set()
    request_parents = []
    for body in receiver.bodies:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                assert ss.scope.name == "loopserve"
                for span in ss.spans:
                    names[span.name] += 1
                    if span.name == REQUEST_SPAN:
                        request_parents.append((span.trace_id.hex(), span.parent_span_id.hex()))
    assert services == {"otlp-test"}
    assert names[REQUEST_SPAN] == len(outs) == 2
    assert names[ITERATION_SPAN] >= 3
    assert {STAGE_SPANS[s] for s in ("recv_requests", "process_input_requests", "get_next_batch_to_run",
                                     "run_batch", "process_batch_result")} <= set(names)
    assert request_parents == [(TRACE_ID, PARENT_ID)] * 2
    assert check_otlp_tree(decode_otlp(receiver.bodies)) == names


def test_otlp_with_no_collector_does_not_hang_shutdown(fake_engine, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    engine = fake_engine("loop=normal", "tracing=otlp", f"tracing.endpoint=http://127.0.0.1:{port}/v1/traces")
    (out,) = engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=2), timeout=TIMEOUT)
    assert len(out.token_ids) == 2  # export failures never reach requests
    t0 = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - t0 < 25


# ------------------------------------------------------------------------- CLI


def test_cli_generate_with_console_tracing_prints_spans():
    """The real tiny model (default worker), from the console script's module."""
    proc = subprocess.run(
        [sys.executable, "-m", "loopserve.core.cli", "generate", "prompt=Hi", "tracing=console",
         "tracing.sample_ratio=1.0", "sampling.max_new_tokens=4"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"name"' not in proc.stdout  # stdout is the completion only; spans go to stderr
    err = proc.stderr
    assert '"name": "loopserve.request"' in err
    assert '"name": "loopserve.iteration"' in err and '"name": "loopserve.run_batch"' in err
    assert '"gen_ai.request.model": "tiny-llama-v1"' in err


def test_cli_generate_exports_otlp_with_the_exporter_key(receiver):
    """``tracing.exporter=otlp`` (the key, not the group) from the console script, with the
    endpoint, a header, a service name and a sample ratio: every span reaches the receiver
    by the time the process exits (flushed on shutdown)."""
    port = receiver.server_address[1]
    proc = subprocess.run(
        [sys.executable, "-m", "loopserve.core.cli", "generate", "prompt=Hi", "tracing.exporter=otlp",
         f"tracing.endpoint=http://127.0.0.1:{port}/v1/traces", "+tracing.headers.authorization=Bearer t0ken",
         "tracing.service_name=cli-svc", "tracing.sample_ratio=1.0", "sampling.max_new_tokens=3",
         "sampling.ignore_eos=true"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert receiver.bodies, "nothing was exported"
    assert all(h.get("authorization") == "Bearer t0ken" for h in receiver.headers_seen)
    decoded = decode_otlp(receiver.bodies)
    assert {svc for svc, _, _ in decoded} == {frozenset({"cli-svc"})}
    names = check_otlp_tree(decoded)
    assert names[REQUEST_SPAN] == 1
    assert names[ITERATION_SPAN] >= 3  # prefill + 2 decodes, all sampled at ratio 1
    assert {STAGE_SPANS[s] for s in ("recv_requests", "process_input_requests", "get_next_batch_to_run",
                                     "run_batch", "process_batch_result")} <= set(names)



def test_server_request_span_is_parented_on_the_callers_traceparent(receiver):
    """``loopserve serve`` with OTLP export: an HTTP request carrying a W3C ``traceparent``
    header gets its request span in the caller's trace, as a child of the caller's span (the
    header crosses the frontend -> scheduler-process hop); a request without one starts a
    trace of its own. Spans are flushed when the server shuts down."""
    import httpx
    from server_util import ServerProc

    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    port = receiver.server_address[1]
    srv = ServerProc("tracing.exporter=otlp", f"tracing.endpoint=http://127.0.0.1:{port}/v1/traces",
                     "tracing.sample_ratio=0.0", "tracing.service_name=serve-svc")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}, timeout=60)
        assert r.status_code == 200
        r = httpx.post(srv.url + "/generate", json={"text": "y", "sampling_params": {"max_new_tokens": 2}}, timeout=60)
        assert r.status_code == 200
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log_path
    requests = [span for _, _, span in decode_otlp(receiver.bodies) if span.name == REQUEST_SPAN]
    assert len(requests) == 2, [span.name for _, _, span in decode_otlp(receiver.bodies)]
    parented = [s for s in requests if s.trace_id.hex() == trace_id]
    assert len(parented) == 1 and parented[0].parent_span_id.hex() == parent_id
    other = next(s for s in requests if s is not parented[0])
    assert other.trace_id.hex() != trace_id and not other.parent_span_id
