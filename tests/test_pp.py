"""Pipeline parallelism (``parallel.pp_size > 1``, ``loop=pp``): greedy tokens equal the
single-process engine's (and so transformers') for Llama, Qwen2 and Qwen3 with 2 and 3
stages (3 stages split the 4 layers unevenly), with chunked prefill, a KV pool small enough
to force retraction, aborts and stop strings, through ``Engine`` and ``loopserve generate``;
a killed or hung stage fails the engine within seconds and leaves no process; bad
``parallel.*`` settings fail before anything starts.

Every engine here starts real stage processes (spawn + gloo on 127.0.0.1), so engines are
shared per module where the test allows it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_reference import ARCHS, engine_reference, hf_greedy, random_id_prompts
from test_tracing import receiver  # noqa: F401 - the OTLP receiver fixture
from loopserve.core import Engine, SamplingParams
from loopserve.core.pp.split import split_layers

pytestmark = pytest.mark.slow
N_NEW = 12


def greedy(n: int = N_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


PROMPTS = random_id_prompts([1, 5, 17, 30, 44, 9, 23, 3], seed=11)
# Different lengths per request, so micro-batches hold requests at different steps.
PARAMS = [greedy(n) for n in (12, 7, 12, 3, 10, 12, 5, 9)]


@pytest.fixture(scope="module")
def reference(ckpt):
    """Single-process greedy outputs per checkpoint (loop=normal)."""
    return engine_reference(ckpt, PROMPTS, PARAMS)


# ---- the split -------------------------------------------------------------------------


def test_layers_split_evenly_unevenly_and_as_pinned():
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(4, 3) == [(0, 2), (2, 3), (3, 4)]  # the last stage also samples
    assert split_layers(3, 2) == [(0, 2), (2, 3)]
    assert split_layers(4, 2, [1, 3]) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="larger than the model's 4 layers"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(4, 2, [2, 1])


# ---- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 3])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_equal_one_process_and_transformers(ckpt, reference, arch, pp):
    ref = reference(arch)
    with Engine(overrides=[f"model.path={ckpt(arch)}", f"parallel.pp_size={pp}"]) as e:
        assert e.loop_name == "pp"  # loop=auto picks pp for pp_size > 1
        outs = e.generate(input_ids=PROMPTS, sampling_params=PARAMS, timeout=120)
        procs = list(e.worker.procs)
        assert len(procs) == pp - 1
    assert [o.token_ids for o in outs] == ref
    assert outs[2].token_ids == hf_greedy(ckpt(arch), PROMPTS[2], N_NEW, ignore_eos=True)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.parametrize("pp, depth", [(2, 1), (3, 0)])
def test_chunked_prefill_and_retraction_keep_the_tokens(ckpt, reference, pp, depth):
    """Also with pp_async_depth=1: steps scheduled ahead with placeholder tokens."""
    ref = reference("llama")
    # 8-token chunks; 96 KV slots cannot hold all eight requests as they grow, and an
    # optimistic growth estimate admits them anyway, so decode must retract.
    with Engine(overrides=[f"model.path={ckpt('llama')}", f"parallel.pp_size={pp}", f"parallel.pp_async_depth={depth}",
                           "scheduler.chunked_prefill_size=8", "kv_cache.num_tokens=96",
                           "kv_cache.page_size=1", "scheduler.init_new_token_ratio=0.05",
                           "scheduler.min_new_token_ratio=0.0"]) as e:
        outs = e.generate(input_ids=PROMPTS, sampling_params=PARAMS, timeout=120)
        stats = e.get_stats()
    assert [o.token_ids for o in outs] == ref
    assert stats["retractions"] > 0


def test_aborts_and_stop_strings(ckpt):
    path = ckpt("llama")
    text = "A longer prompt about a scheduler that batches requests"
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as e:
        full = e.generate(text, greedy(24))[0]
    # A stop string from the middle of the greedy output.
    stop = next((full.text[i:i + 2] for i in range(4, len(full.text) - 2)
                 if full.text[i:i + 2].isascii() and full.text[i:i + 2].strip()), None)
    with Engine(overrides=[f"model.path={path}", "parallel.pp_size=2"]) as e:
        if stop is not None:
            out = e.generate(text, greedy(24, stop=[stop]), timeout=60)[0]
            assert out.finish_reason == "stop" and out.matched_stop == stop
            assert full.text.startswith(out.text) and stop not in out.text
        long = e.submit(input_ids=PROMPTS[4], sampling_params=greedy(400))
        others = [e.submit(input_ids=p, sampling_params=sp) for p, sp in zip(PROMPTS[:3], PARAMS[:3])]
        deadline = time.monotonic() + 30
        while len(long.req.output_ids) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        e.abort(long.rid)
        aborted = long.result(timeout=30)
        assert aborted.finish_reason == "abort" and 2 <= len(aborted.token_ids) < 400
        assert all(t >= 0 for t in aborted.token_ids)  # no placeholder leaks out
        done = [h.result(timeout=60) for h in others]
        deadline = time.monotonic() + 20
        while (e.scheduler.has_work or e.loop.has_pending()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert e.scheduler.kv.available_pages() == e.scheduler.kv.num_pages  # every page is back
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as e:
        ref = e.generate(input_ids=PROMPTS[:3], sampling_params=PARAMS[:3])
    assert [o.token_ids for o in done] == [o.token_ids for o in ref]


def test_generate_cli_with_two_stages(ckpt):
    path = ckpt("qwen2")
    exe = Path(sys.executable).with_name("loopserve")
    args = ["generate", "prompt=Hello, world", f"model.path={path}", "output_format=json",
            f"sampling.max_new_tokens={N_NEW}", "sampling.ignore_eos=true"]
    proc = subprocess.run([str(exe), *args, "parallel.pp_size=2"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as e:
        ref = e.generate("Hello, world", greedy(N_NEW))[0]
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


# ---- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_stage_fails_the_engine_within_seconds(ckpt, how):
    timeout_s = 6.0  # a cold first forward on a loaded 2-core machine took over 3 s once
    e = Engine(overrides=[f"model.path={ckpt('llama')}", "parallel.pp_size=3",
                          f"parallel.stage_timeout_s={timeout_s}"])
    try:
        procs = list(e.worker.procs)
        assert e.generate(input_ids=PROMPTS[:2], sampling_params=PARAMS[:2], timeout=60)
        handle = e.submit(input_ids=PROMPTS[1], sampling_params=greedy(1000))
        while len(handle.req.output_ids) < 2:
            time.sleep(0.01)
        victim = procs[1] if how == "killed" else procs[0]
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        out = handle.result(timeout=30)  # its micro-batch fails, then the loop stops
        elapsed = time.monotonic() - t0
        assert out.finish_reason == "abort", out
        assert ("stage_timeout_s" if how == "hung" else "stage 2 exited with code -9") in out.error, out.error
        assert elapsed < timeout_s * 3 + 5, elapsed
        with pytest.raises(RuntimeError, match="loop failed"):
            e.generate(input_ids=PROMPTS[0], sampling_params=PARAMS[0], timeout=10)
    finally:
        e.shutdown()
    for p in procs:
        p.join(10)
        assert p.exitcode is not None, f"stage {p.name} left running"


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("overrides, words", [
    (["parallel.pp_size=5"], ["pp_size=5", "4 layers"]),
    (["parallel.pp_size=2", "parallel.pp_layers=[3,2]"], ["pp_layers"]),
    (["parallel.pp_size=2", "parallel.nnodes=2", "parallel.node_rank=2", "parallel.dist_init_addr=127.0.0.1:1"],
     ["node_rank=2"]),
    (["parallel.pp_size=2", "parallel.nnodes=2"], ["dist_init_addr"]),
    (["parallel.pp_size=3", "parallel.nnodes=2", "parallel.dist_init_addr=127.0.0.1:1"], ["multiple"]),
    (["parallel.pp_size=2", "parallel.dist_init_addr=nonsense"], ["HOST:PORT"]),
    (["parallel.pp_size=2", "parallel.stage_timeout_s=0"], ["stage_timeout_s"]),
    (["parallel.pp_size=2", "parallel.dist_init_addr=127.0.0.1:{busy}"], ["cannot be bound", "free port"]),
])
def test_bad_parallel_config_fails_before_anything_starts(ckpt, overrides, words):
    busy = _busy_port()
    try:
        overrides = [o.replace("{busy}", str(busy.getsockname()[1])) for o in overrides]
        before = _children()
        with pytest.raises(ValueError) as info:
            Engine(overrides=[f"model.path={ckpt('llama')}", *overrides])
        assert _children() == before
    finally:
        busy.close()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ---- two nodes on loopback through `loopserve serve` ---------------------------------------


def test_two_node_pipeline_through_loopserve_serve(ckpt):
    import httpx

    from server_util import ServerProc, free_port

    path = ckpt("qwen3")
    rdv = free_port()
    common = [f"model.path={path}", "parallel.pp_size=4", "parallel.nnodes=2",
              f"parallel.dist_init_addr=127.0.0.1:{rdv}", "parallel.stage_timeout_s=20"]
    # Node 1 first: its stages wait for node 0's rendezvous.
    node1 = subprocess.Popen([sys.executable, "-m", "loopserve.core.cli", "serve", *common, "parallel.node_rank=1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    srv = ServerProc(*common, "parallel.node_rank=0")
    try:
        srv.wait_ready()
        prompt = PROMPTS[3]
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        info = httpx.get(srv.url + "/server_info", timeout=10).json()
        assert srv.stop() == 0, srv.output()
        assert node1.wait(30) == 0, node1.stdout.read().decode()
    finally:
        srv.stop()
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait(10)
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as e:
        ref = e.generate(input_ids=prompt, sampling_params=greedy(N_NEW))[0]
    assert body["choices"][0]["text"] == ref.text
    assert info["loop"] == "pp" and info["pp_size"] == 4


def test_spans_carry_pp_rank_and_micro_batch_id_and_metrics_busy_per_stage(ckpt):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with Engine(overrides=[f"model.path={ckpt('llama')}", "parallel.pp_size=2", "tracing.sample_ratio=1.0"],
                    tracer_provider=provider) as e:
            e.generate(input_ids=PROMPTS[:4], sampling_params=PARAMS[:4], timeout=60)
            time.sleep(0.6)  # stage 1 publishes its counters every 0.25 s
            text = e.metrics()
            stats = e.worker.stage_stats()
    finally:
        provider.shutdown()
    iters = [s for s in exporter.get_finished_spans()
             if s.name == "loopserve.iteration" and s.attributes.get("loopserve.batch.size")]
    assert iters and all(s.attributes["loopserve.pp.rank"] == 0 for s in iters)
    ids = [s.attributes["loopserve.pp.micro_batch_id"] for s in iters]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # one id per launched micro-batch
    assert [st["pp_rank"] for st in stats] == [0, 1]
    assert all(st["forwards"] == len(ids) and 0 < st["busy_fraction"] <= 1 for st in stats), stats
    assert 'loopserve_pp_stage_busy_fraction{pp_rank="0"}' in text
    assert 'loopserve_pp_stage_busy_fraction{pp_rank="1"}' in text


def test_other_stages_export_spans_under_the_iteration_that_launched_them(ckpt, receiver):
    """With an exporter configured, every stage process exports one span per traced
    micro-batch, carrying its ``pp_rank`` and the micro-batch id, as a child of rank 0's
    iteration span that launched it (same trace, OTLP to a local receiver)."""
    from test_tracing import decode_otlp

    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    with Engine(overrides=[f"model.path={ckpt('llama')}", "parallel.pp_size=3", "tracing=otlp",
                           f"tracing.endpoint={endpoint}", "tracing.sample_ratio=1.0"]) as e:
        e.generate(input_ids=PROMPTS[:4], sampling_params=PARAMS[:4], timeout=60)
    spans = [sp for _, _, sp in decode_otlp(receiver.bodies)]

    def attrs(sp):
        return {a.key: (a.value.int_value if a.value.HasField("int_value") else a.value.string_value)
                for a in sp.attributes}

    iterations = {(sp.trace_id, sp.span_id): attrs(sp) for sp in spans if sp.name == "loopserve.iteration"}
    stage = [sp for sp in spans if sp.name == "loopserve.pp.stage_forward"]
    by_rank = {r: [attrs(sp)["loopserve.pp.micro_batch_id"] for sp in stage if attrs(sp)["loopserve.pp.rank"] == r]
               for r in (1, 2)}
    launched = sorted(a["loopserve.pp.micro_batch_id"] for a in iterations.values()
                      if "loopserve.pp.micro_batch_id" in a)
    assert launched and sorted(by_rank[1]) == launched and sorted(by_rank[2]) == launched
    for sp in stage:
        parent = iterations.get((sp.trace_id, sp.parent_span_id))
        assert parent is not None, "a stage span outside the iteration that launched it"
        assert parent["loopserve.pp.micro_batch_id"] == attrs(sp)["loopserve.pp.micro_batch_id"]
        assert parent["loopserve.pp.rank"] == 0


def test_a_stage_that_cannot_load_fails_the_start_with_its_reason(ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = ckpt("llama")
    bad = tmp_path / "no-last-layer"
    shutil.copytree(src, bad)
    weights = load_file(str(bad / "model.safetensors"))
    del weights["model.layers.3.mlp.up_proj.weight"]  # stage 1's layer (layers 2-3 of 4)
    save_file(weights, str(bad / "model.safetensors"))
    before = _children()
    with pytest.raises(ValueError, match="stage 1 failed to start.*model.layers.3.mlp.up_proj.weight"):
        Engine(overrides=[f"model.path={bad}", "parallel.pp_size=2"])
    deadline = time.monotonic() + 10
    while _children() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children() == before
