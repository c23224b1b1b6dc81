"""KV memory and batching features at the user level (issue 3): the radix prefix cache,
chunked prefill (alternating and mixed), retraction under a tiny KV pool, eviction, and the
lpm and priority policies.

Engine tests run the REAL embedded tiny model (greedy, float32) and compare every output
token-for-token with a reference run that has none of the features (no radix cache, no
chunking, ample memory). Every engine test ends with the idle leak check: the loop thread is
stopped once idle and ``self_check_during_idle`` is called here, with no radix locks held and
free + cached == total. Step-level questions (queue order, admission order) use ``Stepped``
and the deterministic fake worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from loopserve.core import Engine, ForwardMode, Req, SamplingParams, hookimpl

from fake_worker import Stepped, reference_tokens, wait_until

TIMEOUT = 60.0
REAL = ("loop=normal", "model.dtype=float32", "model.device=cpu", "attention.backend=torch",
        "kv_cache.num_tokens=8192")
# Tests whose token counts assume a cache shared token by token (the default page is 16 tokens).
TOKEN_PAGES = ("kv_cache.page_size=1",)
# An optimistic growth estimate admits more than will fit later, so decode must retract.
OPTIMISTIC = ("scheduler.init_new_token_ratio=0.05", "scheduler.min_new_token_ratio=0.0")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, 256) for _ in range(n)]  # byte tokens; no BOS/EOS


# ------------------------------------------------------------------------- helpers


@dataclass
class Entry:
    row: int
    start: int  # prefix_len
    n: int  # extend_len
    tokens: tuple[int, ...]
    decode: bool  # a running request's decode step (else prefill work)


@dataclass
class Forward:
    mode: ForwardMode
    entries: list[Entry]

    @property
    def prefill(self) -> list[Entry]:
        return [e for e in self.entries if not e.decode]

    @property
    def prefill_tokens(self) -> int:
        return sum(e.n for e in self.prefill)

    @property
    def num_decodes(self) -> int:
        return sum(e.decode for e in self.entries)


class Recorder:
    """Records every forward (hook ``loopserve_before_forward``); which entries are decodes is
    read off the scheduler's running set (prefill entries of a MIXED batch are not in it)."""

    def __init__(self) -> None:
        self.scheduler = None
        self.forwards: list[Forward] = []
        self.on_forward = None  # called in the loop thread after each record

    @hookimpl
    def loopserve_startup(self, scheduler, loop):
        self.scheduler = scheduler

    @hookimpl
    def loopserve_before_forward(self, batch):
        decoding = {r.req_pool_idx for r in self.scheduler.running}
        entries, k = [], 0
        for row, start, n in zip(batch.req_pool_indices, batch.prefix_lens, batch.extend_lens):
            entries.append(Entry(row, start, n, tuple(batch.input_ids[k:k + n]), row in decoding))
            k += n
        self.forwards.append(Forward(batch.forward_mode, entries))
        if self.on_forward is not None:
            self.on_forward(self)

    def prefill_forwards_of(self, prompt: list[int]) -> list[int]:
        """Indices of the forwards that computed part of ``prompt`` as prefill work."""
        out = []
        for i, f in enumerate(self.forwards):
            if any(e.start < len(prompt) and list(e.tokens) == prompt[e.start:e.start + e.n] for e in f.prefill):
                out.append(i)
        return out


@pytest.fixture
def engines():
    """Factory: an Engine on the real tiny model with extra overrides (and plugins)."""
    made: list[Engine] = []

    def make(*overrides: str, recorder: Recorder | None = None) -> Engine:
        plugins = [("rec", recorder)] if recorder is not None else []
        eng = Engine(overrides=[*REAL, *overrides], plugins=plugins)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown()


class Reference:
    """Outputs without any feature: radix cache off, no chunking, ample memory, fcfs."""

    def __init__(self) -> None:
        self.engine = Engine(overrides=[*REAL, "radix_cache=false"])
        self._memo: dict = {}

    def __call__(self, prompts: list[list[int]], ns: list[int]) -> list[list[int]]:
        key = (tuple(map(tuple, prompts)), tuple(ns))
        if key not in self._memo:
            outs = self.engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in ns], timeout=TIMEOUT)
            assert all(o.finish_reason == "length" for o in outs)
            self._memo[key] = [o.token_ids for o in outs]
        return self._memo[key]


@pytest.fixture(scope="module")
def reference():
    ref = Reference()
    yield ref
    ref.engine.shutdown()


def stop_and_check_idle(engine: Engine) -> None:
    """The idle leak check, run here: stop the loop once idle, then check the books."""
    s = engine.scheduler
    wait_until(lambda: not s.running and not s.waiting_queue and not s.inbox._items, TIMEOUT,
               what="the engine to go idle")
    engine.loop.stop()
    engine._thread.join(TIMEOUT)
    assert not engine._thread.is_alive()
    assert engine._loop_error is None
    s.self_check_during_idle()  # raises KVLeakError on a leak
    tree = s.tree_cache
    assert tree is None or tree.protected_pages == 0, "radix-cache locks held while idle"
    assert s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
    assert s.req_pool.num_free == s.req_pool.size
    if tree is not None:
        pages = tree.all_pages()
        assert len(pages) == len(set(pages)) == tree.total_pages
        assert not any(s.allocator._is_free[p] for p in pages), "a cached page is also free"


# ------------------------------------------------------------------------- prefix sharing

PREFIX_LEN = 98  # not a multiple of 4: with page_size 4 only 96 tokens are shareable
N_SHARED = 12


def _prefix_workload():
    rng = random.Random(7)
    prefix = rand_tokens(rng, PREFIX_LEN)
    firsts = rng.sample(range(256), N_SHARED + 1)  # distinct first suffix tokens
    warm = prefix + [firsts[0]] + rand_tokens(rng, 6)
    prompts = [prefix + [firsts[i + 1]] + rand_tokens(rng, rng.randrange(2, 20)) for i in range(N_SHARED)]
    return warm, prompts


WARM_NEW, SHARED_NEW = 8, 12


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_sharing_reduces_computed_prompt_tokens(engines, reference, page_size):
    warm, prompts = _prefix_workload()
    ref_warm = reference([warm], [WARM_NEW])
    ref = reference(prompts, [SHARED_NEW] * N_SHARED)
    shared = PREFIX_LEN - PREFIX_LEN % page_size
    total = len(warm) + sum(map(len, prompts))

    outs = {}
    for radix in (True, False):
        engine = engines(f"radix_cache={str(radix).lower()}", f"kv_cache.page_size={page_size}")
        (w,) = engine.generate(input_ids=[warm], sampling_params=greedy(WARM_NEW), timeout=TIMEOUT)
        batch = engine.generate(input_ids=prompts, sampling_params=greedy(SHARED_NEW), timeout=TIMEOUT)
        stats = engine.get_stats()
        stop_and_check_idle(engine)
        assert [w.token_ids] == ref_warm
        assert [o.token_ids for o in batch] == ref
        assert stats["prompt_tokens"] == total
        outs[radix] = (w, batch, stats)

    w, batch, stats = outs[True]
    assert w.num_cached_tokens == 0  # nothing cached yet
    assert [o.num_cached_tokens for o in batch] == [shared] * N_SHARED
    assert stats["prompt_tokens_reused"] == N_SHARED * shared
    assert stats["prompt_tokens_computed"] == total - N_SHARED * shared
    assert stats["cache_hit_rate"] == pytest.approx(N_SHARED * shared / total)
    assert stats["cache_hit_rate"] > 0.7

    _, batch_off, off = outs[False]
    assert all(o.num_cached_tokens == 0 for o in batch_off)
    assert off["prompt_tokens_computed"] == total
    assert off["prompt_tokens_reused"] == 0 and off["cache_hit_rate"] == 0.0
    assert off["cached_kv_pages"] == 0


def test_requests_in_one_batch_do_not_share_before_the_prefix_is_computed(engines, reference):
    """Without a warm-up the shared prefix is computed by every request of the first batch
    (no cache entry exists yet); a second identical call then reuses it."""
    _, prompts = _prefix_workload()
    ref = reference(prompts, [SHARED_NEW] * N_SHARED)
    engine = engines(*TOKEN_PAGES)
    first = engine.generate(input_ids=prompts, sampling_params=greedy(SHARED_NEW), timeout=TIMEOUT)
    computed_first = engine.get_stats()["prompt_tokens_computed"]
    again = engine.generate(input_ids=prompts, sampling_params=greedy(SHARED_NEW), timeout=TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    n = sum(map(len, prompts))
    assert computed_first == n and all(o.num_cached_tokens == 0 for o in first)
    # Each repeated prompt is cached whole (with its outputs); one token is always computed.
    assert [o.num_cached_tokens for o in again] == [len(p) - 1 for p in prompts]
    assert stats["prompt_tokens_computed"] == n + N_SHARED
    assert [o.token_ids for o in first] == ref and [o.token_ids for o in again] == ref


# ------------------------------------------------------------------------- chunked prefill


def _chunk_workload():
    rng = random.Random(11)
    common = rand_tokens(rng, 40)
    lens = [5, 37, 150, 64, 9, 200, 17, 90]
    prompts = [rand_tokens(rng, n) for n in lens]
    prompts += [common + rand_tokens(rng, 30), common + rand_tokens(rng, 45)]  # share 40 tokens
    ns = [20, 6, 10, 3, 33, 8, 12, 5, 9, 7]
    return prompts, ns


@pytest.mark.parametrize("chunk,mixed", [(8, False), (16, False), (64, False), (8, True), (16, True), (-1, True)])
def test_chunked_prefill_outputs_identical(engines, reference, chunk, mixed):
    prompts, ns = _chunk_workload()
    ref = reference(prompts, ns)
    rec = Recorder()
    engine = engines(f"scheduler.chunked_prefill_size={chunk}", f"scheduler.enable_mixed_chunk={str(mixed).lower()}",
                     recorder=rec)
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in ns], timeout=TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    assert [o.token_ids for o in outs] == ref
    assert stats["prompt_tokens_computed"] + stats["prompt_tokens_reused"] == stats["prompt_tokens"]
    if chunk > 0:
        assert max(f.prefill_tokens for f in rec.forwards) <= chunk
        # The 200-token prompt took at least ceil(200 / chunk) forwards.
        assert len(rec.prefill_forwards_of(prompts[5])) >= -(-200 // chunk)
    modes = {f.mode for f in rec.forwards}
    if mixed:
        # Unchunked, everything is admitted in the first batch and nothing is left to mix.
        assert (ForwardMode.MIXED in modes) == (chunk > 0)
        for f in rec.forwards:
            if f.mode is ForwardMode.MIXED:
                assert f.prefill and f.num_decodes  # prefill part first, then the decodes
                assert all(not e.decode for e in f.entries[:len(f.prefill)])
                assert all(e.n == 1 for e in f.entries if e.decode)
    else:
        assert ForwardMode.MIXED not in modes


LONG_LEN, CHUNK = 120, 16


@pytest.mark.parametrize("mixed", [False, True])
def test_decodes_keep_running_between_the_chunks_of_a_long_prompt(engines, reference, mixed):
    rng = random.Random(3)
    short, long_ = rand_tokens(rng, 4), rand_tokens(rng, LONG_LEN)
    ref = reference([short, long_], [40, 4])
    rec = Recorder()
    engine = engines(f"scheduler.chunked_prefill_size={CHUNK}", f"scheduler.enable_mixed_chunk={str(mixed).lower()}",
                     recorder=rec)
    outs = engine.generate(input_ids=[short, long_], sampling_params=[greedy(40), greedy(4)], timeout=TIMEOUT)
    stop_and_check_idle(engine)
    assert [o.token_ids for o in outs] == ref

    chunks = rec.prefill_forwards_of(long_)
    # The first batch holds the short prompt and the first 12 tokens of the long one.
    first = CHUNK - len(short)
    assert chunks[0] == 0 and len(chunks) == 1 + -(-(LONG_LEN - first) // CHUNK)
    spans = [(e.start, e.n) for i in chunks for e in rec.forwards[i].prefill
             if list(e.tokens) == long_[e.start:e.start + e.n]]
    assert spans[0] == (0, first)
    assert sum(n for _, n in spans) == LONG_LEN  # every prompt token computed exactly once
    if mixed:
        # Each later chunk rides in one MIXED batch with the short request's decode.
        assert chunks == list(range(len(chunks)))
        for i in chunks[1:]:
            f = rec.forwards[i]
            assert f.mode is ForwardMode.MIXED and f.num_decodes == 1 and f.prefill_tokens <= CHUNK
    else:
        # Chunks alternate with decode batches of the short request: E D E D ... E.
        assert chunks == list(range(0, 2 * len(chunks), 2))
        for i in chunks[1:]:
            assert rec.forwards[i].mode is ForwardMode.EXTEND
            between = rec.forwards[i - 1]
            assert between.mode is ForwardMode.DECODE and between.num_decodes == 1
    # After the last chunk both requests decode together.
    after = rec.forwards[chunks[-1] + 1]
    assert after.mode is ForwardMode.DECODE and after.num_decodes == 2


# ------------------------------------------------------------------------- retraction and eviction


def _pressure_workload():
    rng = random.Random(5)
    prompts = [rand_tokens(rng, rng.randrange(8, 30)) for _ in range(10)]
    ns = [rng.randrange(24, 48) for _ in prompts]
    return prompts, ns


@pytest.mark.parametrize("page_size,radix", [(1, True), (4, True), (4, False)])
def test_retraction_under_a_tiny_kv_pool(engines, reference, page_size, radix):
    prompts, ns = _pressure_workload()
    ref = reference(prompts, ns)
    demand = sum(len(p) + n for p, n in zip(prompts, ns))
    engine = engines("kv_cache.num_tokens=200", f"kv_cache.page_size={page_size}",
                     f"radix_cache={str(radix).lower()}", *OPTIMISTIC)
    assert engine.scheduler.allocator.num_slots * 2 < demand
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in ns], timeout=TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    assert stats["retractions"] > 0
    assert stats["preemptions"] == 0 and stats["aborted_requests"] == 0
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in outs] == ref
    # Retracted requests are recomputed: more prompt tokens are computed than were sent
    # (less the part the cache still had).
    assert stats["prompt_tokens_computed"] + stats["prompt_tokens_reused"] >= stats["prompt_tokens"]


def test_eviction_under_memory_pressure(engines, reference):
    rng = random.Random(9)
    waves = [[[16 * w + i] + rand_tokens(rng, 19) for i in range(6)] for w in range(4)]  # distinct first tokens
    n_new = 8
    engine = engines("kv_cache.num_tokens=256", "kv_cache.page_size=4")
    s = engine.scheduler
    tree = s.tree_cache
    evicted: list[int] = []
    real_evict = tree.evict

    def spy(num_pages):
        freed = real_evict(num_pages)
        evicted.append(freed)
        return freed

    tree.evict = spy
    for wave in waves:
        outs = engine.generate(input_ids=wave, sampling_params=greedy(n_new), timeout=TIMEOUT)
        assert [o.token_ids for o in outs] == reference(wave, [n_new] * len(wave))
        assert all(o.finish_reason == "length" for o in outs)
    stop_and_check_idle(engine)
    # Every request's prompt + outputs (but its newest token) was cached: 27 tokens -> 6 pages.
    ever_cached = sum(len(w) for w in waves) * ((20 + n_new - 1) // 4)
    assert sum(evicted) > 0
    assert tree.total_pages + sum(evicted) == ever_cached
    assert tree.total_pages <= s.allocator.num_pages < ever_cached
    # Least recently used first: the first wave is gone, the last one still matches.
    assert all(tree.match_len(p) == 0 for p in waves[0])
    assert [tree.match_len(p) for p in waves[-1]] == [20] * 6
    assert engine.get_stats()["retractions"] == 0


def test_evicted_prefix_is_recomputed_with_the_same_output(engines, reference):
    rng = random.Random(13)
    first = [200] + rand_tokens(rng, 40)
    others = [[i] + rand_tokens(rng, 40) for i in range(8)]
    engine = engines("kv_cache.num_tokens=128", *TOKEN_PAGES)
    (a,) = engine.generate(input_ids=[first], sampling_params=greedy(6), timeout=TIMEOUT)
    assert engine.scheduler.tree_cache.match_len(first) == len(first)
    for p in others:  # each pushes older entries out of the 128-token pool
        engine.generate(input_ids=[p], sampling_params=greedy(6), timeout=TIMEOUT)
    assert engine.scheduler.tree_cache.match_len(first) == 0
    (b,) = engine.generate(input_ids=[first], sampling_params=greedy(6), timeout=TIMEOUT)
    stop_and_check_idle(engine)
    assert b.num_cached_tokens == 0
    assert a.token_ids == b.token_ids == reference([first], [6])[0]


# ------------------------------------------------------------------------- lpm (fake worker)

W = list(range(30, 54))  # the warm prefix, 24 tokens


def _lpm_prompts():
    none_ = [60, 61, 62] + W[:10]  # shares nothing with the tree
    partial = W[:12] + [70, 71, 72]
    full = W + [80, 81]
    return none_, partial, full


def _warm(st: Stepped) -> None:
    (w,) = st.submit(W + [90], max_new_tokens=2)
    st.run_until_done([w])
    st.settle()


def _admission_order(st: Stepped, reqs: list[Req]) -> list[Req]:
    st.run_until_done(reqs, max_steps=500)
    for r in reqs:
        assert r.output_ids == reference_tokens(r.input_ids, r.sampling_params.max_new_tokens)
    st.settle()
    st.assert_all_free()
    return sorted(reqs, key=lambda r: r.schedule_time)


def test_lpm_orders_the_queue_by_prefix_match():
    st = Stepped("loop=normal", "policy=lpm", "scheduler.max_running_requests=1", *TOKEN_PAGES)
    _warm(st)
    s = st.scheduler
    n, p, f = st.submit(*_lpm_prompts(), max_new_tokens=3)
    s.process_input_requests(s.recv_requests())  # into the queue, not yet admitted
    assert s.waiting_queue == [n, p, f]
    assert [s.tree_cache.match_len(r.input_ids) for r in (n, p, f)] == [0, 12, 24]
    assert s.policy.order(s.waiting_queue) == [f, p, n]
    assert s.policy.order([n, p]) == [p, n] and s.policy.order([p, n]) == [p, n]
    assert _admission_order(st, [n, p, f]) == [f, p, n]
    assert (f.num_cached_tokens, p.num_cached_tokens, n.num_cached_tokens) == (24, 12, 0)


def test_lpm_falls_back_to_fcfs_above_the_queue_threshold():
    st = Stepped("loop=normal", "policy=lpm", "policy.params.queue_threshold=2", "scheduler.max_running_requests=1",
                 *TOKEN_PAGES)
    _warm(st)
    s = st.scheduler
    n, p, f = st.submit(*_lpm_prompts(), max_new_tokens=3)
    s.process_input_requests(s.recv_requests())
    assert s.policy.order(s.waiting_queue) == [n, p, f]  # 3 waiting > threshold 2: arrival order
    assert s.policy.order([n, p]) == [p, n]  # at the threshold it still sorts
    # n goes first (3 waiting); then 2 are left and the full match overtakes the partial one.
    assert _admission_order(st, [n, p, f]) == [n, f, p]


def test_lpm_without_radix_cache_is_fcfs():
    st = Stepped("loop=normal", "policy=lpm", "radix_cache=false", "scheduler.max_running_requests=1")
    _warm(st)
    reqs = st.submit(*_lpm_prompts(), max_new_tokens=3)
    assert _admission_order(st, reqs) == reqs


# ------------------------------------------------------------------------- a chunk in progress keeps its place


def _req(rid: str, prompt: list[int], n: int, priority: int = 0) -> Req:
    return Req(rid=rid, input_ids=list(prompt), sampling_params=SamplingParams(max_new_tokens=n, temperature=0.0),
               priority=priority)


@pytest.mark.parametrize("policy", ["lpm", "priority"])
def test_request_in_chunked_prefill_is_continued_before_others(policy):
    """A request part-way through a chunked prefill holds KV and a request row. A request
    the policy ranks higher (longer prefix match / higher priority) must not take the row
    it still needs: that crashed with 'a free row was checked above'."""
    st = Stepped("loop=normal", f"policy={policy}", "scheduler.max_running_requests=1",
                 "scheduler.chunked_prefill_size=8")
    s = st.scheduler
    _warm(st)  # so that b below matches 24 cached tokens
    a = _req("a", list(range(2, 42)), 5)  # 40 tokens: five chunks
    s.submit(a)
    st.step()
    assert a.is_chunked and a.req_pool_idx is not None and s.req_pool.num_free == 0
    b = _req("b", W + [3, 4, 5], 5, priority=5)
    s.submit(b)
    st.run_until_done([a, b], max_steps=200)
    assert a.first_token_time < b.schedule_time  # a finished its prefill first
    for r in (a, b):
        assert r.output_ids == reference_tokens(r.input_ids, 5)
    st.settle()
    st.assert_all_free()


@pytest.mark.parametrize("radix", [True, False])
def test_last_running_request_is_not_aborted_for_memory_a_chunk_holds(radix):
    """The one running request runs out of KV while a half-prefilled (chunked) request in
    the queue holds most of the pool. The chunked one must give its KV back and start over
    later; the running one used to be aborted with 'the sequence grew to N tokens, more than
    the KV cache holds' although it fits the pool alone."""
    st = Stepped("loop=normal", "kv_cache.num_tokens=64", "scheduler.chunked_prefill_size=8",
                 f"radix_cache={str(radix).lower()}", *OPTIMISTIC)
    b = _req("b", [5, 6, 7, 8], 50)  # decodes to 54 tokens
    a = _req("a", list(range(10, 66)), 4)  # 56 tokens, prefilled 8 at a time between b's decodes
    st.scheduler.submit(b, a)
    st.run_until_done([a, b], max_steps=500)
    for r in (a, b):
        assert r.finished_reason.kind.value == "length", r.finished_reason
        assert r.output_ids == reference_tokens(r.input_ids, r.sampling_params.max_new_tokens)
    assert a.num_retractions >= 1 and b.num_retractions == 0
    assert st.scheduler.stats.num_aborted == 0
    st.settle()
    st.assert_all_free()


@pytest.mark.parametrize("radix", [True, False])
def test_abort_during_chunked_prefill_frees_its_kv(radix):
    st = Stepped("loop=normal", "scheduler.chunked_prefill_size=8", f"radix_cache={str(radix).lower()}")
    s = st.scheduler
    a = _req("a", list(range(10, 50)), 5)
    c = _req("c", [5, 6, 7], 6)
    s.submit(c, a)
    st.step()  # c prefilled, a's first 5 tokens
    st.step()  # c decodes; a's chunk waits its turn
    assert a.is_chunked and a.kv_pages and a in s.waiting_queue
    s.abort(a.rid)
    st.run_until_done([a, c], max_steps=50)
    assert a.finished_reason.kind.value == "abort" and a.output_ids == [] and not a.kv_pages
    assert c.output_ids == reference_tokens(c.input_ids, 6)
    st.settle()
    st.assert_all_free()


# ------------------------------------------------------------------------- priority (real model)


def test_priority_admits_highest_priority_first(engines, reference):
    rng = random.Random(17)
    prompts = [[i] + rand_tokens(rng, 10) for i in range(5)]
    priorities = [0, 5, 1, 3, -2]
    ref = reference(prompts, [4] * 5)
    rec = Recorder()
    engine = engines("policy=priority", "scheduler.max_running_requests=1", recorder=rec)
    outs = engine.generate(input_ids=prompts, sampling_params=greedy(4), priority=priorities, timeout=TIMEOUT)
    stop_and_check_idle(engine)
    assert [o.token_ids for o in outs] == ref
    first_prefill = [rec.prefill_forwards_of(p)[0] for p in prompts]
    by_admission = [prio for _, prio in sorted(zip(first_prefill, priorities))]
    assert by_admission == [5, 3, 1, 0, -2]
    assert engine.get_stats()["preemptions"] == 0  # nothing lower-priority was running


@pytest.mark.parametrize("preemption", [True, False])
def test_priority_preempts_a_lower_priority_running_request(engines, reference, preemption):
    rng = random.Random(19)
    low_prompt, high_prompt = rand_tokens(rng, 30), rand_tokens(rng, 12)
    ref_low = reference([low_prompt], [80])[0]
    ref_high = reference([high_prompt], [10])[0]
    rec = Recorder()
    engine = engines("policy=priority", "scheduler.max_running_requests=1", *TOKEN_PAGES,
                     f"policy.params.preemption={str(preemption).lower()}", recorder=rec)
    handles = {}

    def arrive(r: Recorder) -> None:
        # Deterministic arrival: once the low request has produced 10 tokens (this runs in
        # the loop thread, before a forward; the request is seen in the next step).
        if "high" not in handles and len(handles["low"].req.output_ids) >= 10:
            handles["high"] = engine.submit(input_ids=high_prompt, sampling_params=greedy(10), priority=10)

    handles["low"] = engine.submit(input_ids=low_prompt, sampling_params=greedy(80), priority=0)
    rec.on_forward = arrive
    low = handles["low"].result(TIMEOUT)
    wait_until(lambda: "high" in handles, TIMEOUT, what="the high-priority request")
    high = handles["high"].result(TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    assert low.token_ids == ref_low and high.token_ids == ref_high
    assert low.finish_reason == high.finish_reason == "length"
    lo, hi = handles["low"].req, handles["high"].req
    if preemption:
        assert stats["preemptions"] >= 1 and lo.num_retractions >= 1
        assert hi.finish_time < lo.finish_time  # the high one ran to the end first
        # Readmitted, the low one found its prompt and outputs in the cache: one token each time.
        assert stats["prompt_tokens_computed"] == len(low_prompt) + len(high_prompt) + stats["preemptions"]
    else:
        assert stats["preemptions"] == 0 and lo.num_retractions == 0
        assert hi.schedule_time > lo.finish_time  # waited for the only running slot


def test_priority_preempts_for_kv_memory(engines, reference):
    """Rows are free but the KV pool is not: the high-priority request takes the memory of
    the lower-priority running request with the least progress."""
    rng = random.Random(23)
    lows = [rand_tokens(rng, 30), rand_tokens(rng, 30)]
    high_prompt = rand_tokens(rng, 60)
    ref_lows = reference(lows, [40, 40])
    ref_high = reference([high_prompt], [10])[0]
    rec = Recorder()
    engine = engines("policy=priority", "kv_cache.num_tokens=160", recorder=rec)
    handles = {}

    def arrive(r: Recorder) -> None:
        if "high" not in handles and min(len(h.req.output_ids) for h in low_handles) >= 10:
            handles["high"] = engine.submit(input_ids=high_prompt, sampling_params=greedy(10), priority=1)

    low_handles = [engine.submit(input_ids=p, sampling_params=greedy(40)) for p in lows]
    rec.on_forward = arrive
    outs = [h.result(TIMEOUT) for h in low_handles]
    wait_until(lambda: "high" in handles, TIMEOUT, what="the high-priority request")
    high = handles["high"].result(TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    assert [o.token_ids for o in outs] == ref_lows and high.token_ids == ref_high
    assert stats["preemptions"] == 1 and stats["retractions"] == 1 and stats["aborted_requests"] == 0
    victim = [h.req for h in low_handles if h.req.num_retractions]
    assert len(victim) == 1 and handles["high"].req.finish_time < victim[0].finish_time


def test_conservative_new_token_ratio_avoids_retraction(engines, reference):
    """With the growth reserve at 100% of the remaining max_new_tokens, admission never
    overcommits the same tiny pool that forces retraction under an optimistic ratio."""
    prompts, ns = _pressure_workload()
    ref = reference(prompts, ns)
    engine = engines("kv_cache.num_tokens=200", "scheduler.init_new_token_ratio=1.0",
                     "scheduler.min_new_token_ratio=1.0", "scheduler.new_token_ratio_decay=0.0")
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in ns], timeout=TIMEOUT)
    stats = engine.get_stats()
    stop_and_check_idle(engine)
    assert stats["retractions"] == 0
    assert [o.token_ids for o in outs] == ref
