"""``loopserve bench bench.mode=http``: the throughput workload through the HTTP server.

Drives a running server (``bench.url=http://host:port``) or starts ``loopserve serve`` with the
same overrides on a free loopback port and stops it afterwards. Every request of the fixed-seed
workload (the same one ``loopserve bench`` runs in-process: token ids, greedy, ignore_eos) is sent
at once as a streamed ``/v1/completions`` call; the server sends one chunk per loop step that
produced tokens, so the client times the first token (TTFT) and the gaps between tokens (ITL).
The summary adds the server's busy fraction over the run (worker forward time from ``/metrics``
divided by the run's duration).

The streams are read by a small HTTP/1.1 client on asyncio streams (``http://`` URLs; httpx for
``https://``): the load generator shares the machine with the server in this benchmark, and
httpx's per-chunk cost made the client, not the server, the bottleneck (about 3x the
frontend's CPU time at the default workload).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from loopserve.core.bench.throughput import bench_workload, make_workload, percentile

START_TIMEOUT_S = 600.0
RUN_TIMEOUT_S = 3600.0  # the longest a benchmark's requests may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A ``loopserve serve`` child for the run (its output goes to stderr)."""

    def __init__(self, overrides: list[str]) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        keep = [o for o in overrides if not o.lstrip("+~").startswith(("bench.", "server.port", "server.host"))]
        self.proc = subprocess.Popen([sys.executable, "-m", "loopserve.core.cli", "serve", *keep,
                                      "server.host=127.0.0.1", f"server.port={port}"],
                                     stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)

    def wait_ready(self, headers: dict[str, str]) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loopserve serve exited with code {self.proc.returncode} while starting")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"loopserve serve did not answer within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _forward_seconds(url: str, headers: dict[str, str]) -> float:
    import httpx

    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    m = re.search(r"^loopserve_forward_time_seconds_total(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _body(ids: list[int], n: int) -> dict[str, Any]:
    return {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


class _Events:
    """The parsed SSE events of one stream: chunk times, completion tokens, an error."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens = 0
        self.error: str | None = None

    def add(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        chunk = _json_decode(data)
        if "error" in chunk:
            self.error = chunk["error"]["message"]
        elif "output_ids" in chunk:  # SGLang's /generate: every chunk has all tokens so far
            n = len(chunk["output_ids"])  # one time per token (a chunk may carry several)
            self.times.extend([time.perf_counter()] * (n - self.tokens))
            self.tokens = n
        elif chunk.get("choices"):
            self.times.append(time.perf_counter())
        elif chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]


def _json_decode(data: bytes) -> Any:
    import msgspec

    return msgspec.json.decode(data)


async def _one_raw(host: str, port: int, headers: dict[str, str], ids: list[int], n: int,
                   path: str = "/v1/completions", request: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed completion over a plain HTTP/1.1 connection (chunked transfer encoding);
    ``request`` replaces the body (``path`` the route), for SGLang's streamed ``/generate``."""
    import msgspec

    body = msgspec.json.encode(request if request is not None else _body(ids, n))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      f"Accept: text/event-stream\r\nConnection: close\r\n{head}\r\n").encode() + body)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            chunked |= k.strip().lower() == "transfer-encoding" and "chunked" in v.lower()
        if status != 200 or not chunked:
            rest = await reader.read()
            return {"error": f"HTTP {status}: {rest.decode(errors='replace')[:200]}"}
        events, buf = _Events(), b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:end], buf[end + 2:]
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        events.add(line[6:])
    finally:
        writer.close()
    return {"t0": t0, "times": events.times, "tokens": events.tokens, "error": events.error}


async def _one(client: Any, url: str, ids: list[int], n: int) -> dict[str, Any]:
    body = _body(ids, n)
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    error = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("choices"):
                times.append(time.perf_counter())
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"t0": t0, "times": times, "tokens": tokens, "error": error}


async def _run_all(url: str, headers: dict[str, str], inputs: list[list[int]], outs: list[int],
                   raw: bool = True) -> list[dict]:
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    if raw and parts.scheme == "http" and parts.path in ("", "/"):
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        # Bounded like the httpx path below (a read times out after RUN_TIMEOUT_S): a server that
        # stops answering ends the run with TimeoutError instead of hanging it.
        return await asyncio.wait_for(
            asyncio.gather(*(_one_raw(host, port, headers, ids, n) for ids, n in zip(inputs, outs))), RUN_TIMEOUT_S)

    limits = httpx.Limits(max_connections=len(inputs) + 8, max_keepalive_connections=len(inputs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(RUN_TIMEOUT_S, connect=30.0), limits=limits,
                                 headers=headers) as client:
        return await asyncio.gather(*(_one(client, url, ids, n) for ids, n in zip(inputs, outs)))


def run_http(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    import httpx

    b = cfg.bench
    from loopserve.core.server.launch import resolve_api_key

    key = resolve_api_key(cfg)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    server = None
    url = str(b.url).rstrip("/") if b.url else None
    if url is None:
        server = _Server(overrides)
        url = server.url
    try:
        if server is not None:
            server.wait_ready(headers)
        info = httpx.get(url + "/get_model_info", headers=headers, timeout=30).json()
        sinfo = httpx.get(url + "/get_server_info", headers=headers, timeout=30).json()
        vocab = int(info["vocab_size"])
        workload = bench_workload(b, vocab)
        if b.warmup:
            warm = make_workload(vocab, min(8, b.num_requests), (8, 64), (8, 8), seed=b.seed + 1)
            asyncio.run(_run_all(url, headers, warm.input_ids, warm.output_lens))
        fwd0 = _forward_seconds(url, headers)
        t0 = time.perf_counter()
        results = asyncio.run(_run_all(url, headers, workload.input_ids, workload.output_lens))
        duration = time.perf_counter() - t0
        fwd1 = _forward_seconds(url, headers)
    finally:
        if server is not None:
            server.stop()
    ok = [r for r in results if not r.get("error")]
    out_tokens = sum(r["tokens"] for r in ok)
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    itl = [b2 - a for r in ok for a, b2 in zip(r["times"], r["times"][1:])]

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(1e3 * v, 3)

    return {
        "bench": "http",
        "url": url,
        "server_started": server is not None,
        "loop": sinfo.get("loop"),
        "policy": sinfo.get("policy"),
        "worker": sinfo.get("worker"),
        "model": sinfo.get("served_model_name"),
        "num_requests": len(results),
        "failed_requests": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if r.get("error")), None),
        "total_input_tokens": workload.total_input_tokens,
        "total_output_tokens": out_tokens,
        "expected_output_tokens": workload.total_output_tokens,
        "duration_s": round(duration, 4),
        "output_throughput": round(out_tokens / duration, 2),
        "input_throughput": round(workload.total_input_tokens / duration, 2),
        "request_throughput": round(len(ok) / duration, 4),
        "busy_fraction": round(min((fwd1 - fwd0) / duration, 1.0), 4),
        "mean_ttft_ms": round(1e3 * sum(ttft) / len(ttft), 3) if ttft else None,
        "p50_ttft_ms": ms(ttft, 0.5),
        "p99_ttft_ms": ms(ttft, 0.99),
        "mean_itl_ms": round(1e3 * sum(itl) / len(itl), 3) if itl else None,
        "p50_itl_ms": ms(itl, 0.5),
        "p99_itl_ms": ms(itl, 0.99),
    }
