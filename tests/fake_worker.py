"""A deterministic stand-in worker for scheduler tests, registered like a third-party plugin.

It keeps a "KV cache" that stores the token id written to each slot, and derives the next token
from tokens it reads back through its request-to-token table. If the scheduler hands out a
wrong or shared slot, outputs change, so equal outputs across runs check the bookkeeping.
"""

from __future__ import annotations

import threading

from loopserve.core import ForwardResult, hookimpl

VOCAB = 97
EOS = 1


class FakeWorker:
    def __init__(self, num_kv_slots: int = 4096, context_len: int = 512, max_running: int = 256,
                 eos: bool = False, delay_s: float = 0.0) -> None:
        self.num_kv_slots = num_kv_slots
        self.context_len = context_len
        self.vocab_size = VOCAB
        self.eos_token_ids = {EOS} if eos else set()
        self.tokenizer = None
        self.delay_s = delay_s
        self.kv = [-1] * num_kv_slots
        self.table = [[-1] * context_len for _ in range(max_running)]
        self.batches: list = []
        self.threads: set[str] = set()
        self.grad_enabled: list[bool] = []
        self.inference_mode: list[bool] = []
        self.shut = False

    def forward_batch(self, fb):
        import torch

        self.threads.add(threading.current_thread().name)
        self.grad_enabled.append(torch.is_grad_enabled())
        self.inference_mode.append(torch.is_inference_mode_enabled())
        self.batches.append(fb)
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        for i, slots in fb.prefix_slots:
            self.table[fb.req_pool_indices[i]][: len(slots)] = slots
        out = []
        k = 0
        for row, start, n in zip(fb.req_pool_indices, fb.prefix_lens, fb.extend_lens):
            table = self.table[row]
            for pos in range(start, start + n):
                slot = fb.out_cache_loc[k]
                table[pos] = slot
                self.kv[slot] = fb.input_ids[k]
                k += 1
            end = start + n
            t = [self.kv[table[p]] for p in (end - 1, end // 2, 0)]
            out.append((t[0] * 31 + t[1] * 17 + t[2] * 7 + end) % VOCAB)
        return ForwardResult(next_token_ids=out)

    def shutdown(self):
        self.shut = True


class FakeWorkerPlugin:
    """Provides ``worker=fake``; ``worker.params`` go to FakeWorker."""

    def __init__(self) -> None:
        self.last: FakeWorker | None = None

    @hookimpl
    def loopserve_add_config(self, config_store):
        config_store.store(group="worker", name="fake", node={"name": "fake", "params": {}})

    @hookimpl
    def loopserve_make_worker(self, name, config):
        if name != "fake":
            return None
        params = dict(config.worker.params)
        params.setdefault("num_kv_slots", config.kv_cache.num_tokens or 4096)
        params.setdefault("max_running", config.scheduler.max_running_requests)
        self.last = FakeWorker(**params)
        return self.last


def reference_tokens(prompt: list[int], n: int) -> list[int]:
    """What FakeWorker produces for ``prompt`` alone, computed without any KV cache."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        end = len(seq)
        tok = (seq[end - 1] * 31 + seq[end // 2] * 17 + seq[0] * 7 + end) % VOCAB
        seq.append(tok)
        out.append(tok)
    return out


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.002, what: str = "condition") -> None:
    """Bounded poll: return as soon as ``predicate()`` holds, fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Stepped:
    """A scheduler and its loop built exactly as ``Engine`` builds them, but with no thread:
    tests drive it with ``loop.step()`` and see every intermediate state."""

    def __init__(self, *overrides: str, plugins=()) -> None:
        from loopserve.core.loop.build import build

        self.fake = FakeWorkerPlugin()
        self.built = build(["worker=fake", *overrides], plugins=[("fake_worker", self.fake), *plugins])
        self.pm, self.config, self.worker = self.built.pm, self.built.config, self.built.worker
        self.scheduler, self.loop = self.built.scheduler, self.built.loop
        self._ids = 0

    def submit(self, *prompts: list[int], sampling_params=None, **sp_kwargs):
        """Queue one request per prompt (in one inbox message); return the ``Req`` objects."""
        from loopserve.core import Req, SamplingParams

        reqs = []
        for prompt in prompts:
            sp = sampling_params if sampling_params is not None else SamplingParams(temperature=0.0, **sp_kwargs)
            reqs.append(Req(rid=f"r{self._ids}", input_ids=list(prompt), sampling_params=sp))
            self._ids += 1
        self.scheduler.submit(*reqs)
        return reqs

    def step(self) -> bool:
        return self.loop.step()

    def run_until_done(self, reqs, max_steps: int = 100_000) -> int:
        """Step until every request in ``reqs`` finished; return the number of steps."""
        for n in range(1, max_steps + 1):
            self.step()
            if all(r.finished for r in reqs):
                return n
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def settle(self, max_steps: int = 10_000) -> None:
        """Step until an iteration finds nothing to do (finished requests are released then)."""
        for _ in range(max_steps):
            if not self.step() and not self.scheduler.has_work:
                return
        raise AssertionError(f"the scheduler still has work after {max_steps} steps")

    def assert_all_free(self) -> None:
        """Idle and nothing leaked: the idle check passes and every page and row is free."""
        s = self.scheduler
        assert not s.running and not s.waiting_queue
        s.self_check_during_idle()
        # Pages are free or held by the prefix cache (unlocked, evictable); none by requests.
        assert s.allocator.num_free + s.kv.cached_pages == s.allocator.num_pages
        assert s.tree_cache is None or s.tree_cache.protected_pages == 0
        assert s.req_pool.num_free == s.req_pool.size
