"""The runner seam (core/loop/runner.py) and loops composed on it.

- any depth gives the same tokens as the normal loop (depth 0, 1, 2, 3);
- a loop written on the seam in a few lines (the "Writing a loop" example of
  docs/architecture.md, verbatim) works with every scheduler feature;
- a forward that raises fails only the requests of its batch; the loop serves on, nothing leaks;
- the shipped third-party example loop keeps decodes going between chunks of a long prompt;
- the model worker's asynchronous launch runs forwards on its compute thread (no extra hop).
"""

from __future__ import annotations

import random
import time

import pytest

from fake_worker import FakeWorkerPlugin, Stepped, reference_tokens, wait_until
from loopserve.core import SamplingParams, hookimpl
from loopserve.core.loop import RunnerLoop
from loopserve.core.loop.runner import FutureMap, Runner
from loopserve.core.sched.req import FinishKind
from loopserve.core.sched.scheduler import Scheduler

TIMEOUT = 60


# ----------------------------------------------------------------- the "Writing a loop" example
# (docs/architecture.md shows this block verbatim; keep the two in step)

class DeadlineScheduler(Scheduler):
    """Aborts requests that waited in the queue longer than ``loop.params.max_wait_s``."""

    def expire_waiting(self) -> bool:
        limit = float(self.config.loop.params.get("max_wait_s", 30.0))
        now = time.perf_counter()
        expired = [r for r in self.waiting_queue if not r.is_chunked and now - r.arrival_time > limit]
        for req in expired:
            self.abort(req.rid, f"waited more than {limit} s in the queue")
        return bool(expired)


class DeadlineLoop(RunnerLoop):
    """The overlap loop, plus a stage that expires requests stuck in the queue."""

    name = "deadline"
    depth = 1                             # one batch in flight while the CPU schedules the next
    scheduler_cls = DeadlineScheduler     # the scheduler role the build path constructs
    extra_stages = ("expire_waiting",)    # traced like every stage, after process_input_requests
    default_params = {"max_wait_s": 30.0}


class DeadlinePlugin:
    @hookimpl
    def loopserve_register_loops(self):
        return [DeadlineLoop]

# ------------------------------------------------------------------------------- end of example


def _depth_loop(depth: int) -> type[RunnerLoop]:
    return type(f"Depth{depth}Loop", (RunnerLoop,), {"name": f"depth{depth}", "depth": depth})


class DepthPlugin:
    @hookimpl
    def loopserve_register_loops(self):
        return [_depth_loop(d) for d in (2, 3)]


def _workload(seed: int, n: int = 24):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 97) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    lens = [rng.randint(1, 12) for _ in range(n)]
    return prompts, lens


@pytest.mark.parametrize("loop", ["normal", "overlap", "depth2", "depth3", "deadline"])
@pytest.mark.parametrize("extra", [(), ("kv_cache.page_size=4", "scheduler.chunked_prefill_size=16"),
                                   ("kv_cache.num_tokens=192", "scheduler.init_new_token_ratio=0.05",
                                    "scheduler.min_new_token_ratio=0.0")])
def test_every_depth_gives_the_normal_loops_tokens(loop, extra):
    """Stepped, with chunked prefill and with a pool small enough to retract: same tokens as
    the reference, every page and row free afterwards."""
    st = Stepped(f"loop={loop}", *extra, plugins=[("depths", DepthPlugin()), ("deadline", DeadlinePlugin())])
    try:
        prompts, lens = _workload(1)
        reqs = [st.submit(p, max_new_tokens=n)[0] for p, n in zip(prompts, lens)]
        st.run_until_done(reqs, max_steps=5000)
        for req, p, n in zip(reqs, prompts, lens):
            assert req.finished_reason.kind is FinishKind.LENGTH
            assert req.output_ids == reference_tokens(p, n), (loop, req.rid)
        st.settle()
        st.assert_all_free()
        if loop.startswith("depth"):
            assert st.loop.runner.depth == int(loop[-1])
    finally:
        st.loop.close()


def test_the_example_loop_is_selected_by_name_and_its_stage_runs(fake_plugin):
    from loopserve.core import Engine

    stages = []

    class Recorder:
        @hookimpl(wrapper=True)
        def loopserve_run_stage(self, stage):
            stages.append(stage)
            return (yield)

    with Engine(overrides=["worker=fake", "loop=deadline", "loop.params.max_wait_s=0.05",
                           "scheduler.max_running_requests=1", "+worker.params.delay_s=0.02"],
                plugins=[("fake_worker", fake_plugin), ("deadline", DeadlinePlugin()), ("rec", Recorder())]) as engine:
        assert engine.loop_name == "deadline" and isinstance(engine.scheduler, DeadlineScheduler)
        outs = engine.generate(input_ids=[[3, 4, 5], [6, 7], [8, 9]], sampling_params=SamplingParams(
            max_new_tokens=8, temperature=0.0), timeout=TIMEOUT)
    # One request runs at a time; the ones left waiting expire after 50 ms.
    reasons = sorted(o.finish_reason for o in outs)
    assert reasons.count("abort") >= 1 and "length" in reasons
    assert all("waited more than" in o.error for o in outs if o.finish_reason == "abort")
    assert "expire_waiting" in stages


# ------------------------------------------------------------------------------ failing forwards

class Flaky:
    """Makes the fake worker's forward raise for any batch holding a poisoned first token."""

    POISON = 66

    def __init__(self, worker):
        self.worker = worker
        self.orig = worker.forward_batch
        worker.forward_batch = self.forward_batch

    def forward_batch(self, fb):
        if any(t == self.POISON for t in fb.input_ids):
            raise RuntimeError("device lost its mind")
        return self.orig(fb)


@pytest.mark.parametrize("loop", ["normal", "overlap"])
def test_a_failing_forward_fails_only_its_batch(fake_engine, loop):
    engine = fake_engine(f"loop={loop}", "kv_cache.page_size=4")
    Flaky(engine.worker)
    good = engine.submit(input_ids=[3, 4, 5], sampling_params=SamplingParams(max_new_tokens=40, temperature=0.0))
    wait_until(lambda: len(good.req.output_ids) >= 2, TIMEOUT, what="the good request decoding")
    bad = engine.submit(input_ids=[Flaky.POISON, 9, 9], sampling_params=SamplingParams(max_new_tokens=5, temperature=0.0))
    out_bad = bad.result(TIMEOUT)
    assert out_bad.finish_reason == "abort" and "forward pass failed" in out_bad.error
    assert "device lost its mind" in out_bad.error
    out_good = good.result(TIMEOUT)
    # The good request rode in no batch with the bad one's prefill, or it was failed with it.
    if out_good.finish_reason == "length":
        assert out_good.token_ids == reference_tokens([3, 4, 5], 40)
    # The engine serves on and nothing leaked.
    (after,) = engine.generate(input_ids=[[7, 8]], sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0),
                               timeout=TIMEOUT)
    assert after.token_ids == reference_tokens([7, 8], 6)
    s = engine.scheduler
    wait_until(lambda: not s.running and not s.waiting_queue and not engine.loop.runner.pending, TIMEOUT,
               what="drain")
    assert engine._loop_error is None
    wait_until(lambda: s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages, TIMEOUT, what="pages free")
    assert s.stats.num_aborted >= 1


# ------------------------------------------------------------------ the third-party example loop

def test_example_loop_decodes_between_chunks_of_a_long_prompt():
    """The example plugin's loop (examples/third_party_plugin) with chunked prefill: a running
    request keeps decoding while a long prompt is prefilled chunk by chunk."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"))
    try:
        import loopserve_example_plugin as example
    finally:
        sys.path.pop(0)
    st = Stepped("loop=budgeted", "scheduler.chunked_prefill_size=8", "kv_cache.page_size=1",
                 plugins=[("example", example)])
    (short,) = st.submit([3, 4], max_new_tokens=30)
    st.step()  # prefill of the short request
    (long_req,) = st.submit(list(range(2, 66)), max_new_tokens=2)  # 64 tokens: 8 chunks
    progress = []
    while not long_req.output_ids or long_req.output_ids[0] < 0:
        st.step()
        progress.append((long_req.num_computed, len(short.output_ids)))
        assert len(progress) < 100
    # The short request's output length at each step that advanced the long prompt's chunks:
    # it grows between any two chunks (decodes alternate with chunks, they are not stalled).
    at_chunk = [n_short for (done, n_short), (before, _) in zip(progress, [(0, 0)] + progress) if done > before]
    assert len(at_chunk) >= 8, progress
    assert all(b > a for a, b in zip(at_chunk, at_chunk[1:])), progress
    st.run_until_done([short, long_req])
    assert short.output_ids == reference_tokens([3, 4], 30)
    assert long_req.output_ids == reference_tokens(list(range(2, 66)), 2)


# ------------------------------------------------------------------------------- units

def test_future_map_wraps_around():
    fm = FutureMap(capacity=8)
    a = fm.allocate(5)
    fm.store(a, [10, 11, 12, 13, 14])
    b = fm.allocate(5)  # wraps: ring positions 5, 6, 7, 0, 1
    fm.store(b, [20, 21, 22, 23, 24])
    assert fm.resolve(b + [7]) == [20, 21, 22, 23, 24, 7]
    assert fm.resolve(a[2:]) == [12, 13, 14]


def test_runner_rejects_a_negative_depth():
    st = Stepped("loop=normal")
    with pytest.raises(ValueError, match="depth"):
        Runner(st.scheduler, -1)


def test_overlap_on_the_model_worker_launches_on_its_compute_thread():
    """No forward thread: the model worker's launch_batch queues onto the compute thread."""
    import threading

    from loopserve.core import Engine

    before = {t.name for t in threading.enumerate()}
    with Engine(overrides=["loop=overlap", "kv_cache.num_tokens=2048"]) as engine:
        assert engine.loop.runner.forward_thread is None
        names = {t.name for t in threading.enumerate()} - before
        assert "loopserve-forward" not in names and "loopserve-compute" in names | before
        outs = engine.generate(input_ids=[[256, 5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0),
                               timeout=TIMEOUT)
    with Engine(overrides=["loop=normal", "kv_cache.num_tokens=2048"]) as engine:
        ref = engine.generate(input_ids=[[256, 5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0),
                              timeout=TIMEOUT)
    assert outs[0].token_ids == ref[0].token_ids


def test_the_writing_a_loop_example_in_the_docs_is_this_test_and_short():
    """docs/architecture.md's "Writing a loop" code block is the example above, line for line
    (imports aside), and stays well under 50 lines."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "architecture.md").read_text()
    section = doc.split("## Writing a loop", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = [line for line in block.splitlines() if line.strip()]
    assert len(code) < 50
    here = Path(__file__).read_text()
    body = [line for line in code if not line.startswith(("import ", "from "))]
    start = here.index("class DeadlineScheduler")
    example = here[start: here.index("# ---", start)]
    assert body == [line for line in example.splitlines() if line.strip()]
