"""``loopserve bench`` as a user runs it, and the sim worker's cost model.

- The console script on a tiny workload (embedded tiny model): the last stdout line is the JSON
  summary, with the fields the issue names and counts that agree with the workload recomputed
  here; the results file holds the same JSON. With ``bench.peer=hf_generate`` /
  ``hf_continuous`` (transformers on the same weights) the peer produced the workload's tokens
  and ``speedup_vs_peer`` is the ratio of the two throughputs; ``bench.plot=true`` writes a PNG.
- ``-m`` sweeps write their comparison (JSON, Markdown table, PNG); a sweep without ``-m`` and
  bad values exit with code 2 and a message naming what to change.
- ``bench.mode=scheduler_overhead`` on the sim worker reports ms per iteration per batch size.
- The sim worker predicts, for known batch shapes, exactly the roofline formula written out by
  hand below from the llama3-8b shape and the H100 figures, sleeps at least that long when
  asked to, and through ``Engine`` produces ``reference_tokens`` with the normal and overlap loops.

Nothing here bounds a measured time from above: throughput numbers come from benchmarks, never
from timed tests. The console-script runs are real subprocesses, started two at a time by one
module fixture (each costs a process start plus the tiny model, a few seconds of CPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loopserve.core import Engine, ForwardMode, SamplingParams
from loopserve.core.bench.throughput import make_workload
from loopserve.core.cli import main
from loopserve.core.sched.forward_batch import ForwardBatch
from loopserve.core.model.tiny import ensure_tiny_model
from loopserve.plugins.worker_sim import SimWorker, reference_tokens

def test_the_peer_runs_without_the_engines_compute_thread(monkeypatch, tmp_path):
    """An idle OpenMP team of the engine's compute thread would slow the peer's torch code
    (on another thread) by ~40% on the CPU; the engine's shutdown stops it before the peer."""
    from loopserve.core.bench import peers as bench_peers, throughput as bench
    from loopserve.core.model.compute_thread import ComputeThread
    from loopserve.core.config import compose_config

    seen = {}

    def fake_peer(name, workload, model_path, **kw):
        seen["compute_thread"] = ComputeThread._shared
        return bench_peers.PeerResult(1.0, workload.total_output_tokens, workload.total_output_tokens)

    monkeypatch.setattr(bench_peers, "run_peer", fake_peer)
    cfg = compose_config([*WORKLOAD, "bench.peer=hf_generate", "bench.warmup=false", f"bench.output_dir={tmp_path}"])
    summary = bench.run_throughput(cfg)
    assert seen == {"compute_thread": None}
    assert summary["peer_output_tokens"] == summary["total_output_tokens"]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The tiny workload of every console-script run: (num_requests, input range, output range, seed).
N_REQ, IN_LEN, OUT_LEN, SEED = 6, (4, 16), (2, 6), 3
WORKLOAD = [f"bench.num_requests={N_REQ}", f"bench.input_len_min={IN_LEN[0]}", f"bench.input_len_max={IN_LEN[1]}",
            f"bench.output_len_min={OUT_LEN[0]}", f"bench.output_len_max={OUT_LEN[1]}", f"bench.seed={SEED}",
            "bench.progress=false"]
# hf_continuous gets loopserve's per-batch token budget; a value unlike transformers' default
# (8192) shows that it is passed through.
PEER_BATCH_TOKENS = 256
SIM_FAST = ["worker=sim", "worker.params.sleep=false"]

# Summary fields the issue names.
FIELDS = ("output_throughput", "input_throughput", "request_throughput", "busy_fraction", "step_time_ms",
          "num_requests", "loop", "policy", "worker")
PEER_FIELDS = ("peer", "peer_output_throughput", "speedup_vs_peer")


def _loopserve() -> str:
    exe = Path(sys.executable).with_name("loopserve")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    return str(exe)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([_loopserve(), *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def _rate_matches(rate: float, count: int, duration: float, rate_digits: int = 2, duration_digits: int = 4) -> bool:
    """``rate`` is ``count / d`` rounded to ``rate_digits``, for some ``d`` that rounds to
    ``duration`` at ``duration_digits`` (the summary rounds both)."""
    half = 0.5 * 10 ** -duration_digits
    lo, hi = count / (duration + half), count / max(duration - half, 1e-12)
    slack = 0.5 * 10 ** -rate_digits + 1e-9
    return lo - slack <= rate <= hi + slack


@pytest.fixture(scope="module")
def tiny_vocab() -> int:
    with open(os.path.join(ensure_tiny_model(), "config.json"), encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])


@pytest.fixture(scope="module")
def expected(tiny_vocab):
    """The tiny workload recomputed here."""
    w = make_workload(tiny_vocab, N_REQ, IN_LEN, OUT_LEN, seed=SEED)
    # The ranges are wide enough that the totals pin the workload down (not all lengths equal).
    assert len({len(x) for x in w.input_ids}) > 1 and len(set(w.output_lens)) > 1
    return w


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vocab):
    """Every console-script run of this module, two at a time: name -> (CompletedProcess, output dir)."""
    root = tmp_path_factory.mktemp("bench")
    jobs = {
        "plain": WORKLOAD,
        "hf_generate": [*WORKLOAD, "bench.peer=hf_generate", "bench.peer_batch_size=4", "bench.plot=true"],
        "hf_continuous": [*WORKLOAD, "bench.peer=hf_continuous", f"scheduler.max_prefill_tokens={PEER_BATCH_TOKENS}"],
        "multirun": ["-m", "policy=fcfs,lpm", *SIM_FAST, "kv_cache.num_tokens=4096", *WORKLOAD],
        "bad_peer": [*WORKLOAD, "bench.peer=nonsense"],
    }
    dirs = {name: root / name for name in jobs}
    argv = {name: ["bench", *args, f"bench.output_dir={dirs[name]}"] for name, args in jobs.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, a) for name, a in argv.items()}
        return {name: (f.result(), dirs[name]) for name, f in futures.items()}


# ------------------------------------------------------------------ loopserve bench (tiny model)


def test_bench_prints_the_summary_fields(runs):
    summary = _last_json(runs["plain"][0])
    missing = [k for k in FIELDS if k not in summary]
    assert not missing, f"summary lacks {missing}: {sorted(summary)}"
    assert summary["num_requests"] == N_REQ
    assert (summary["loop"], summary["policy"], summary["worker"]) == ("normal", "fcfs", "model")
    step = summary["step_time_ms"]
    assert isinstance(step, dict) and {"run_batch", "forward", "total"} <= set(step), step
    assert all(isinstance(v, (int, float)) and v >= 0 for v in step.values()), step
    assert step["run_batch"] > 0 and step["total"] >= step["run_batch"]
    assert "peer" not in summary and "plot_file" not in summary
    threads = summary["cpu_threads"]  # the thread choice, as the worker made it
    assert threads["source"] in ("affinity mask", "OMP_NUM_THREADS") or threads["source"].startswith("cgroup")
    assert 1 <= threads["threads_at_end"] <= threads["max_threads"] <= len(os.sched_getaffinity(0))


def test_bench_counts_match_the_workload(runs, expected):
    summary = _last_json(runs["plain"][0])
    total_in, total_out = expected.total_input_tokens, expected.total_output_tokens
    assert summary["total_input_tokens"] == total_in
    assert summary["total_output_tokens"] == total_out
    assert summary["expected_output_tokens"] == total_out
    assert summary["aborted"] == 0
    d = summary["duration_s"]
    assert d > 0
    assert _rate_matches(summary["output_throughput"], total_out, d)
    assert _rate_matches(summary["input_throughput"], total_in, d)
    assert _rate_matches(summary["request_throughput"], N_REQ, d, rate_digits=4)
    assert 0 < summary["busy_fraction"] <= 1
    assert summary["num_forwards"] >= max(expected.output_lens)  # a prefill, then decodes of the longest


def test_bench_writes_the_same_json_to_the_results_file(runs):
    proc, out_dir = runs["plain"]
    summary = _last_json(proc)
    path = Path(summary["results_file"])
    assert path.is_file() and path.parent == out_dir
    stored = json.loads(path.read_text(encoding="utf-8"))
    # The file also keeps the throughput trace for plots; everything printed is in it, equal.
    assert {k: v for k, v in stored.items() if k != "trace"} == summary
    trace = stored["trace"]  # (seconds, output tokens so far), ending at the run's end with all of them
    assert trace and trace[-1][1] == summary["total_output_tokens"]
    assert trace[-1][0] == pytest.approx(summary["duration_s"], abs=1e-4)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(trace, trace[1:]))


@pytest.mark.parametrize("peer", ["hf_generate", "hf_continuous"])
def test_bench_with_a_peer(runs, expected, peer):
    summary = _last_json(runs[peer][0])
    missing = [k for k in (*FIELDS, *PEER_FIELDS) if k not in summary]
    assert not missing, f"summary lacks {missing}"
    assert summary["peer"] == peer
    # Both sides ran under the same CPU thread policy, and the JSON says so.
    assert summary["peer_same_thread_settings"] is True
    assert summary["peer_cpu_threads"]["max_threads"] == summary["cpu_threads"]["max_threads"]
    total_out = expected.total_output_tokens
    assert summary["total_output_tokens"] == total_out
    assert summary["peer_output_tokens"] == total_out
    assert summary["peer_generated_tokens"] >= total_out
    assert summary["peer_output_throughput"] > 0
    assert _rate_matches(summary["peer_output_throughput"], total_out, summary["peer_duration_s"])
    assert summary["speedup_vs_peer"] == pytest.approx(
        summary["output_throughput"] / summary["peer_output_throughput"], rel=2e-3, abs=1e-3)
    if peer == "hf_generate":
        assert summary["peer_batch_size"] == 4 and summary["peer_max_batch_tokens"] is None
    else:
        assert summary["peer_batch_size"] is None
        assert summary["peer_max_batch_tokens"] == PEER_BATCH_TOKENS


def test_hf_continuous_halves_max_batch_tokens_until_the_plan_fits(monkeypatch, capsys):
    """transformers' planner raises MemoryError when its masks (max_batch_tokens x cache) do
    not fit; the peer then halves the budget and says on stderr which value it ran with."""
    from types import SimpleNamespace

    from loopserve.core.bench import peers as bench_peers

    tried = []

    def once(model, workload, warmup, progress, max_batch_tokens):
        tried.append(max_batch_tokens)
        if max_batch_tokens > 1024:
            raise MemoryError("Memory footprint 5359601664 is more than available memory 3277676544")
        return bench_peers.PeerResult(1.0, 10, 10, max_batch_tokens=max_batch_tokens)

    monkeypatch.setattr(bench_peers, "_hf_continuous_once", once)
    model = SimpleNamespace(continuous_batching_context_manager=None)
    result = bench_peers._hf_continuous(model, None, False, False, 8192)
    assert tried == [8192, 4096, 2048, 1024]
    assert result.max_batch_tokens == 1024
    err = capsys.readouterr().err
    assert "ran with max_batch_tokens=1024" in err and "asked for 8192" in err
    # A budget that fits is used as given, silently.
    tried.clear()
    assert bench_peers._hf_continuous(model, None, False, False, 512).max_batch_tokens == 512
    assert tried == [512] and capsys.readouterr().err == ""


def test_bench_plot_writes_a_png(runs):
    summary = _last_json(runs["hf_generate"][0])
    png = Path(summary["plot_file"])
    assert png.with_suffix(".json") == Path(summary["results_file"])
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


# ------------------------------------------------------------------ sweeps and bad input


def test_multirun_writes_a_comparison(runs):
    proc, out_dir = runs["multirun"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    summaries = [json.loads(line) for line in lines if line.startswith("{")]
    assert [s["policy"] for s in summaries] == ["fcfs", "lpm"]
    assert all(s["worker"] == "sim" and s["num_requests"] == N_REQ for s in summaries)
    assert [s["run"] for s in summaries] == ["policy=fcfs", "policy=lpm"]
    # Same workload, and the sim worker's tokens do not depend on the batching policy.
    assert len({s["total_output_tokens"] for s in summaries}) == 1
    (sweep_dir,) = [p for p in out_dir.iterdir() if p.name.startswith("multirun-")]
    comparison = json.loads((sweep_dir / "comparison.json").read_text(encoding="utf-8"))
    assert [r["policy"] for r in comparison["runs"]] == ["fcfs", "lpm"]
    assert comparison["runs"] == [{k: v for k, v in s.items()} for s in summaries]
    table = (sweep_dir / "comparison.md").read_text(encoding="utf-8").splitlines()
    for s in summaries:
        (row,) = [line for line in table if line.startswith(f"| {s['run']} ")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [s["loop"], s["policy"], "sim"]
    assert (sweep_dir / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in sweep_dir.glob("run-*.json")) == ["run-0.json", "run-1.json"]
    assert any(line.startswith("comparison: ") for line in lines)


def test_sweep_without_multirun_exits_2_and_says_add_m(capsys):
    assert main(["bench", "policy=fcfs,lpm", *SIM_FAST, *WORKLOAD]) == 2
    err = capsys.readouterr().err
    assert "add -m" in err and "loopserve bench -m" in err


@pytest.mark.parametrize(("override", "key"), [
    ("bench.num_requests=0", "bench.num_requests"),
    ("bench.peer=nonsense", "bench.peer"),
    ("bench.input_len_min=20", "bench.input_len_min"),  # above input_len_max=16
    ("bench.mode=fastest", "bench.mode"),
    ("bench.overhead_batch_sizes=[]", "bench.overhead_batch_sizes"),
])
def test_bad_bench_values_exit_2_naming_the_key(capsys, tmp_path, override, key):
    assert main(["bench", *WORKLOAD, f"bench.output_dir={tmp_path}", override]) == 2
    captured = capsys.readouterr()
    assert key in captured.err and captured.out == ""
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_peer_on_the_sim_worker_exits_2(capsys, tmp_path):
    assert main(["bench", *SIM_FAST, *WORKLOAD, f"bench.output_dir={tmp_path}", "bench.peer=hf_generate"]) == 2
    assert "worker=model" in capsys.readouterr().err


def test_bad_peer_from_the_console_script(runs):
    proc, out_dir = runs["bad_peer"]
    assert proc.returncode == 2, proc.stderr
    assert "bench.peer" in proc.stderr and "hf_continuous" in proc.stderr
    assert proc.stdout == "" and not out_dir.exists()


# ------------------------------------------------------------------ scheduler overhead


def test_scheduler_overhead_mode(capsys, tmp_path):
    rc = main(["bench", "bench.mode=scheduler_overhead", "worker=sim", "kv_cache.num_tokens=4096",
               "bench.overhead_batch_sizes=[1,8]", "bench.overhead_steps=5", "bench.progress=false",
               f"bench.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bench"] == "scheduler_overhead" and summary["worker"] == "sim"
    assert set(summary["overhead_ms"]) == {"1", "8"}
    assert all(isinstance(v, float) and v > 0 for v in summary["overhead_ms"].values()), summary["overhead_ms"]
    assert summary["overhead_detail"]["8"]["running"] == 8 and summary["overhead_detail"]["8"]["steps"] == 5
    assert json.loads(Path(summary["results_file"]).read_text(encoding="utf-8")) == summary


# ------------------------------------------------------------------ the sim worker's cost model

# llama3-8b, written out: layers, hidden, heads, kv heads, head dim, intermediate, vocab.
L, H, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
H100_FLOPS, H100_BW, H100_OVERHEAD = 989e12, 3.35e12, 50e-6
DTYPE_BYTES = 2


def _hand_time(prefix_lens: list[int], extend_lens: list[int], num_sampled: int) -> tuple[float, str]:
    """The roofline time of one forward, from the shape above (not from core/cost_model.py)."""
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layer_params = 2 * H * q_dim + 2 * H * kv_dim + 3 * H * INTER  # q, o; k, v; gate, up, down
    assert layer_params == 218_103_808
    lm_head = VOCAB * H
    tokens = sum(extend_lens)
    context = sum(prefix_lens) + tokens
    # Query j of a request (position p + j) attends to p + j + 1 keys.
    pairs = sum(sum(p + j + 1 for j in range(e)) for p, e in zip(prefix_lens, extend_lens))
    flops = 2 * tokens * L * layer_params + 2 * num_sampled * VOCAB * H + 4 * L * HEADS * HEAD_DIM * pairs
    kv_per_token = 2 * L * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # K and V, every layer
    nbytes = (L * layer_params + lm_head) * DTYPE_BYTES + kv_per_token * (context + tokens)
    compute, memory = flops / H100_FLOPS, nbytes / H100_BW
    return max(compute, memory) + H100_OVERHEAD, "compute" if compute >= memory else "memory"


def _forward_batch(mode: ForwardMode, prefix_lens: list[int], extend_lens: list[int],
                   need_sample: list[bool] | None = None) -> ForwardBatch:
    n = len(prefix_lens)
    tokens = sum(extend_lens)
    # Slots: every request's prefix first, then the new tokens.
    prefix_slots, next_slot = [], 0
    for i, p in enumerate(prefix_lens):
        prefix_slots.append((i, list(range(next_slot, next_slot + p))))
        next_slot += p
    return ForwardBatch(
        forward_mode=mode,
        req_pool_indices=list(range(n)),
        input_ids=[(7 * k + 3) % VOCAB for k in range(tokens)],
        prefix_lens=list(prefix_lens),
        extend_lens=list(extend_lens),
        out_cache_loc=list(range(next_slot, next_slot + tokens)),
        sampling_params=[SamplingParams(max_new_tokens=4, temperature=0.0)] * n,
        need_sample=list(need_sample) if need_sample is not None else [True] * n,
        prefix_slots=[(i, s) for i, s in prefix_slots if s],
    )


DECODE = (ForwardMode.DECODE, [100, 37, 250], [1, 1, 1], None)
PREFILL = (ForwardMode.EXTEND, [0, 64], [512, 200], [True, False])  # the second is a non-final chunk


def _sim(sleep: bool) -> SimWorker:
    return SimWorker(model="llama3-8b", device="h100", sleep=sleep, num_kv_slots=4096, max_running_requests=4)


def test_sim_worker_predicts_the_roofline_formula():
    worker = _sim(sleep=False)
    total = 0.0
    for (mode, prefix, ext, sample), bound in ((DECODE, "memory"), (PREFILL, "compute")):
        num_sampled = sum(sample) if sample else len(ext)
        want, want_bound = _hand_time(prefix, ext, num_sampled)
        assert want_bound == bound  # decode reads the weights; a long prefill is matmul-bound
        result = worker.forward_batch(_forward_batch(mode, prefix, ext, sample))
        assert len(result.next_token_ids) == len(ext)
        assert worker.last_cost.time_s == pytest.approx(want, rel=1e-12)
        assert worker.last_cost.bound == bound
        total += want
        assert worker.predicted_time_s == pytest.approx(total, rel=1e-12)
    # Decode of 3 requests with 387 tokens cached: 15.06 GB of weights + KV at 3.35 TB/s, + 50 us.
    assert _hand_time(*DECODE[1:3], 3)[0] == pytest.approx(4.5457696e-3, rel=1e-9)
    assert worker.num_forwards == 2


def test_sim_worker_sleeps_at_least_the_predicted_time():
    worker = _sim(sleep=True)
    mode, prefix, ext, sample = PREFILL
    t0 = time.perf_counter()
    result = worker.forward_batch(_forward_batch(mode, prefix, ext, sample))
    wall = time.perf_counter() - t0
    predicted = _hand_time(prefix, ext, 1)[0]
    assert worker.last_cost.time_s == pytest.approx(predicted, rel=1e-12)
    assert wall >= predicted and result.forward_time_s >= predicted  # a lower bound only


# Prompts for the sim worker through Engine: two share a 40-token prefix (the radix cache
# hands the second the first's KV slots), one is short.
SIM_PROMPTS = [[(13 * k + 5) % 1000 for k in range(40)] + [901, 902, 903],
               [(13 * k + 5) % 1000 for k in range(40)] + [77],
               [4, 8, 15, 16, 23, 42]]


@pytest.mark.parametrize("loop", ["normal", "overlap"])
def test_sim_worker_tokens_through_engine(loop):
    n_new = [9, 12, 5]
    sps = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in n_new]
    with Engine(overrides=[f"loop={loop}", *SIM_FAST, "kv_cache.num_tokens=512",
                           "scheduler.max_running_requests=4"]) as engine:
        assert engine.loop_name == loop
        vocab = engine.worker.vocab_size
        assert vocab == VOCAB
        want = [reference_tokens(p, n, vocab) for p, n in zip(SIM_PROMPTS, n_new)]
        assert len({tuple(w) for w in want}) == len(want)
        for _ in range(2):  # the second round runs on cached prefixes
            outs = engine.generate(input_ids=SIM_PROMPTS, sampling_params=sps)
            assert [o.token_ids for o in outs] == want
            assert [o.finish_reason for o in outs] == ["length"] * 3
