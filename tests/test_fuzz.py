"""Property-based fuzzing of everything a caller controls: sampling settings, prompts, token
ids, config overrides and model directories.

The contract, for any input: either a ``ValueError`` (whose message names what to change) or
a correct output; and afterwards the engine still serves a witness request with the same
tokens as before, its KV books balance when idle (``self_check_during_idle``) and, once shut
down, no thread it started is left. Budgets are small (a few hundred examples in all, well
under a minute) so the suite runs in CI on every change; ``deadline=None`` because the machine
is shared and an example's time says nothing about correctness. CI runs are derandomized (the
same examples every run); ``LOOPSERVE_FUZZ_SCALE=10`` multiplies the budgets and draws fresh
random examples, for a deeper hunt before a release.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fake_worker import VOCAB, FakeWorkerPlugin, reference_tokens, wait_until
from loopserve.core import Engine, SamplingParams
from loopserve.core.sched.sampling_params import GREEDY_TEMPERATURE, MAX_NEW_TOKENS_LIMIT

TIMEOUT = 60.0
WITNESS = [5, 6, 7, 8]
FIELDS = ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
          "presence_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens"]


SCALE = float(os.environ.get("LOOPSERVE_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


# Values of every kind a JSON body, a careless caller or an attacker might send.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
    st.floats(), st.floats(0, 2), st.floats(-1e-30, 1e-30), st.sampled_from([math.nan, math.inf, -math.inf, 5e-324]),
    st.text(max_size=4), st.decimals(allow_nan=True, places=3), st.fractions(),
    st.lists(st.one_of(st.integers(-2, 300), st.booleans(), st.text(max_size=2), st.floats()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
# Plausible values: mostly in range, at the edges, and just outside them.
plausible = {
    "max_new_tokens": st.integers(-1, 6),
    "temperature": st.one_of(st.floats(0, 3), st.sampled_from([0.0, 1e-38, GREEDY_TEMPERATURE, 1e6, -0.0])),
    "top_k": st.one_of(st.integers(-2, 300), st.floats(-2, 300)),
    "top_p": st.floats(-0.1, 1.1),
    "min_p": st.floats(-0.1, 1.1),
    "repetition_penalty": st.one_of(st.floats(0, 3), st.sampled_from([1e-300, 1e300])),
    "frequency_penalty": st.floats(-2.5, 2.5),
    "presence_penalty": st.floats(-2.5, 2.5),
    "seed": st.one_of(st.none(), st.integers(-(2**65), 2**65)),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
    "stop_token_ids": st.lists(st.integers(-1, 400), max_size=3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
field_values = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), st.one_of(plausible[f], anything)))
sampling_kwargs = st.lists(field_values, max_size=5).map(dict)


def _check_valid(sp: SamplingParams, vocab: int | None = None) -> None:
    """A SamplingParams that passed validation has exact types and in-range values."""
    assert type(sp.max_new_tokens) is int and 1 <= sp.max_new_tokens <= MAX_NEW_TOKENS_LIMIT
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        value = getattr(sp, name)
        assert type(value) is float and math.isfinite(value), name
    assert sp.temperature >= 0 and 0 < sp.top_p <= 1 and 0 <= sp.min_p <= 1 and sp.repetition_penalty > 0
    assert type(sp.top_k) is int and (sp.top_k == -1 or sp.top_k >= 1)
    assert sp.seed is None or type(sp.seed) is int
    assert all(type(s) is str and s and s.encode("utf-8") for s in sp.stop)
    assert all(type(t) is int and t >= 0 and (vocab is None or t < vocab) for t in sp.stop_token_ids)
    assert type(sp.ignore_eos) is bool and type(sp.skip_special_tokens) is bool


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _no_new_threads(before: set[threading.Thread]) -> None:
    wait_until(lambda: not [t for t in _threads() - before if t.is_alive()], timeout=10,
               what=f"threads to end: {[t.name for t in _threads() - before]}")


def _idle_check(engine: Engine) -> None:
    s = engine.scheduler
    wait_until(lambda: not s.running and not s.waiting_queue and not s.inbox.size(), timeout=TIMEOUT,
               what="the engine to become idle")
    s.self_check_during_idle()


# ------------------------------------------------------------------ SamplingParams alone


@fuzz(300)
@given(data=st.dictionaries(st.sampled_from(FIELDS + ["unknown"]), st.one_of(anything, *plausible.values()),
                            max_size=6))
def test_from_dict_gives_a_value_error_or_exact_valid_params(data):
    try:
        sp = SamplingParams.from_dict(data, vocab_size=VOCAB)
    except ValueError as exc:
        assert str(exc)
        return
    _check_valid(sp, VOCAB)
    before = dict(vars(sp))
    assert vars(sp.validate(VOCAB)) == before  # idempotent


# ------------------------------------------------------------------ the engine, fake worker


@pytest.fixture(scope="module")
def fake():
    before = _threads()
    engine = Engine(overrides=["worker=fake", "loop=overlap", "kv_cache.num_tokens=512", "kv_cache.page_size=4"],
                    plugins=[("fake_worker", FakeWorkerPlugin())])
    yield engine
    _idle_check(engine)
    engine.shutdown()
    _no_new_threads(before)


token_ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3), anything)
input_ids = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
    st.lists(token_ids, max_size=6),
    st.lists(st.lists(token_ids, max_size=5), max_size=3),
    st.lists(st.integers(0, VOCAB - 1), min_size=500, max_size=600),  # beyond the KV cache
    anything,
)


@fuzz(120)
@given(kwargs=sampling_kwargs, ids=input_ids, priority=st.one_of(st.integers(-5, 5), anything),
       traceparent=st.one_of(st.none(), st.text(max_size=60), anything))
def test_engine_gives_a_value_error_or_a_correct_output(fake, kwargs, ids, priority, traceparent):
    witness = reference_tokens(WITNESS, 4)
    try:
        sp = SamplingParams(**kwargs)
        outs = fake.generate(input_ids=ids, sampling_params=sp, priority=priority, traceparent=traceparent,
                             timeout=TIMEOUT)
    except ValueError as exc:
        assert str(exc)
    else:
        prompts = ids if isinstance(ids[0], list) else [ids]
        assert len(outs) == len(prompts)
        for out, prompt in zip(outs, prompts):
            assert out.finish_reason in ("stop", "length"), out.error
            assert 1 <= len(out.token_ids) <= sp.max_new_tokens
            assert all(0 <= t < VOCAB for t in out.token_ids)
            if sp.is_greedy and not sp.needs_penalties:
                expected = reference_tokens(list(prompt), len(out.token_ids))
                assert out.token_ids == expected
                if out.finish_reason == "length":
                    assert len(out.token_ids) == sp.max_new_tokens
                else:
                    assert out.token_ids[-1] in sp.stop_token_ids
    (w,) = fake.generate(input_ids=[WITNESS], sampling_params=SamplingParams(max_new_tokens=4, temperature=0),
                         timeout=TIMEOUT)
    assert w.token_ids == witness
    _idle_check(fake)


# ------------------------------------------------------------------ the engine, real (tiny) model


@pytest.fixture(scope="module")
def tiny():
    before = _threads()
    engine = Engine(overrides=["loop=normal", "kv_cache.num_tokens=512"])
    witness = engine.generate("Hello", SamplingParams(max_new_tokens=4, temperature=0))[0].token_ids
    yield engine, witness
    _idle_check(engine)
    engine.shutdown()
    _no_new_threads(before)


# Any code point, lone surrogates included (what undecodable bytes become in Python).
any_text = st.lists(st.integers(0, 0x10FFFF).map(chr), max_size=12).map("".join)


@fuzz(40)
@given(prompt=st.one_of(any_text, st.text(max_size=12), anything), kwargs=sampling_kwargs)
def test_model_gives_a_value_error_or_tokens_in_the_vocabulary(tiny, prompt, kwargs):
    engine, witness = tiny
    kwargs = {**kwargs, "max_new_tokens": kwargs.get("max_new_tokens", 3)}
    if type(kwargs["max_new_tokens"]) is int:
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], 3)
    try:
        out = engine.generate(prompt, SamplingParams(**kwargs), timeout=TIMEOUT)[0]
    except ValueError as exc:
        assert str(exc)
    else:
        assert out.finish_reason in ("stop", "length"), out.error
        assert all(0 <= t < engine.worker.vocab_size for t in out.token_ids)
        assert isinstance(out.text, str)
    assert engine.generate("Hello", SamplingParams(max_new_tokens=4, temperature=0))[0].token_ids == witness
    _idle_check(engine)


# ------------------------------------------------------------------ config overrides


scalar = st.one_of(st.integers(-3, 3000), st.floats(allow_nan=True), st.sampled_from(["nan", "inf", "-1", "0", "null",
                                                                                       "true", "x", "1e3", "[]"]))
config_overrides = st.lists(st.one_of(
    st.tuples(st.sampled_from(["scheduler.max_running_requests", "scheduler.max_prefill_tokens",
                               "scheduler.chunked_prefill_size", "kv_cache.page_size", "kv_cache.num_tokens",
                               "scheduler.idle_wait_s", "scheduler.min_new_token_ratio", "tracing.sample_ratio"]),
              scalar),
    st.tuples(st.sampled_from(["loop", "policy"]), st.sampled_from(["normal", "overlap", "auto", "fcfs", "lpm",
                                                                   "priority", "nope"])),
    st.tuples(st.sampled_from(["scheduler.enable_mixed_chunk", "radix_cache"]), st.sampled_from(["true", "false", "2"])),
), max_size=4)


@fuzz(30)
@given(overrides=config_overrides)
def test_config_overrides_give_a_value_error_or_a_working_engine(overrides):
    before = _threads()
    args = [f"{k}={v}" for k, v in overrides]
    try:
        engine = Engine(overrides=["worker=fake", *args], plugins=[("fake_worker", FakeWorkerPlugin())])
    except ValueError as exc:
        assert str(exc)
    else:
        try:
            try:
                (out,) = engine.generate(input_ids=[WITNESS], sampling_params=SamplingParams(max_new_tokens=4,
                                                                                           temperature=0),
                                         timeout=TIMEOUT)
            except ValueError as exc:
                assert "kv_cache.num_tokens" in str(exc)  # a cache too small for the witness
            else:
                assert out.token_ids == reference_tokens(WITNESS, 4), out.error
            _idle_check(engine)
        finally:
            engine.shutdown()
    _no_new_threads(before)


# ------------------------------------------------------------------ model directories


@pytest.fixture(scope="module")
def tiny_dir():
    from loopserve.core.model.tiny import ensure_tiny_model

    return Path(ensure_tiny_model())


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "eos_token_id", "bos_token_id", "rope_scaling", "architectures",
               "attention_bias", "torch_dtype", "hidden_act"]
model_damage = st.one_of(
    st.tuples(st.just("config"), st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), anything), min_size=1,
                                          max_size=3)),
    st.tuples(st.just("truncate"), st.tuples(st.sampled_from(["model.safetensors", "tokenizer.json", "config.json",
                                                              "tokenizer_config.json"]), st.floats(0, 0.999))),
    st.tuples(st.just("garble"), st.tuples(st.sampled_from(["model.safetensors", "tokenizer.json"]),
                                           st.integers(0, 20_000), st.binary(min_size=1, max_size=8))),
)


@fuzz(25)
@given(damage=model_damage)
def test_a_damaged_model_dir_gives_a_value_error_or_a_working_engine(tiny_dir, tmp_path_factory, damage):
    d = tmp_path_factory.mktemp("fuzz-model")
    shutil.rmtree(d)
    shutil.copytree(tiny_dir, d)
    kind, what = damage
    if kind == "config":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update({k: (float(v) if isinstance(v, Decimal) else v) for k, v in what})
        try:
            text = json.dumps(cfg, default=str)
        except ValueError:
            assume(False)
        (d / "config.json").write_text(text)
    elif kind == "truncate":
        name, share = what
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * share)])
    else:
        name, offset, blob = what
        data = bytearray((d / name).read_bytes())
        offset %= len(data)
        data[offset:offset + len(blob)] = blob
        (d / name).write_bytes(bytes(data))
    before = _threads()
    try:
        engine = Engine(overrides=[f"model.path={d}", "loop=normal", "kv_cache.num_tokens=256",
                                   "scheduler.max_running_requests=4"])
    except ValueError as exc:
        assert str(exc)
    else:
        try:
            out = engine.generate(input_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_new_tokens=2, temperature=0),
                                  timeout=TIMEOUT)[0]
            assert out.finish_reason in ("stop", "length") and all(0 <= t < engine.worker.vocab_size
                                                                   for t in out.token_ids)
            _idle_check(engine)
        except ValueError as exc:  # e.g. a vocabulary so small that the witness ids fall outside it
            assert "vocabulary" in str(exc)
        finally:
            engine.shutdown()
    shutil.rmtree(d, ignore_errors=True)
    _no_new_threads(before)
