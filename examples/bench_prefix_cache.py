"""Benchmark of the radix prefix cache: many requests that share a long system prompt.

64 requests (by default) = one 512-token system prompt + a distinct 16-64-token user
suffix each, 32 output tokens each (greedy, ignore_eos), on the embedded tiny model
(float32). The same workload runs, in one process, with ``radix_cache=false`` and
``radix_cache=true`` — the latter twice: a cold cache with all requests arriving at once,
and after one warm-up request that puts the system prompt in the cache. Prints prompt tokens
computed, the cache hit rate and output tok/s for each, the ratios to the run without the
cache, and checks that the outputs are token-identical.

    python examples/bench_prefix_cache.py
    python examples/bench_prefix_cache.py --repeat 3 --page-size 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from loopserve.core import Engine, SamplingParams


def workload(args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(args.seed)
    system = [rng.randrange(0, 256) for _ in range(args.system_len)]
    # Distinct first suffix tokens, so requests share exactly the system prompt.
    firsts = rng.sample(range(256), args.requests)
    prompts = [system + [f] + [rng.randrange(0, 256) for _ in range(rng.randint(args.suffix_min, args.suffix_max) - 1)]
               for f in firsts]
    return system, prompts


def run(mode: str, args: argparse.Namespace, system: list[int], prompts: list[list[int]]) -> dict:
    radix = mode != "off"
    overrides = [
        f"loop={args.loop}", "model.dtype=float32", f"radix_cache={str(radix).lower()}",
        f"kv_cache.page_size={args.page_size}",
        f"kv_cache.num_tokens={args.requests * (args.system_len + args.suffix_max + args.output_len) + 4096}",
        f"scheduler.max_running_requests={max(args.requests, 1)}",
    ]
    sp = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    with Engine(overrides=overrides) as engine:
        # Untimed: first-forward overheads, on the BOS id, which no workload token equals.
        engine.generate(input_ids=[[256] * 8], sampling_params=SamplingParams(max_new_tokens=2, temperature=0.0))
        if mode == "on-warm":
            engine.generate(input_ids=[system], sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0))
        before = engine.get_stats()
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=sp, timeout=3600)
        wall = time.perf_counter() - t0
        after = engine.get_stats()
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    reused = after["prompt_tokens_reused"] - before["prompt_tokens_reused"]
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    generated = sum(len(o.token_ids) for o in outs)
    return {
        "mode": mode, "computed": computed, "reused": reused, "prompt": prompt,
        "hit_rate": reused / prompt if prompt else 0.0, "wall": wall, "tok_s": generated / wall,
        "outputs": [o.token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--suffix-min", type=int, default=16)
    ap.add_argument("--suffix-max", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--loop", default="normal")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode; the median wall time is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    system, prompts = workload(args)
    print(f"{args.requests} requests: {args.system_len}-token shared system prompt + "
          f"{args.suffix_min}-{args.suffix_max}-token user suffix, {args.output_len} output tokens "
          f"(greedy, ignore_eos); tiny model, float32, loop={args.loop}, page_size={args.page_size}, "
          f"repeat={args.repeat}")
    results = {}
    for mode in ("off", "on-cold", "on-warm"):
        runs = [run(mode, args, system, prompts) for _ in range(args.repeat)]
        best = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]  # the median run
        best["walls"] = [r["wall"] for r in runs]
        results[mode] = best
    off = results["off"]
    print(f"{'radix cache':<22}{'prompt tok':>11}{'computed':>10}{'reused':>9}{'hit rate':>10}"
          f"{'wall s':>9}{'out tok/s':>11}{'computed x':>12}{'tok/s x':>9}")
    labels = {"off": "off", "on-cold": "on, cold (burst)", "on-warm": "on, system cached"}
    for mode, r in results.items():
        print(f"{labels[mode]:<22}{r['prompt']:>11}{r['computed']:>10}{r['reused']:>9}{r['hit_rate']:>10.1%}"
              f"{statistics.median(r['walls']):>9.2f}{r['tok_s']:>11.0f}"
              f"{off['computed'] / max(r['computed'], 1):>11.2f}x{r['tok_s'] / off['tok_s']:>8.2f}x")
    same = all(r["outputs"] == off["outputs"] for r in results.values())
    print(f"outputs token-identical across modes: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
