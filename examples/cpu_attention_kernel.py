"""Time the native CPU decode-attention kernel alone, over a written KV cache, against the same
work from cache and against one thread's plain streaming read.

    python examples/cpu_attention_kernel.py [--threads 1] [--batch 64] [--context 450] [--pool 4]

The cache has the llama-75m attention shape (12 heads on 4 KV heads of 64, 12 layers), float32
and bfloat16, with each request's keys in pages of 16 slots taken in random order from a pool
``--pool`` times larger than the batch needs (as in a busy server). "in cache" gives every
request the same 451 keys, so the kernel's work is the same but its data stays in cache: the
difference is the time spent waiting on memory. "stream" is ``x.sum()`` over 200 MB, what one
thread reads from memory front to back. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from cpu_decode_step import median_time  # examples/ is on the path when run as a script
from loopserve.core.model import cpu_native

HEADS, KV_HEADS, HEAD_DIM, LAYERS, PAGE = 12, 4, 64, 12, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=450)
    ap.add_argument("--pool", type=int, default=4, help="pool size as a multiple of what the batch needs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = cpu_native.load("on")
    B, n = args.batch, args.context + 1
    span = -(-n // PAGE) * PAGE
    pages = list(range(B * span // PAGE * args.pool))
    random.Random(0).shuffle(pages)
    per = span // PAGE
    scattered = torch.tensor([[p * PAGE + j for p in pages[i * per:(i + 1) * per] for j in range(PAGE)]
                              for i in range(B)], dtype=torch.int64)
    shared = torch.arange(span, dtype=torch.int64).repeat(B, 1)
    rows = torch.arange(B, dtype=torch.int64)
    lens = torch.full((B,), n, dtype=torch.int64)
    q = torch.randn(B, HEADS, HEAD_DIM)
    out = torch.empty(B, HEADS, HEAD_DIM)
    result: dict = {"threads": args.threads, "batch": B, "keys": n, "layers": LAYERS}
    for dt in (torch.float32, torch.bfloat16):
        slots = len(pages) * PAGE
        ks = [torch.randn(slots, KV_HEADS, HEAD_DIM).to(dt) for _ in range(LAYERS)]
        vs = [torch.randn(slots, KV_HEADS, HEAD_DIM).to(dt) for _ in range(LAYERS)]

        def run(table):
            for layer in range(LAYERS):
                cpu_native.decode_attention(lib, q, ks[layer], vs[layer], table, rows, lens, None, out,
                                            HEAD_DIM**-0.5, n)

        t_mem = median_time(lambda: run(scattered))
        t_cache = median_time(lambda: run(shared))
        gb = 2 * LAYERS * B * n * KV_HEADS * HEAD_DIM * ks[0].element_size() / 1e9
        name = str(dt).removeprefix("torch.")
        result[name] = {"ms": round(t_mem * 1e3, 1), "in_cache_ms": round(t_cache * 1e3, 1),
                        "kv_gb_per_s": round(gb / t_mem, 1)}
        del ks, vs
    x = torch.randn(50_000_000)
    result["stream_gb_per_s"] = round(x.numel() * 4 / median_time(x.sum, 3) / 1e9, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
