"""No input, race or fault may kill the engine, hang a caller or leak a thread.

Each class of failure found by probing the engine as an attacker and as a careless caller
would has a test here, at the Python API and (as a subprocess) at the CLI: values of the wrong
type or out of range get a ``ValueError`` naming the field (CLI exit 2); degenerate sampling
values give the greedy answer, never garbage; a plugin's exception on the loop thread is
contained, logged once and counted while the engine keeps serving; ``generate`` racing
``shutdown`` returns, a timeout aborts what it started, ids of live requests are unique;
failed construction leaves no thread; broken checkpoints and absurd sizes are ValueErrors
naming the file or key, checked before anything large is allocated; shutdown is bounded
with a collector that never answers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fake_worker import VOCAB, FakeWorkerPlugin, reference_tokens
from loopserve.core import Engine, SamplingParams, hookimpl
from loopserve.core.model.sampler import Sampler
from loopserve.core.sched.req import Req
from loopserve.core.sched.sampling_params import GREEDY_TEMPERATURE
from loopserve.core.telemetry import Telemetry

TIMEOUT = 30.0
PROMPT = [5, 6, 7, 8]


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _new_threads(before: set[threading.Thread], wait_s: float = 5.0) -> list[str]:
    """Threads started since ``before`` that are still alive after a short grace period."""
    deadline = time.monotonic() + wait_s
    while True:
        extra = [t for t in _threads() - before if t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return [t.name for t in extra]
        time.sleep(0.02)


def _engine(*overrides, plugins=(), **kw) -> Engine:
    return Engine(overrides=["worker=fake", "loop=normal", *overrides],
                  plugins=[("fake_worker", FakeWorkerPlugin()), *plugins], **kw)


def _witness(engine: Engine) -> list[int]:
    (out,) = engine.generate(input_ids=[PROMPT], sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0),
                             timeout=TIMEOUT)
    return out.token_ids


# ------------------------------------------------------------------ sampling params


@pytest.mark.parametrize("field, value, says", [
    ("top_k", 50.5, "top_k"), ("top_k", float("nan"), "top_k"), ("top_k", True, "top_k"),
    ("top_p", Decimal("0.5"), "top_p"), ("temperature", Fraction(1, 2), "temperature"),
    ("temperature", float("nan"), "finite"), ("temperature", float("inf"), "temperature"),
    ("temperature", "0.5", "temperature"), ("temperature", -1.0, "temperature"),
    ("repetition_penalty", float("nan"), "repetition_penalty"), ("min_p", float("-inf"), "min_p"),
    ("frequency_penalty", 2.5, "frequency_penalty"), ("max_new_tokens", True, "max_new_tokens"),
    ("max_new_tokens", 10**40, "max_new_tokens"), ("max_new_tokens", 1e300, "max_new_tokens"),
    ("seed", 1.5, "seed"), ("seed", 2**80, "seed"), ("stop", 5, "stop"), ("stop", [""], "stop[0]"),
    ("stop", ["ok", "\ud800"], "stop[1]"), ("stop_token_ids", 5, "stop_token_ids"),
    ("stop_token_ids", [1, None], "stop_token_ids[1]"), ("stop_token_ids", [-1], "stop_token_ids[0]"),
    ("ignore_eos", 1, "ignore_eos"), ("skip_special_tokens", "no", "skip_special_tokens"),
])
def test_a_bad_sampling_value_is_a_value_error_naming_the_field(field, value, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=re.escape(says)):
        SamplingParams.from_dict({field: value})


def test_json_values_are_accepted_with_exact_types():
    sp = SamplingParams.from_dict({"top_k": 50.0, "max_new_tokens": 16.0, "temperature": 1, "seed": 3.0,
                                   "stop": "x", "stop_token_ids": [2.0], "unknown": {"ignored": True},
                                   "top_p": None})
    assert (sp.top_k, sp.max_new_tokens, sp.seed, sp.stop_token_ids) == (50, 16, 3, [2])
    assert all(type(v) is int for v in (sp.top_k, sp.max_new_tokens, sp.seed, sp.stop_token_ids[0]))
    assert type(sp.temperature) is float and sp.stop == ["x"] and sp.top_p == 1.0
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_dict({"unknown": 1}, strict=True)
    with pytest.raises(ValueError, match="sampling_params must be an object"):
        SamplingParams.from_dict([("top_k", 1)])
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]=97 is outside the vocabulary \[0, 97\)"):
        SamplingParams.from_dict({"stop_token_ids": [97]}, vocab_size=97)


def test_a_field_changed_after_construction_is_checked_at_submit(fake_engine):
    engine = fake_engine("loop=normal")
    sp = SamplingParams(max_new_tokens=4)
    sp.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(input_ids=[PROMPT], sampling_params=sp)
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]=500 is outside the vocabulary"):
        engine.generate(input_ids=[PROMPT], sampling_params=SamplingParams(stop_token_ids=[500]))
    assert _witness(engine) == reference_tokens(PROMPT, 6)


# ------------------------------------------------------------------ numerically safe sampling


def test_a_temperature_below_the_threshold_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 20
    params = [SamplingParams(temperature=t) for t in (1e-38, 1e-30, 1e-6, GREEDY_TEMPERATURE / 2, 0.0, 5e-324)]
    tokens = Sampler("cpu").sample(logits.clone(), params)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_extreme_values_never_sample_from_nan():
    torch.manual_seed(1)
    logits = torch.randn(4, 50) * 30
    params = [SamplingParams(temperature=1e300), SamplingParams(temperature=1.0, repetition_penalty=1e-300),
              SamplingParams(temperature=GREEDY_TEMPERATURE, repetition_penalty=1e300, top_p=1e-300),
              SamplingParams(temperature=0.7, top_k=10**30, min_p=1.0, presence_penalty=2.0)]
    ids = [[1, 2, 3]] * 4
    sampler = Sampler("cpu")
    for _ in range(20):
        tokens = sampler.sample(logits.clone(), params, output_ids=ids, prompt_ids=ids)
        assert ((tokens >= 0) & (tokens < 50)).all()
    # Greedy with a repetition penalty so small the penalized logits overflow: still the
    # argmax of the unpenalized tokens (an infinite logit must not turn into NaN).
    one = torch.tensor([[5.0, 4.0, 3.0]])
    assert Sampler("cpu").sample(one, [SamplingParams(temperature=0, repetition_penalty=1e-300)],
                                 output_ids=[[1]], prompt_ids=[[]]).tolist() == [1]


# ------------------------------------------------------------------ the API edge


@pytest.mark.parametrize("kwargs, says", [
    (dict(prompt=["a", None]), r"prompt\[1\] must be a string"),
    (dict(prompt="\udcff"), "lone surrogate"),
    (dict(prompt=""), "empty"),
    (dict(input_ids=[[1, True]]), "must be a token id"),
    (dict(input_ids=[[1, 2.0]]), "must be a token id"),
    (dict(input_ids=[[1, VOCAB]]), "outside the vocabulary"),
    (dict(input_ids=[[1]], traceparent=5), "traceparent must be a string"),
    (dict(input_ids=[[1]], timeout=float("nan")), "timeout"),
    (dict(input_ids=[[1]], timeout=-1), "timeout"),
    (dict(input_ids=[[1]], priority=1.5), "priority"),
    (dict(input_ids=[[1]], priority=True), "priority"),
    (dict(input_ids=[[1]], sampling_params=5), "sampling_params"),
    (dict(input_ids=[[1]], sampling_params={"temperature": "hot"}), "temperature"),
])
def test_bad_request_fields_are_value_errors_and_the_engine_keeps_serving(fake_engine, kwargs, says):
    engine = fake_engine("loop=normal")
    with pytest.raises(ValueError, match=says):
        engine.generate(**kwargs)
    assert _witness(engine) == reference_tokens(PROMPT, 6)
    engine.scheduler.self_check_during_idle()


def test_a_live_request_id_cannot_be_reused(fake_engine):
    engine = fake_engine("loop=normal", "+worker.params.delay_s=0.002")
    sp = SamplingParams(max_new_tokens=400, ignore_eos=True, temperature=0.0)
    first = engine.submit(input_ids=PROMPT, sampling_params=sp, rid="same")
    with pytest.raises(ValueError, match="'same' is already in use"):
        engine.submit(input_ids=PROMPT, rid="same")
    with pytest.raises(ValueError, match="rid"):
        engine.submit(input_ids=PROMPT, rid="")
    engine.abort("same")
    assert first.result(TIMEOUT).finish_reason == "abort"
    # Finished, so the id is free again.
    again = engine.submit(input_ids=PROMPT, rid="same", sampling_params=SamplingParams(max_new_tokens=3, temperature=0))
    assert again.result(TIMEOUT).token_ids == reference_tokens(PROMPT, 3)


def test_a_timeout_aborts_the_requests_it_started(fake_engine):
    engine = fake_engine("loop=normal", "+worker.params.delay_s=0.01")
    sp = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="aborted"):
        engine.generate(input_ids=[PROMPT, [9, 9, 9]], sampling_params=sp, timeout=0.3)
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + TIMEOUT
    while engine.scheduler.running or engine.scheduler.waiting_queue:
        assert time.monotonic() < deadline, "the timed-out requests were not aborted"
        time.sleep(0.01)
    assert engine.get_stats()["aborted_requests"] == 2
    handle = engine.submit(input_ids=PROMPT, sampling_params=sp)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.1)
    assert handle._done.wait(TIMEOUT) and handle.req.finished_reason.kind.value == "abort"
    assert _witness(engine) == reference_tokens(PROMPT, 6)


def test_generate_racing_shutdown_returns_promptly():
    before = _threads()
    for delay in (0.0, 0.01, 0.05):
        engine = _engine("+worker.params.delay_s=0.001")
        box: list[object] = []

        def call():
            try:
                box.append(engine.generate(input_ids=[[i % 90 + 2, 3, 4] for i in range(300)],
                                           sampling_params=SamplingParams(max_new_tokens=50, ignore_eos=True)))
            except BaseException as exc:  # noqa: BLE001 - inspected below
                box.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(delay)
        engine.shutdown()
        caller.join(10)
        assert not caller.is_alive(), "generate hung after shutdown"
        (result,) = box
        if isinstance(result, BaseException):
            assert isinstance(result, RuntimeError) and "shut down" in str(result)
        else:
            assert all(o.finish_reason in ("abort", "length") for o in result)
    assert _new_threads(before) == []


def test_result_wakes_on_loop_failure():
    engine = _engine()
    try:
        handle = engine.submit(input_ids=PROMPT, sampling_params=SamplingParams(max_new_tokens=10_000, ignore_eos=True))

        def boom(*args):
            raise RuntimeError("the scheduler exploded")

        # A failing forward only fails its batch (tests/test_runner.py); a scheduler stage that
        # raises is a bug that stops the loop, and every waiting caller must wake.
        engine.scheduler.get_next_batch_to_run = boom
        t0 = time.monotonic()
        try:  # either the aborted output or the loop's error, whichever the caller sees first
            out = handle.result(TIMEOUT)
            assert out.finish_reason == "abort" and "loop failed" in out.error
        except RuntimeError as exc:
            assert "loop failed" in str(exc) and "exploded" in str(exc.__cause__)
        assert time.monotonic() - t0 < 10
        with pytest.raises(RuntimeError, match="loop failed"):
            engine.generate(input_ids=[PROMPT])
    finally:
        engine.shutdown()


def test_a_request_finished_just_before_the_loop_failed_returns_its_own_outcome():
    """The loop can finish a request (fail its batch with a stage's error) and then fail
    itself between two polls of a waiting caller: the caller gets the request's output (its
    error says why), not the loop's RuntimeError. Forced here by a handle whose 0.1 s poll
    times out while the loop does both."""
    engine = _engine()
    try:
        handle = engine.submit(input_ids=PROMPT, sampling_params=SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        real = handle._done

        class RacingEvent:
            def is_set(self):
                return real.is_set()

            def set(self):
                real.set()

            def wait(self, timeout=None):
                # The poll times out; meanwhile the request ends and then the loop fails.
                engine.abort(handle.rid, "the stage's error")
                assert real.wait(TIMEOUT)
                engine._loop_error = RuntimeError("the pipeline failed")
                return False

        handle._done = RacingEvent()
        out = handle.result(TIMEOUT)
        assert out.finish_reason == "abort" and "the stage's error" in out.error
    finally:
        engine._loop_error = None
        engine.shutdown()


# ------------------------------------------------------------------ plugin containment


class FailingObserver:
    """Raises in every observer hook and in stage and iteration wrappers (before or after
    the wrapped call)."""

    def __init__(self, where: str) -> None:
        self.where = where

    @hookimpl
    def loopserve_requests_finished(self, scheduler, reqs):
        if self.where == "finished":
            raise RuntimeError("finished hook failed")

    @hookimpl
    def loopserve_before_forward(self, batch):
        if self.where == "before":
            raise KeyError("before hook failed")

    @hookimpl
    def loopserve_after_forward(self, batch, result):
        if self.where == "after":
            raise ValueError("after hook failed")

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, stage):
        if self.where == "stage-before":
            raise RuntimeError(f"stage wrapper failed before {stage}")
        result = yield
        if self.where == "stage-after":
            raise RuntimeError(f"stage wrapper failed after {stage}")
        return result

    @hookimpl(wrapper=True)
    def loopserve_run_iteration(self, loop):
        if self.where == "iteration-before":
            raise RuntimeError("iteration wrapper failed")
        result = yield
        if self.where == "iteration-after":
            raise RuntimeError("iteration wrapper failed after")
        return result


@pytest.mark.parametrize("loop", ["normal", "overlap"])
@pytest.mark.parametrize("where", ["finished", "before", "after", "stage-before", "stage-after",
                                   "iteration-before", "iteration-after"])
def test_a_failing_plugin_hook_is_contained_logged_once_and_counted(where, loop, caplog):
    caplog.set_level(logging.ERROR, logger="loopserve.plugins")
    engine = _engine(f"loop={loop}", plugins=[("failing", FailingObserver(where))])
    try:
        sp = SamplingParams(max_new_tokens=5, temperature=0.0)
        for _ in range(3):
            outs = engine.generate(input_ids=[PROMPT, [3, 1, 4, 1, 5]], sampling_params=sp, timeout=TIMEOUT)
            assert [o.token_ids for o in outs] == [reference_tokens(PROMPT, 5), reference_tokens([3, 1, 4, 1, 5], 5)]
        stats = engine.get_stats()
        assert stats["plugin_errors"] >= 3
        assert set(engine.scheduler.stats.plugin_errors.counts) <= {
            ("failing", f"loopserve_{h}") for h in
            ("requests_finished", "before_forward", "after_forward", "run_stage", "run_iteration")}
        logged = [r for r in caplog.records if "failing" in r.getMessage()]
        assert len(logged) == len(engine.scheduler.stats.plugin_errors.counts) == 1
        text = engine.metrics()
        assert f"loopserve_plugin_errors_total {float(stats['plugin_errors'])}" in text
        assert 'loopserve_plugin_hook_errors_total{hook="loopserve_' in text
    finally:
        engine.shutdown()


def test_the_tracing_plugin_ignores_a_non_string_traceparent():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = _engine(tracer_provider=provider)
    try:
        # A frontend that skipped the API's checks hands the scheduler anything.
        req = Req(rid="raw", input_ids=list(PROMPT), sampling_params=SamplingParams(max_new_tokens=2),
                  traceparent=12345)  # type: ignore[arg-type]
        done = threading.Event()
        req.on_update = lambda r: r.finished and done.set()
        engine.scheduler.submit(req)
        assert done.wait(TIMEOUT)
        assert _witness(engine) == reference_tokens(PROMPT, 6)
        assert engine.get_stats()["plugin_errors"] == 0
        assert any(s.name.startswith("gen_ai") or "request" in s.name for s in exporter.get_finished_spans())
    finally:
        engine.shutdown()
        provider.shutdown()


# ------------------------------------------------------------------ construction and shutdown


class RaisesAtStartup:
    @hookimpl
    def loopserve_startup(self, scheduler, loop):
        raise RuntimeError("startup failed")


def _failing_loop_plugin():
    from loopserve.plugins.loop_overlap import OverlapLoop

    class HalfBuiltLoop(OverlapLoop):
        name = "half_built"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)  # starts the forward thread
            raise RuntimeError("loop constructor failed")

    class Plugin:
        @hookimpl
        def loopserve_register_loops(self):
            return {"half_built": HalfBuiltLoop}

        @hookimpl
        def loopserve_add_config(self, config_store):
            config_store.store(group="loop", name="half_built", node={"name": "half_built"})

    return Plugin()


@pytest.mark.parametrize("case", ["startup-normal", "startup-overlap", "loop-constructor"])
def test_failed_construction_leaves_no_thread(case):
    before = _threads()
    if case == "loop-constructor":
        plugins, overrides = [("half", _failing_loop_plugin())], ["loop=half_built"]
    else:
        plugins, overrides = [("bad", RaisesAtStartup())], [f"loop={case.split('-')[1]}"]
    # The model worker: its compute thread must go too.
    with pytest.raises(RuntimeError, match="failed"):
        Engine(overrides=[*overrides, "kv_cache.num_tokens=256"], plugins=plugins)
    assert _new_threads(before) == []


def test_shutdown_is_bounded_when_the_collector_never_answers():
    release = threading.Event()

    class HangingProvider:
        def force_flush(self, timeout_millis=30000):
            release.wait(60)  # ignores its timeout, like an exporter retrying a dead collector
            return True

        def shutdown(self):
            release.wait(60)

    telemetry = Telemetry(HangingProvider(), owns_provider=True)
    t0 = time.monotonic()
    try:
        telemetry.shutdown(timeout_s=0.3)
        assert time.monotonic() - t0 < 3
        assert not telemetry.flush(timeout_s=0.1)
    finally:
        release.set()


def test_an_engine_with_an_unreachable_otlp_collector_shuts_down_in_bounded_time(monkeypatch):
    import socket

    import loopserve.core.telemetry as tel

    monkeypatch.setattr(tel, "EXPORT_TIMEOUT_S", 1.0)
    # A collector that accepts connections and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    try:
        engine = _engine("tracing=otlp", f"tracing.endpoint=http://127.0.0.1:{port}/v1/traces",
                         "tracing.sample_ratio=1.0")
        engine.generate(input_ids=[PROMPT], sampling_params=SamplingParams(max_new_tokens=2), timeout=TIMEOUT)
        t0 = time.monotonic()
        engine.telemetry.shutdown(timeout_s=1.0)
        engine.shutdown()
        assert time.monotonic() - t0 < 6
    finally:
        server.close()


@pytest.mark.parametrize("value", ["-1", "0", "nan", "1e9"])
def test_idle_wait_must_be_positive_and_bounded(value):
    with pytest.raises(ValueError, match="scheduler.idle_wait_s"):
        _engine(f"scheduler.idle_wait_s={value}")


# ------------------------------------------------------------------ broken models, oversize settings


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from loopserve.core.model.tiny import ensure_tiny_model

    return Path(ensure_tiny_model())


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BROKEN_MODELS = {
    "truncated-weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          "model.safetensors is not a readable safetensors file"),
    "garbage-weights": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "broken-tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE"'), "tokenizer.json"),
    "tokenizer-config-not-json": (lambda d: (d / "tokenizer_config.json").write_text("{oops"), "tokenizer_config.json"),
    "negative-heads": (lambda d: _edit_config(d, num_attention_heads=-4), "num_attention_heads"),
    "string-vocab": (lambda d: _edit_config(d, vocab_size="258"), "vocab_size"),
    "string-eps": (lambda d: _edit_config(d, rms_norm_eps="tiny"), "rms_norm_eps"),
    "nan-theta": (lambda d: _edit_config(d, rope_theta=float("nan")), "rope_theta"),
    "bool-as-string": (lambda d: _edit_config(d, tie_word_embeddings="false"), "tie_word_embeddings"),
    "eos-string": (lambda d: _edit_config(d, eos_token_id="eos"), "eos_token_id"),
    "odd-head-dim": (lambda d: _edit_config(d, head_dim=7), "head_dim"),
    "shape-mismatch": (lambda d: _edit_config(d, intermediate_size=12345), "check that config.json matches"),
    "absurd-context": (lambda d: _edit_config(d, max_position_embeddings=10**13), "scheduler.max_running_requests"),
    "absurd-width": (lambda d: _edit_config(d, hidden_size=2**22, num_attention_heads=2**10,
                                            num_key_value_heads=2**10, intermediate_size=2**24), "weights"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_a_broken_model_is_a_value_error_naming_the_file_or_key(case, model_copy):
    break_it, says = BROKEN_MODELS[case]
    break_it(model_copy)
    before = _threads()
    with pytest.raises(ValueError, match=re.escape(says)):
        Engine(overrides=[f"model.path={model_copy}", "loop=normal", "kv_cache.num_tokens=256"])
    assert _new_threads(before) == []


@pytest.mark.parametrize("override, says", [
    ("kv_cache.num_tokens=10000000000000", "kv_cache.num_tokens"),
    ("scheduler.max_running_requests=1000000000", "scheduler.max_running_requests"),
])
def test_absurd_sizes_are_value_errors_before_allocating(override, says):
    before = _threads()
    with pytest.raises(ValueError, match=re.escape(says)):
        Engine(overrides=["loop=normal", override])
    assert _new_threads(before) == []


class HugeWorker:
    """A worker that claims a KV pool far beyond host memory (a third-party worker's bug)."""

    num_kv_slots = 10**14
    context_len = 512
    vocab_size = 97
    eos_token_ids = frozenset()
    tokenizer = None

    def forward_batch(self, fb):  # pragma: no cover - never reached
        raise AssertionError("not built")

    def shutdown(self):
        self.shut = True


class HugeWorkerPlugin:
    def __init__(self):
        self.worker = HugeWorker()

    @hookimpl
    def loopserve_add_config(self, config_store):
        config_store.store(group="worker", name="huge", node={"name": "huge", "params": {}})

    @hookimpl
    def loopserve_make_worker(self, name, config):
        return self.worker if name == "huge" else None


def test_the_scheduler_checks_its_bookkeeping_before_allocating():
    plugin = HugeWorkerPlugin()
    with pytest.raises(ValueError, match=r"scheduler bookkeeping.*kv_cache.num_tokens"):
        Engine(overrides=["worker=huge", "loop=normal"], plugins=[("huge", plugin)])
    assert plugin.worker.shut  # the build path released the worker it made


# ------------------------------------------------------------------ the CLI


CLI_CASES = {
    "undecodable-prompt": ([b"prompt=caf\xff"], b"lone surrogate"),
    "nan-temperature": (["prompt=Hi", "sampling.temperature=nan"], b"temperature"),
    "stop-id-outside-vocab": (["prompt=Hi", "sampling.stop_token_ids=[100000]"], b"stop_token_ids[0]=100000"),
    "absurd-kv-cache": (["prompt=Hi", "kv_cache.num_tokens=10000000000000"], b"kv_cache.num_tokens"),
    "negative-idle-wait": (["prompt=Hi", "scheduler.idle_wait_s=-1"], b"scheduler.idle_wait_s"),
    "corrupt-checkpoint": (["prompt=Hi", "model.path={corrupt}"], b"model.safetensors"),
}


@pytest.fixture(scope="module")
def cli_runs(tiny_dir, tmp_path_factory):
    """Every CLI case as a real subprocess of the console script, two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    corrupt = tmp_path_factory.mktemp("cli-corrupt") / "model"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 10)
    exe = str(Path(sys.executable).with_name("loopserve"))

    def run(args):
        args = [a.replace("{corrupt}", str(corrupt)) if isinstance(a, str) else a for a in args]
        return subprocess.run([exe, "generate", *args], capture_output=True, timeout=180,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, args) for name, (args, _) in CLI_CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_cli_exits_2_with_a_message(cli_runs, case):
    proc = cli_runs[case]
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    assert CLI_CASES[case][1] in proc.stderr and b"Traceback" not in proc.stderr
