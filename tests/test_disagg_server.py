"""Disaggregated serving end to end: a prefill server and a decode server (``loopserve serve``)
behind ``sglang-router --pd-disaggregation``, driven by the official ``openai`` client and plain
HTTP. Greedy outputs must equal a single server's for completions, chat and ``/generate``,
streamed and not, under concurrency, with the zmq and the mooncake backend; missing halves
and a dead prefill server fail their request within ``transfer_timeout_s`` and leave both
servers healthy and idle."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from server_util import ServerProc, free_port

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

ROUTER = shutil.which("sglang-router")
TIMEOUT_S = 10.0  # disaggregation.transfer_timeout_s of the servers here (a loaded CPU queues prefills)
PROMPTS = ["The quick brown fox", "Hello world, this is loopserve", "a"]


def _mooncake_available() -> bool:
    if os.environ.get("CI"):
        return True  # CI installs it (.ci/run, the test extra): a missing install must fail there
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


class Router:
    def __init__(self, prefill: ServerProc, bootstrap_port: int, decode: ServerProc) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"loopserve-router-{self.port}.log"), "w+b")
        self.proc = subprocess.Popen(
            [ROUTER, "launch", "--pd-disaggregation", "--prefill", prefill.url, str(bootstrap_port),
             "--decode", decode.url, "--host", "127.0.0.1", "--port", str(self.port),
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn",
             "--worker-startup-timeout-secs", "60"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "sglang-router exited"
            try:
                r = httpx.post(self.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {
                    "max_new_tokens": 1, "temperature": 0}}, timeout=10)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("sglang-router did not route a request within 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


class Cluster:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.bootstrap_port = free_port()
        common = [f"disaggregation.transfer_backend={backend}", f"disaggregation.transfer_timeout_s={TIMEOUT_S}"]
        self.servers: list[ServerProc] = []
        self.router: Router | None = None
        try:
            self.prefill = self._start(*common, "disaggregation.mode=prefill",
                                       f"disaggregation.bootstrap_port={self.bootstrap_port}")
            self.decode = self._start(*common, "disaggregation.mode=decode")
            for s in self.servers:
                s.wait_ready()
            self.router = Router(self.prefill, self.bootstrap_port, self.decode)
        except BaseException:
            self.stop()
            raise

    def _start(self, *overrides: str) -> ServerProc:
        s = ServerProc(*overrides)
        self.servers.append(s)
        return s

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="module")
def single():
    srv = ServerProc()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module", params=["zmq", pytest.param("mooncake", marks=pytest.mark.skipif(
    not _mooncake_available(), reason="mooncake-transfer-engine-non-cuda is not installed"))])
def cluster(request):
    if ROUTER is None:
        if os.environ.get("CI"):
            pytest.fail("sglang-router is not installed (the test extra installs it)")
        pytest.skip("sglang-router is not installed")
    c = Cluster(request.param)
    try:
        yield c
    finally:
        c.stop()


def oa(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60.0, max_retries=0)


def completion(url: str, stream: bool, prompt=PROMPTS[0], **kw) -> list[str]:
    client = oa(url)
    args = dict(model="loopserve-tiny", prompt=prompt, max_tokens=10, temperature=0.0, **kw)
    if not stream:
        r = client.completions.create(**args)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    return [texts[i] for i in sorted(texts)]


def chat(url: str, stream: bool) -> str:
    client = oa(url)
    args = dict(model="loopserve-tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=10,
                temperature=0.0)
    if not stream:
        return client.chat.completions.create(**args).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                   if c.choices)


def assert_idle(*servers: ServerProc) -> None:
    """Healthy (the loop and its idle KV check run) and nothing left queued or running."""
    for s in servers:
        deadline = time.monotonic() + 10
        while True:
            load = httpx.get(s.url + "/get_load", timeout=10).json()[0]
            if load["num_reqs"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert load["num_reqs"] == 0
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert httpx.get(s.url + "/health_generate", timeout=30).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_equal_a_single_server(cluster, single, stream):
    assert completion(cluster.router.url, stream) == completion(single.url, stream)
    # A batch: the router sends lists of bootstrap fields.
    assert completion(cluster.router.url, stream, prompt=PROMPTS) == completion(single.url, stream, prompt=PROMPTS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_equals_a_single_server(cluster, single, stream):
    assert chat(cluster.router.url, stream) == chat(single.url, stream)


def test_generate_equals_a_single_server(cluster, single):
    body = {"input_ids": [[1, 72, 101, 108], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]],
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    got = httpx.post(cluster.router.url + "/generate", json=body, timeout=60).json()
    want = httpx.post(single.url + "/generate", json=body, timeout=60).json()
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    one = {"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "stream": True}
    with httpx.stream("POST", cluster.router.url + "/generate", json=one, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    import json

    last = json.loads(events[-2][6:])
    want_one = httpx.post(single.url + "/generate", json={**one, "stream": False}, timeout=60).json()
    assert last["output_ids"] == want_one["output_ids"] and last["text"] == want_one["text"]


def test_concurrent_requests(cluster, single):
    prompts = [f"request number {i} " * (1 + i % 5) for i in range(16)]

    async def run(url: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=120.0, max_retries=0)
        outs = await asyncio.gather(*(client.completions.create(
            model="loopserve-tiny", prompt=p, max_tokens=6, temperature=0.0) for p in prompts))
        await client.close()
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run(cluster.router.url)) == asyncio.run(run(single.url))
    assert_idle(cluster.prefill, cluster.decode)


def test_bootstrap_fields_missing_malformed_or_reused_are_400(cluster):
    url = cluster.decode.url + "/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 400 and "bootstrap_host" in r.json()["error"]["message"]
    r = httpx.post(url, json={**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": 1, "bootstrap_room": "x"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_room"
    r = httpx.post(url, json={**body, "bootstrap_host": "http://127.0.0.1", "bootstrap_port": 1, "bootstrap_room": 3},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_host"
    r = httpx.post(url, json={**body, "prompt": ["a", "b"], "bootstrap_host": "127.0.0.1",
                              "bootstrap_port": cluster.bootstrap_port, "bootstrap_room": [1]}, timeout=30)
    assert r.status_code == 400 and "one per sequence" in r.json()["error"]["message"]
    # A room in flight cannot be used again; it is free once its request ended.
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": cluster.bootstrap_port, "bootstrap_room": 777}
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=httpx.post(url, json={**body, **fields}, timeout=60)))
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(cluster.decode.url + "/get_load", timeout=10).json()[0]["num_waiting_reqs"] == 0:
        assert time.monotonic() < deadline, "the first request never reached the decode server"
        time.sleep(0.05)
    r = httpx.post(url, json={**body, **fields}, timeout=30)
    assert r.status_code == 400 and "already in use" in r.json()["error"]["message"]
    # The prefill half arrives: both finish.
    p = httpx.post(cluster.prefill.url + "/v1/completions", json={**body, **fields}, timeout=60)
    t.join(60)
    assert p.status_code == 200 and first["r"].status_code == 200
    assert_idle(cluster.prefill, cluster.decode)


def test_missing_halves_fail_within_the_timeout_and_free_kv(cluster):
    body = {"prompt": "lonely", "max_tokens": 3, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": cluster.bootstrap_port}
    got: dict = {}

    def post(server: ServerProc, room: int) -> None:
        t0 = time.monotonic()
        got[room] = (httpx.post(server.url + "/v1/completions", json={**body, "bootstrap_room": room}, timeout=60),
                     time.monotonic() - t0)

    # Both at once (each waits out the timeout): decode without its prefill half, and the reverse.
    threads = [threading.Thread(target=post, args=a) for a in ((cluster.decode, 901), (cluster.prefill, 902))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (r, took), (r2, _) = got[901], got[902]
    assert r.status_code >= 500 and "KV transfer failed" in r.json()["error"]["message"]
    assert took < TIMEOUT_S + 3
    assert r2.status_code >= 500 and "did not ask" in r2.json()["error"]["message"]
    assert_idle(cluster.prefill, cluster.decode)
    assert completion(cluster.router.url, False)  # still serving


def kv_usage(server: ServerProc) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("loopserve_kv_cache_usage_ratio"))
    return float(line.split()[-1])


def test_prefill_server_dies(cluster):
    """The decode server found the prefill server and reserved KV, then the prefill server is
    killed: its connection closes, so the request fails at once (well within the timeout), its
    KV is freed, the decode server serves on."""
    if cluster.backend != "zmq":
        pytest.skip("one backend is enough for the process-death case")
    bport = free_port()
    doomed = ServerProc("disaggregation.mode=prefill", f"disaggregation.bootstrap_port={bport}",
                        f"disaggregation.transfer_timeout_s={TIMEOUT_S}")
    try:
        doomed.wait_ready()
        body = {"prompt": "orphaned", "max_tokens": 3, "bootstrap_host": "127.0.0.1", "bootstrap_port": bport,
                "bootstrap_room": 903}
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(
            r=httpx.post(cluster.decode.url + "/v1/completions", json=body, timeout=60)))
        t.start()
        # The decode server looks the prefill server up, connects and reserves the request's KV.
        deadline = time.monotonic() + 30
        while kv_usage(cluster.decode) == 0.0:
            assert time.monotonic() < deadline and "r" not in result, "the decode server never reserved KV"
            time.sleep(0.05)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        if doomed.scheduler_pid is not None:
            try:
                os.kill(doomed.scheduler_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        start = time.monotonic()
        t.join(60)
        # The connection closed: the request fails at once, not at the timeout.
        assert time.monotonic() - start < TIMEOUT_S / 2
        r = result["r"]
        assert r.status_code >= 500 and "KV transfer failed" in r.json()["error"]["message"]
        assert "closed the connection" in r.json()["error"]["message"]
    finally:
        doomed.stop()
    assert_idle(cluster.decode)
