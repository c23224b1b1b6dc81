"""``loopserve bench bench.mode=scheduler_overhead``: the scheduler's own time per loop
iteration, the worker's forward excluded, at several numbers of running decode requests.

For each size ``n`` in ``bench.overhead_batch_sizes`` a scheduler and loop are built exactly as
``Engine`` builds them (with ``scheduler.max_running_requests`` raised to ``n`` if needed), ``n``
requests are admitted and prefilled, and then ``bench.overhead_steps`` decode iterations are
stepped and timed in this thread. The headline, ``overhead_ms``, is the loop thread's CPU
time per iteration minus the CPU time spent inside ``worker.forward_batch``: sleeps and waits
cost no CPU time, so it is also robust to other load on the machine. ``overhead_wall_ms`` is
wall time minus the forward's wall time (meaningful for the normal loop, which runs the
forward inline). Meant for ``worker=sim``, which makes 1024 running requests cheap.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from typing import Any

from omegaconf import DictConfig

WARMUP_STEPS = 10


class TimedWorker:
    """Wraps a worker and adds up the wall and CPU time its forward passes take in the
    calling thread."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.thread_ident: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._worker, name)

    def forward_batch(self, fb: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._worker.forward_batch(fb)
        finally:
            if threading.get_ident() == self.thread_ident:
                self.cpu_s += time.thread_time() - c0
                self.wall_s += time.perf_counter() - w0

    def shutdown(self) -> None:
        self._worker.shutdown()


def _build(cfg: DictConfig) -> tuple[Any, Any, TimedWorker, Any]:
    """Scheduler, loop, timed worker and plugin manager, from the one build path."""
    from loopserve.core.loop.build import build

    built = build(config=cfg, wrap_worker=TimedWorker)
    return built.scheduler, built.loop, built.worker, built


def measure(cfg: DictConfig, n: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` decode iterations with ``n`` running requests."""
    from loopserve.core.bench.throughput import make_workload, percentile
    from loopserve.core.sched.req import Req
    from loopserve.core.sched.sampling_params import SamplingParams

    cfg = copy.deepcopy(cfg)
    b = cfg.bench
    cfg.scheduler.max_running_requests = max(n, int(cfg.scheduler.max_running_requests))
    scheduler, loop, timed, built = _build(cfg)
    try:
        workload = make_workload(int(timed.vocab_size), n, (b.input_len_min, b.input_len_max), (1, 1),
                                 seed=b.seed)
        sp = SamplingParams(max_new_tokens=WARMUP_STEPS + steps + 8, temperature=0.0, ignore_eos=True)
        reqs = [Req(rid=f"overhead-{i}", input_ids=ids, sampling_params=sp) for i, ids in enumerate(workload.input_ids)]
        scheduler.submit(*reqs)
        for _ in range(100_000):  # admit and prefill everything
            loop.step()
            if len(scheduler.running) == n and not scheduler.waiting_queue:
                break
        else:
            raise RuntimeError(f"could not get {n} requests running; raise kv_cache.num_tokens")
        if len(scheduler.running) < n:
            raise ValueError(f"only {len(scheduler.running)} of {n} requests fit in the KV cache; "
                             "raise kv_cache.num_tokens or worker.params.num_kv_slots")
        timed.thread_ident = threading.get_ident()
        for _ in range(WARMUP_STEPS):
            loop.step()
        cpu, wall = [], []
        retractions = scheduler.stats.num_retractions
        for _ in range(steps):
            fw_cpu, fw_wall = timed.cpu_s, timed.wall_s
            c0, w0 = time.thread_time(), time.perf_counter()
            loop.step()
            c1, w1 = time.thread_time(), time.perf_counter()
            cpu.append((c1 - c0) - (timed.cpu_s - fw_cpu))
            wall.append((w1 - w0) - (timed.wall_s - fw_wall))
        if len(scheduler.running) != n or scheduler.stats.num_retractions != retractions:
            print(f"bench: warning: the running set changed during the {n}-request measurement",
                  file=sys.stderr)
        return {
            "running": n,
            "steps": steps,
            "mean_ms": round(1e3 * sum(cpu) / len(cpu), 4),
            "p50_ms": round(1e3 * percentile(cpu, 0.5), 4),
            "p90_ms": round(1e3 * percentile(cpu, 0.9), 4),
            "wall_mean_ms": round(1e3 * sum(wall) / len(wall), 4),
            "wall_p50_ms": round(1e3 * percentile(wall, 0.5), 4),
        }
    finally:
        loop.stop()
        built.close()


def run_overhead(cfg: DictConfig) -> dict[str, Any]:
    from tqdm import tqdm

    b = cfg.bench
    sizes = [int(n) for n in b.overhead_batch_sizes]
    detail = {}
    for n in tqdm(sizes, desc="scheduler overhead", unit="size", file=sys.stderr, disable=not b.progress,
                  leave=False):
        detail[str(n)] = measure(cfg, n, int(b.overhead_steps))
    from loopserve.core.loop import resolve_loop_class
    from loopserve.core.plugin_manager import make_plugin_manager

    loop_name = resolve_loop_class(cfg, make_plugin_manager(disable=list(cfg.plugins.disable))).name
    model = str(cfg.model.path or "tiny")
    if str(cfg.worker.name) == "sim":
        params = cfg.worker.get("params") or {}
        model = f"{params.get('model', 'llama3-8b')}@{params.get('device', 'h100')}"
    return {
        "bench": "scheduler_overhead",
        "loop": loop_name,
        "policy": str(cfg.policy.name),
        "worker": str(cfg.worker.name),
        "model": model,
        "overhead_ms": {k: v["mean_ms"] for k, v in detail.items()},
        "overhead_wall_ms": {k: v["wall_mean_ms"] for k, v in detail.items()},
        "overhead_p50_ms": {k: v["p50_ms"] for k, v in detail.items()},
        "overhead_detail": detail,
        "target": "<= 1 ms per iteration at 256 running requests",
    }
