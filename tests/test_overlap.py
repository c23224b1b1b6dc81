"""The overlap loop (``loop=overlap``): the same greedy tokens as the normal loop over a mixed
workload, nothing emitted past a stop condition although one extra decode step runs, the
launch / launch_done / process ordering, the primed first batch and the one-step lag, no leak
after a drain, a prompt shutdown that leaves no thread behind, ``auto`` selection and the
grad mode inside the forward thread.

The fake worker's outputs have an exact oracle (``reference_tokens``); the real embedded tiny
model is checked normal-vs-overlap. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

from loopserve.core import Engine, ForwardMode, SamplingParams, hookimpl
from loopserve.core.sched.req import FinishKind
from loopserve.plugins.loop_overlap import OverlapLoop

from fake_worker import EOS, Stepped, reference_tokens, wait_until

TIMEOUT = 30.0
LOOP_THREADS = ("loopserve-forward", "loopserve-loop")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def real_ids(ids) -> int:
    """How many of ``ids`` are real tokens (not the overlap loop's negative placeholders)."""
    return sum(1 for t in list(ids) if t >= 0)


def assert_engine_memory_free(engine, timeout: float = 10.0) -> None:
    """After a drain: every page free or cached-and-unlocked, every row free, idle check passes."""
    s = engine.scheduler

    def drained() -> bool:
        return (not s.running and not s.waiting_queue and not getattr(getattr(engine.loop, "runner", None), "queue", None)
                and s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
                and s.req_pool.num_free == s.req_pool.size)

    wait_until(lambda: engine._loop_error is not None or drained(), timeout, what="all KV pages and rows free")
    assert engine._loop_error is None, repr(engine._loop_error.__cause__ or engine._loop_error)
    assert s.tree_cache is None or s.tree_cache.protected_pages == 0
    s.self_check_during_idle()


def expected_fake(prompt: list[int], sp: SamplingParams, eos: bool) -> list[int]:
    """FakeWorker's greedy output for ``prompt`` under ``sp``: the reference, cut after the first
    stop token id (or EOS) — the stop token itself is kept, nothing after it."""
    out = reference_tokens(prompt, sp.max_new_tokens)
    stops = set(sp.stop_token_ids) | ({EOS} if eos and not sp.ignore_eos else set())
    for i, t in enumerate(out):
        if t in stops:
            return out[: i + 1]
    return out


def find_prompt_with_token_at(rng: random.Random, token: int | None, lo: int, hi: int,
                              n: int = 40) -> tuple[list[int], int]:
    """A prompt whose reference output first contains ``token`` (or, for None, some token not
    seen before and not EOS) at an index in [lo, hi]; returns (prompt, index)."""
    for _ in range(100_000):
        prompt = [rng.randrange(2, 97) for _ in range(rng.randrange(2, 30))]
        ref = reference_tokens(prompt, n)
        if token is not None:
            if token in ref and lo <= ref.index(token) <= hi:
                return prompt, ref.index(token)
        else:
            if EOS in ref[: hi + 1]:
                continue
            k = rng.randrange(lo, hi + 1)
            if ref[k] not in ref[:k]:
                return prompt, k
    raise AssertionError("no such prompt found")


# =========================================================================== fake worker


def fake_workload(seed: int = 7) -> list[tuple[list[int], SamplingParams]]:
    """Different prompt lengths (some sharing long prefixes, for the radix cache) and
    max_new_tokens, EOS hits, stop_token_ids hits, and ignore_eos."""
    rng = random.Random(seed)
    shared = [rng.randrange(2, 97) for _ in range(24)]
    items: list[tuple[list[int], SamplingParams]] = []
    for n in (1, 2, 3, 5, 9, 17, 33, 40):
        items.append(([rng.randrange(2, 97) for _ in range(n)], greedy(rng.randrange(1, 25))))
    for n in (4, 8, 12, 16):  # long outputs: growth the admission reserve underestimates
        items.append(([rng.randrange(2, 97) for _ in range(n)], greedy(rng.randrange(40, 60), ignore_eos=True)))
    for n in (3, 10, 20):  # a common 24-token prefix
        items.append((shared + [rng.randrange(2, 97) for _ in range(n)], greedy(rng.randrange(5, 25))))
    for _ in range(3):  # EOS well before max_new_tokens
        prompt, k = find_prompt_with_token_at(rng, EOS, 2, 12)
        items.append((prompt, greedy(k + 8)))
    prompt, k = find_prompt_with_token_at(rng, EOS, 2, 12)
    items.append((prompt, greedy(k + 4, ignore_eos=True)))
    for _ in range(3):  # a stop token id well before max_new_tokens
        prompt, k = find_prompt_with_token_at(rng, None, 2, 12)
        items.append((prompt, greedy(k + 8, stop_token_ids=[reference_tokens(prompt, k + 1)[k]])))
    return items


def run_fake(fake_engine, loop: str, overrides: tuple[str, ...], items, abort_prompts):
    """Run ``items`` plus long requests that are aborted after a few tokens; drain; return
    (outputs of items, outputs of aborted, engine)."""
    engine = fake_engine(f"loop={loop}", "+worker.params.eos=true", "+worker.params.delay_s=0.001", *overrides)
    doomed = [engine.submit(input_ids=p, sampling_params=greedy(400, ignore_eos=True)) for p in abort_prompts]
    handles = [engine.submit(input_ids=p, sampling_params=sp) for p, sp in items]
    for h in doomed:
        wait_until(lambda: real_ids(h.req.output_ids) >= 3 or h.done(), TIMEOUT, what="the doomed request to decode")
        engine.abort(h.rid)
    outs = [h.result(TIMEOUT) for h in handles]
    aborted = [h.result(TIMEOUT) for h in doomed]
    assert_engine_memory_free(engine)
    return outs, aborted, engine


FAKE_VARIANTS = {
    "plain": ("radix_cache=false",),
    "radix_chunked_paged": ("scheduler.chunked_prefill_size=16", "kv_cache.page_size=4"),
    "mixed_chunk": ("scheduler.chunked_prefill_size=16", "scheduler.enable_mixed_chunk=true"),
    "small_pool": ("kv_cache.num_tokens=128", "scheduler.init_new_token_ratio=0.05",
                   "scheduler.min_new_token_ratio=0.0", "scheduler.chunked_prefill_size=16"),
}


@pytest.mark.parametrize("variant", sorted(FAKE_VARIANTS))
def test_fake_mixed_workload_overlap_equals_normal_and_reference(fake_engine, variant):
    overrides = FAKE_VARIANTS[variant]
    items = fake_workload()
    abort_prompts = [[11, 12, 13], [14, 15, 16, 17, 18]]
    expected = [expected_fake(p, sp, eos=True) for p, sp in items]
    results = {}
    for loop in ("normal", "overlap"):
        outs, aborted, engine = run_fake(fake_engine, loop, overrides, items, abort_prompts)
        assert engine.loop_name == loop
        for (prompt, sp), exp, out in zip(items, expected, outs):
            assert out.token_ids == exp, (loop, prompt)
            hit_stop = len(exp) < sp.max_new_tokens or exp[-1] in sp.stop_token_ids or (
                exp[-1] == EOS and not sp.ignore_eos)
            assert out.finish_reason == ("stop" if hit_stop else "length")
            if hit_stop:
                assert out.matched_stop == exp[-1]
        for prompt, out in zip(abort_prompts, aborted):
            assert out.finish_reason == "abort"
            assert all(t >= 0 for t in out.token_ids)
            assert 3 <= len(out.token_ids) < 400
            assert out.token_ids == reference_tokens(prompt, len(out.token_ids))
        stats = engine.get_stats()
        if variant == "small_pool":
            assert stats["retractions"] > 0, loop
        results[loop] = [o.token_ids for o in outs]
    assert results["overlap"] == results["normal"]


def test_no_token_past_eos_or_stop_token_and_extra_step_freed():
    """With EOS / a stop token id, the overlap loop runs one extra decode step for the finished
    request (already launched when its stop token becomes known) and throws its token away;
    its KV and row are freed at once, and the books balance after the drain."""
    rng = random.Random(3)
    eos_prompt, k_eos = find_prompt_with_token_at(rng, EOS, 3, 10)
    stop_prompt, k_stop = find_prompt_with_token_at(rng, None, 3, 10)
    stop_tok = reference_tokens(stop_prompt, k_stop + 1)[k_stop]
    companion = [40, 41, 42, 43]
    cases = [(eos_prompt, greedy(k_eos + 10)), (stop_prompt, greedy(k_stop + 10, stop_token_ids=[stop_tok]))]
    seen = {}
    for loop in ("normal", "overlap"):
        for prompt, sp in cases:
            st = Stepped(f"loop={loop}", "+worker.params.eos=true")
            try:
                (req,) = st.submit(prompt, sampling_params=sp)
                (comp,) = st.submit(companion, sampling_params=greedy(40, ignore_eos=True))
                exp = expected_fake(prompt, sp, eos=True)
                assert len(exp) < sp.max_new_tokens
                st.step()
                row = req.req_pool_idx
                assert row is not None
                st.run_until_done([req], max_steps=100)
                assert req.output_ids == exp
                assert req.finished_reason.kind is FinishKind.STOP and req.finished_reason.matched == exp[-1]
                # Freed at once, while the companion still runs: books balance with it live.
                assert req.kv_pages == [] and req.req_pool_idx is None
                assert not comp.finished
                st.scheduler.self_check_during_idle()
                if loop == "overlap":
                    wait_until(lambda: len(st.worker.batches) >= len(exp) + 1, TIMEOUT, what="the extra step")
                    # Batch len(exp) is the one launched before the stop token was known: the
                    # finished request rides in it, fed its (resolved) stop token.
                    extra = st.worker.batches[len(exp)]
                    assert extra.forward_mode is ForwardMode.DECODE
                    assert row in extra.req_pool_indices
                    assert extra.input_ids[extra.req_pool_indices.index(row)] == exp[-1]
                    # ...and in no batch after it.
                    st.run_until_done([comp], max_steps=200)
                    assert all(row not in b.req_pool_indices for b in st.worker.batches[len(exp) + 1:])
                else:
                    assert all(row not in b.req_pool_indices for b in st.worker.batches[len(exp):])
                    st.run_until_done([comp], max_steps=200)
                assert req.output_ids == exp  # the discarded token never showed up
                st.settle()
                st.assert_all_free()
                seen[(loop, tuple(prompt))] = (list(req.output_ids), list(comp.output_ids))
            finally:
                st.loop.close()
    for prompt, _ in cases:
        assert seen[("overlap", tuple(prompt))] == seen[("normal", tuple(prompt))]


class _StageRecorder:
    """Records (stage, result-queue length before the stage) for every stage of a loop."""

    def __init__(self):
        self.loop = None
        self.events: list[tuple[str, int]] = []

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, loop, stage):
        self.events.append((stage, len(loop.runner.queue)))
        return (yield)


def test_first_batch_is_primed_and_tokens_lag_one_step():
    rec = _StageRecorder()
    st = Stepped("loop=overlap", plugins=[("rec", rec)])
    loop = st.loop
    assert isinstance(loop, OverlapLoop)
    processed: list[ForwardMode] = []
    orig = loop.runner.process

    def process_result(batch, entry):
        processed.append(batch.forward_mode)
        return orig(batch, entry)

    loop.runner.process = process_result
    try:
        # Idle: no batch, no dummy, the idle check runs.
        assert st.step() is False
        assert not loop.runner.queue and processed == []
        assert rec.events[-1] == ("self_check_during_idle", 0)
        prompt = [5, 6, 7, 8, 9]
        ref = reference_tokens(prompt, 4)
        (req,) = st.submit(prompt, max_new_tokens=4)
        rec.events.clear()

        # Step 1 launches the prefill: the DUMMY_FIRST entry was processed in its place, the
        # real batch waits in the queue, and the request holds only a placeholder.
        assert st.step() is True
        assert processed == [ForwardMode.DUMMY_FIRST]
        assert len(loop.runner.queue) == 1
        entry = loop.runner.queue[0]
        assert entry.batch.forward_mode is ForwardMode.EXTEND and entry.batch.reqs == [req]
        assert len(req.output_ids) == 1 and req.output_ids[0] < 0
        assert entry.placeholders == req.output_ids

        # Each later step resolves the previous step's token: one step of lag.
        for k in (2, 3, 4):
            assert st.step() is True
            assert len(loop.runner.queue) == 1
            assert req.output_ids[: k - 1] == ref[: k - 1]
            assert len(req.output_ids) == k and req.output_ids[-1] < 0
            assert not req.finished
        assert processed == [ForwardMode.DUMMY_FIRST, ForwardMode.EXTEND] + [ForwardMode.DECODE] * 2
        # No idle check while a result was still queued.
        assert all(stage != "self_check_during_idle" for stage, _ in rec.events)

        # Step 5 has no batch to launch (max_new_tokens reached): it drains the queue, and only
        # then runs the idle check.
        st.step()
        assert req.finished and req.output_ids == ref
        assert not loop.runner.queue
        idle_checks = [n for stage, n in rec.events if stage == "self_check_during_idle"]
        assert idle_checks == [0]
        stages = [stage for stage, _ in rec.events]
        assert stages[-2:] == ["process_batch_result", "self_check_during_idle"]
        assert len(st.worker.batches) == 4  # no extra step for a length finish
        assert [b.input_ids for b in st.worker.batches[1:]] == [[t] for t in ref[:3]]
        assert st.worker.threads == {"loopserve-forward"}
        st.assert_all_free()

        # A second burst is primed again.
        (req2,) = st.submit([9, 9, 9], max_new_tokens=2)
        st.run_until_done([req2], max_steps=10)
        assert processed.count(ForwardMode.DUMMY_FIRST) == 2
        assert req2.output_ids == reference_tokens([9, 9, 9], 2)
        st.settle()
        st.assert_all_free()
    finally:
        loop.close()
    assert not loop.runner.alive


def test_normal_loop_has_no_lag_for_comparison():
    st = Stepped("loop=normal")
    (req,) = st.submit([5, 6, 7, 8, 9], max_new_tokens=4)
    st.step()
    assert req.output_ids == reference_tokens([5, 6, 7, 8, 9], 1)


def test_recorded_order_launch_before_process_and_launch_done(fake_engine):
    """Events from the loop thread (launch, process) and the forward thread (forward start /
    end), numbered in one sequence: batch N+1 is launched, and its launch_done set, before
    batch N's result is processed; forwards run on the ``loopserve-forward`` thread."""
    engine = fake_engine("loop=overlap", "+worker.params.delay_s=0.002")
    loop, worker = engine.loop, engine.worker
    assert isinstance(loop, OverlapLoop)
    seq = itertools.count()
    events: list[tuple[int, float, str, object, str, object]] = []
    bid_of: dict[int, int] = {}  # id(ScheduleBatch or ForwardBatch) -> batch number
    keep: list[object] = []  # keeps ids unique

    def record(kind, bid, extra=None):
        events.append((next(seq), time.perf_counter(), kind, bid, threading.current_thread().name, extra))

    runner = loop.runner
    orig_submit, orig_launch_batch, orig_process = runner.forward_thread.submit, runner.launch, runner.process
    orig_forward = worker.forward_batch
    counter = itertools.count()

    def submit(job, forward):
        fb, batch = job.fb, job.entry.batch
        bid = next(counter)
        bid_of[id(fb)] = bid_of[id(batch)] = bid
        keep.extend((fb, batch))
        record("launch_call", bid)
        return orig_submit(job, forward)

    def launch_batch(batch):
        future = orig_launch_batch(batch)
        record("launch_return", bid_of[id(batch)])
        return future

    def process_result(batch, entry):
        bid = "dummy" if batch.forward_mode is ForwardMode.DUMMY_FIRST else bid_of[id(batch)]
        queued = [(bid_of[id(e.batch)], e.launch_done.is_set()) for e in runner.queue]
        record("process_start", bid, queued)
        try:
            return orig_process(batch, entry)
        finally:
            record("process_end", bid)

    def forward_batch(fb):
        record("forward_start", bid_of[id(fb)])
        try:
            return orig_forward(fb)
        finally:
            record("forward_end", bid_of[id(fb)])

    # Patched while the loop idles (nothing submitted yet); it looks these up per call.
    runner.forward_thread.submit, runner.launch, runner.process = submit, launch_batch, process_result
    worker.forward_batch = forward_batch

    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in (6, 12, 9, 15)], timeout=TIMEOUT)
    for p, n, o in zip(prompts, (6, 12, 9, 15), outs):
        assert o.token_ids == reference_tokens(p, n)
    # A second burst after the loop went idle.
    (out,) = engine.generate(input_ids=[[20, 21]], sampling_params=greedy(5), timeout=TIMEOUT)
    assert out.token_ids == reference_tokens([20, 21], 5)
    assert_engine_memory_free(engine)

    first = {}
    for ev in events:
        first.setdefault((ev[2], ev[3]), ev)
    n_batches = next(counter)
    assert n_batches >= 16
    assert {ev[4] for ev in events if ev[2].startswith("forward")} == {"loopserve-forward"}
    assert {ev[4] for ev in events if not ev[2].startswith("forward")} == {"loopserve-loop"}
    # Forwards run in launch order, one at a time.
    fwd = [(ev[2], ev[3]) for ev in events if ev[2].startswith("forward")]
    assert fwd == [(k, b) for b in range(n_batches) for k in ("forward_start", "forward_end")]
    # Every batch is processed exactly once, in order; one DUMMY_FIRST per burst (2 bursts).
    processed = [ev[3] for ev in events if ev[2] == "process_start"]
    assert processed.count("dummy") == 2
    assert [b for b in processed if b != "dummy"] == list(range(n_batches))

    overlapped = 0
    successors = 0
    for ev in events:
        if ev[2] != "process_start" or ev[3] == "dummy":
            continue
        n, queued = ev[3], ev[5]
        # What is still queued when N is processed is exactly the batch launched this iteration.
        assert queued in ([], [(n + 1, True)]), (n, queued)
        assert first[("forward_end", n)][0] < first[("process_end", n)][0]
        if queued:
            # N+1 was taken by the forward thread, so N's forward had ended already.
            assert first[("forward_end", n)][0] < ev[0]
            successors += 1
            launched = first[("launch_return", n + 1)]
            assert launched[0] < ev[0] and launched[1] <= ev[1]  # launch N+1 before process N
            # launch_done(N+1) was set (recorded True above), before processing N.
            start_next, end_next = first[("forward_start", n + 1)], first[("forward_end", n + 1)]
            if start_next[0] < first[("process_end", n)][0] < end_next[0]:
                overlapped += 1  # N's result processed while N+1 computed
    assert successors >= n_batches - 4
    assert overlapped >= 1
    # Dummies are processed right after the first launch of a burst.
    for ev in events:
        if ev[2] == "process_start" and ev[3] == "dummy":
            assert len(ev[5]) == 1


# ------------------------------------------------------------------------- leaks, shutdown


@pytest.mark.parametrize("overrides", [
    ("kv_cache.page_size=1",),
    ("kv_cache.page_size=4", "scheduler.chunked_prefill_size=8"),
    ("kv_cache.page_size=2", "radix_cache=false", "scheduler.enable_mixed_chunk=true",
     "scheduler.chunked_prefill_size=8"),
    ("kv_cache.num_tokens=128", "scheduler.init_new_token_ratio=0.05", "scheduler.min_new_token_ratio=0.0"),
])
def test_no_leak_after_drain_stepped(overrides):
    """Random arrivals, EOS, aborts (queued and running) and retraction, stepped: after the drain
    the idle check passes, pages are free or cached-and-unlocked, every request row is free."""
    st = Stepped("loop=overlap", "+worker.params.eos=true", *overrides)
    rng = random.Random(11)
    try:
        reqs = []
        for step in range(400):
            if step < 120 and rng.random() < 0.3:
                prompt = [rng.randrange(2, 97) for _ in range(rng.randrange(1, 30))]
                reqs += st.submit(prompt, max_new_tokens=rng.randrange(1, 30))
            if reqs and rng.random() < 0.05:
                st.scheduler.abort(rng.choice(reqs).rid)
            st.step()
            for r in reqs:
                assert sum(t < 0 for t in r.output_ids) <= 1  # never more than one in-flight token
                if r.finished:
                    assert all(t >= 0 for t in r.output_ids)
            if step > 120 and all(r.finished for r in reqs):
                break
        st.settle()
        assert all(r.finished for r in reqs)
        assert not st.loop.runner.queue
        st.assert_all_free()
        for r in reqs:
            if r.finished_reason.kind is not FinishKind.ABORT:
                assert r.output_ids == expected_fake(r.input_ids, r.sampling_params, eos=True)
            else:
                assert r.output_ids == reference_tokens(r.input_ids, len(r.output_ids))
        if "kv_cache.num_tokens=128" in overrides:
            assert st.scheduler.stats.num_retractions > 0
    finally:
        st.loop.close()


def test_shutdown_mid_run_is_prompt_and_leaves_no_thread(fake_engine, fake_plugin):
    before = {t for t in threading.enumerate() if t.name in LOOP_THREADS}
    engine = fake_engine("loop=overlap", "scheduler.max_running_requests=2", "+worker.params.delay_s=0.01")
    assert isinstance(engine.loop, OverlapLoop)
    sp = greedy(400)  # ~4 s of decoding if left alone
    handles = [engine.submit(input_ids=[3 + i, 4, 5], sampling_params=sp) for i in range(4)]
    wait_until(lambda: real_ids(handles[0].req.output_ids) >= 3, TIMEOUT, what="decoding to start")
    t0 = time.monotonic()
    engine.shutdown(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"shutdown took {elapsed:.2f} s"
    assert not engine._thread.is_alive()
    assert not engine.loop.runner.alive
    left = [t.name for t in threading.enumerate() if t.name in LOOP_THREADS and t not in before]
    assert left == []
    outs = [h.result(5) for h in handles]
    assert [o.finish_reason for o in outs] == ["abort"] * 4
    assert outs[2].token_ids == [] and outs[3].token_ids == []  # never admitted
    for i, o in enumerate(outs[:2]):
        assert all(t >= 0 for t in o.token_ids)
        assert o.token_ids == reference_tokens([3 + i, 4, 5], len(o.token_ids))
    s = engine.scheduler
    assert s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
    assert s.req_pool.num_free == s.req_pool.size
    assert fake_plugin.last.shut
    engine.shutdown()  # idempotent


def test_close_of_a_stepped_overlap_loop_ends_its_forward_thread():
    st = Stepped("loop=overlap")
    thread = st.loop.runner.forward_thread._thread
    assert thread.name == "loopserve-forward" and thread.is_alive()
    (req,) = st.submit([1, 2, 3], max_new_tokens=3)
    st.run_until_done([req], max_steps=10)
    st.loop.close()
    thread.join(5)
    assert not thread.is_alive()


# ------------------------------------------------------------------------- auto, grad mode


def test_auto_with_enable_overlap_selects_overlap(fake_engine):
    engine = fake_engine("loop=auto", "scheduler.enable_overlap=true")
    assert engine.loop_name == "overlap"
    assert type(engine.loop) is OverlapLoop
    (out,) = engine.generate(input_ids=[[3, 4, 5]], sampling_params=greedy(5), timeout=TIMEOUT)
    assert out.token_ids == reference_tokens([3, 4, 5], 5)
    assert engine.worker.threads == {"loopserve-forward"}


EXPECTED_MODE = {  # grad_mode -> (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    "no_grad": (False, False),
    "inference": (False, True),
    "enable_grad": (True, False),
}


@pytest.mark.parametrize("mode", sorted(EXPECTED_MODE))
def test_grad_mode_applies_in_the_forward_thread(fake_engine, mode):
    engine = fake_engine("loop=overlap", f"grad_mode={mode}")
    engine.generate(input_ids=[[3, 4, 5], [6, 7]], sampling_params=greedy(3), timeout=TIMEOUT)
    worker = engine.worker
    grad, inference = EXPECTED_MODE[mode]
    assert worker.threads == {"loopserve-forward"}
    assert len(worker.grad_enabled) == 3
    assert worker.grad_enabled == [grad] * 3
    assert worker.inference_mode == [inference] * 3


# =========================================================================== real tiny model

REAL_PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books.",
    "Once upon a time, in a land far away, there lived a king.",
    "abc",
    "Serving LLMs needs a scheduler",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "Once upon a time, in a land far away",
]
REAL_MAX_NEW = [20, 32, 12, 24, 32, 7, 28, 16]


@pytest.fixture(scope="module")
def real_reference():
    """One greedy run on the normal loop; stop strings and stop token ids are chosen from it
    so that they really occur, a few tokens into the output."""
    with Engine(overrides=["loop=normal", "kv_cache.num_tokens=4096"]) as engine:
        outs = engine.generate(REAL_PROMPTS, [greedy(n) for n in REAL_MAX_NEW], timeout=60)
        tok = engine.tokenizer
        plans = []
        for i, out in enumerate(outs):
            ids = out.token_ids
            plan = None
            if i % 2 == 0:  # a stop string: two printable ASCII chars first seen at token k+1
                for k in range(3, len(ids) - 2):
                    s = tok.decode(ids[k : k + 2])
                    if len(s) == 2 and s.isascii() and s.isprintable() and s.strip() == s \
                            and s not in tok.decode(ids[: k + 1], skip_special_tokens=False):
                        plan = ("stop_str", s, k + 2)
                        break
            else:  # a stop token id first seen at token k
                for k in range(3, len(ids) - 2):
                    if ids[k] not in ids[:k]:
                        plan = ("stop_tok", ids[k], k + 1)
                        break
            plans.append(plan)
    assert sum(p is not None and p[0] == "stop_str" for p in plans) >= 2
    assert sum(p is not None and p[0] == "stop_tok" for p in plans) >= 2
    return outs, plans


def real_items(real_reference):
    outs, plans = real_reference
    items = []
    for prompt, n, plan in zip(REAL_PROMPTS, REAL_MAX_NEW, plans):
        if plan is None:
            items.append((prompt, greedy(n)))
        elif plan[0] == "stop_str":
            items.append((prompt, greedy(n, stop=[plan[1]])))
        else:
            items.append((prompt, greedy(n, stop_token_ids=[plan[1]])))
    return items


def run_real(loop: str, overrides, items, abort_prompts):
    with Engine(overrides=[f"loop={loop}", *overrides]) as engine:
        doomed = [engine.submit(p, greedy(1000, ignore_eos=True)) for p in abort_prompts]
        handles = [engine.submit(p, sp) for p, sp in items]
        for h in doomed:
            wait_until(lambda: real_ids(h.req.output_ids) >= 3 or h.done(), TIMEOUT, what="the doomed request")
            engine.abort(h.rid)
        outs = [h.result(60) for h in handles]
        aborted = [h.result(60) for h in doomed]
        assert_engine_memory_free(engine)
        stats = engine.get_stats()
    return outs, aborted, stats


REAL_VARIANTS = {
    "radix_chunked": ("kv_cache.num_tokens=4096", "scheduler.chunked_prefill_size=16"),
    "small_pool": ("kv_cache.num_tokens=128", "kv_cache.page_size=1", "scheduler.init_new_token_ratio=0.05",
                   "scheduler.min_new_token_ratio=0.0", "scheduler.chunked_prefill_size=16"),
}


@pytest.mark.parametrize("variant", sorted(REAL_VARIANTS))
def test_real_model_mixed_workload_overlap_equals_normal(real_reference, variant):
    ref_outs, plans = real_reference
    items = real_items(real_reference)
    abort_prompts = ["Abort me please", "Another long one that is cancelled"]
    results = {}
    for loop in ("normal", "overlap"):
        outs, aborted, stats = run_real(loop, REAL_VARIANTS[variant], items, abort_prompts)
        for ref, plan, out in zip(ref_outs, plans, outs):
            if plan is None:
                assert out.token_ids == ref.token_ids and out.finish_reason == "length"
            else:
                # Stopped exactly where the condition first holds: nothing past it.
                assert out.token_ids == ref.token_ids[: plan[2]], (loop, plan)
                assert out.finish_reason == "stop" and out.matched_stop == plan[1]
                if plan[0] == "stop_str":
                    assert plan[1] not in out.text
        for out in aborted:
            assert out.finish_reason == "abort"
            assert all(t >= 0 for t in out.token_ids) and len(out.token_ids) >= 3
        if variant == "small_pool":
            assert stats["retractions"] > 0, loop
        results[loop] = ([(o.token_ids, o.text, o.finish_reason, o.matched_stop) for o in outs],
                         [o.token_ids for o in aborted])
    assert results["overlap"][0] == results["normal"][0]
    for a, b in zip(*(results[loop][1] for loop in ("normal", "overlap"))):
        short, long_ = sorted((a, b), key=len)
        assert long_[: len(short)] == short  # the same greedy tokens, cut at different times


@pytest.mark.parametrize("kind", ["stop_str", "stop_tok"])
def test_real_model_extra_step_discarded(real_reference, kind):
    """One request alone: the overlap loop runs exactly one forward more than the normal loop
    (the extra decode step), yet emits the same tokens and text, and frees everything."""
    ref_outs, plans = real_reference
    i = next(j for j, p in enumerate(plans) if p is not None and p[0] == kind)
    prompt, plan = REAL_PROMPTS[i], plans[i]
    sp = greedy(REAL_MAX_NEW[i], **({"stop": [plan[1]]} if kind == "stop_str" else {"stop_token_ids": [plan[1]]}))
    got = {}
    for loop in ("normal", "overlap"):
        with Engine(overrides=[f"loop={loop}", "kv_cache.num_tokens=4096"]) as engine:
            worker = engine.worker
            orig = worker._forward_batch  # the body both forward_batch and launch_batch run
            batches = []

            def forward_batch(fb, orig=orig, batches=batches):
                batches.append((fb.forward_mode, list(fb.input_ids)))
                return orig(fb)

            worker._forward_batch = forward_batch
            (out,) = engine.generate(prompt, sp, timeout=60)
            assert_engine_memory_free(engine)
        assert out.token_ids == ref_outs[i].token_ids[: plan[2]]
        assert out.finish_reason == "stop" and out.matched_stop == plan[1]
        n = len(out.token_ids)
        expected_batches = n + (1 if loop == "overlap" else 0)
        assert len(batches) == expected_batches, loop
        if loop == "overlap":
            # The extra step decodes the request's last (stopping) token; its output is dropped.
            assert batches[-1] == (ForwardMode.DECODE, [out.token_ids[-1]])
        got[loop] = (out.token_ids, out.text)
    assert got["overlap"] == got["normal"]


def test_real_model_penalties_overlap_equals_normal():
    """Penalties read the request's earlier output tokens: the forward thread must see them as
    they were at launch (placeholders resolved), not the live list the loop keeps extending."""
    sps = [greedy(16, repetition_penalty=1.3), greedy(16, frequency_penalty=0.5, presence_penalty=0.3),
           greedy(16)]
    prompts = ["Hello world", "The quick brown fox", "abcabcabc"]
    got = {}
    for loop in ("normal", "overlap"):
        with Engine(overrides=[f"loop={loop}", "kv_cache.num_tokens=4096"]) as engine:
            outs = engine.generate(prompts, sps, timeout=60)
            assert_engine_memory_free(engine)
        assert [o.finish_reason for o in outs] == ["length"] * 3
        got[loop] = [o.token_ids for o in outs]
    assert got["overlap"] == got["normal"]


@pytest.mark.parametrize("loop", ["normal", "overlap"])
def test_forward_time_is_counted_for_a_worker_that_does_not_time_itself(fake_engine, loop):
    # The fake worker reports forward_time_s=0; the loop times the call itself, so the busy
    # fraction of a benchmark is not 0 (5 ms of forwards at the least: 5 steps x 1 ms).
    engine = fake_engine(f"loop={loop}", "+worker.params.delay_s=0.001")
    (out,) = engine.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=5, temperature=0),
                             timeout=TIMEOUT)
    assert len(out.token_ids) == 5
    assert engine.get_stats()["forward_time_s"] >= 0.005
