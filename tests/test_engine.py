"""The ``Engine`` as a user meets it: parity with transformers on random Llama, Qwen2 and
Qwen3 checkpoints, batch invariance, sampling and stop conditions, bad input (``ValueError``,
with the other requests unharmed), KV memory after a random workload, and shutdown.

Worker-level parity (hand-built forward batches) is in test_model_worker.py.
"""

from __future__ import annotations

import random
import shutil
import string
import threading
import time

import pytest

from hf_reference import (
    ARCHS,
    TEXT_PROMPTS,
    find_eos_prompt,
    hf_decode,
    hf_encode,
    hf_greedy,
    random_id_prompts,
)
from loopserve.core import Engine, SamplingParams, hookimpl
from loopserve.core.model.tiny import EOS_ID

N_NEW = 20


def greedy(n: int = N_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def kv_books(engine: Engine) -> tuple[int, int, int]:
    """(free pages, pages held by the prefix cache, total pages)."""
    s = engine.scheduler
    tree = getattr(s, "tree_cache", None)
    cached = tree.total_pages if tree is not None else 0
    return s.allocator.num_free, cached, s.allocator.num_pages


def wait_idle_and_check_kv(engine: Engine) -> None:
    """Once nothing is queued or running, every KV page is free or in the prefix cache."""
    s = engine.scheduler

    def idle_and_balanced() -> bool:
        if s.running or s.waiting_queue:
            return False
        free, cached, total = kv_books(engine)
        return free + cached == total

    wait_until(idle_and_balanced, what="the KV pool to be free again")


@pytest.fixture(scope="module")
def arch_engine(ckpt):
    """Factory: one engine per ARCHS checkpoint, as the user would start it."""
    engines: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in engines:
            engines[name] = Engine(overrides=[f"model.path={ckpt(name)}", "loop=normal"])
        return engines[name]

    yield get
    for e in engines.values():
        e.shutdown()


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny model."""
    with Engine(overrides=["loop=normal"]) as e:
        yield e


# ---- parity with transformers ----------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_batch_of_token_id_prompts_equals_transformers(arch_engine, ckpt, arch):
    prompts = random_id_prompts([1, 6, 13, 24, 41], seed=7)
    outs = arch_engine(arch).generate(input_ids=prompts, sampling_params=greedy())
    for i, (p, out) in enumerate(zip(prompts, outs)):
        ref = hf_greedy(ckpt(arch), p, N_NEW, ignore_eos=True)
        assert out.token_ids == ref, f"{arch} prompt {i} (len {len(p)}): ours {out.token_ids} vs HF {ref}"
        assert out.prompt_token_ids == p
        assert out.finish_reason == "length"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_text_prompts_tokenize_generate_and_decode_like_transformers(arch_engine, ckpt, arch):
    path = ckpt(arch)
    outs = arch_engine(arch).generate(TEXT_PROMPTS, greedy(16))
    for text, out in zip(TEXT_PROMPTS, outs):
        ids = hf_encode(path, text)
        assert out.prompt == text
        assert out.prompt_token_ids == ids
        ref = hf_greedy(path, ids, 16, ignore_eos=True)
        assert out.token_ids == ref, f"{arch} {text!r}"
        assert out.text == hf_decode(path, ref)


# The qwen2 checkpoint's greedy continuations of the candidates never reach </s> in 32
# tokens; llama and qwen3 do.
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_stops_at_eos_like_transformers(arch_engine, ckpt, arch):
    path = ckpt(arch)
    text = find_eos_prompt(path, 32)
    assert text is not None, "no candidate prompt reaches </s>; change the candidates"
    ids = hf_encode(path, text)
    engine = arch_engine(arch)
    out = engine.generate(text, SamplingParams(max_new_tokens=32, temperature=0))[0]
    ref = hf_greedy(path, ids, 32, ignore_eos=False)
    assert ref[-1] == EOS_ID and len(ref) < 32
    assert out.token_ids == ref  # up to and including </s>
    assert out.finish_reason == "stop" and out.matched_stop == EOS_ID
    assert out.text == hf_decode(path, ref)
    # ignore_eos: </s> is an ordinary token and both run the full length.
    full = engine.generate(text, greedy(32))[0]
    ref_full = hf_greedy(path, ids, 32, ignore_eos=True)
    assert full.token_ids == ref_full and EOS_ID in ref_full
    assert full.finish_reason == "length"


# ---- batch invariance --------------------------------------------------------------------


def _mixed_workload(seed: int, n: int):
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append(random_id_prompts([rng.randint(1, 60)], seed=seed * 1000 + i)[0])
        if i % 8 == 3:  # a few seeded sampled requests in the mix; they too must not depend on company
            params.append(SamplingParams(max_new_tokens=rng.randint(1, 40), temperature=0.8, top_p=0.9,
                                         seed=1000 + i, ignore_eos=True))
        else:
            params.append(SamplingParams(max_new_tokens=rng.randint(1, 40), temperature=0.0,
                                         ignore_eos=i % 2 == 0))
    # Two requests share a long prefix (the prefix cache comes into play in the batch).
    prompts[5] = prompts[4][:30] + prompts[5][:10]
    return prompts, params


def test_tokens_are_the_same_alone_and_in_a_batch_of_32(tiny):
    prompts, params = _mixed_workload(seed=11, n=32)
    # Alone: one at a time on an engine without a prefix cache.
    with Engine(overrides=["loop=normal", "radix_cache=false"]) as alone_engine:
        alone = [alone_engine.generate(input_ids=p, sampling_params=sp)[0].token_ids for p, sp in zip(prompts, params)]
    # Together: half submitted at once, the other half while the first half decodes.
    handles = [tiny.submit(input_ids=p, sampling_params=sp) for p, sp in zip(prompts[:16], params[:16])]
    wait_until(lambda: len(handles[0].req.output_ids) >= 1 or handles[0].done(), what="the first tokens")
    handles += [tiny.submit(input_ids=p, sampling_params=sp) for p, sp in zip(prompts[16:], params[16:])]
    together = [h.result(timeout=60) for h in handles]
    for i, (a, out) in enumerate(zip(alone, together)):
        assert out.token_ids == a, f"request {i}: alone {a} vs in the batch {out.token_ids}"
        assert len(a) == params[i].max_new_tokens or a[-1] == EOS_ID


# ---- sampling and stop conditions ------------------------------------------------------------


def test_seeded_sampling_reproduces_across_calls_and_batch_company(tiny):
    sp = SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True)
    prompt = [256, *b"Once upon a time"]
    first = tiny.generate(input_ids=prompt, sampling_params=sp)[0].token_ids
    second = tiny.generate(input_ids=prompt, sampling_params=sp)[0].token_ids
    company = random_id_prompts([3, 30, 9], seed=4)
    others = [SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True),  # unseeded
              greedy(10), SamplingParams(max_new_tokens=5, temperature=0.8, seed=7)]
    batched = tiny.generate(input_ids=[company[0], prompt, company[1], company[2]],
                            sampling_params=[others[0], sp, others[1], others[2]])[1].token_ids
    assert first == second == batched
    assert len(first) == 24
    # It really samples: another seed and greedy decoding give other tokens.
    other_seed = tiny.generate(input_ids=prompt, sampling_params=SamplingParams(
        max_new_tokens=24, temperature=0.8, top_p=0.9, seed=124, ignore_eos=True))[0].token_ids
    greedy_ids = tiny.generate(input_ids=prompt, sampling_params=greedy(24))[0].token_ids
    assert first != other_seed and first != greedy_ids


def test_top_k_one_is_greedy(tiny):
    prompts = random_id_prompts([4, 17, 33], seed=21)
    ref = [o.token_ids for o in tiny.generate(input_ids=prompts, sampling_params=greedy(24))]
    top1 = tiny.generate(input_ids=prompts, sampling_params=SamplingParams(
        max_new_tokens=24, temperature=1.0, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in top1] == ref


def _ascii_stop_string(text: str) -> str | None:
    """A two-character printable-ASCII substring that first occurs after the start."""
    ok = set(string.ascii_letters + string.digits + string.punctuation + " ")
    for i in range(3, len(text) - 1):
        if text[i] in ok and text[i + 1] in ok:
            return text[i : i + 2]
    return None


def test_stop_string_cuts_the_text_and_says_so(tiny):
    tok = tiny.tokenizer
    for prompt in ["Hello there", "Stop here", "abc", "The quick brown fox"]:
        full = tiny.generate(prompt, greedy(48))[0]
        stop = _ascii_stop_string(full.text)
        if stop is not None:
            break
    else:
        pytest.fail("no greedy output with a printable two-character substring; change the prompts")
    # The token that completes the first occurrence is the last one produced.
    k = next(k for k in range(1, len(full.token_ids) + 1)
             if stop in tok.decode(full.token_ids[:k], skip_special_tokens=False))
    out = tiny.generate(prompt, greedy(48, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop
    assert out.token_ids == full.token_ids[:k]
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_max_new_tokens(tiny):
    prompt = "Count to ten"
    full = tiny.generate(prompt, greedy(40))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    j = 5
    stop_id = full.token_ids[j]
    first = full.token_ids.index(stop_id)
    out = tiny.generate(prompt, greedy(40, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop_id
    assert out.token_ids == full.token_ids[: first + 1]  # the stop token is the last output
    short = tiny.generate(prompt, greedy(3))[0]
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:3]
    one = tiny.generate(prompt, greedy(1))[0]
    assert one.finish_reason == "length" and one.token_ids == full.token_ids[:1]


def test_reaching_the_context_length_finishes_with_length():
    with Engine(overrides=["loop=normal", "model.context_length=32"]) as e:
        out = e.generate(input_ids=random_id_prompts([31], seed=2)[0], sampling_params=greedy(10))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 1
        out = e.generate(input_ids=random_id_prompts([25], seed=2)[0], sampling_params=greedy(10))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 7


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), ["max_new_tokens", "at least one token"]),
    (dict(max_new_tokens=-3), ["max_new_tokens", "at least one token"]),
    (dict(temperature=-0.5), ["temperature", ">= 0"]),
])
def test_bad_sampling_params_raise(kwargs, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(e.value)


def _loop_threads() -> int:
    return sum(t.name == "loopserve-loop" for t in threading.enumerate())


@pytest.mark.parametrize("override, words", [
    ("loop=nosuchloop", ["nosuchloop", "loop", "normal"]),
    ("policy=nosuchpolicy", ["nosuchpolicy", "policy", "fcfs"]),
])
def test_unknown_loop_or_policy_raises_naming_the_choices(override, words):
    before = _loop_threads()
    with pytest.raises(ValueError) as e:
        Engine(overrides=[override])
    for w in words:
        assert w in str(e.value)
    assert _loop_threads() == before


@pytest.fixture(scope="module")
def broken_dirs(ckpt, tmp_path_factory):
    """Copies of the llama checkpoint with one required file deleted."""
    root = tmp_path_factory.mktemp("broken-checkpoints")
    dirs = {}
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        d = root / f"no-{name}"
        shutil.copytree(ckpt("llama"), d)
        (d / name).unlink()
        dirs[name] = str(d)
    return dirs


@pytest.mark.parametrize("missing, words", [
    ("model.safetensors", ["model.safetensors", "no weights"]),
    ("config.json", ["config.json", "model.path"]),
    ("tokenizer.json", ["tokenizer.json", "save_pretrained"]),
])
def test_model_dir_with_a_missing_file_raises_naming_it(broken_dirs, missing, words):
    before = _loop_threads()
    with pytest.raises(ValueError) as e:
        Engine(overrides=[f"model.path={broken_dirs[missing]}", "loop=normal"])
    for w in words:
        assert w in str(e.value)
    assert _loop_threads() == before


def test_model_dir_that_does_not_exist_raises(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        Engine(overrides=[f"model.path={tmp_path / 'nope'}"])


class Gate:
    """Pauses the engine loop after a forward once armed, until released."""

    def __init__(self) -> None:
        self.armed = False
        self.paused = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def loopserve_after_forward(self, batch, result):
        if self.armed and not self.release.is_set():
            self.paused.set()
            self.release.wait(30)


def test_bad_calls_raise_while_other_requests_keep_running(tiny):
    long_prompt = [256, *b"A long story:"]
    long_sp = greedy(200)
    ref_long = tiny.generate(input_ids=long_prompt, sampling_params=long_sp)[0].token_ids
    ref_new = tiny.generate("Hello", greedy(8))[0].token_ids

    gate = Gate()
    with Engine(overrides=["loop=normal"], plugins=[("gate", gate)]) as e:
        before = e.get_stats()["finished_requests"]
        gate.armed = True
        handle = e.submit(input_ids=long_prompt, sampling_params=long_sp)
        assert gate.paused.wait(20), "the long request never ran"
        assert not handle.done()
        ctx = e.scheduler.context_len
        bad_calls = [
            (lambda: e.generate(""), ["empty"]),
            (lambda: e.generate(["fine", ""]), ["empty"]),
            (lambda: e.generate(input_ids=[[]]), ["empty"]),
            (lambda: e.generate(input_ids=[[256, 1, 2], [256] * ctx]), ["context length", "shorten"]),
            (lambda: e.generate("x" * (ctx + 10)), ["context length", "shorten"]),
            (lambda: e.generate(input_ids=[[256, 1], [5000]]), ["5000", "vocabulary"]),
            (lambda: e.generate(input_ids=[[256, 1], 7]), ["input_ids[1]", "list of integers"]),
            (lambda: e.generate(input_ids=7), ["list of token ids"]),
            (lambda: e.generate(["a", "b"], [greedy(), greedy(), greedy()]), ["3 sampling_params", "2 prompts"]),
            (lambda: e.generate("a", input_ids=[1, 2]), ["exactly one"]),
            (lambda: e.generate([]), ["at least one prompt"]),
            (lambda: e.generate("a", SamplingParams(max_new_tokens=0)), ["max_new_tokens"]),
            (lambda: e.generate("a", SamplingParams(temperature=-1.0)), ["temperature"]),
            (lambda: e.submit(input_ids=[]), ["empty"]),
        ]
        for i, (call, words) in enumerate(bad_calls):
            with pytest.raises(ValueError) as err:
                call()
            for w in words:
                assert w in str(err.value), f"bad call {i}: {err.value}"
        assert not handle.done()
        gate.release.set()

        out = handle.result(timeout=60)
        assert out.finish_reason == "length" and out.token_ids == ref_long
        assert e.generate("Hello", greedy(8), timeout=60)[0].token_ids == ref_new
        stats = e.get_stats()
        # Nothing of the rejected calls was queued: only the two good requests finished.
        assert stats["finished_requests"] == before + 2 and stats["aborted_requests"] == 0
        wait_idle_and_check_kv(e)
    e.scheduler.self_check_during_idle()  # the loop thread is gone: no race with it


# ---- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_random_requests_with_aborts_leave_the_kv_pool_full(tiny, page_size):
    """200 random requests (shared prefixes, some aborted while queued or running) on a KV
    pool far smaller than their total need; afterwards every page is free or cached, the idle
    check passes, and the unaborted requests' tokens equal a run alone."""
    rng = random.Random(page_size)
    base = random_id_prompts([40], seed=3)[0]
    with Engine(overrides=["loop=normal", f"kv_cache.page_size={page_size}", "kv_cache.num_tokens=384",
                           "scheduler.max_running_requests=24"]) as e:
        handles, params = [], []
        for i in range(200):
            n = rng.randint(1, 50)
            p = base[: rng.randint(1, 40)] + random_id_prompts([n], seed=i)[0][1:] if i % 3 == 0 \
                else random_id_prompts([n], seed=i)[0]
            sp = greedy(rng.randint(1, 24))
            handles.append(e.submit(input_ids=p, sampling_params=sp))
            params.append(sp)
            if rng.random() < 0.2:
                e.abort(handles[rng.randrange(len(handles))].rid)
            if i % 25 == 0:
                time.sleep(0.02)
        outs = [h.result(timeout=120) for h in handles]
        wait_idle_and_check_kv(e)
    e.scheduler.self_check_during_idle()
    aborted = [o for o in outs if o.finish_reason == "abort"]
    done = [(h, o) for h, o in zip(handles, outs) if o.finish_reason != "abort"]
    assert aborted and done
    for h, o in done[::10]:
        alone = tiny.generate(input_ids=list(h.req.input_ids), sampling_params=h.req.sampling_params)[0]
        assert o.token_ids == alone.token_ids


# ---- lifecycle -----------------------------------------------------------------------------------


def test_context_manager_shuts_down_cleanly():
    before = set(threading.enumerate())
    with Engine(overrides=["loop=normal"]) as e:
        thread = e._thread
        assert thread.is_alive() and thread not in before
        assert e.generate("Hi", greedy(4))[0].finish_reason == "length"
    assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    with pytest.raises(RuntimeError, match="shut down"):
        e.generate("Hi", greedy(4))
    with pytest.raises(RuntimeError, match="shut down"):
        e.submit("Hi", greedy(4))
    e.shutdown()  # idempotent


def test_shutdown_aborts_what_is_still_running():
    gate = Gate()
    e = Engine(overrides=["loop=normal"], plugins=[("gate", gate)])
    gate.armed = True
    handle = e.submit(input_ids=[256, 1, 2, 3], sampling_params=greedy(1000))
    assert gate.paused.wait(20)
    gate.release.set()
    e.shutdown()
    assert not e._thread.is_alive()
    out = handle.result(timeout=10)
    assert out.finish_reason == "abort" and "shut down" in out.error
    assert 0 < len(out.token_ids) < 1000


def _compute_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loopserve-compute"]


def test_model_workers_share_one_compute_thread_that_ends_with_the_last(broken_dirs):
    """Every torch computation of the model workers runs on one thread (one OpenMP team on
    the CPU); it stops with the last worker, so a shut-down engine leaves no thread behind."""
    from loopserve.core.model.compute_thread import ComputeThread

    users_before = ComputeThread._users
    seen: list[str] = []
    engines = [Engine(overrides=["loop=normal", "kv_cache.num_tokens=1024"]) for _ in range(2)]
    try:
        shared = engines[0].worker._compute
        assert shared is not None and engines[1].worker._compute is shared
        assert len(_compute_threads()) == 1 and ComputeThread._users == users_before + 2
        for engine in engines:
            inner = engine.worker._forward_batch

            def recording(fb, inner=inner):
                seen.append(threading.current_thread().name)
                return inner(fb)

            engine.worker._forward_batch = recording
            (out,) = engine.generate(input_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0))
            assert len(out.token_ids) == 3
        assert seen and set(seen) == {"loopserve-compute"}
    finally:
        for engine in engines:
            engine.shutdown()
    assert ComputeThread._users == users_before
    if users_before == 0:
        assert not _compute_threads()
    # A worker that fails to load gives the thread back too.
    with pytest.raises(ValueError):
        Engine(overrides=[f"model.path={broken_dirs['model.safetensors']}", "loop=normal"])
    assert ComputeThread._users == users_before
