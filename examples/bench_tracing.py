"""Tracing (and metrics) overhead: output tok/s of the embedded tiny model with tracing off vs
OTLP export to a local receiver, at the default ``tracing.sample_ratio`` and at 1.0, side by
side in one run (figures: docs/benchmarks.md, "Tracing overhead").

    python examples/bench_tracing.py --rounds 11 --ratios 0.05 0.1   # the documented run
    python examples/bench_tracing.py --requests 64 --rounds 5          # quicker

Method. One engine per configuration, all alive for the whole run, each with its own KV pool
(``kv_cache.num_tokens`` fixed, so every engine gets the same). Rounds are interleaved — every
round runs one timed block on every engine, in a rotating order — so drift in the machine's
load hits all configurations alike. A block is the workload (one ``Engine.generate`` of all
its requests, greedy, ``ignore_eos``) repeated back to back for about ``--block-seconds``, as
a server under steady load would see it (the batch processor exports in the background every
512 spans), then a flush of the spans still queued, so all export work of the block is counted
and none leaks into the next configuration's block.

Reported: median tok/s per configuration, and the median over rounds of the per-round ratio
to the baseline (paired, so less noisy than a ratio of medians); a second, identical ``none``
engine is a control that shows the noise and the bias between engine instances. The same
ratio is reported for output tokens per CPU-second of the process (all its threads: loop,
span export). Outputs are checked to be token-identical across configurations.

The OTLP receiver is a separate process on 127.0.0.1 (an ephemeral port) that accepts
http/protobuf exports, answers 200 and counts spans (decoded with opentelemetry-proto only when
asked, between runs).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request

SPAN_COUNT_PATH = "/stats"


# ------------------------------------------------------------------------- receiver process


def run_receiver() -> None:
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):  # noqa: N802
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            spans = 0
            names: dict[str, int] = {}
            for body in bodies:
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                for rs in msg.resource_spans:
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            spans += 1
                            names[span.name] = names.get(span.name, 0) + 1
            reply = json.dumps({"exports": len(bodies), "spans": spans, "names": names}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def receiver_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{SPAN_COUNT_PATH}", timeout=60) as resp:
        return json.loads(resp.read())


# ------------------------------------------------------------------------- benchmark


def workload(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(rng.randrange(16, 49))] for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, nargs="*", default=[64, 8], help="workloads: requests per run")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-seconds", type=float, default=2.0,
                    help="each timed block repeats the workload back to back for about this long")
    ap.add_argument("--ratios", type=float, nargs="*", default=[],
                    help="more tracing.sample_ratio values to run with otlp (besides the default and 1.0)")
    ap.add_argument("--no-metrics-configs", action="store_true",
                    help="skip the metrics-off and stage-times configurations")
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        run_receiver()
        return 0

    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from loopserve.core import Engine, SamplingParams

    proc = subprocess.Popen([sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        kv_tokens = max(args.requests) * (48 + args.new_tokens) + 4096
        common = ["loop=normal", f"kv_cache.num_tokens={kv_tokens}"]
        from loopserve.core.config import TracingConfig

        otlp = ["tracing=otlp", f"tracing.endpoint={endpoint}"]
        configs = {
            "none (default: metrics on)": [],
            "none, a second engine (control)": [],
            f"otlp, sample_ratio default ({TracingConfig.sample_ratio:g})": otlp,
            **{f"otlp, sample_ratio {r:g}": otlp + [f"tracing.sample_ratio={r}"] for r in args.ratios},
            "otlp, sample_ratio 1.0": otlp + ["tracing.sample_ratio=1.0"],
        }
        if not args.no_metrics_configs:
            configs["none, metrics off"] = ["metrics.enabled=false"]
            configs["none, metrics.stage_times on"] = ["metrics.stage_times=true"]
        baseline = next(iter(configs))
        engines = {name: Engine(overrides=common + ov) for name, ov in configs.items()}
        try:
            import platform

            import torch

            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                  f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
                  f"Python {platform.python_version()}")
            print(f"model: embedded tiny model, loop=normal, greedy, ignore_eos, {args.new_tokens} new tokens, "
                  f"{args.rounds} interleaved rounds\n")
            sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
            for engine in engines.values():  # warm-up: first-call costs out of the way
                engine.generate(input_ids=workload(4, seed=99), sampling_params=sp)
                engine.telemetry.flush()
            for n in args.requests:
                prompts = workload(n)
                t0 = time.perf_counter()
                engines[baseline].generate(input_ids=prompts, sampling_params=sp)
                repeat = max(1, round(args.block_seconds / (time.perf_counter() - t0)))
                tps: dict[str, list[float]] = {name: [] for name in configs}
                ratios: dict[str, list[float]] = {name: [] for name in configs}
                cpu_ratios: dict[str, list[float]] = {name: [] for name in configs}
                outputs: dict[str, list[list[int]]] = {}
                spans_before = receiver_stats(port)["spans"]
                names = list(configs)
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[: r % len(names)]
                    this_round, this_cpu = {}, {}
                    for name in order:
                        engine = engines[name]
                        c0, t0 = time.process_time(), time.perf_counter()
                        tokens = 0
                        for _ in range(repeat):
                            outs = engine.generate(input_ids=prompts, sampling_params=sp)
                            tokens += sum(len(o.token_ids) for o in outs)
                        engine.telemetry.flush()
                        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                        this_round[name] = tokens / dt
                        this_cpu[name] = tokens / cpu
                        ids = [o.token_ids for o in outs]
                        assert outputs.setdefault(name, ids) == ids
                    for name in names:
                        tps[name].append(this_round[name])
                        ratios[name].append(this_round[name] / this_round[baseline])
                        cpu_ratios[name].append(this_cpu[name] / this_cpu[baseline])
                assert all(o == outputs[baseline] for o in outputs.values()), "outputs differ between configs"
                stats = receiver_stats(port)
                print(f"workload: {n} requests x {args.new_tokens} new tokens (prompts 16-48 tokens), "
                      f"all in one generate call, {repeat} back to back per timed block; "
                      f"spans received: {stats['spans'] - spans_before}")
                print(f"{'configuration':36s} {'median tok/s':>12s} {'min':>8s} {'max':>8s} "
                      f"{'tok/s vs none':>16s} {'tok/CPU-s vs none':>18s}")
                for name in names:
                    med = statistics.median(tps[name])
                    ratio = statistics.median(ratios[name])
                    cpu_ratio = statistics.median(cpu_ratios[name])
                    print(f"{name:36s} {med:12.0f} {min(tps[name]):8.0f} {max(tps[name]):8.0f} "
                          f"{ratio:7.3f} ({(ratio - 1) * 100:+5.1f}%) "
                          f"{cpu_ratio:7.3f} ({(cpu_ratio - 1) * 100:+5.1f}%)")
                print()
            print("span names received (all workloads):", receiver_stats(port)["names"])
        finally:
            for engine in engines.values():
                engine.shutdown()
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
