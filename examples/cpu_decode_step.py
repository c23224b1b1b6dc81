"""Time one decode step of a random-weight model on the CPU against this machine's GEMM roofline.

    python examples/cpu_decode_step.py [--shape llama-75m] [--batch 64] [--context 400] [--threads N]
                                       [--cpu-fused-ops off] [--dtype bfloat16] [--scatter]

``--scatter`` lays each request's KV out as a busy server's pool does: pages of 16 slots
taken in random order (default: each request's slots contiguous).

The roofline is the FLOP/s of a large matmul in the model's dtype measured here, by the faster of torch's
``F.linear`` and oneDNN's packed linear (the path loopserve's model worker uses on the CPU).
A decode step's FLOPs are 2 x (linear weights) x batch plus attention (4 x context x heads x
head_dim x layers per token). The step is split into the weight GEMMs (every Linear of the
model run on a [batch, in] input), attention over the paged cache (the backend's forward for
every layer on the step's metadata) and the rest (norms, rotary, activations, sampling,
Python). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from loopserve.core.bench.shapes import ensure_shape_checkpoint
from loopserve.core.model.llama import Linear
from loopserve.core.model.worker import ModelWorker
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode
from loopserve.core.sched.sampling_params import SamplingParams


def median_time(fn, reps: int = 7) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def roofline_flops(dtype: torch.dtype) -> dict:
    a, w = torch.randn(2048, 2048, dtype=dtype), torch.randn(4096, 2048, dtype=dtype)
    flops = 2 * 2048 * 2048 * 4096
    out = {"torch_linear": flops / median_time(lambda: F.linear(a, w), 5)}
    if torch.backends.mkldnn.is_available():
        pw = torch.ops.mkldnn._reorder_linear_weight(w, 2048)
        out["onednn_packed"] = flops / median_time(lambda: torch.ops.mkldnn._linear_pointwise(a, pw, None, "none", [], ""), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-75m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cpu-fused-ops", default="auto", help="model.cpu_fused_ops (auto | on | off)")
    ap.add_argument("--dtype", default="float32", help="model.dtype (float32 | bfloat16)")
    ap.add_argument("--scatter", action="store_true", help="pages of 16 slots in random order")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, C = args.batch, args.context
    page = 16
    span = -(-(C + 1) // page) * page  # slots per request: whole pages
    w = ModelWorker(ensure_shape_checkpoint(args.shape), kv_num_tokens=B * span + 64, max_running_requests=B,
                    num_threads=args.threads, cpu_fused_ops=args.cpu_fused_ops, dtype=args.dtype)
    dt = w.dtype
    a = w.arch
    slots = [list(range(i * span, (i + 1) * span)) for i in range(B)]
    if args.scatter:
        import random

        pages = list(range(B * span // page))
        random.Random(0).shuffle(pages)
        per = span // page
        slots = [[p * page + j for p in pages[i * per:(i + 1) * per] for j in range(page)] for i in range(B)]
    for i, s in enumerate(slots):
        w.req_to_token[i, : len(s)] = torch.tensor(s)
    # NOTE: the pool is allocated untouched; reading never-written pages reads the kernel's one
    # shared zero page, which stays in cache and makes attention look several times faster
    # than over a real cache. Write every slot first.
    with torch.inference_mode():
        for c in (*w.k_cache, *w.v_cache):
            c.normal_()
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)

    def batch() -> ForwardBatch:
        return ForwardBatch(ForwardMode.DECODE, list(range(B)), [7] * B, [C] * B, [1] * B, [s[C] for s in slots],
                            [sp] * B, need_sample=[True] * B, output_ids=[[]] * B, prompt_ids=[None] * B,
                            step_seeds=[None] * B)

    linears = [m for m in w.model.modules() if isinstance(m, Linear)]
    inputs = [torch.randn(B, m.packed.shape[1] if m.packed is not None else m.weight.shape[1], dtype=dt)
              for m in linears]
    linear_params = sum((m.packed if m.packed is not None else m.weight).numel() for m in linears)
    with torch.inference_mode():
        step = median_time(lambda: w._forward_tokens(batch()), args.reps)
        gemm = median_time(lambda: [m(x) for m, x in zip(linears, inputs)], args.reps)
        meta = w.attn_backend.init_forward_metadata(batch())
        q = torch.randn(B, a.num_attention_heads, a.head_dim, dtype=dt)
        kv = torch.randn(B, a.num_key_value_heads, a.head_dim, dtype=dt)
        attn = median_time(lambda: [w.attn_backend.forward(layer, q, kv, kv, meta) for layer in range(a.num_hidden_layers)],
                       args.reps)
    attn_flops = 4 * (C + 1) * a.num_attention_heads * a.head_dim * a.num_hidden_layers * B
    flops = 2 * linear_params * B + attn_flops
    roof = roofline_flops(dt)
    peak = max(roof.values())
    print(json.dumps({
        "shape": args.shape, "dtype": str(dt).removeprefix("torch."), "scatter": args.scatter, "batch": B,
        "context": C, "threads": torch.get_num_threads(),
        "linear_backend": w.linear_backend, "attention_native": w.attn_backend.native is not None,
        "fused_ops": w.fused_ops,
        "step_ms": round(step * 1e3, 2), "gemm_ms": round(gemm * 1e3, 2), "attention_ms": round(attn * 1e3, 2),
        "rest_ms": round((step - gemm - attn) * 1e3, 2),
        "step_gflop": round(flops / 1e9, 3), "roofline_gflops": {k: round(v / 1e9, 1) for k, v in roof.items()},
        "roofline_step_ms": round(flops / peak * 1e3, 2), "step_over_roofline": round(step * peak / flops, 2),
    }))


if __name__ == "__main__":
    main()
