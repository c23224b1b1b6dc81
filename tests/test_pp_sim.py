"""The sim worker as pipeline stages (``worker=sim parallel.pp_size=N``), and how the PP
scheduler groups requests under ``parallel.pp_async_depth``.

The sim stages model a device queue (``worker.params.async_device``, default on): a stage's
process enqueues a forward and goes on, the modelled device runs it after the previous one
and after the hidden states arrived, and rank 0 waits for the last stage's ready time. The
tests check the tokens (the sim worker's deterministic tokens read back through every KV
slot), the modelled times chaining across stages, and that the host really waits for them.
"""

from __future__ import annotations

import random
import time
from collections import deque

import pytest

from loopserve.core import Engine, ForwardMode, SamplingParams
from loopserve.core.pp.sim_stage import SimStageWorker
from loopserve.core.sched.forward_batch import ForwardBatch
from loopserve.plugins.worker_sim import reference_tokens

from fake_worker import Stepped

SHAPE = "qwen3-0.6b"
VOCAB = 151936


def workload(n: int, seed: int = 0, vocab: int = VOCAB):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    lens = [rng.randrange(1, 24) for _ in prompts]
    return prompts, lens


@pytest.mark.parametrize(("pp", "depth", "async_device"),
                         [(2, 0, "true"), (4, 1, "true"), (3, 1, "false"), (4, 0, "true")])
def test_sim_pipeline_tokens_equal_the_single_sim_worker(pp, depth, async_device):
    prompts, lens = workload(24)
    overrides = ["worker=sim", f"worker.params.model={SHAPE}", f"worker.params.async_device={async_device}",
                 f"parallel.pp_size={pp}", f"parallel.pp_async_depth={depth}", "parallel.stage_timeout_s=30",
                 "kv_cache.page_size=4"]
    with Engine(overrides=overrides) as e:
        assert e.loop_name == "pp"
        outs = e.generate(input_ids=prompts, timeout=120,
                          sampling_params=[SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lens])
        time.sleep(0.4)  # the other stages publish their counters every 0.25 s
        stats = e.worker.stage_stats()
    for prompt, n, out in zip(prompts, lens, outs):
        assert out.token_ids == reference_tokens(prompt, n, VOCAB)
    assert all(0.0 < s["busy_fraction"] <= 1.0 for s in stats)


def _batch(n_tokens: int) -> ForwardBatch:
    return ForwardBatch(forward_mode=ForwardMode.EXTEND, req_pool_indices=[0], input_ids=list(range(1, n_tokens + 1)),
                        prefix_lens=[0], extend_lens=[n_tokens], out_cache_loc=list(range(n_tokens)),
                        sampling_params=[SamplingParams(max_new_tokens=1)], need_sample=[True])


def _stages(async_device: bool):
    kw = dict(model="llama3-8b", device="h100", num_kv_slots=8192, context_len=4096, max_running_requests=4,
              async_device=async_device, link_bandwidth=1e9)
    return SimStageWorker(layer_range=(0, 16), **kw), SimStageWorker(layer_range=(16, 32), **kw)


def test_async_device_chains_each_stage_after_its_queue_and_the_link():
    first, last = _stages(async_device=True)
    fb = _batch(2048)
    t0 = time.monotonic()
    hidden = first.forward_stage(fb)
    hidden2 = first.forward_stage(fb)  # queued behind the first on stage 0's device
    enqueue_s = time.monotonic() - t0
    cost0 = first.last_cost.time_s
    assert cost0 > 0.004 and enqueue_s < cost0  # returned without running the modelled compute
    ready1, ready2 = float(hidden[0, 0]), float(hidden2[0, 0])
    assert t0 + cost0 <= ready1 <= t0 + enqueue_s + cost0
    assert ready2 == pytest.approx(ready1 + cost0)
    assert first.queued_s() > cost0  # two forwards' worth minus the time gone by
    link = 2048 * 4096 * 2 / 1e9  # tokens x hidden x bf16 bytes / link bandwidth
    tokens = last.forward_stage(fb, hidden)
    assert tokens.tolist() == reference_tokens(fb.input_ids, 1, last.vocab_size)
    cost1 = last.last_cost.time_s
    assert last.ready_at_ns / 1e9 == pytest.approx(ready1 + link + cost1)
    last.forward_stage(fb, hidden2)  # its device is still busy with the first: that comes first
    assert last.ready_at_ns / 1e9 == pytest.approx(max(ready1 + link + cost1, ready2 + link) + cost1)
    assert first.busy_s == pytest.approx(2 * cost0) and last.wait_s == pytest.approx(2 * link)


def test_sync_device_sleeps_through_link_and_compute():
    first, last = _stages(async_device=False)
    fb = _batch(2048)
    t0 = time.monotonic()
    last.forward_stage(fb, first.forward_stage(fb))
    elapsed = time.monotonic() - t0
    assert elapsed >= first.last_cost.time_s + last.last_cost.time_s + last.wait_s
    assert last.ready_at_ns == 0


def test_rank0_waits_for_the_modelled_devices():
    """The host's one sync per micro-batch waits for the last stage's ready time: the run
    lasts at least as long as any stage's modelled compute."""
    prompts, lens = workload(8, seed=3, vocab=128256)
    overrides = ["worker=sim", "worker.params.model=llama3-70b", "worker.params.num_devices=2",
                 "parallel.pp_size=2", "parallel.stage_timeout_s=30"]
    with Engine(overrides=overrides) as e:
        t0 = time.perf_counter()
        outs = e.generate(input_ids=prompts, timeout=120,
                          sampling_params=[SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lens])
        wall = time.perf_counter() - t0
        time.sleep(0.4)  # the other stage publishes its counters every 0.25 s
        stats = e.worker.stage_stats()
    assert [o.token_ids for o in outs] == [reference_tokens(p, n, 128256) for p, n in zip(prompts, lens)]
    busiest = max(s["busy_s"] for s in stats)
    assert busiest > 0.05 and wall >= busiest


# ------------------------------------------------------------ groups under the async depth


def _drive(st: Stepped, reqs, in_flight_max: int):
    """Run the PP scheduler as the pipeline loop does, without a pipeline: launch micro-batches
    (placeholder tokens) while fewer than ``in_flight_max`` are out, land the oldest, and
    record, per decode micro-batch, the micro-batches its requests' previous tokens came from."""
    s = st.scheduler
    out: deque = deque()
    last_batch: dict[int, int] = {}
    decode_sources: list[tuple[int, set[int]]] = []
    n_launched = 0
    while not all(r.finished for r in reqs):
        s.process_input_requests(s.recv_requests())
        while len(out) < in_flight_max:
            batch = s.get_next_batch_to_run()
            if batch is None:
                break
            if batch.forward_mode is ForwardMode.DECODE:
                srcs = {last_batch[id(r)] for r in batch.reqs if last_batch.get(id(r), -1) in {b[0] for b in out}}
                decode_sources.append((len(batch.reqs), srcs))
            s.commit_batch(batch, [-1] * len(batch.reqs))
            for r, pos in zip(batch.reqs, batch.out_positions):
                if pos is not None:
                    last_batch[id(r)] = n_launched
            out.append((n_launched, batch))
            n_launched += 1
        assert out, "nothing in flight and nothing to launch"
        _, batch = out.popleft()
        s.resolve_batch(batch, [7] * len(batch.reqs))
    return decode_sources


def test_async_depth_keeps_each_group_whole_and_spreads_a_burst_over_pp_size_groups():
    st = Stepped("parallel.pp_size=4", "parallel.pp_async_depth=1")
    # Requests finish at different times, so the groups shrink unevenly.
    reqs = [st.submit([5, 6, 7], max_new_tokens=4 + 3 * i, ignore_eos=True)[0] for i in range(16)]
    sources = _drive(st, reqs, in_flight_max=8)
    # The burst admitted in one prefill micro-batch splits into four groups of four ...
    assert [n for n, _ in sources[:4]] == [4, 4, 4, 4]
    # ... and a later decode micro-batch reads tokens still in flight from one earlier
    # micro-batch (a group keeps its turn), or, when two groups merge (one grew too small),
    # from two launched one after the other, so it waits for none out of turn.
    multi = [sorted(srcs) for _, srcs in sources if len(srcs) > 1]
    assert all(len(m) == 2 and m[1] - m[0] == 1 for m in multi) and len(multi) <= 2, multi
    st.settle()
    st.assert_all_free()


def test_async_depth_rebalances_uneven_groups():
    """A group half again as large as its share is split and the surplus merged into the
    next group."""
    st = Stepped("parallel.pp_size=2", "parallel.pp_async_depth=1", "scheduler.max_prefill_tokens=8",
                 "kv_cache.page_size=1")
    reqs = st.submit(*[[5, 6, 7, 8, 9, 10, 11]] * 6, max_new_tokens=16, ignore_eos=True)
    sources = _drive(st, reqs, in_flight_max=4)
    # One prefill micro-batch admitted one prompt, the next the other five: two groups of 1
    # and 5. The 5 is split (cap 3) and the rest merged into the 1: two groups of three.
    sizes = [n for n, _ in sources]
    assert sizes[0] == 1 and set(sizes[2:-1]) == {3}, sizes
    st.settle()
    st.assert_all_free()


@pytest.mark.parametrize("seed", [1, 6])
def test_async_depth_reserves_pages_for_a_whole_group_under_memory_pressure(seed):
    """A merged or oversized group decodes more than `cap` requests at once: the pages
    reserved before the batch (retracting when the pool is dry) must cover all of them, or
    the scheduler's allocation fails mid-step (it did, with page size 1 and a small pool)."""
    rng = random.Random(seed)
    st = Stepped("parallel.pp_size=2", "parallel.pp_async_depth=1", "kv_cache.num_tokens=160",
                 "kv_cache.page_size=1")
    reqs = [st.submit([rng.randrange(2, 90) for _ in range(rng.randrange(2, 20))],
                      max_new_tokens=rng.randrange(3, 60), ignore_eos=True)[0] for _ in range(rng.randrange(6, 30))]
    _drive(st, reqs, in_flight_max=4)
    assert all(r.finished for r in reqs)
    st.settle()
    st.assert_all_free()


def test_async_device_on_several_nodes_is_a_clear_error():
    with pytest.raises(ValueError, match="worker.params.async_device=true needs every pipeline stage on one host"):
        Engine(overrides=["worker=sim", f"worker.params.model={SHAPE}", "worker.params.async_device=true",
                          "parallel.pp_size=2", "parallel.nnodes=2", "parallel.dist_init_addr=127.0.0.1:29577"])
