"""Event loops: the ``auto`` selection table (docs/architecture.md), loops that are steppable (driven with
``step()`` and no thread) and stoppable (``run()`` returns soon after ``stop()``), and
``DynamicGradMode`` applied to every loop, third-party subclasses included."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import pytest
import torch

from loopserve.core import ForwardMode, SamplingParams, hookimpl
from loopserve.core.config import compose_config
from loopserve.core.loop import EventLoop
from loopserve.core.plugin_manager import make_plugin_manager
from loopserve.plugins.loop_auto import select_loop_name
from loopserve.plugins.loop_normal import NormalLoop

from fake_worker import Stepped, reference_tokens, wait_until

TIMEOUT = 30.0

# The loop-selection table, written out row by row: (disaggregation mode, pp_size > 1, overlap) -> loop.
SEED_TABLE = {
    (None, True, False): "pp",
    (None, True, True): "pp",
    (None, False, True): "overlap",
    (None, False, False): "normal",
    ("prefill", False, False): "disagg_prefill",
    ("prefill", False, True): "disagg_prefill",
    ("prefill", True, False): "disagg_prefill",
    ("prefill", True, True): "disagg_prefill",
    ("decode", False, False): "disagg_decode",
    ("decode", False, True): "disagg_decode",
    ("decode", True, False): "disagg_decode",
    ("decode", True, True): "disagg_decode",
}

COMBINATIONS = list(itertools.product([None, "prefill", "decode"], [1, 2, 4], [False, True]))


# ------------------------------------------------------------------------- auto selection


@pytest.mark.parametrize(("mode", "pp_size", "overlap"), COMBINATIONS)
def test_select_loop_name_follows_the_seed_table(mode, pp_size, overlap):
    assert select_loop_name(mode, pp_size, overlap) == SEED_TABLE[(mode, pp_size > 1, overlap)]


@pytest.mark.parametrize(("mode", "pp_size", "overlap"), COMBINATIONS[::5])
def test_select_loop_hook_reads_the_config(mode, pp_size, overlap):
    cfg = compose_config([f"disaggregation.mode={'null' if mode is None else mode}",
                          f"parallel.pp_size={pp_size}", f"scheduler.enable_overlap={str(overlap).lower()}"])
    pm = make_plugin_manager()
    chosen = pm.hook.loopserve_select_loop(config=cfg, available=["normal"])
    assert chosen == SEED_TABLE[(mode, pp_size > 1, overlap)]


def test_auto_picks_normal(fake_engine):
    engine = fake_engine("loop=auto")
    assert engine.loop_name == "normal"
    assert type(engine.loop) is NormalLoop
    (out,) = engine.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0),
                             timeout=TIMEOUT)
    assert out.token_ids == reference_tokens([3, 4, 5], 3)


def test_auto_is_the_default(fake_engine):
    assert fake_engine().loop_name == "normal"


@pytest.mark.parametrize(
    ("override", "missing"),
    [
        ("scheduler.enable_overlap=true", "overlap"),
        ("parallel.pp_size=2", "pp"),
        ("disaggregation.mode=prefill", "disagg_prefill"),
        ("disaggregation.mode=decode", "disagg_decode"),
    ],
)
def test_auto_names_a_loop_that_is_not_installed(fake_plugin, override, missing):
    from loopserve.core import Engine

    with pytest.raises(ValueError) as info:
        # The overlap, pipeline and disaggregated loops are built-in plugins: disable them so only
        # normal is installed.
        Engine(overrides=["worker=fake", "loop=auto", override, "plugins.disable=[loop_overlap,loop_disagg,loop_pp]"],
               plugins=[("fake_worker", fake_plugin)])
    message = str(info.value)
    assert f"'{missing}' is not installed" in message
    assert "installed loops: normal" in message
    assert fake_plugin.last is None  # failed before the worker was built


def test_explicit_unknown_loop_lists_options():
    with pytest.raises(ValueError, match=r"(?s)loop 'nosuch' is not installed.*auto.*normal.*overlap.*pp"):
        compose_config(["loop=nosuch"])


# ------------------------------------------------------------------------- steppable


def test_step_drives_one_request_exactly():
    st = Stepped("loop=normal")
    threads_before = threading.active_count()
    (req,) = st.submit([5, 6, 7, 8, 9], max_new_tokens=4)
    results = []
    for i in range(4):
        assert not req.finished
        results.append(st.step())
    assert req.finished and req.finished_reason.kind.value == "length"
    assert results == [True] * 4  # prefill + 3 decodes
    assert [b.forward_mode for b in st.worker.batches] == [ForwardMode.EXTEND] + [ForwardMode.DECODE] * 3
    assert st.loop.num_iterations == 4
    assert st.step() is False  # idle now: nothing received, no batch
    assert st.loop.num_iterations == 5 and len(st.worker.batches) == 4
    assert req.output_ids == reference_tokens([5, 6, 7, 8, 9], 4)
    st.assert_all_free()
    assert threading.active_count() == threads_before  # no loop thread anywhere
    assert st.worker.threads == {threading.current_thread().name}


def test_step_counts_for_two_requests_of_different_lengths():
    st = Stepped("loop=normal")
    (short,) = st.submit([5, 6], max_new_tokens=2)
    (long_,) = st.submit([7, 8, 9], max_new_tokens=5)  # both arrive before the first step
    finished_at = {}
    for i in range(1, 8):
        st.step()
        for r in (short, long_):
            if r.finished and r.rid not in finished_at:
                finished_at[r.rid] = i
    assert finished_at == {short.rid: 2, long_.rid: 5}
    assert [b.batch_size for b in st.worker.batches] == [2, 2, 1, 1, 1]


def test_idle_step_does_nothing():
    st = Stepped("loop=normal")
    assert [st.step() for _ in range(3)] == [False, False, False]
    assert st.worker.batches == []


# ------------------------------------------------------------------------- stoppable


def test_shutdown_during_a_long_run(fake_engine, fake_plugin):
    engine = fake_engine("loop=normal", "scheduler.max_running_requests=2", "+worker.params.delay_s=0.01")
    sp = SamplingParams(max_new_tokens=400, temperature=0)  # ~4 s of decoding if left alone
    handles = [engine.submit(input_ids=[3 + i, 4, 5], sampling_params=sp) for i in range(4)]
    wait_until(lambda: len(handles[0].req.output_ids) >= 3, TIMEOUT, what="decoding to start")
    t0 = time.monotonic()
    engine.shutdown(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"shutdown took {elapsed:.2f} s"
    assert not engine._thread.is_alive()
    assert engine.loop.stopped
    outs = [h.result(5) for h in handles]
    assert [o.finish_reason for o in outs] == ["abort"] * 4
    assert outs[2].token_ids == [] and outs[3].token_ids == []  # never admitted
    assert outs[0].token_ids == reference_tokens([3, 4, 5], len(outs[0].token_ids))
    s = engine.scheduler
    assert s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
    assert s.req_pool.num_free == s.req_pool.size
    assert fake_plugin.last.shut
    engine.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(input_ids=[1, 2], sampling_params=sp)


def test_shutdown_of_an_idle_loop_does_not_wait_out_the_idle_timeout(fake_engine):
    engine = fake_engine("loop=normal", "scheduler.idle_wait_s=20")
    engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=2, temperature=0),
                    timeout=TIMEOUT)
    t0 = time.monotonic()
    engine.shutdown(timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert not engine._thread.is_alive()


class _StopInsideIdleIteration:
    """Calls ``loop.stop()`` while an idle iteration is running: the worst moment for a wakeup,
    just before the loop goes to sleep on its inbox."""

    def __init__(self):
        self.loop = None

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, stage):
        result = yield
        if stage == "self_check_during_idle" and self.loop is not None:
            self.loop.stop()
        return result


def test_stop_during_an_idle_iteration_is_not_lost():
    stopper = _StopInsideIdleIteration()
    st = Stepped("loop=normal", "scheduler.idle_wait_s=20", plugins=[("stopper", stopper)])
    stopper.loop = st.loop
    thread = threading.Thread(target=st.loop.run, name="test-run", daemon=True)
    thread.start()
    thread.join(5)
    alive = thread.is_alive()
    if alive:  # do not leave the thread behind
        st.loop.stop()
        thread.join(5)
    assert not alive, "run() slept through stop()"


def test_run_waits_on_the_inbox_instead_of_spinning():
    st = Stepped("loop=normal", "scheduler.idle_wait_s=0.05")
    thread = threading.Thread(target=st.loop.run, name="test-run", daemon=True)
    thread.start()
    try:
        (req,) = st.submit([4, 5, 6], max_new_tokens=3)
        wait_until(lambda: req.finished, TIMEOUT, what="the request")
        n = st.loop.num_iterations
        threading.Event().wait(0.3)  # a measurement window, not synchronization
        assert st.loop.num_iterations - n < 30  # ~6 idle wake-ups, not a busy loop
        # A new request wakes the loop at once, well before idle_wait_s would.
        (req2,) = st.submit([7, 8], max_new_tokens=2)
        wait_until(lambda: req2.finished, TIMEOUT, what="the second request")
        assert req2.output_ids == reference_tokens([7, 8], 2)
    finally:
        st.loop.stop()
        thread.join(5)
    assert not thread.is_alive()


# ------------------------------------------------------------------------- DynamicGradMode

EXPECTED_MODE = {  # grad_mode -> (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    "no_grad": (False, False),
    "inference": (False, True),
    "enable_grad": (True, False),
}


@pytest.mark.parametrize("mode", sorted(EXPECTED_MODE))
def test_grad_mode_in_engine_loop_thread(fake_engine, fake_plugin, mode):
    engine = fake_engine("loop=normal", f"grad_mode={mode}")
    engine.generate(input_ids=[[3, 4, 5], [6, 7]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0),
                    timeout=TIMEOUT)
    worker = fake_plugin.last
    grad, inference = EXPECTED_MODE[mode]
    assert len(worker.grad_enabled) == 3
    assert worker.grad_enabled == [grad] * 3
    assert worker.inference_mode == [inference] * 3


@pytest.mark.parametrize("mode", sorted(EXPECTED_MODE))
def test_grad_mode_in_step_and_restored_after(mode):
    st = Stepped("loop=normal", f"grad_mode={mode}")
    st.submit([3, 4, 5], max_new_tokens=2)
    # Step from a thread whose own mode differs from the loop's.
    with torch.no_grad() if mode == "enable_grad" else contextlib.nullcontext():
        outer = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        st.step()
        st.step()
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == outer
    grad, inference = EXPECTED_MODE[mode]
    assert st.worker.grad_enabled == [grad, grad]
    assert st.worker.inference_mode == [inference, inference]


class _RecordingLoop(EventLoop):
    """A third-party loop that overrides ``step`` (and ``run``) without decorating them."""

    name = "recording"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_modes: list[tuple[bool, bool]] = []
        self.run_modes: list[tuple[bool, bool]] = []
        self.inner = NormalLoop(self.scheduler, self.pm, self.config)

    def iteration(self):
        return self.inner.iteration()

    def step(self):
        self.step_modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        self.num_iterations += 1
        return self.iteration()

    def run(self):
        self.run_modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        while not self.stopped:
            if not self.step() and not self.has_pending():
                self.scheduler.wait_for_work(self.idle_wait_s)


class _RecordingLoopPlugin:
    @hookimpl
    def loopserve_register_loops(self):
        return {"recording": _RecordingLoop}

    @hookimpl
    def loopserve_add_config(self, config_store):
        config_store.store(group="loop", name="recording", node={"name": "recording"})


@pytest.fixture
def _forget_recording_loop():
    yield
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().repo.get("loop", {}).pop("recording.yaml", None)


@pytest.mark.parametrize("mode", sorted(EXPECTED_MODE))
def test_third_party_step_override_gets_grad_mode(mode, _forget_recording_loop):
    st = Stepped("loop=recording", f"grad_mode={mode}", plugins=[("recording", _RecordingLoopPlugin())])
    assert type(st.loop) is _RecordingLoop
    (req,) = st.submit([3, 4, 5], max_new_tokens=2)
    with torch.no_grad() if mode == "enable_grad" else contextlib.nullcontext():
        st.run_until_done([req], max_steps=10)
    assert req.output_ids == reference_tokens([3, 4, 5], 2)
    expected = EXPECTED_MODE[mode]
    assert st.loop.step_modes and set(st.loop.step_modes) == {expected}
    assert set(zip(st.worker.grad_enabled, st.worker.inference_mode)) == {expected}


def test_third_party_run_override_gets_grad_mode(fake_plugin, _forget_recording_loop):
    from loopserve.core import Engine

    with Engine(overrides=["worker=fake", "loop=recording", "grad_mode=inference"],
                plugins=[("fake_worker", fake_plugin), ("recording", _RecordingLoopPlugin())]) as engine:
        engine.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=2, temperature=0),
                        timeout=TIMEOUT)
    assert engine.loop.run_modes == [(False, True)]
    assert set(engine.loop.step_modes) == {(False, True)}
    assert fake_plugin.last.inference_mode == [True, True]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["worker=sim"], "overlap"),  # a modeled GPU: overlap measured faster
    (["worker=sim", "scheduler.enable_overlap=false"], "normal"),
    (["worker=model", "model.device=cpu"], "normal"),  # the CPU's cores run the forward
    (["worker=model", "model.device=cpu", "scheduler.enable_overlap=true"], "overlap"),
    (["worker=model", "model.device=cuda"], "overlap"),
    (["worker=fake"], "normal"),  # a worker auto knows nothing about
])
def test_auto_overlap_default_depends_on_where_it_wins(overrides, expected):
    cfg = compose_config(["loop=auto", *overrides], make_plugin_manager())
    pm = make_plugin_manager()
    assert pm.hook.loopserve_select_loop(config=cfg, available=["normal", "overlap"]) == expected


def test_auto_runs_the_sim_worker_on_the_overlap_loop():
    from loopserve.core import Engine
    from loopserve.plugins.worker_sim import reference_tokens as sim_reference

    with Engine(overrides=["worker=sim", "worker.params.model=tiny", "kv_cache.num_tokens=4096"]) as engine:
        assert engine.loop_name == "overlap"
        (out,) = engine.generate(input_ids=[[3, 4, 5, 6]], sampling_params=SamplingParams(max_new_tokens=5),
                                 timeout=TIMEOUT)
        assert out.token_ids == sim_reference([3, 4, 5, 6], 5, engine.worker.vocab_size)
