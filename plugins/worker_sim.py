"""``worker=sim``: a worker with no weights that predicts each forward's time from the roofline
cost model (``core/cost_model.py``) of a named model shape on a named device, sleeps that long
with the GIL released, and returns deterministic tokens.

It lets the real scheduler and loops run thousands of concurrent requests on a CPU, at the
speed a GPU would give them, so scheduler overhead and loop comparisons mean something
without a GPU. Tokens are read back through a KV "cache" that stores the token id written to
each slot (like ``tests/fake_worker.py``): a wrong or shared slot from the scheduler changes
the outputs. All per-request work is vectorized with numpy (no torch, no per-token loop).

``loopserve bench worker=sim worker.params.model=llama3-8b worker.params.device=h100``
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from loopserve.core import ForwardMode, ForwardResult, hookimpl
from loopserve.core.bench.cost_model import ForwardCost, forward_cost, get_device, get_shape

# Default KV pool: the device memory left after the weights, at most this many slots.
STATIC_MEM_FRACTION = 0.9
MAX_DEFAULT_KV_SLOTS = 1 << 22

PARAMS = ("model", "device", "dtype_bytes", "num_devices", "context_len", "num_kv_slots",
          "launch_overhead_s", "sleep", "link_bandwidth", "async_device")
# Bytes/s between pipeline stages (loop=pp): hidden states take size / this to arrive.
# Default: 50 GB/s, an NVLink-class link between GPUs of one host (InfiniBand is ~25-50 GB/s).
DEFAULT_LINK_BANDWIDTH = 50e9


def sim_token(last: Any, mid: Any, first: Any, seq_len: Any, vocab: int) -> Any:
    """The token that follows a sequence of length ``seq_len`` whose last, middle
    (position ``seq_len // 2``) and first tokens are given (ints or numpy arrays)."""
    return (last * 31 + mid * 17 + first * 7 + seq_len) % vocab


def reference_tokens(prompt: list[int], n: int, vocab: int) -> list[int]:
    """What the sim worker produces for ``prompt`` alone, computed without any KV cache."""
    seq = list(prompt)
    for _ in range(n):
        end = len(seq)
        seq.append(sim_token(seq[end - 1], seq[end // 2], seq[0], end, vocab))
    return seq[len(prompt):]


class SimWorker:
    """Implements the ``Worker`` protocol with a cost model instead of a model.

    ``tokenizer`` is None (requests come as token ids) and there is no EOS token, so requests
    stop on ``max_new_tokens``, stop token ids or the context length only.
    """

    tokenizer = None

    def __init__(
        self,
        model: str = "llama3-8b",
        device: str = "h100",
        *,
        dtype_bytes: int = 2,
        num_devices: int = 1,
        context_len: int | None = None,
        num_kv_slots: int | None = None,
        launch_overhead_s: float | None = None,
        sleep: bool = True,
        page_size: int = 1,
        max_running_requests: int = 256,
    ) -> None:
        self.shape = get_shape(str(model))
        self.device = get_device(str(device))
        if dtype_bytes not in (1, 2, 4):
            raise ValueError(f"worker.params.dtype_bytes must be 1, 2 or 4; got {dtype_bytes}")
        if num_devices < 1:
            raise ValueError(f"worker.params.num_devices must be >= 1; got {num_devices}")
        self.dtype_bytes = int(dtype_bytes)
        self.num_devices = int(num_devices)
        self.launch_overhead_s = launch_overhead_s
        self.sleep = bool(sleep)
        self.vocab_size = self.shape.vocab_size
        self.eos_token_ids: frozenset[int] = frozenset()
        self.context_len = int(context_len or self.shape.context_len)
        if self.context_len < 2:
            raise ValueError(f"worker.params.context_len must be >= 2; got {self.context_len}")
        slots = int(num_kv_slots) if num_kv_slots else self._default_kv_slots(max_running_requests)
        self.num_kv_slots = slots - slots % page_size
        self.page_size = page_size
        if self.num_kv_slots < page_size:
            raise ValueError(f"the sim KV pool would hold {slots} tokens, less than one page of {page_size}; "
                             "raise worker.params.num_kv_slots or kv_cache.num_tokens")
        # Token id stored in each KV slot, and each request row's position -> slot table.
        # np.zeros maps untouched pages lazily, so large defaults cost nothing up front.
        self.kv = np.zeros(self.num_kv_slots, dtype=np.int64)
        self.table = np.zeros((max_running_requests, self.context_len), dtype=np.int64)
        self.num_forwards = 0
        self.predicted_time_s = 0.0  # sum of the cost model's times
        self.last_cost: ForwardCost | None = None

    def _default_kv_slots(self, max_running: int) -> int:
        free = STATIC_MEM_FRACTION * self.device.memory_bytes * self.num_devices
        free -= self.shape.num_params * self.dtype_bytes
        slots = int(free // self.shape.kv_bytes_per_token(self.dtype_bytes))
        if slots <= 0:
            raise ValueError(
                f"{self.shape.name} does not fit in {self.device.name} memory; raise "
                "worker.params.num_devices or set worker.params.num_kv_slots")
        return min(slots, max_running * self.context_len, MAX_DEFAULT_KV_SLOTS)

    def cost(self, prefix_lens: list[int], extend_lens: list[int], num_sampled: int | None = None) -> ForwardCost:
        """The cost model's prediction for one forward of this worker's shape and device."""
        return forward_cost(self.shape, self.device, prefix_lens, extend_lens, num_sampled,
                            dtype_bytes=self.dtype_bytes, num_devices=self.num_devices,
                            launch_overhead_s=self.launch_overhead_s)

    def forward_batch(self, fb: Any) -> ForwardResult:
        start = time.perf_counter()
        n = fb.batch_size
        if n == 0 or fb.forward_mode is ForwardMode.IDLE:
            return ForwardResult(next_token_ids=[0] * n)
        num_sampled = sum(fb.need_sample) if fb.need_sample else n
        cost = self.cost(fb.prefix_lens, fb.extend_lens, num_sampled)
        tokens = self._tokens(fb)
        self.num_forwards += 1
        self.predicted_time_s += cost.time_s
        self.last_cost = cost
        if self.sleep:
            # The bookkeeping above runs "on the device": it counts against the predicted time.
            remaining = start + cost.time_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        return ForwardResult(next_token_ids=tokens, forward_time_s=time.perf_counter() - start)

    def _tokens(self, fb: Any) -> list[int]:
        rows = np.asarray(fb.req_pool_indices, dtype=np.int64)
        prefix = np.asarray(fb.prefix_lens, dtype=np.int64)
        ext = np.asarray(fb.extend_lens, dtype=np.int64)
        table, kv = self.table, self.kv
        for i, slots in fb.prefix_slots:
            table[rows[i], : len(slots)] = slots
        loc = np.asarray(fb.out_cache_loc, dtype=np.int64)
        kv[loc] = fb.input_ids
        if len(loc) == len(rows):  # one new token per request (decode)
            table[rows, prefix] = loc
        else:
            starts = np.cumsum(ext) - ext
            tok_pos = np.repeat(prefix - starts, ext) + np.arange(len(loc))
            table[np.repeat(rows, ext), tok_pos] = loc
        end = prefix + ext
        last = kv[table[rows, end - 1]]
        mid = kv[table[rows, end // 2]]
        first = kv[table[rows, 0]]
        return sim_token(last, mid, first, end, self.vocab_size).tolist()

    def kv_buffers(self) -> Any:
        """The KV "cache" for a KV-transfer backend: the token id stored in each slot (8 bytes
        per slot), so a decode server continues exactly where the prefill server stopped.
        A real model's KV bytes are not modelled here."""
        from loopserve.core.disagg.base import KVArgs

        return KVArgs(buffers=[self.kv.view(np.uint8).reshape(self.num_kv_slots, 8)],
                      page_size=self.page_size, num_slots=self.num_kv_slots)

    def shutdown(self) -> None:
        self.kv = np.zeros(0, dtype=np.int64)
        self.table = np.zeros((0, 0), dtype=np.int64)


def make_sim_worker(config: Any) -> SimWorker:
    kwargs = sim_worker_kwargs(config)
    kwargs.pop("link_bandwidth", None)  # one device: no link
    kwargs.pop("async_device", None)  # pipeline stages only (the overlap loop overlaps itself)
    return SimWorker(**kwargs)


def sim_worker_kwargs(config: Any) -> dict[str, Any]:
    """``SimWorker`` arguments from config (plain values: pipeline stages get them too)."""
    params = dict(config.worker.get("params") or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown sim worker parameter {unknown[0]!r}; worker.params takes "
                         f"{', '.join(PARAMS)}")
    if params.get("num_kv_slots") is None and config.kv_cache.num_tokens is not None:
        params["num_kv_slots"] = int(config.kv_cache.num_tokens)
    if params.get("context_len") is None and config.model.context_length is not None:
        params["context_len"] = int(config.model.context_length)
    return dict(
        page_size=int(config.kv_cache.page_size),
        max_running_requests=int(config.scheduler.max_running_requests),
        **{k: v for k, v in params.items() if v is not None},
    )


@hookimpl
def loopserve_make_worker(name, config):
    if name != "sim":
        return None
    return make_sim_worker(config)
