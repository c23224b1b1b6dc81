"""Disaggregated prefill and decode under pipeline parallelism: the ``pp`` variants of the
``disagg_prefill`` / ``disagg_decode`` loops.

Each pipeline stage holds its own layers' KV and moves it itself (core/disagg/staged.py), so
the two servers may split the layers differently: a prefill over 2 stages feeding a decode on
1, 1 feeding 2, 2 feeding 3 (4 layers: 2+2 against 2+1+1). Greedy outputs must equal a
single engine's (and so transformers'), also with chunked prefill; a decode request whose KV
never comes fails within the timeout on every stage and leaves both servers idle; the same
through ``loopserve serve`` behind sglang-router with the openai client, and a prefill pipeline
over two "nodes" on loopback driven without a router.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from hf_reference import engine_reference, random_id_prompts
from loopserve.core import Engine, SamplingParams
from loopserve.core.disagg.decode import DecodeScheduler
from loopserve.core.disagg.prefill import PrefillScheduler
from loopserve.core.disagg.staged import StagedKVManager
from loopserve.core.pp.scheduler import PPScheduler
from server_util import ServerProc
from test_disagg import assert_idle, bootstrap, run_disagg
from test_disagg_server import ROUTER, Router, _mooncake_available, assert_idle as assert_servers_idle, oa

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TIMEOUT = 120
PROMPTS = random_id_prompts([1, 5, 17, 30, 44, 9, 23, 3], seed=23)
PARAMS = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (9, 4, 9, 2, 7, 9, 3, 6)]


@pytest.fixture(scope="module")
def reference(ckpt):
    return engine_reference(ckpt, PROMPTS, PARAMS)


def make_pair(model: str, pp_prefill: int, pp_decode: int, *overrides: str):
    common = [f"model.path={model}", "disaggregation.bootstrap_port=0", "kv_cache.num_tokens=2048", *overrides]
    prefill = Engine(overrides=[*common, "disaggregation.mode=prefill", f"parallel.pp_size={pp_prefill}"])
    try:
        decode = Engine(overrides=[*common, "disaggregation.mode=decode", f"parallel.pp_size={pp_decode}"])
    except BaseException:
        prefill.shutdown()
        raise
    return prefill, decode


def _mooncake(backend: str) -> list:
    return [] if backend != "mooncake" else [pytest.mark.skipif(
        not _mooncake_available(), reason="mooncake-transfer-engine-non-cuda is not installed")]


@pytest.mark.parametrize("arch,pp_prefill,pp_decode,backend,extra", [
    pytest.param("llama", 2, 1, "zmq", [], id="llama-p2-d1"),
    pytest.param("qwen3", 1, 2, "zmq", ["scheduler.chunked_prefill_size=16"], id="qwen3-p1-d2-chunked"),
    pytest.param("qwen2", 2, 3, "zmq", ["kv_cache.page_size=1", "scheduler.chunked_prefill_size=7"],
                 id="qwen2-p2-d3-chunked-page1"),
    pytest.param("llama", 2, 2, "mooncake", ["scheduler.chunked_prefill_size=16"], id="llama-p2-d2-mooncake",
                 marks=_mooncake("mooncake")),
])
def test_outputs_equal_one_engine(ckpt, reference, arch, pp_prefill, pp_decode, backend, extra):
    p, d = make_pair(ckpt(arch), pp_prefill, pp_decode, f"disaggregation.transfer_backend={backend}", *extra)
    try:
        assert isinstance(p.scheduler, PrefillScheduler) and isinstance(d.scheduler, DecodeScheduler)
        assert isinstance(d.scheduler, PPScheduler) == (pp_decode > 1)
        for engine, pp in ((p, pp_prefill), (d, pp_decode)):
            # Every stage runs its own transfer manager: no KV crosses the pipeline.
            assert isinstance(engine.scheduler.kv_manager, StagedKVManager) == (pp > 1)
            assert engine.loop.runner.depth == (pp - 1 if pp > 1 else 0)
        outs = run_disagg(p, d, PARAMS, input_ids=PROMPTS)
        assert [o.error for o in outs] == [None] * len(PROMPTS)
        assert [o.token_ids for o in outs] == reference(arch)
        # A second round reuses rooms' endpoints and the prefill's prefix cache.
        outs = run_disagg(p, d, PARAMS, input_ids=PROMPTS)
        assert [o.token_ids for o in outs] == reference(arch)
        assert_idle(p, d)
    finally:
        d.shutdown()
        p.shutdown()


def test_kv_that_never_comes_fails_on_every_stage_and_frees_it(ckpt, reference):
    """The prefill half of a request never arrives: the decode server (2 stages) fails it
    within the timeout, its pages and every stage's room are freed, the prefill stages drop
    the decode side's early requests, and both servers go on serving."""
    p, d = make_pair(ckpt("llama"), 2, 2, "disaggregation.transfer_timeout_s=2")
    try:
        kw = bootstrap(p, 1)
        start = time.monotonic()
        (out,) = d.generate(input_ids=[PROMPTS[1]], sampling_params=PARAMS[1], timeout=TIMEOUT, **kw)
        assert out.finish_reason == "abort" and "KV transfer failed" in out.error
        assert time.monotonic() - start < 8.0
        outs = run_disagg(p, d, PARAMS, input_ids=PROMPTS)
        assert [o.token_ids for o in outs] == reference("llama")
        assert_idle(p, d)
        assert not d.scheduler.kv_manager._parts and not p.scheduler.kv_manager._parts
    finally:
        d.shutdown()
        p.shutdown()


def test_abort_while_the_stages_wait_for_kv(ckpt):
    p, d = make_pair(ckpt("llama"), 2, 2)
    try:
        kw = bootstrap(p, 1)
        kw["bootstrap_room"] = kw["bootstrap_room"][0]
        handle = d.submit(input_ids=PROMPTS[4], sampling_params=PARAMS[4], **kw)
        time.sleep(0.3)
        d.abort(handle.rid)
        assert handle.result(TIMEOUT).finish_reason == "abort"
        assert_idle(d)
    finally:
        d.shutdown()
        p.shutdown()


def test_pipelined_servers_behind_sglang_router():
    """``loopserve serve`` with 2 prefill stages and 2 decode stages (the tiny model's 4 layers
    split 3+1 and 1+3), behind sglang-router, against one plain server: completions (streamed
    and not, a batch of prompts), chat and ``/generate``."""
    if ROUTER is None:
        if os.environ.get("CI"):
            pytest.fail("sglang-router is not installed (the test extra installs it)")
        pytest.skip("sglang-router is not installed")
    from server_util import free_port

    boot = free_port()
    common = ["disaggregation.transfer_timeout_s=20", "parallel.pp_size=2"]
    servers = [ServerProc(), ServerProc(*common, "disaggregation.mode=prefill", "parallel.pp_layers=[3,1]",
                                        f"disaggregation.bootstrap_port={boot}"),
               ServerProc(*common, "disaggregation.mode=decode", "parallel.pp_layers=[1,3]")]
    router = None
    try:
        single, prefill, decode = (s.wait_ready() for s in servers)
        router = Router(prefill, boot, decode)
        prompts = ["The quick brown fox", "Hello world, this is loopserve", "a"]

        def completions(url, stream):
            args = dict(model="loopserve-tiny", prompt=prompts, max_tokens=10, temperature=0.0)
            if not stream:
                r = oa(url).completions.create(**args)
                return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
            texts: dict[int, str] = {}
            for chunk in oa(url).completions.create(stream=True, **args):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
            return [texts[i] for i in sorted(texts)]

        want = completions(single.url, False)
        assert completions(router.url, False) == want
        assert completions(router.url, True) == want
        chat = dict(model="loopserve-tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8,
                    temperature=0.0)
        assert (oa(router.url).chat.completions.create(**chat).choices[0].message.content
                == oa(single.url).chat.completions.create(**chat).choices[0].message.content)
        body = {"input_ids": [5, 6, 7, 8, 9] * 7, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
        got = httpx.post(router.url + "/generate", json=body, timeout=60).json()
        ref = httpx.post(single.url + "/generate", json=body, timeout=60).json()
        assert got["output_ids"] == ref["output_ids"] and got["meta_info"]["completion_tokens"] == 6
        # Under concurrency.
        results: list = [None] * 6

        def one(i):
            results[i] = completions(router.url, i % 2 == 1)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [want] * 6
        assert_servers_idle(prefill, decode)
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()


def test_two_node_prefill_pipeline_without_a_router(ckpt):
    """The prefill server's pipeline spans two "nodes" on loopback (node 1 runs stage 1 and
    its transfer manager); a plain decode server; each request POSTed to both servers with the
    same bootstrap fields, as the router would."""
    import signal
    import subprocess
    import sys

    from server_util import free_port

    path = ckpt("llama")
    rdv, boot = free_port(), free_port()
    common = [f"model.path={path}", "disaggregation.transfer_timeout_s=20"]
    prefill_args = [*common, "disaggregation.mode=prefill", f"disaggregation.bootstrap_port={boot}",
                    "parallel.pp_size=2", "parallel.nnodes=2", f"parallel.dist_init_addr=127.0.0.1:{rdv}",
                    "parallel.stage_timeout_s=20"]
    node1 = subprocess.Popen([sys.executable, "-m", "loopserve.core.cli", "serve", *prefill_args,
                              "parallel.node_rank=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    servers = [ServerProc(*prefill_args, "parallel.node_rank=0"), ServerProc(*common, "disaggregation.mode=decode")]
    try:
        prefill, decode = (s.wait_ready() for s in servers)
        bodies = [{"input_ids": ids, "sampling_params": {"max_new_tokens": sp.max_new_tokens, "temperature": 0,
                                                         "ignore_eos": True},
                   "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": 7000 + i}
                  for i, (ids, sp) in enumerate(zip(PROMPTS[:4], PARAMS[:4]))]
        answers: dict = {}

        def post(server, i):
            answers[(server.url, i)] = httpx.post(server.url + "/generate", json=bodies[i], timeout=60)

        threads = [threading.Thread(target=post, args=(s, i)) for i in range(4) for s in (prefill, decode)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert all(answers[(prefill.url, i)].status_code == 200 for i in range(4))
        got = [answers[(decode.url, i)].json()["output_ids"] for i in range(4)]
        assert servers[0].stop() == 0, servers[0].output()
        assert node1.wait(30) == 0, node1.stdout.read().decode()
    finally:
        for s in servers:
            s.stop()
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait(10)
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as e:
        ref = [o.token_ids for o in e.generate(input_ids=PROMPTS[:4], sampling_params=PARAMS[:4])]
    assert got == ref
