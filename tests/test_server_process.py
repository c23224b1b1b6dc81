"""``loopserve serve`` as a process: API-key auth, the queue limit, SIGTERM, and the scheduler
process dying under it. Each test starts its own server (they end it)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server_util import ServerProc, pid_alive

pytestmark = pytest.mark.timeout(240)


def _stream_lines(url: str, body: dict, out: list, headers: dict | None = None) -> None:
    """Read an SSE stream into ``out`` (run in a thread); a transport error is recorded too."""
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                if line:
                    out.append(line)
    except httpx.HTTPError as exc:
        out.append(exc)


def test_api_key_and_queue_limit():
    srv = ServerProc("server.api_key=sekret", "server.max_queued_requests=1")
    try:
        srv.wait_ready(headers={"Authorization": "Bearer sekret"})
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # open for probes
        for path in ("/v1/models", "/metrics", "/get_server_info"):
            r = httpx.get(srv.url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", timeout=60, max_retries=0)
        assert client.completions.create(model="loopserve-tiny", prompt="hi", max_tokens=2).choices
        # n=2 would queue two requests with room for one.
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "n": 2},
                       headers={"Authorization": "Bearer sekret"}, timeout=10)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "server.max_queued_requests" in r.json()["error"]["message"]
    finally:
        assert srv.stop() == 0, srv.output()


def test_api_key_from_environment(monkeypatch):
    from loopserve.core.config import compose_config
    from loopserve.core.server.launch import resolve_api_key

    monkeypatch.setenv("LOOPSERVE_API_KEY", "from-env")
    assert resolve_api_key(compose_config([])) == "from-env"
    assert resolve_api_key(compose_config(["server.api_key=cfg"])) == "cfg"
    monkeypatch.delenv("LOOPSERVE_API_KEY")
    assert resolve_api_key(compose_config([])) is None


def test_sigterm_finishes_in_flight_then_exits_0_without_orphans():
    srv = ServerProc()
    srv.wait_ready()
    lines: list = []
    t = threading.Thread(target=_stream_lines, args=(srv.url + "/v1/completions", {
        "prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True}, lines))
    t.start()
    deadline = time.monotonic() + 30
    while len(lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(60)
    t.join(30)
    assert code == 0, srv.output()
    assert lines[0] == 200 and lines[-1] == "data: [DONE]"
    finals = [json.loads(x[6:]) for x in lines[1:-1] if isinstance(x, str)]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"  # it finished, not aborted
    assert not pid_alive(srv.scheduler_pid)
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.url + "/health", timeout=2)
    srv.stop()


def test_scheduler_killed_health_503_requests_error_serve_exits_nonzero():
    srv = ServerProc()
    srv.wait_ready()
    try:
        lines: list = []
        t = threading.Thread(target=_stream_lines, args=(srv.url + "/v1/completions", {
            "prompt": "x", "max_tokens": 1900, "ignore_eos": True, "stream": True}, lines))
        t.start()
        deadline = time.monotonic() + 30
        while len(lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(srv.scheduler_pid, signal.SIGKILL)
        # The property: once the kernel has ended the process, /health never says 200 again.
        # Time counts from then, not from the kill: a loaded host can take a while to end a
        # killed process (a CI run once saw a 200 more than 5 s after the kill).
        t0 = time.monotonic()
        gone_at = None
        seen = []  # (start, end, status, gone before the request started) for the failure message
        while True:
            start = time.monotonic()
            gone = not pid_alive(srv.scheduler_pid)
            if gone and gone_at is None:
                gone_at = start
            status = httpx.get(srv.url + "/health", timeout=10).status_code
            seen.append((round(start - t0, 2), round(time.monotonic() - t0, 2), status, gone))
            if status == 503:
                break
            assert not gone, f"/health said {status} about a scheduler that had ended: {seen}"
            assert time.monotonic() - t0 < 60, f"the killed scheduler process is still alive: {seen}"
            time.sleep(0.05)
        assert gone_at is None or time.monotonic() - gone_at < 5, seen
        t.join(30)
        assert not t.is_alive(), "the pending request hangs"
        errors = [x for x in lines if isinstance(x, str) and x.startswith('data: {"error"')]
        assert errors and "died" in errors[0], lines[-3:]
        assert lines[-1] == "data: [DONE]"
        # New requests are refused while the port is still open.
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 503
        assert srv.proc.wait(30) != 0
    finally:
        srv.stop()


@pytest.mark.parametrize("override,needle", [
    ("server.port=70000", "server.port"),
    ("loop=no_such_loop", "no_such_loop"),
    ("model.path=/nonexistent/model", "/nonexistent/model"),  # found by the scheduler process
])
def test_bad_config_exits_2_naming_it(override, needle):
    import subprocess
    import sys

    from server_util import free_port

    port = [] if override.startswith("server.port") else [f"server.port={free_port()}"]
    proc = subprocess.run([sys.executable, "-m", "loopserve.core.cli", "serve", *port, override],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "loopserve serve: error:" in proc.stderr and needle in proc.stderr


def test_sim_worker_and_overlap_loop_serve_token_ids():
    """Any worker and loop plugin runs in the scheduler process: the sim worker (no tokenizer,
    no logprobs) under the overlap loop."""
    from loopserve.plugins.worker_sim import reference_tokens

    srv = ServerProc("worker=sim", "worker.params.model=qwen3-0.6b", "worker.params.sleep=false", "loop=overlap")
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/server_info", timeout=10).json()
        assert info["loop"] == "overlap" and info["worker"] == "sim"
        vocab = httpx.get(srv.url + "/model_info", timeout=10).json()["vocab_size"]
        r = httpx.post(srv.url + "/generate", json={"input_ids": [5, 6, 7], "sampling_params": {
            "max_new_tokens": 6}}, timeout=30).json()
        assert r["output_ids"] == reference_tokens([5, 6, 7], 6, vocab) and r["text"] == ""
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "text", "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "token ids" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 1},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"] == "logprobs not supported by this worker"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 6}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    finally:
        assert srv.stop() == 0, srv.output()


def test_overlap_loop_logprobs_line_up_with_tokens():
    """Under the overlap loop a result can arrive after its request's row was reused; logprobs
    are kept by output position, so each token still gets its own."""
    srv = ServerProc("loop=overlap", "scheduler.max_running_requests=4")
    try:
        srv.wait_ready()

        def one(i: int) -> dict:
            return httpx.post(srv.url + "/generate", timeout=60, json={
                "input_ids": [1, 40 + i, 50 + i], "return_logprob": True, "top_logprobs_num": 2,
                "sampling_params": {"max_new_tokens": 3 + i % 5, "temperature": 0, "ignore_eos": True}}).json()

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        for i, r in enumerate(results):
            meta = r["meta_info"]
            assert len(r["output_ids"]) == 3 + i % 5
            assert [t for _, t, _ in meta["output_token_logprobs"]] == r["output_ids"]
            # Greedy: each token is the top alternative computed for that very position.
            assert [top[0][1] for top in meta["output_top_logprobs"]] == r["output_ids"]
            assert all(lp == top[0][0] for (lp, _, _), top in zip(meta["output_token_logprobs"],
                                                                   meta["output_top_logprobs"]))
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.mark.parametrize("loop", ["normal", "overlap"])
def test_logprobs_through_chunked_prefill_and_retraction_equal_transformers(loop):
    """A KV pool too small for the load (requests are retracted and recomputed) and 8-token
    prefill chunks: every request's prompt and output logprobs still equal transformers' for
    its own tokens, and each is reported once."""
    import random

    from hf_reference import hf_greedy, hf_token_logprobs

    srv = ServerProc(f"loop={loop}", "kv_cache.num_tokens=200", "kv_cache.page_size=4",
                     "scheduler.chunked_prefill_size=8", "scheduler.init_new_token_ratio=0.05",
                     "scheduler.min_new_token_ratio=0.0")
    rng = random.Random(5)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(8, 30))] for _ in range(10)]
    ns = [rng.randrange(24, 48) for _ in prompts]
    try:
        srv.wait_ready()
        path = httpx.get(srv.url + "/server_info", timeout=10).json()["model_path"]

        # One batch call: all requests arrive together, whatever the machine's load.
        results = httpx.post(srv.url + "/generate", timeout=120, json={
            "input_ids": prompts, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1,
            "sampling_params": [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in ns]}).json()
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    finally:
        assert srv.stop() == 0, srv.output()
    retractions = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("loopserve_retractions_total")]
    assert retractions and retractions[0] > 0, "the pool was not small enough to retract"
    for p, n, r in zip(prompts, ns, results):
        out, meta = r["output_ids"], r["meta_info"]
        assert out == hf_greedy(path, p, n, ignore_eos=True)
        ref = hf_token_logprobs(path, p + out)
        inputs = meta["input_token_logprobs"]
        assert [t for _, t, _ in inputs] == p and inputs[0][0] is None
        assert [v for v, _, _ in inputs[1:]] == pytest.approx(ref[:len(p) - 1], abs=1e-4)
        assert [t for _, t, _ in meta["output_token_logprobs"]] == out
        assert [v for v, _, _ in meta["output_token_logprobs"]] == pytest.approx(ref[len(p) - 1:], abs=1e-4)


def test_logprobs_under_pipeline_parallelism_equal_transformers():
    """pp_size=2: the last stage computes the logprobs and sends them back with the tokens."""
    import random

    from hf_reference import hf_greedy, hf_token_logprobs

    srv = ServerProc("parallel.pp_size=2", "scheduler.chunked_prefill_size=8")
    rng = random.Random(9)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/server_info", timeout=10).json()
        assert info["loop"] == "pp"
        results = httpx.post(srv.url + "/generate", timeout=120, json={
            "input_ids": prompts, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}).json()
        plain = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "prompt": prompts[0], "max_tokens": 3, "temperature": 0, "ignore_eos": True}).json()
    finally:
        assert srv.stop() == 0, srv.output()
    assert len(plain["choices"][0]["text"]) > 0
    for p, r in zip(prompts, results):
        out, meta = r["output_ids"], r["meta_info"]
        assert out == hf_greedy(info["model_path"], p, 6, ignore_eos=True)
        ref = hf_token_logprobs(info["model_path"], p + out)
        assert [v for v, _, _ in meta["input_token_logprobs"][1:]] == pytest.approx(ref[:len(p) - 1], abs=1e-4)
        assert [v for v, _, _ in meta["output_token_logprobs"]] == pytest.approx(ref[len(p) - 1:], abs=1e-4)
        assert all(len(top) == 2 and top[0][1] == t for top, t in zip(meta["output_top_logprobs"], out))
