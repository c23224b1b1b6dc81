"""The scheduler on the deterministic fake worker: exact outputs under continuous batching,
stop conditions, aborts, KV-leak detection, and a randomized memory test with retraction.

FakeWorker's next token depends on tokens it reads back from its KV slots, so any slot the
scheduler hands out wrongly (shared, stale, freed too early) changes the outputs, and
``reference_tokens`` (no KV cache at all) is the oracle.
"""

from __future__ import annotations

import random

import pytest

from loopserve.core import ForwardMode, SamplingParams
from loopserve.core.sched.scheduler import KVLeakError

from fake_worker import EOS, Stepped, reference_tokens, wait_until

TIMEOUT = 30.0


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def assert_engine_memory_free(engine, timeout: float = 10.0) -> None:
    s = engine.scheduler
    wait_until(lambda: s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
               and s.req_pool.num_free == s.req_pool.size
               and not s.running and not s.waiting_queue, timeout, what="all KV pages and request rows free")
    assert engine._loop_error is None
    s.self_check_during_idle()


# ------------------------------------------------------------------------- exact outputs


@pytest.mark.parametrize("page_size", [1, 4])
def test_engine_outputs_equal_reference_for_mixed_lengths(fake_engine, page_size):
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 97) for _ in range(n)] for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 4, 7, 16)]
    lens = [rng.randrange(1, 20) for _ in prompts]
    engine = fake_engine("loop=normal", f"kv_cache.page_size={page_size}")
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in lens], timeout=TIMEOUT)
    for prompt, n, out in zip(prompts, lens, outs):
        assert out.token_ids == reference_tokens(prompt, n)
        assert out.finish_reason == "length"
        assert out.prompt_token_ids == prompt
    assert_engine_memory_free(engine)


def test_single_prompt_as_flat_list(fake_engine):
    engine = fake_engine("loop=normal")
    (out,) = engine.generate(input_ids=[9, 8, 7], sampling_params=greedy(4), timeout=TIMEOUT)
    assert out.token_ids == reference_tokens([9, 8, 7], 4)


def test_stepped_scheduler_outputs_equal_reference():
    st = Stepped("loop=normal", "kv_cache.page_size=2")
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 97) for _ in range(rng.randrange(1, 30))] for _ in range(10)]
    reqs = [st.submit(p, max_new_tokens=rng.randrange(1, 15))[0] for p in prompts]
    st.run_until_done(reqs, max_steps=500)
    for req in reqs:
        assert req.output_ids == reference_tokens(req.input_ids, req.sampling_params.max_new_tokens)
    st.settle()
    st.assert_all_free()


# ------------------------------------------------------------------------- continuous batching


def test_continuous_batching_stepped():
    st = Stepped("loop=normal")
    a, b = st.submit([10, 11, 12], [20, 21], max_new_tokens=8)
    modes = []

    def step():
        assert st.step()
        fb = st.worker.batches[-1]
        modes.append((fb.forward_mode, list(fb.req_pool_indices)))

    step()  # prefill a, b
    step()  # decode
    step()  # decode
    (c,) = st.submit([30, 31, 32, 33], max_new_tokens=4)
    step()  # c's prefill goes between the decodes
    step()  # decode of all three
    ra, rb, rc = a.req_pool_idx, b.req_pool_idx, c.req_pool_idx
    assert modes == [
        (ForwardMode.EXTEND, [ra, rb]),
        (ForwardMode.DECODE, [ra, rb]),
        (ForwardMode.DECODE, [ra, rb]),
        (ForwardMode.EXTEND, [rc]),
        (ForwardMode.DECODE, [ra, rb, rc]),
    ]
    assert len(a.output_ids) == 4 and len(c.output_ids) == 2
    st.run_until_done([a, b, c], max_steps=50)
    for req in (a, b, c):
        assert req.output_ids == reference_tokens(req.input_ids, req.sampling_params.max_new_tokens)
    st.settle()
    st.assert_all_free()


def test_continuous_batching_engine(fake_engine, fake_plugin):
    engine = fake_engine("loop=normal", "+worker.params.delay_s=0.002")
    first = engine.submit(input_ids=[40, 41, 42], sampling_params=greedy(400))
    wait_until(lambda: len(first.req.output_ids) >= 3, TIMEOUT, what="first request decoding")
    late_prompt = [50, 51, 52, 53, 54]
    late = engine.submit(input_ids=late_prompt, sampling_params=greedy(5))
    out_late = late.result(TIMEOUT)
    assert not first.done()  # the late request joined and finished while the first decodes
    engine.abort(first.rid)
    out_first = first.result(TIMEOUT)
    assert out_late.token_ids == reference_tokens(late_prompt, 5)
    assert out_first.token_ids == reference_tokens([40, 41, 42], len(out_first.token_ids))
    batches = fake_plugin.last.batches
    late_prefill = next(i for i, b in enumerate(batches)
                        if b.forward_mode is ForwardMode.EXTEND and b.input_ids == late_prompt)
    assert late_prefill >= 3
    assert batches[late_prefill - 1].forward_mode is ForwardMode.DECODE
    after = batches[late_prefill + 1: late_prefill + 5]
    assert [(b.forward_mode, b.batch_size) for b in after] == [(ForwardMode.DECODE, 2)] * 4  # old and new together
    assert_engine_memory_free(engine)


# ------------------------------------------------------------------------- stop conditions


def _prompt_with_eos(min_index: int = 1, n: int = 12) -> tuple[list[int], int]:
    """A prompt whose greedy continuation hits token EOS at position >= min_index (< n)."""
    for a in range(2, 97):
        prompt = [a, a + 1 if a < 96 else 2, 7]
        ref = reference_tokens(prompt, n)
        if EOS in ref and ref.index(EOS) >= min_index:
            return prompt, ref.index(EOS)
    raise AssertionError("no prompt found")


def test_max_new_tokens_is_length(fake_engine):
    engine = fake_engine("loop=normal")
    (out,) = engine.generate(input_ids=[[3, 5, 7]], sampling_params=greedy(6), timeout=TIMEOUT)
    assert out.finish_reason == "length" and len(out.token_ids) == 6 and out.matched_stop is None


def test_eos_stops_and_ignore_eos_continues(fake_engine):
    prompt, at = _prompt_with_eos()
    n = at + 5
    engine = fake_engine("loop=normal", "+worker.params.eos=true")
    stop, cont = engine.generate(input_ids=[prompt, prompt], timeout=TIMEOUT,
                                 sampling_params=[greedy(n), greedy(n, ignore_eos=True)])
    ref = reference_tokens(prompt, n)
    assert stop.token_ids == ref[: at + 1] and stop.token_ids[-1] == EOS
    assert stop.finish_reason == "stop" and stop.matched_stop == EOS
    assert cont.token_ids == ref and cont.finish_reason == "length"


def test_without_eos_ids_token_1_is_ordinary(fake_engine):
    prompt, at = _prompt_with_eos()
    engine = fake_engine("loop=normal")  # FakeWorker(eos=False): no EOS ids
    (out,) = engine.generate(input_ids=[prompt], sampling_params=greedy(at + 3), timeout=TIMEOUT)
    assert out.finish_reason == "length" and len(out.token_ids) == at + 3


def test_stop_token_ids(fake_engine):
    prompt = [11, 22, 33, 44]
    ref = reference_tokens(prompt, 20)
    k = next(i for i in range(2, 20) if ref[i] not in ref[:i])
    engine = fake_engine("loop=normal")
    (out,) = engine.generate(input_ids=[prompt], sampling_params=greedy(20, stop_token_ids=[ref[k]]), timeout=TIMEOUT)
    assert out.token_ids == ref[: k + 1]
    assert out.finish_reason == "stop" and out.matched_stop == ref[k]


def test_context_length_reached_is_length(fake_engine):
    prompt = list(range(2, 12))  # 10 tokens; the worker's context is 16
    engine = fake_engine("loop=normal", "+worker.params.context_len=16")
    (out,) = engine.generate(input_ids=[prompt], sampling_params=greedy(100), timeout=TIMEOUT)
    assert out.finish_reason == "length"
    assert out.token_ids == reference_tokens(prompt, 6)  # 10 + 6 = 16 tokens
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[list(range(2, 18))], sampling_params=greedy(1))
    assert_engine_memory_free(engine)


# ------------------------------------------------------------------------- aborts


def test_abort_queued_request(fake_engine):
    engine = fake_engine("loop=normal", "scheduler.max_running_requests=1", "+worker.params.delay_s=0.002")
    running = engine.submit(input_ids=[5, 6, 7], sampling_params=greedy(60))
    queued = engine.submit(input_ids=[8, 9], sampling_params=greedy(40))
    wait_until(lambda: len(running.req.output_ids) >= 2, TIMEOUT, what="first request running")
    engine.abort(queued.rid)  # still queued: only one request may run at a time
    out_q = queued.result(TIMEOUT)
    assert out_q.finish_reason == "abort" and out_q.token_ids == [] and out_q.error
    out_r = running.result(TIMEOUT)  # undisturbed by the abort
    assert out_r.token_ids == reference_tokens([5, 6, 7], 60) and out_r.finish_reason == "length"
    assert_engine_memory_free(engine)
    assert engine.scheduler.stats.num_aborted == 1


def test_abort_running_request(fake_engine):
    engine = fake_engine("loop=normal", "+worker.params.delay_s=0.002")
    victim = engine.submit(input_ids=[5, 6, 7], sampling_params=greedy(400))
    other = engine.submit(input_ids=[8, 9, 10, 11], sampling_params=greedy(30))
    wait_until(lambda: len(victim.req.output_ids) >= 3, TIMEOUT, what="victim decoding")
    engine.abort(victim.rid)
    out_v = victim.result(TIMEOUT)
    out_o = other.result(TIMEOUT)
    assert out_v.finish_reason == "abort"
    assert 3 <= len(out_v.token_ids) < 400
    assert out_v.token_ids == reference_tokens([5, 6, 7], len(out_v.token_ids))
    assert out_o.finish_reason == "length" and out_o.token_ids == reference_tokens([8, 9, 10, 11], 30)
    assert_engine_memory_free(engine)


def test_abort_unknown_or_finished_request_is_harmless(fake_engine):
    engine = fake_engine("loop=normal")
    (out,) = engine.generate(input_ids=[[4, 5]], sampling_params=greedy(3), timeout=TIMEOUT)
    engine.abort(out.rid)
    engine.abort("no-such-request")
    (again,) = engine.generate(input_ids=[[4, 5]], sampling_params=greedy(3), timeout=TIMEOUT)
    assert again.token_ids == out.token_ids and again.finish_reason == "length"
    assert engine.scheduler.stats.num_aborted == 0
    assert_engine_memory_free(engine)


def test_abort_stepped_frees_memory_at_once():
    st = Stepped("loop=normal", "scheduler.max_running_requests=2", "kv_cache.page_size=1")
    a, b, c = st.submit([5, 6, 7], [8, 9], [10, 11, 12, 13], max_new_tokens=10)
    st.step()  # a, b prefilled; c waits (max 2 running)
    assert c in st.scheduler.waiting_queue and st.scheduler.running == [a, b]
    st.scheduler.abort(c.rid)
    st.scheduler.abort(a.rid)
    used_by_a = len(a.kv_pages)
    free_before = st.scheduler.kv.available_pages()  # free + evictable cached pages
    st.step()  # applies both aborts, frees a, decodes b
    assert a.finished_reason.kind.value == "abort" and c.finished_reason.kind.value == "abort"
    assert c.output_ids == [] and len(a.output_ids) == 1
    assert a.kv_pages == [] and a.req_pool_idx is None
    assert st.scheduler.running == [b]
    # a's pages went back (free, or cached for reuse); b took one page for its next token.
    assert st.scheduler.kv.available_pages() == free_before + used_by_a - 1
    st.run_until_done([b], max_steps=20)
    assert b.output_ids == reference_tokens([8, 9], 10)
    st.settle()
    st.assert_all_free()
    assert st.scheduler.stats.num_aborted == 2


# ------------------------------------------------------------------------- leak detection


def test_idle_check_passes_when_nothing_leaked():
    st = Stepped("loop=normal")
    (req,) = st.submit([1, 2, 3], max_new_tokens=5)
    st.run_until_done([req])
    st.settle()
    st.scheduler.self_check_during_idle()
    assert st.step() is False  # an idle iteration runs the check itself


def test_idle_check_catches_a_leaked_page():
    st = Stepped("loop=normal")
    (req,) = st.submit([1, 2, 3], max_new_tokens=5)
    st.run_until_done([req])
    st.settle()
    leaked = st.scheduler.allocator.alloc(1)  # behind the scheduler's back
    assert leaked
    with pytest.raises(KVLeakError, match="leak"):
        st.step()
    st.scheduler.allocator.free(leaked)
    st.step()


def test_idle_check_catches_a_leaked_request_row():
    st = Stepped("loop=normal")
    row = st.scheduler.req_pool.alloc()
    with pytest.raises(KVLeakError, match="row"):
        st.scheduler.self_check_during_idle()
    st.scheduler.req_pool.free(row)
    st.scheduler.self_check_during_idle()


def test_leak_in_engine_loop_surfaces_as_error(fake_engine):
    engine = fake_engine("loop=normal")
    engine.generate(input_ids=[[3, 4]], sampling_params=greedy(2), timeout=TIMEOUT)
    engine.scheduler.allocator.alloc(1)
    wait_until(lambda: engine._loop_error is not None, TIMEOUT, what="the loop to report the leak")
    assert isinstance(engine._loop_error, KVLeakError)
    with pytest.raises(RuntimeError, match="loop failed"):
        engine.generate(input_ids=[[3, 4]], sampling_params=greedy(2), timeout=TIMEOUT)


# ------------------------------------------------------------------------- memory pressure


OPTIMISTIC = ("scheduler.init_new_token_ratio=0.05", "scheduler.min_new_token_ratio=0.0")


def _random_workload(rng: random.Random, n: int):
    return [([rng.randrange(2, 97) for _ in range(rng.randrange(1, 40))], rng.randrange(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_memory_stress_stepped(page_size):
    """200 random requests arriving over time, ~20% aborted at random moments, a KV pool far
    smaller than the demand: retraction happens, nothing is lost, nothing leaks."""
    rng = random.Random(1234 + page_size)
    # An optimistic growth estimate admits more than fits later, so decode must retract.
    st = Stepped("loop=normal", f"kv_cache.num_tokens={64 * page_size + 96}", f"kv_cache.page_size={page_size}",
                 "scheduler.max_running_requests=32", *OPTIMISTIC)
    work = _random_workload(rng, 200)
    pending = list(work)
    reqs = []
    aborted = set()
    steps = 0
    while pending or not all(r.finished for r in reqs):
        steps += 1
        assert steps < 20_000, "no progress"
        if pending and rng.random() < 0.5:
            batch = [pending.pop(0) for _ in range(min(len(pending), rng.randrange(1, 8)))]
            for prompt, n in batch:
                reqs.extend(st.submit(prompt, max_new_tokens=n))
        live = [r for r in reqs if not r.finished and r.rid not in aborted]
        if live and len(aborted) < 40 and rng.random() < 0.12:
            victim = rng.choice(live)
            aborted.add(victim.rid)
            st.scheduler.abort(victim.rid)
        st.step()
    st.settle()
    st.assert_all_free()
    stats = st.scheduler.stats
    assert stats.num_retractions > 0
    assert len(aborted) >= 30
    assert any(r.num_retractions for r in reqs if r.rid not in aborted)
    for req in reqs:
        ref = reference_tokens(req.input_ids, req.sampling_params.max_new_tokens)
        kind = req.finished_reason.kind.value
        if req.rid in aborted:
            assert kind == "abort"
            assert req.output_ids == ref[: len(req.output_ids)]
        else:
            assert kind == "length", (req.rid, req.finished_reason)
            assert req.output_ids == ref, req.rid
    assert stats.num_aborted == len(aborted)
    assert stats.num_finished == 200 - len(aborted)


@pytest.mark.parametrize("page_size", [1, 4])
def test_memory_stress_engine(fake_engine, page_size):
    """The same through the threaded Engine: requests and aborts arrive while the loop runs."""
    rng = random.Random(99 + page_size)
    engine = fake_engine("loop=normal", f"kv_cache.num_tokens={64 * page_size + 96}",
                         f"kv_cache.page_size={page_size}", "scheduler.max_running_requests=32",
                         "+worker.params.delay_s=0.0003", *OPTIMISTIC)
    work = _random_workload(rng, 200)
    handles = [engine.submit(input_ids=prompt, sampling_params=greedy(n)) for prompt, n in work]
    aborted = set()
    for _ in range(40):
        # Abort at a random moment: after a random number of further forward passes.
        forwards = engine.scheduler.stats.num_forwards + rng.randrange(1, 12)
        wait_until(lambda: engine.scheduler.stats.num_forwards >= forwards or all(h.done() for h in handles),
                   TIMEOUT, what="progress")
        live = [h for h in handles if not h.done() and h.rid not in aborted]
        if live:
            victim = rng.choice(live)
            aborted.add(victim.rid)
            engine.abort(victim.rid)
    outs = [h.result(60) for h in handles]
    assert_engine_memory_free(engine)
    assert engine.scheduler.stats.num_retractions > 0
    for (prompt, n), out in zip(work, outs):
        ref = reference_tokens(prompt, n)
        if out.finish_reason == "abort":
            assert out.rid in aborted
            assert out.token_ids == ref[: len(out.token_ids)]
        else:
            assert out.finish_reason == "length"
            assert out.token_ids == ref
    # Most aborts land on a live request (some race with its last token, which is fine).
    assert sum(o.finish_reason == "abort" for o in outs) >= 10


def test_decode_reserve_with_pages_avoids_needless_retraction():
    """A running request at a page edge keeps the page its next token needs: a newcomer that
    would take it waits instead of being admitted and retracted right away."""
    st = Stepped("loop=normal", "kv_cache.num_tokens=8", "kv_cache.page_size=4")
    (a,) = st.submit([2, 3, 4, 5], max_new_tokens=3)
    st.step()  # a: 4 prompt tokens in one page; its first decode needs a second page
    (b,) = st.submit([6, 7, 8], max_new_tokens=3)
    st.run_until_done([a, b], max_steps=50)
    assert st.scheduler.stats.num_retractions == 0
    assert a.output_ids == reference_tokens([2, 3, 4, 5], 3)
    assert b.output_ids == reference_tokens([6, 7, 8], 3)
    st.settle()
    st.assert_all_free()


# ------------------------------------------------------------------------- requests that do not fit


def test_prompt_larger_than_the_kv_pool_is_rejected(fake_engine):
    engine = fake_engine("loop=normal", "kv_cache.num_tokens=32")
    with pytest.raises(ValueError, match=r"kv_cache\.num_tokens"):
        engine.generate(input_ids=[[5] * 40], sampling_params=greedy(2))
    with pytest.raises(ValueError, match=r"kv_cache\.num_tokens"):
        engine.generate(input_ids=[[5] * 3, [5] * 32], sampling_params=greedy(2))  # nothing of the call queued
    assert not engine.scheduler.waiting_queue and engine.scheduler.stats.num_aborted == 0
    (out,) = engine.generate(input_ids=[[5] * 31], sampling_params=greedy(1), timeout=TIMEOUT)
    assert out.finish_reason == "length"


def test_request_outgrowing_the_pool_alone_is_aborted(fake_engine):
    engine = fake_engine("loop=normal", "kv_cache.num_tokens=32")
    prompt = list(range(2, 12))
    (out,) = engine.generate(input_ids=[prompt], sampling_params=greedy(100), timeout=TIMEOUT)
    assert out.finish_reason == "abort"
    assert "kv_cache.num_tokens" in out.error
    assert out.token_ids == reference_tokens(prompt, len(out.token_ids))
    assert len(out.token_ids) == 32 - len(prompt) + 1  # the pool held the whole sequence but its newest token
    assert_engine_memory_free(engine)
    (ok,) = engine.generate(input_ids=[prompt], sampling_params=greedy(5), timeout=TIMEOUT)
    assert ok.token_ids == reference_tokens(prompt, 5)


def test_scheduling_core_rejects_bad_requests_from_other_frontends():
    st = Stepped("loop=normal", "kv_cache.num_tokens=16")
    empty, big = st.submit([], [3] * 20, max_new_tokens=2)
    st.step()
    assert empty.finished_reason.kind.value == "abort" and "empty" in empty.finished_reason.message
    assert big.finished_reason.kind.value == "abort" and "kv_cache.num_tokens" in big.finished_reason.message
    st.assert_all_free()
