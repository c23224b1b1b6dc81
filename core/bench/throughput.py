"""``loopserve bench``: the offline throughput benchmark.

A fixed-seed random workload (``bench.*``: request count, input and output length ranges, an
optional shared prefix; token ids, greedy, ignore_eos) runs through ``Engine`` with whatever
loop, policy and worker the overrides pick. A timing plugin, registered for the bench run only,
wraps every loop iteration and stage (``loopserve_run_iteration`` / ``loopserve_run_stage``),
so the summary splits the mean step time by stage. With ``bench.peer`` the same workload then
runs through transformers on the same weights (``core/bench_peers.py``). The summary is one
JSON line on stdout, the same JSON in a results file, and with ``bench.plot=true`` a PNG.
``-m`` sweeps overrides (``core/bench_sweep.py``); ``bench.mode=scheduler_overhead`` times the
scheduler alone (``core/bench_overhead.py``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig

from loopserve.core.hookspecs import hookimpl

STAGES = ("recv_requests", "process_input_requests", "get_next_batch_to_run", "run_batch",
          "process_batch_result", "self_check_during_idle")


@dataclass
class Workload:
    """Prompts as token ids and the number of tokens each request must generate."""

    input_ids: list[list[int]]
    output_lens: list[int]

    @property
    def total_input_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def total_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(vocab_size: int, num_requests: int, input_len: tuple[int, int],
                  output_len: tuple[int, int], shared_prefix_len: int = 0, seed: int = 0) -> Workload:
    """``shared_prefix_len`` common tokens then a random suffix of ``input_len`` (inclusive
    range) tokens per prompt; ``output_len`` tokens to generate per request. Same arguments,
    same workload on every machine (Python's ``random`` with a fixed seed)."""
    rng = random.Random(seed)
    vocab = range(vocab_size)
    prefix = rng.choices(vocab, k=shared_prefix_len)
    inputs, outputs = [], []
    for _ in range(num_requests):
        inputs.append(prefix + rng.choices(vocab, k=rng.randint(*input_len)))
        outputs.append(rng.randint(*output_len))
    return Workload(inputs, outputs)


def bench_workload(b: Any, vocab_size: int) -> Workload:
    """The workload ``bench.*`` describes."""
    return make_workload(vocab_size, b.num_requests, (b.input_len_min, b.input_len_max),
                         (b.output_len_min, b.output_len_max), b.shared_prefix_len, b.seed)


class BenchTimer:
    """Times loop iterations and stages (a plugin registered for the bench run only).

    Stage times are gathered per iteration and kept only for iterations that did work, so
    idle polling while requests trickle in does not dilute the means. Counting is off until
    ``enabled`` is set (after the warmup). The wrappers cost a few microseconds per stage.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.iterations = 0
        self.iteration_s = 0.0
        self.stage_s: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._local = threading.local()

    @hookimpl(wrapper=True)
    def loopserve_run_iteration(self, loop: Any, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        self._local.stages = stages = {}
        try:
            did_work = yield
        finally:
            self._local.stages = None
        if did_work and self.enabled:
            dt = time.perf_counter() - t0
            with self._lock:
                self.iterations += 1
                self.iteration_s += dt
                for name, s in stages.items():
                    self.stage_s[name] += s
        return did_work

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, loop: Any, stage: str, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            dt = time.perf_counter() - t0
            stages = getattr(self._local, "stages", None)
            if stages is not None:
                stages[stage] = stages.get(stage, 0.0) + dt
            elif self.enabled:  # a stage run outside an iteration (another thread)
                with self._lock:
                    self.stage_s[stage] += dt

    def step_time_ms(self, forward_s: float) -> dict[str, float]:
        """Mean milliseconds per busy iteration: each stage, the worker's forward (inside
        ``run_batch`` for the normal loop), and the whole iteration."""
        n = max(self.iterations, 1)
        out = {name: 1e3 * self.stage_s[name] / n for name in STAGES if name in self.stage_s}
        out.update({name: 1e3 * s / n for name, s in self.stage_s.items() if name not in STAGES})
        out["forward"] = 1e3 * forward_s / n
        out["total"] = 1e3 * self.iteration_s / n
        return {k: round(v, 4) for k, v in out.items()}


class _Progress:
    """A tqdm bar on stderr fed by polling the scheduler's counters (no per-token hook), and
    a (time, generated tokens) trace for the plot."""

    def __init__(self, total: int, read: Callable[[], tuple[int, int]], enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.read = read
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, leave=False)
        self.trace: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-progress", daemon=True)
        self._base = read()
        self._t0 = time.perf_counter()
        self._thread.start()

    def _poll(self, final: tuple[int, int] | None = None, at: float | None = None) -> None:
        done, tokens = self.read() if final is None else (self._base[0] + final[0], self._base[1] + final[1])
        self.bar.update(done - self._base[0] - self.bar.n)
        self.trace.append((time.perf_counter() - self._t0 if at is None else at, tokens - self._base[1]))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._poll()

    def close(self, final: tuple[int, int] | None = None, at: float | None = None) -> None:
        """Stop polling; the last trace point is ``final`` (requests done, tokens generated)
        at ``at`` seconds when given: the run's own totals at its measured end, rather than a
        poll that lands a little after it."""
        self._stop.set()
        self._thread.join()
        self._poll(final, at)
        self.bar.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def _model_label(cfg: DictConfig, worker: Any) -> str:
    if str(cfg.worker.name) == "sim":
        return f"{worker.shape.name}@{worker.device.name}"
    if cfg.bench.model_shape:
        return str(cfg.bench.model_shape)
    return str(cfg.model.path or "tiny")


def use_model_shape(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """``bench.model_shape``: write (once) the shape's checkpoint and point ``model.path`` at
    it; returns the overrides with that ``model.path`` (a server started by bench.mode=http
    gets them)."""
    from loopserve.core.bench.shapes import ensure_shape_checkpoint

    name = str(cfg.bench.model_shape)
    if str(cfg.worker.name) != "model":
        raise ValueError(f"bench.model_shape={name} writes a checkpoint for the model worker; with "
                         f"worker={cfg.worker.name} use worker.params.model instead")
    if cfg.model.path:
        raise ValueError(f"bench.model_shape={name} and model.path={cfg.model.path} both name the model; "
                         "set only one")
    path = ensure_shape_checkpoint(name)
    cfg.model.path = path
    return [*overrides, f"model.path={path}"]


def run_engine(cfg: DictConfig, workload_fn: Callable[[int], Workload]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the workload through an ``Engine`` built from ``cfg``; returns the summary fields
    and what a peer needs (the workload, the worker's weights path and dtype)."""
    from loopserve.core.engine import Engine
    from loopserve.core.sched.sampling_params import SamplingParams

    b = cfg.bench
    timer = BenchTimer()
    with Engine(config=cfg, plugins=[("bench_timer", timer)]) as engine:
        vocab = int(engine.worker.vocab_size)
        workload = workload_fn(vocab)
        if b.warmup:
            # Different tokens from the workload's, so the warmup leaves nothing in the cache.
            warm = make_workload(vocab, min(8, b.num_requests), (8, 64), (8, 8), seed=b.seed + 1)
            engine.generate(input_ids=warm.input_ids,
                            sampling_params=SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        sps = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in workload.output_lens]
        s = engine.scheduler.stats
        before = engine.get_stats()
        timer.enabled = True
        progress = _Progress(len(sps), lambda: (s.num_finished + s.num_aborted, s.num_generated_tokens),
                             bool(b.progress), f"bench {engine.loop_name}")
        outs = None
        t0 = time.perf_counter()
        try:
            outs = engine.generate(input_ids=workload.input_ids, sampling_params=sps)
        finally:
            duration = time.perf_counter() - t0
            timer.enabled = False
            final = None if outs is None else (len(outs), sum(len(o.token_ids) for o in outs))
            progress.close(final, duration)
        after = engine.get_stats()
        forward_s = after["forward_time_s"] - before["forward_time_s"]
        out_tokens = sum(len(o.token_ids) for o in outs)
        ttft = [o.metrics.time_to_first_token_s for o in outs if o.metrics and o.metrics.time_to_first_token_s is not None]
        e2e = [o.metrics.e2e_latency_s for o in outs if o.metrics and o.metrics.e2e_latency_s is not None]
        summary: dict[str, Any] = {
            "bench": "throughput",
            "loop": engine.loop_name,
            "policy": str(cfg.policy.name),
            "worker": str(cfg.worker.name),
            "model": _model_label(cfg, engine.worker),
            "num_requests": len(outs),
            "total_input_tokens": workload.total_input_tokens,
            "total_output_tokens": out_tokens,
            "duration_s": round(duration, 4),
            "output_throughput": round(out_tokens / duration, 2),
            "input_throughput": round(workload.total_input_tokens / duration, 2),
            "request_throughput": round(len(outs) / duration, 4),
            "busy_fraction": round(min(forward_s / duration, 1.0), 4),
            "forward_time_s": round(forward_s, 4),
            "num_forwards": after["forwards"] - before["forwards"],
            "num_iterations": timer.iterations,
            "step_time_ms": timer.step_time_ms(forward_s),
            "mean_ttft_ms": round(1e3 * sum(ttft) / len(ttft), 3) if ttft else None,
            "p99_ttft_ms": round(1e3 * percentile(ttft, 0.99), 3) if ttft else None,
            "mean_e2e_latency_s": round(sum(e2e) / len(e2e), 4) if e2e else None,
            "cache_hit_rate": round((after["prompt_tokens_reused"] - before["prompt_tokens_reused"])
                                    / max(after["prompt_tokens"] - before["prompt_tokens"], 1), 4),
            "retractions": after["retractions"] - before["retractions"],
            "aborted": sum(o.finish_reason == "abort" for o in outs),
        }
        threads = getattr(engine.worker, "cpu_threads", None)
        if threads is not None:
            summary["cpu_threads"] = threads.report()
        if str(cfg.worker.name) == "sim":
            summary["sim_predicted_forward_s"] = round(engine.worker.predicted_time_s, 4)
        summary["trace"] = progress.trace
        peer_inputs = {
            "workload": workload,
            "model_path": getattr(engine.worker, "model_path", None),
            "dtype": getattr(engine.worker, "dtype", None),
            "device": getattr(engine.worker, "device", None),
            "token_ids": [list(o.token_ids) for o in outs],
        }
    return summary, peer_inputs


def run_throughput(cfg: DictConfig, peer_cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """One throughput run (and its peer) from a composed config; returns the summary."""
    b = cfg.bench
    peer = None if b.peer in (None, "none") else str(b.peer)
    if peer is not None and str(cfg.worker.name) != "model":
        raise ValueError(f"bench.peer={peer} runs a peer engine on real weights; use worker=model "
                         f"(got worker={cfg.worker.name})")
    if peer == "vllm":
        from loopserve.core.bench.peers import check_vllm

        check_vllm(b.peer_python)  # fail before the engine run, not after it
    elif peer is not None:
        from loopserve.core.bench.peers import check_transformers

        check_transformers()  # fail before the engine run, not after it
    summary, peer_inputs = run_engine(cfg, lambda vocab: bench_workload(b, vocab))
    workload: Workload = peer_inputs["workload"]
    summary["expected_output_tokens"] = workload.total_output_tokens
    if peer == "vllm":
        _run_vllm(cfg, summary, peer_inputs)
    elif peer is not None:
        from loopserve.core.bench.peers import run_peer

        # hf_continuous gets loopserve's own token budget per batch as its max_batch_tokens.
        max_batch_tokens = int(cfg.scheduler.max_prefill_tokens)
        key = (peer, int(b.peer_batch_size), peer_inputs["model_path"], str(peer_inputs["dtype"]),
               json.dumps(workload.output_lens), json.dumps([len(x) for x in workload.input_ids]), b.seed,
               b.shared_prefix_len, max_batch_tokens if peer == "hf_continuous" else None, cfg.model.num_threads)
        cached = peer_cache.get(key) if peer_cache is not None else None
        if cached is None:
            # NOTE: the engine is shut down, and its compute thread with it: an idle OpenMP
            # team of that thread would slow the peer's torch code here by ~40% on the CPU.
            # The peer's forward passes get the same thread policy as the engine's
            # (model.num_threads, or the same adaptation to busy cores).
            from loopserve.core.model.cpu_threads import CpuThreads

            cached = run_peer(peer, workload, peer_inputs["model_path"], dtype=peer_inputs["dtype"],
                              device=peer_inputs["device"], batch_size=int(b.peer_batch_size),
                              warmup=bool(b.warmup), progress=bool(b.progress),
                              max_batch_tokens=max_batch_tokens,
                              threads=CpuThreads(cfg.model.num_threads))
            if peer_cache is not None:
                peer_cache[key] = cached
        else:
            print(f"bench: reusing the {peer} result of an earlier run with the same workload", file=sys.stderr)
        summary.update(
            peer=peer,
            peer_batch_size=int(b.peer_batch_size) if peer == "hf_generate" else None,
            peer_max_batch_tokens=cached.max_batch_tokens,
            peer_output_throughput=round(cached.output_tokens / cached.duration_s, 2),
            peer_duration_s=round(cached.duration_s, 4),
            peer_output_tokens=cached.output_tokens,
            peer_generated_tokens=cached.generated_tokens,
            peer_cpu_threads=cached.threads,
            peer_same_thread_settings=cached.threads is not None and summary.get("cpu_threads") is not None
            and cached.threads["source"] == summary["cpu_threads"]["source"]
            and cached.threads["max_threads"] == summary["cpu_threads"]["max_threads"],
            speedup_vs_peer=round(summary["output_throughput"] * cached.duration_s / cached.output_tokens, 3),
        )
        summary["peer_trace"] = cached.trace
    return summary


def _loopserve_threads(cfg: DictConfig) -> int:
    """How many compute threads loopserve's forward passes may use (their ceiling)."""
    if cfg.model.num_threads is not None:
        return int(cfg.model.num_threads)
    from loopserve.core.model.cpu_threads import usable_cpus

    return usable_cpus()[0]


def _run_vllm(cfg: DictConfig, summary: dict[str, Any], peer_inputs: dict[str, Any]) -> None:
    """bench.peer=vllm: the same workload through vLLM in its own interpreter; adds the peer
    fields to ``summary``."""
    from loopserve.core.bench.peers import run_vllm_peer

    b = cfg.bench
    if peer_inputs["model_path"] is None:
        raise ValueError("bench.peer=vllm needs the model worker's checkpoint directory")
    threads = None if b.peer_threads is None else (
        _loopserve_threads(cfg) if str(b.peer_threads) == "same" else int(str(b.peer_threads)))
    dtype = str(peer_inputs["dtype"]).removeprefix("torch.")
    r = run_vllm_peer(peer_inputs["workload"], peer_inputs["model_path"], dtype=dtype, python=b.peer_python,
                      threads=threads, warmup=bool(b.warmup))
    mine = peer_inputs["token_ids"]
    ours = summary.get("cpu_threads") or {}
    peer_threads = r.threads or {}
    n_peer = peer_threads.get("compute_threads")
    if n_peer is None:
        # vLLM's CPU default: one OpenMP thread per usable core but one (its engine's).
        n_peer = max(1, int(peer_threads.get("usable_cpus") or 1) - 1)
        peer_threads["compute_threads"] = n_peer
    summary.update(
        peer="vllm",
        peer_version=r.version,
        peer_output_throughput=round(r.output_tokens / r.duration_s, 2),
        peer_duration_s=round(r.duration_s, 4),
        peer_output_tokens=r.output_tokens,
        peer_generated_tokens=r.generated_tokens,
        peer_cpu_threads=peer_threads,
        # Equal compute threads on both sides (loopserve's ceiling; it may use fewer while
        # other processes keep cores busy).
        peer_same_thread_settings=ours.get("max_threads") == n_peer,
        # Greedy on the same weights: how many requests produced exactly the same tokens.
        peer_same_tokens=sum(a == b_ for a, b_ in zip(mine, r.token_ids or [])),
        speedup_vs_peer=round(summary["output_throughput"] * r.duration_s / r.output_tokens, 3),
    )
    summary["peer_trace"] = r.trace


def _results_path(b: Any) -> str:
    if b.results_file:
        return str(b.results_file)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(str(b.output_dir), f"bench-{stamp}-{os.getpid()}.json")


def run_one(overrides: list[str], peer_cache: dict[Any, Any] | None = None,
            results_file: str | None = None) -> dict[str, Any]:
    """Compose ``overrides``, run the benchmark its ``bench.mode`` names, write the results
    file (and plot); returns the summary (which names both files)."""
    from loopserve.core.config import compose_config
    from loopserve.core.loop.build import disabled_plugins as _disabled_plugins
    from loopserve.core.plugin_manager import make_plugin_manager

    cfg = compose_config(overrides, make_plugin_manager(disable=_disabled_plugins(overrides)))
    b = cfg.bench
    if b.model_shape:
        overrides = use_model_shape(cfg, overrides)
    if b.plot:
        from loopserve.core.bench.plot import check_matplotlib

        check_matplotlib()
    profiler = None
    if b.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if b.mode == "scheduler_overhead":
            from loopserve.core.bench.overhead import run_overhead

            summary = run_overhead(cfg)
        elif b.mode == "http":
            from loopserve.core.bench.http import run_http

            summary = run_http(cfg, overrides)
        else:
            summary = run_throughput(cfg, peer_cache)
    finally:
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    summary["overrides"] = list(overrides)
    summary["machine"] = machine_info()
    path = results_file or _results_path(b)
    summary["results_file"] = path
    if b.plot:
        from loopserve.core.bench.plot import plot_run

        summary["plot_file"] = os.path.splitext(path)[0] + ".png"
        plot_run(summary, summary["plot_file"])
    write_json(path, summary)
    return summary


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def public(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without the plot traces (those stay in the results file)."""
    return {k: v for k, v in summary.items() if k not in ("trace", "peer_trace", "curve_detail")}


def main(args: list[str]) -> int:
    """The ``loopserve bench`` command: ``[-m|--multirun] [overrides]``."""
    multirun = False
    overrides = []
    for a in args:
        if a in ("-m", "--multirun"):
            multirun = True
        else:
            overrides.append(a)
    from loopserve.core.bench.sweep import expand_sweep, run_sweep

    runs = expand_sweep(overrides)
    if len(runs) > 1 and not multirun:
        raise ValueError("these overrides sweep over several values; add -m to run each combination "
                         "(loopserve bench -m policy=fcfs,lpm)")
    if not multirun:
        summary = run_one(overrides)
        print(json.dumps(public(summary)), flush=True)
        return 0
    return run_sweep(runs)
