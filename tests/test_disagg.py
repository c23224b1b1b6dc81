"""Disaggregated prefill and decode through ``Engine``: a prefill engine and a decode engine in
one process, paired per request by ``bootstrap_host/port/room`` like sglang-router pairs two
servers. The decode engine's outputs must equal a single engine's; failed transfers must fail
their request within ``disaggregation.transfer_timeout_s``, free its KV and leave the engines
serving (and their idle checks passing)."""

from __future__ import annotations

import os

import itertools
import threading
import time

import pytest

from loopserve.core import Engine, SamplingParams
from loopserve.core.disagg.decode import DecodeScheduler
from loopserve.core.disagg.prefill import PrefillScheduler

TIMEOUT = 60
_rooms = itertools.count(1000)

PROMPTS = ["Hello world, this is a test", "The quick brown fox jumps over the lazy dog " * 3, "a",
           "0123456789" * 5]


def make_pair(*overrides: str, backend: str = "zmq"):
    common = ["disaggregation.bootstrap_port=0", f"disaggregation.transfer_backend={backend}",
              "kv_cache.num_tokens=4096", *overrides]
    prefill = Engine(overrides=[*common, "disaggregation.mode=prefill"])
    try:
        decode = Engine(overrides=[*common, "disaggregation.mode=decode"])
    except BaseException:
        prefill.shutdown()
        raise
    return prefill, decode


@pytest.fixture
def pair():
    made = []

    def make(*overrides, **kw):
        p, d = make_pair(*overrides, **kw)
        made.extend([p, d])
        return p, d

    yield make
    for engine in made:
        engine.shutdown()


def bootstrap(prefill: Engine, n: int) -> dict:
    return {"bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.scheduler.bootstrap_port,
            "bootstrap_room": [next(_rooms) for _ in range(n)]}


def run_disagg(prefill: Engine, decode: Engine, sp, prompts=None, input_ids=None):
    """Send the same batch to both engines (as the router does); the decode outputs."""
    n = len(prompts if prompts is not None else input_ids)
    kw = bootstrap(prefill, n)
    results = {}

    def run_prefill():
        results["prefill"] = prefill.generate(prompts, sp, input_ids=input_ids, timeout=TIMEOUT, **kw)

    t = threading.Thread(target=run_prefill)
    t.start()
    outs = decode.generate(prompts, sp, input_ids=input_ids, timeout=TIMEOUT, **kw)
    t.join(TIMEOUT)
    assert all(o.finish_reason == "length" and o.error is None for o in results["prefill"]), [
        o.error for o in results["prefill"]]
    return outs


def assert_idle(*engines: Engine) -> None:
    """Both servers drained: no rooms, no queues, KV books balanced (the loop's own idle check
    raising would have stopped it)."""
    for e in engines:
        deadline = time.monotonic() + 10
        s = e.scheduler
        while (len(s.rooms) or s.has_work or s.has_transfers) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert e._loop_error is None
        assert not len(s.rooms) and not s.has_work and not s.has_transfers
        s.kv.check([], idle=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_outputs_equal_a_single_engine(pair, overlap):
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    with Engine(overrides=["kv_cache.num_tokens=4096"]) as single:
        ref = single.generate(PROMPTS, sp, timeout=TIMEOUT)
    p, d = pair(f"scheduler.enable_overlap={str(overlap).lower()}")
    assert isinstance(p.scheduler, PrefillScheduler) and isinstance(d.scheduler, DecodeScheduler)
    assert (p.loop.runner.depth, d.loop.runner.depth) == ((1, 1) if overlap else (0, 0))
    outs = run_disagg(p, d, sp, prompts=PROMPTS)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.text for o in outs] == [r.text for r in ref]
    assert all(o.finish_reason == "length" for o in outs)
    assert_idle(p, d)


def test_chunked_prefill_and_small_pages(pair):
    """The prefill computes the prompt in chunks; pages of one token."""
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(overrides=["kv_cache.num_tokens=4096", "kv_cache.page_size=1"]) as single:
        ref = single.generate(PROMPTS, sp, timeout=TIMEOUT)
    p, d = pair("scheduler.chunked_prefill_size=7", "kv_cache.page_size=1")
    outs = run_disagg(p, d, sp, prompts=PROMPTS)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert_idle(p, d)


def test_sim_worker_continues_from_the_transferred_kv(pair):
    from loopserve.plugins.worker_sim import reference_tokens

    p, d = pair("worker=sim", "worker.params.sleep=false", "worker.params.context_len=512")
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(n)] for i, n in enumerate([1, 15, 16, 17, 100])]
    sp = SamplingParams(max_new_tokens=9, temperature=0.0)
    outs = run_disagg(p, d, sp, input_ids=prompts)
    vocab = d.worker.vocab_size
    assert [o.token_ids for o in outs] == [reference_tokens(x, 9, vocab) for x in prompts]
    assert_idle(p, d)


def test_mooncake_backend(pair):
    if not os.environ.get("CI"):  # CI installs it: there a missing install must fail
        pytest.importorskip("mooncake.engine")
    sp = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    with Engine(overrides=["kv_cache.num_tokens=4096"]) as single:
        ref = single.generate(PROMPTS[:2], sp, timeout=TIMEOUT)
    p, d = pair(backend="mooncake")
    outs = run_disagg(p, d, sp, prompts=PROMPTS[:2])
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert_idle(p, d)


def test_stop_conditions_apply_to_the_first_token(pair):
    p, d = pair()
    (first,) = run_disagg(p, d, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
                          prompts=["stop here"])
    assert len(first.token_ids) == 1 and first.finish_reason == "length"
    (stopped,) = run_disagg(p, d, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                 stop_token_ids=[first.token_ids[0]]), prompts=["stop here"])
    assert stopped.token_ids == first.token_ids and stopped.finish_reason == "stop"
    assert_idle(p, d)


def test_bootstrap_fields_are_required_and_rooms_unique(pair):
    p, d = pair()
    sp = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="missing bootstrap_room"):
        d.generate(["x"], sp, bootstrap_host="127.0.0.1", bootstrap_port=8998)
    with pytest.raises(ValueError, match="bootstrap_port"):
        d.submit("x", sp, bootstrap_host="127.0.0.1", bootstrap_port="8998", bootstrap_room=1)
    with pytest.raises(ValueError, match="must differ"):
        d.generate(["x", "y"], sp, bootstrap_host="127.0.0.1", bootstrap_port=8998, bootstrap_room=[5, 5])
    kw = bootstrap(p, 1)
    kw["bootstrap_room"] = kw["bootstrap_room"][0]
    handle = d.submit("x", sp, **kw)  # waits for its prefill half
    with pytest.raises(ValueError, match="already in use"):
        d.submit("y", sp, **kw)
    p.generate(["x"], sp, timeout=TIMEOUT, **kw)
    assert handle.result(TIMEOUT).finish_reason == "length"
    assert_idle(p, d)


def test_missing_prefill_half_fails_within_the_timeout(pair):
    """Decode waits for KV that never comes: the request fails with an error after the
    timeout, its reserved pages are freed, and the next request is served."""
    p, d = pair("disaggregation.transfer_timeout_s=2")
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    kw = bootstrap(p, 1)
    start = time.monotonic()
    (out,) = d.generate(["orphan"], sp, timeout=TIMEOUT, **kw)
    assert out.finish_reason == "abort" and "KV transfer failed" in out.error
    assert time.monotonic() - start < 5.0
    (ok,) = run_disagg(p, d, sp, prompts=["fine"])
    assert ok.finish_reason == "length" and len(ok.token_ids) == 4
    assert_idle(p, d)


def test_missing_decode_half_frees_prefill_kv_after_the_timeout(pair):
    p, d = pair("disaggregation.transfer_timeout_s=2")
    sp = SamplingParams(max_new_tokens=4)
    (out,) = p.generate(["nobody decodes this"], sp, timeout=TIMEOUT, **bootstrap(p, 1))
    assert out.finish_reason == "abort" and "did not ask" in out.error
    assert_idle(p, d)


def test_prefill_server_gone_fails_the_decode_request(pair):
    p, d = pair("disaggregation.transfer_timeout_s=2")
    kw = bootstrap(p, 1)
    p.shutdown()  # its bootstrap server and endpoint are gone
    (out,) = d.generate(["x"], SamplingParams(max_new_tokens=3), timeout=TIMEOUT, **kw)
    assert out.finish_reason == "abort" and "could not be reached" in out.error
    assert_idle(d)


def test_abort_while_waiting_for_kv(pair):
    p, d = pair()
    kw = bootstrap(p, 1)
    kw["bootstrap_room"] = kw["bootstrap_room"][0]
    handle = d.submit("x", SamplingParams(max_new_tokens=3), **kw)
    time.sleep(0.1)
    d.abort(handle.rid)
    out = handle.result(TIMEOUT)
    assert out.finish_reason == "abort"
    assert_idle(d)


def test_transfer_stages_and_requests_are_traced():
    """The roles' extra stages run as traced stages like the built-in ones; both halves of a
    request get a request span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    common = ["disaggregation.bootstrap_port=0", "kv_cache.num_tokens=4096", "tracing.sample_ratio=1.0"]
    with Engine(overrides=[*common, "disaggregation.mode=prefill"], tracer_provider=provider) as p, \
            Engine(overrides=[*common, "disaggregation.mode=decode"], tracer_provider=provider) as d:
        outs = run_disagg(p, d, SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True),
                          prompts=["traced"])
        assert len(outs[0].token_ids) == 3
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"loopserve.process_bootstrap_queue", "loopserve.process_inflight_queue",
            "loopserve.process_prealloc_queue", "loopserve.process_transfer_queue"} <= names
    loops = {s.attributes.get("loopserve.loop.name") for s in exporter.get_finished_spans()}
    assert {"disagg_prefill", "disagg_decode"} <= loops
    assert sum(s.name == "loopserve.request" for s in exporter.get_finished_spans()) == 2
