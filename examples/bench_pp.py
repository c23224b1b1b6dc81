"""Pipeline-parallel scaling with the sim worker: throughput, per-stage busy fraction and
where the bubbles go, for ``pp_size`` 1/2/4/8 and ``parallel.pp_async_depth`` 0 vs 1.

The default workload of ``loopserve bench`` (256 requests, 32-512 prompt tokens, 32-256
output tokens, all arriving at once) runs on a llama3-70b-shaped model; each stage is a pair
of H100s (``worker.params.num_devices=2``: 70B in bf16 does not fit one), so pp_size=N uses
2N GPUs. Stages are real processes talking over gloo; each sim stage models its device as a
GPU stream (the process enqueues, the modelled device runs after its queue and after the
hidden states arrived; ``--sync-device``: the process sleeps through its compute and link
time instead), so the scheduler, the wire and the pipeline run at GPU speed on a CPU.

Busy fraction is each stage's modelled compute time over wall time, for the whole run and
for its middle half (steady state: the fill and drain at the ends left out). Each stage's
idle time is split into the modelled hidden-state transfers (link) and the rest (fill,
drain, and waiting for stage 0's scheduling or for the previous stage).

    python examples/bench_pp.py
    python examples/bench_pp.py --pp 4 --depth 0 1 --requests 128
    python examples/bench_pp.py --pp 2 4 8 --depth 0 1 --rounds 3   # interleaved, medians
    python examples/bench_pp.py --tiny --requests 32   # the model worker, embedded tiny model, CPU

``--tiny`` runs the embedded tiny model (float32, CPU) with pp_size 1 (the normal loop) and 2,
interleaved ``--repeat`` times, on ``--requests`` requests of the same workload shape (tokens < 256).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from loopserve.core import Engine, SamplingParams
from loopserve.core.bench.throughput import make_workload


def snapshots(engine: Engine, stop: threading.Event, out: list) -> None:
    while not stop.wait(0.1):
        out.append((time.perf_counter(), engine.worker.stage_stats()))


def run(pp: int, depth: int, args: argparse.Namespace) -> dict:
    overrides = ["worker=sim", f"worker.params.model={args.model}", f"worker.params.device={args.device}",
                 f"worker.params.num_devices={args.devices_per_stage}", f"parallel.pp_size={pp}"]
    if pp > 1:  # the overlap loop reads no parallel.* setting and rejects them
        overrides += [f"parallel.pp_async_depth={depth}", "parallel.stage_timeout_s=60"]
    if args.sync_device and pp > 1:
        overrides.append("worker.params.async_device=false")
    work = make_workload(128256, args.requests, (32, 512), (32, 256), 0, args.seed)
    sps = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    with Engine(overrides=overrides) as e:
        e.generate(input_ids=work.input_ids[:8], sampling_params=[SamplingParams(max_new_tokens=4, ignore_eos=True)] * 8)
        time.sleep(0.5)
        snaps: list = []
        stop = threading.Event()
        if pp > 1:
            snaps.append((time.perf_counter(), e.worker.stage_stats()))
            sampler = threading.Thread(target=snapshots, args=(e, stop, snaps), daemon=True)
            sampler.start()
        t0 = time.perf_counter()
        outs = e.generate(input_ids=work.input_ids, sampling_params=sps, timeout=600)
        t1 = time.perf_counter()
        stop.set()
        result = dict(pp=pp, depth=depth, loop=e.loop_name, wall_s=t1 - t0,
                      tok_s=sum(len(o.token_ids) for o in outs) / (t1 - t0), forwards=e.get_stats()["forwards"])
        if pp > 1:
            time.sleep(0.6)  # the stages publish their counters every 0.25 s
            end = e.worker.stage_stats()
            first = snaps[0][1]
            wall = t1 - t0
            mid = [s for s in snaps if t0 + 0.25 * wall <= s[0] <= t0 + 0.75 * wall]
            stages = []
            for r in range(pp):
                busy = end[r]["busy_s"] - first[r]["busy_s"]
                link = end[r]["link_wait_s"] - first[r]["link_wait_s"]
                steady = None
                if len(mid) >= 2:
                    a, b = mid[0][1][r], mid[-1][1][r]  # each stage's reading carries its time
                    if a["at"] is not None and b["at"] > a["at"]:
                        steady = (b["busy_s"] - a["busy_s"]) / (b["at"] - a["at"])
                stages.append(dict(busy=busy / wall, steady=steady, link_s=link, other_idle_s=wall - busy - link))
            result["stages"] = stages
    return result


def run_tiny(args: argparse.Namespace) -> None:
    work = make_workload(256, args.requests, (32, 512), (32, 256), 0, args.seed)
    sps = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    results: dict[int, list[float]] = {1: [], 2: []}
    ref = None
    for _ in range(args.repeat):
        for pp in (1, 2):
            with Engine(overrides=[f"parallel.pp_size={pp}", "model.dtype=float32"]) as e:
                t0 = time.perf_counter()
                outs = e.generate(input_ids=work.input_ids, sampling_params=sps, timeout=1200)
                wall = time.perf_counter() - t0
            ids = [o.token_ids for o in outs]
            ref = ref or ids
            assert ids == ref, "pp_size=2 tokens differ from pp_size=1"
            results[pp].append(sum(map(len, ids)) / wall)
            print(f"pp={pp} ({e.loop_name}): {results[pp][-1]:.0f} tok/s", flush=True)
    ratios = [b / a for a, b in zip(results[1], results[2])]
    print(f"pp2/pp1 throughput: {', '.join(f'{r:.2f}' for r in ratios)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--depth", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--model", default="llama3-70b")
    ap.add_argument("--device", default="h100")
    ap.add_argument("--devices-per-stage", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="the model worker on the tiny model, pp 1 vs 2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole sweep (interleaved), then print medians per pp and depth")
    ap.add_argument("--sync-device", action="store_true",
                    help="stages sleep through their compute (worker.params.async_device=false)")
    args = ap.parse_args()
    if args.tiny:
        run_tiny(args)
        return
    print(f"{'pp':>3} {'depth':>5} {'loop':>8} {'wall s':>7} {'tok/s':>8} {'fwd':>6}  per-stage busy (whole run / steady) ; "
          "idle s: link + other")
    summary: dict[tuple[int, int], list[dict]] = {}
    for _ in range(args.rounds):
        for pp in args.pp:
            for depth in (args.depth if pp > 1 else [0]):
                r = run(pp, depth, args)
                summary.setdefault((pp, depth), []).append(r)
                print_row(r)
    if args.rounds > 1:
        print("medians over rounds: pp depth tok/s (min-max) ; steady busy per stage")
        for (pp, depth), rs in summary.items():
            tok = sorted(r["tok_s"] for r in rs)
            line = f"{pp:>3} {depth if pp > 1 else '-':>5} {statistics.median(tok):8.0f} ({tok[0]:.0f}-{tok[-1]:.0f})"
            if "stages" in rs[0]:
                line += " ; " + " ".join(
                    f"{statistics.median(r['stages'][k]['steady'] or 0.0 for r in rs):.2f}" for k in range(pp))
            print(line, flush=True)


def print_row(r: dict) -> None:
    pp, depth = r["pp"], r["depth"]
    line = f"{pp:>3} {depth if pp > 1 else '-':>5} {r['loop']:>8} {r['wall_s']:7.2f} {r['tok_s']:8.0f} {r['forwards']:6d}"
    if "stages" in r:
        line += "  " + " ".join(
            f"{s['busy']:.2f}/{s['steady']:.2f}" if s["steady"] is not None else f"{s['busy']:.2f}/-"
            for s in r["stages"])
        line += " ; " + " ".join(f"{s['link_s']:.2f}+{s['other_idle_s']:.2f}" for s in r["stages"])
    print(line, flush=True)


if __name__ == "__main__":
    main()
