"""Helpers of ``examples/bench_gpu.sh`` (the GPU benchmark): write the random-weight
checkpoints, and print one table from the ``loopserve bench`` result files.

    python examples/bench_gpu.py checkpoints DIR          # DIR/qwen3-0.6b, DIR/llama3-8b (bf16)
    python examples/bench_gpu.py table RESULTS_DIR [--hbm-gbps 4800]

The checkpoints have the real models' shapes (layers, heads, head dim, GQA, vocabulary, tied
embeddings for Qwen3-0.6B, q/k norm) but random weights and the byte-level tokenizer, so
no download is needed; throughput depends on shapes, not on weight values. Weights are drawn
with std 0.02 so activations stay finite in bfloat16 at these widths.

The decode roofline: a decode step must read every weight once and each running request's
KV cache; at ``--hbm-gbps`` that takes ``bytes / bandwidth``. The table compares the measured
mean forward time of the decode-only run (``*-decode.json``: 256 requests, all decoding
together) with it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

SHAPES = {
    # name: write_random_checkpoint arguments (shapes from the models' config.json)
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1000000.0),
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
}


def write_checkpoints(root: str) -> None:
    from loopserve.core.model.tiny import write_random_checkpoint

    for name, shape in SHAPES.items():
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            print(f"{path}: exists", file=sys.stderr)
            continue
        print(f"{path}: writing (bf16, random weights)...", file=sys.stderr)
        write_random_checkpoint(path, seed=1, weight_std=0.02, dtype="bfloat16", **shape)


def _param_bytes(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                total += 2 * n  # bf16
    return total


def _kv_bytes_per_token(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 2  # K and V, bf16


def print_table(results: str, hbm_gbps: float) -> None:
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        rows.append((os.path.basename(path)[:-5], s))
    if not rows:
        raise SystemExit(f"no result files in {results}")
    peers = {}
    for name, s in rows:
        if s.get("peer_output_throughput"):
            peers[s["model"]] = s["peer_output_throughput"]
    print(f"{'run':44s} {'out tok/s':>10s} {'busy':>6s} {'fwd ms':>8s} {'vs hf generate':>15s}")
    for name, s in rows:
        peer = peers.get(s["model"])
        ratio = f"{s['output_throughput'] / peer:.2f}x" if peer else "-"
        fwd = 1e3 * s["forward_time_s"] / max(s["num_forwards"], 1)
        print(f"{name:44s} {s['output_throughput']:10.1f} {s['busy_fraction']:6.3f} {fwd:8.2f} {ratio:>15s}")
    for model, tput in peers.items():
        print(f"{'hf generate on ' + os.path.basename(model):44s} {tput:10.1f}")
    for name, s in rows:
        if not name.endswith("-decode"):
            continue
        model = s["model"]
        n = s["num_requests"]
        mean_ctx = (s["total_input_tokens"] + s["total_output_tokens"] / 2) / n
        step_bytes = _param_bytes(model) + n * mean_ctx * _kv_bytes_per_token(model)
        roofline_ms = 1e3 * step_bytes / (hbm_gbps * 1e9)
        fwd = 1e3 * s["forward_time_s"] / max(s["num_forwards"], 1)
        print(f"decode roofline {name}: {step_bytes / 2**30:.2f} GiB per step at {hbm_gbps:.0f} GB/s = "
              f"{roofline_ms:.2f} ms; measured mean forward {fwd:.2f} ms ({fwd / roofline_ms:.2f}x the roofline; "
              f"includes the prefill steps of the run)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoints")
    c.add_argument("root")
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth (H200 4800, H100 SXM 3350)")
    args = ap.parse_args(argv)
    if args.cmd == "checkpoints":
        write_checkpoints(args.root)
    else:
        print_table(args.results, args.hbm_gbps)


if __name__ == "__main__":
    main()
