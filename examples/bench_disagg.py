"""Benchmark of disaggregated prefill and decode, and of the KV-transfer backends.

Part 1 (``--part serving``): the sim worker with a GPU shape (llama3-8b on an H100 by default;
each forward sleeps the time the roofline cost model predicts). A steady decode load (``--steady``
requests with short prompts and long outputs) runs while long prompts (``--long`` of
``--long-len`` tokens) arrive every ``--long-every`` seconds. Setups, one after another in this
process, in two groups:

- same workload: one co-located server (normal prefill batches), one co-located server with
  chunked prefill (``--chunk``), and ``--prefill-servers`` (default 1) prefill engines + one
  decode engine paired per request by bootstrap room (the zmq backend; the sim worker's KV is one
  token id per slot; requests spread over the prefill engines round-robin);
- same load per device: with n = prefill engines + 1 devices, n times the workload (n times the
  steady requests, long prompts n times as often) on n co-located servers (requests spread
  round-robin, as a router does), with and without chunked prefill, and on the disaggregated
  setup.

Reports the inter-token latency (p50, p99, max) of the steady requests, output throughput, and
throughput per device. Only the second group compares throughput per device fairly: in the first
the disaggregated setup has n devices for one device's requests.

Part 1b (``--part http``): the same workload through ``loopserve serve`` processes: one
co-located server given one device's share, and, given twice the workload, two co-located servers
behind ``sglang-router`` (round robin) and one prefill + one decode server behind
``sglang-router --pd-disaggregation``; the client streams SGLang's ``/generate`` with token ids
and takes one time per token. Needs ``sglang-router`` on the PATH.

Part 2 (``--part transfer``): the time one request's KV takes from ``send`` to the decode side's
confirmation, for each backend, with KV buffers shaped like ``--shape`` (llama3-8b: 32 layers x K,V
x 8 KV heads x 128 x 2 bytes = 128 KiB per token) and prompts of ``--tokens`` tokens, between
two managers in this process over 127.0.0.1.

    python examples/bench_disagg.py --part serving
    python examples/bench_disagg.py --part http
    python examples/bench_disagg.py --part transfer --tokens 128 1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import threading
import time

COMMON = ["worker=sim", "kv_cache.page_size=16", "scheduler.enable_overlap=true"]
_rooms = itertools.count(1)


class Tracker:
    """Token arrival times of one request, from its update callback."""

    def __init__(self, req) -> None:
        self.req = req
        self.times: list[float] = []
        inner = req.on_update

        def on_update(r, inner=inner) -> None:
            n = sum(1 for t in r.output_ids if t >= 0)
            now = time.perf_counter()
            self.times.extend([now] * (n - len(self.times)))
            if inner is not None:
                inner(r)

        req.on_update = on_update

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def workload(args, scale: int = 1):
    """``scale`` times the per-device workload: the steady requests, and the long prompts
    arriving ``scale`` times as often (so the same arrival window)."""
    rng = random.Random(args.seed)
    steady = [[rng.randrange(1, 30000) for _ in range(args.steady_len)] for _ in range(args.steady * scale)]
    long = [[rng.randrange(1, 30000) for _ in range(args.long_len)] for _ in range(args.long * scale)]
    return steady, long, args.long_every / scale


def summary(name: str, devices: int, steady: int, long: int, gaps: list[float], tokens: int,
            elapsed: float) -> dict:
    """One setup's figures from the steady requests' sorted inter-token gaps (seconds)."""
    return {
        "setup": name,
        "devices": devices,
        "steady": steady,
        "long": long,
        "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
        "itl_p99_ms": 1e3 * gaps[int(len(gaps) * 0.99)],
        "itl_max_ms": 1e3 * gaps[-1],
        "itl_gaps_over_50ms": sum(1 for g in gaps if g > 0.05),
        "itl_gaps": len(gaps),
        "output_tok_s": tokens / elapsed,
        "output_tok_s_per_device": tokens / elapsed / devices,
        "elapsed_s": elapsed,
    }


def run_setup(name: str, args, scale: int, overrides: list[str], kind: str) -> dict:
    """``kind``: ``co-located`` (``scale`` co-located engines, requests spread round-robin as a
    router would) or ``disagg`` (one prefill and one decode engine, each request to both)."""
    from loopserve.core import Engine, SamplingParams

    steady, long, long_every = workload(args, scale)
    shape = [f"worker.params.model={args.shape}", f"worker.params.device={args.device}"]
    sp_steady = SamplingParams(max_new_tokens=args.steady_out, temperature=0.0, ignore_eos=True)
    sp_long = SamplingParams(max_new_tokens=args.long_out, temperature=0.0, ignore_eos=True)
    engines = []
    try:
        if kind == "disagg":
            base = [*COMMON, *shape, *overrides, "disaggregation.bootstrap_port=0"]
            prefills = [Engine(overrides=[*base, "disaggregation.mode=prefill"]) for _ in range(args.prefill_servers)]
            engines += prefills
            d = Engine(overrides=[*base, "disaggregation.mode=decode"])
            engines.append(d)
            devices = len(prefills) + 1
        else:
            for _ in range(scale):
                engines.append(Engine(overrides=[*COMMON, *shape, *overrides]))
            prefills = []
            devices = scale
        turn = itertools.count()

        def submit(ids, sp):
            e = engines[next(turn) % len(engines)] if not prefills else prefills[next(turn) % len(prefills)]
            if not prefills:
                return [e.submit(input_ids=ids, sampling_params=sp)]
            kw = dict(bootstrap_host="127.0.0.1", bootstrap_port=e.scheduler.bootstrap_port,
                      bootstrap_room=next(_rooms))
            return [d.submit(input_ids=ids, sampling_params=sp, **kw), e.submit(input_ids=ids, sampling_params=sp, **kw)]

        # Warm-up (not timed): the loop thread's first iteration imports torch for its grad
        # mode, which takes seconds on this machine.
        for _ in prefills or engines:
            for h in submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True)):
                h.result(120)
        start = time.perf_counter()
        handles, trackers = [], []
        for ids in steady:
            hs = submit(ids, sp_steady)
            trackers.append(Tracker(hs[0].req))
            handles += hs
        time.sleep(args.long_start)
        for ids in long:
            handles += submit(ids, sp_long)
            time.sleep(long_every)
        for h in handles:
            out = h.result(600)
            assert out.finish_reason == "length", out.error
        elapsed = time.perf_counter() - start
        gaps = sorted(g for t in trackers for g in t.gaps())
        tokens = len(steady) * args.steady_out + len(long) * args.long_out
        retractions = sum(e.get_stats()["retractions"] for e in engines)
        return {
            **summary(name, devices, len(steady), len(long), gaps, tokens, elapsed),
            # The largest gap of a request that was never retracted (a retracted request waits
            # for memory, then is recomputed).
            "itl_max_ms_not_retracted": 1e3 * max((g for t in trackers if not t.req.num_retractions
                                                   for g in t.gaps()), default=0.0),
            "retractions": retractions,
        }
    finally:
        for e in engines:
            e.shutdown()


def part_serving(args) -> list[dict]:
    """Two comparisons. Same workload: one co-located device against the pair given the same
    requests (the pair's second device is then half idle, so its per-device figure halves).
    Same load per device: two co-located devices (requests spread round-robin) against the pair,
    both given twice the workload, which is what "throughput per device" compares."""
    chunk = [f"scheduler.chunked_prefill_size={args.chunk}"]
    n = args.prefill_servers + 1  # devices of the disaggregated setup
    pair = f"{args.prefill_servers} prefill + 1 decode (zmq)"
    setups = [("co-located", 1, [], "co-located"),
              (f"co-located, chunked prefill {args.chunk}", 1, chunk, "co-located"),
              (pair, 1, [], "disagg"),
              (f"{n} co-located", n, [], "co-located"),
              (f"{n} co-located, chunked prefill {args.chunk}", n, chunk, "co-located"),
              (f"{pair}, {n}x the workload", n, [], "disagg")]
    if args.only_equal_devices:
        setups = setups[3:]
    results = []
    for name, scale, overrides, kind in setups:
        r = run_setup(name, args, scale, overrides, kind)
        print(json.dumps(r), flush=True)
        results.append(r)
    by_scale: dict[int, dict] = {}
    for r in results:
        base = by_scale.setdefault(r["steady"], r)
        if r is base:
            continue
        print(f"{r['setup']}: ITL p99 x{r['itl_p99_ms'] / base['itl_p99_ms']:.3f} of {base['setup']}, "
              f"throughput per device x{r['output_tok_s_per_device'] / base['output_tok_s_per_device']:.3f}")
    return results


class _Proc:
    """A child process (``loopserve serve`` or ``sglang-router``) with its output in a log file."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        import subprocess
        import tempfile

        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-disagg-{name}-", suffix=".log", delete=False)
        self.keep_log = False  # kept only when the process exited early (the error names it)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            self.keep_log = True
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        if not self.keep_log:
            os.unlink(self.log.name)


def _server(name: str, overrides: list[str]) -> tuple[_Proc, str]:
    import sys

    from loopserve.core.bench.http import _free_port

    port = _free_port()
    return _Proc(name, [sys.executable, "-m", "loopserve.core.cli", "serve", "server.host=127.0.0.1",
                        f"server.port={port}", *overrides]), f"http://127.0.0.1:{port}"


def _wait(procs: list[_Proc], url: str, path: str, body: dict | None = None, tries: int = 1) -> None:
    """Until ``url + path`` answers 200 (``tries`` times in a row, for a router's workers)."""
    import httpx

    deadline = time.monotonic() + 300
    ok = 0
    while ok < tries:
        for p in procs:
            p.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} did not answer within 300 s")
        try:
            r = httpx.post(url + path, json=body, timeout=30) if body else httpx.get(url + path, timeout=5)
            ok = ok + 1 if r.status_code == 200 else 0
        except httpx.HTTPError:
            ok = 0
        if ok < tries:
            time.sleep(0.2 if ok == 0 else 0)


def _generate(ids: list[int], n: int, stream: bool = False) -> dict:
    return {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}


def run_http_setup(name: str, args, scale: int, kind: str) -> dict:
    """``kind``: ``direct`` (one co-located server), ``router`` (``scale`` co-located servers
    behind sglang-router, round robin) or ``pd`` (one prefill + one decode server behind
    ``sglang-router --pd-disaggregation``)."""
    import asyncio
    import shutil
    from urllib.parse import urlsplit

    from loopserve.core.bench.http import _free_port, _one_raw

    router_bin = shutil.which("sglang-router")
    if kind != "direct" and router_bin is None:
        raise RuntimeError("sglang-router is not installed (pip install sglang-router)")
    steady, long, long_every = workload(args, scale)
    base = [*COMMON, f"worker.params.model={args.shape}", f"worker.params.device={args.device}"]
    procs: list[_Proc] = []
    try:
        router = ["--host", "127.0.0.1", "--port", str(port := _free_port()), "--prometheus-host", "127.0.0.1",
                  "--prometheus-port", str(_free_port()), "--log-level", "warn", "--worker-startup-timeout-secs", "300"]
        if kind == "pd":
            bport = _free_port()
            p, purl = _server("prefill", [*base, "disaggregation.mode=prefill", f"disaggregation.bootstrap_port={bport}"])
            d, durl = _server("decode", [*base, "disaggregation.mode=decode"])
            procs += [p, d]
            for u in (purl, durl):
                _wait(procs, u, "/health")
            procs.append(_Proc("router", [router_bin, "launch", "--pd-disaggregation", "--prefill", purl, str(bport),
                                          "--decode", durl, *router]))
            url, devices = f"http://127.0.0.1:{port}", 2
        else:
            urls = []
            for i in range(1 if kind == "direct" else scale):
                srv, u = _server(f"colocated{i}", base)
                procs.append(srv)
                urls.append(u)
            for u in urls:
                _wait(procs, u, "/health")
            if kind == "direct":
                url = urls[0]
            else:
                procs.append(_Proc("router", [router_bin, "launch", "--worker-urls", *urls, "--policy", "round_robin",
                                              *router]))
                url = f"http://127.0.0.1:{port}"
            devices = len(urls)
        # Ready, and a warm-up request through every worker (not timed).
        _wait(procs, url, "/generate", _generate([1, 2, 3], 2), tries=devices)
        parts = urlsplit(url)

        async def run() -> tuple[list[dict], float]:
            start = time.perf_counter()
            def one(ids: list[int], n: int):
                # SGLang's /generate with token ids (sglang-router's /v1/completions takes text
                # only, and the sim server has no tokenizer).
                return asyncio.create_task(_one_raw(parts.hostname, parts.port, {}, ids, n, "/generate",
                                                    _generate(ids, n, stream=True)))

            tasks = [one(ids, args.steady_out) for ids in steady]
            await asyncio.sleep(args.long_start)
            for ids in long:
                tasks.append(one(ids, args.long_out))
                await asyncio.sleep(long_every)
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 600)), start  # never hang

        results, start = asyncio.run(run())
        errors = [r["error"] for r in results if r.get("error")]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
        end = max(r["times"][-1] for r in results)
        gaps = sorted(b - a for r in results[:len(steady)] for a, b in zip(r["times"], r["times"][1:]))
        tokens = sum(r["tokens"] for r in results)
        return summary(name, devices, len(steady), len(long), gaps, tokens, end - start)
    finally:
        for p in reversed(procs):
            p.stop()


def part_http(args) -> list[dict]:
    """The same comparison through HTTP servers: one co-located server given one device's share,
    two co-located servers behind sglang-router and one prefill + one decode server behind
    ``sglang-router --pd-disaggregation``, both given twice the workload. Each server and the
    router is its own process; the client is this process."""
    setups = [("co-located server", 1, "direct"),
              ("2 co-located servers behind sglang-router", 2, "router"),
              ("1 prefill + 1 decode server behind sglang-router", 2, "pd")]
    results = []
    for name, scale, kind in setups:
        r = run_http_setup(name, args, scale, kind)
        print(json.dumps(r), flush=True)
        results.append(r)
    base = results[1]
    r = results[2]
    print(f"{r['setup']}: ITL p99 x{r['itl_p99_ms'] / base['itl_p99_ms']:.3f} of {base['setup']}, "
          f"throughput per device x{r['output_tok_s_per_device'] / base['output_tok_s_per_device']:.3f}")
    return results


def part_transfer(args) -> list[dict]:
    import numpy as np

    from loopserve.core.bench.cost_model import get_shape
    from loopserve.core.disagg.base import BootstrapAddr, KVArgs, KVPoll

    shape = get_shape(args.shape)
    slot_bytes = shape.num_kv_heads * shape.head_dim * 2  # bf16, one layer's K (or V) of one token
    layers = 2 * shape.num_layers
    page = 16
    results = []
    for backend in args.backends:
        if backend == "zmq":
            from loopserve.core.disagg.zmq_transfer import ZmqManager as cls
        else:
            from loopserve.core.disagg.mooncake_transfer import MooncakeManager as cls
        slots = (max(args.tokens) // page + 1) * page

        def args_for(fill: bool) -> KVArgs:
            bufs = [np.full((slots, slot_bytes), 7 if fill else 0, dtype=np.uint8) for _ in range(layers)]
            return KVArgs(buffers=bufs, page_size=page, num_slots=slots)

        src_args, dst_args = args_for(True), args_for(False)
        prefill = cls("prefill", src_args, 60.0, bootstrap_port=0)
        decode = cls("decode", dst_args, 60.0)
        try:
            for n in args.tokens:
                pages = list(range(-(-n // page)))
                times = []
                for rep in range(args.repeat + 1):
                    addr = BootstrapAddr("127.0.0.1", prefill.bootstrap.port, next(_rooms))
                    sender, recv = prefill.make_sender(addr), decode.make_receiver(addr)
                    recv.init()
                    while recv.poll() is KVPoll.Bootstrapping:
                        time.sleep(0.001)
                    recv.send_metadata(pages[::-1])  # scattered destination pages, as in a busy pool
                    while sender.poll() is KVPoll.Bootstrapping:
                        time.sleep(0.0005)
                    t0 = time.perf_counter()
                    sender.send(pages, [1])
                    while sender.poll() not in (KVPoll.Success, KVPoll.Failed):
                        time.sleep(0.0002)
                    dt = time.perf_counter() - t0
                    assert sender.poll() is KVPoll.Success and recv.poll() is KVPoll.Success, (
                        sender.poll(), sender.failure_exception(), recv.poll())
                    prefill.release(addr.room)
                    decode.release(addr.room)
                    if rep:  # the first is a warm-up
                        times.append(dt)
                assert int(dst_args.page_views()[0][pages[0]][0]) == 7
                mib = len(pages) * page * slot_bytes * layers / 2**20
                med = statistics.median(times)
                r = {"backend": backend, "tokens": n, "kv_mib": round(mib, 1), "median_ms": round(1e3 * med, 2),
                     "gib_s": round(mib / 1024 / med, 2)}
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            decode.close()
            prefill.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["serving", "http", "transfer", "all"], default="all",
                    help="all: serving and transfer (http starts server processes and the router)")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="h100")
    ap.add_argument("--steady", type=int, default=32)
    ap.add_argument("--steady-len", type=int, default=128)
    ap.add_argument("--steady-out", type=int, default=400)
    ap.add_argument("--long", type=int, default=8)
    ap.add_argument("--long-len", type=int, default=6000)
    ap.add_argument("--long-out", type=int, default=16)
    ap.add_argument("--long-start", type=float, default=0.3)
    ap.add_argument("--long-every", type=float, default=0.3)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--prefill-servers", type=int, default=1,
                    help="prefill engines of the disaggregated setup (one decode engine)")
    ap.add_argument("--only-equal-devices", action="store_true",
                    help="run only the comparison at the same load per device (n devices, n times the workload)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["zmq", "mooncake"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.prefill_servers < 1:
        ap.error(f"--prefill-servers must be at least 1 (got {args.prefill_servers})")
    if args.part in ("serving", "all"):
        part_serving(args)
    if args.part == "http":
        part_http(args)
    if args.part in ("transfer", "all"):
        part_transfer(args)


if __name__ == "__main__":
    main()
