#!/usr/bin/env bash
# The GPU benchmark (docs/benchmarks.md, "GPU"): on a CUDA machine, with no internet.
#
# Writes random-weight Qwen3-0.6B- and Llama-3-8B-shaped bf16 checkpoints, then runs
# `loopserve bench` on each for: torch vs triton attention, CUDA graphs on vs off (triton
# only: the torch backend cannot be captured), the normal vs the overlap loop, and
# transformers `generate` as the peer (once per model); plus a decode-only run (256 requests
# decoding together) for the HBM roofline. Prints one table at the end.
#
#   examples/bench_gpu.sh                      # everything (the 8B checkpoint takes minutes to write)
#   MODELS="qwen3-0.6b" examples/bench_gpu.sh  # one model
#   HBM_GBPS=3350 examples/bench_gpu.sh        # H100 SXM bandwidth for the roofline (default: H200)
set -euo pipefail

WORK=${WORK:-bench_gpu}
MODELS=${MODELS:-"qwen3-0.6b llama3-8b"}
HBM_GBPS=${HBM_GBPS:-4800}
EXTRA=${EXTRA:-}            # extra overrides for every run, e.g. "bench.num_requests=128"
HERE=$(cd "$(dirname "$0")" && pwd)

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this benchmark needs a GPU')"
mkdir -p "$WORK/results"
python "$HERE/bench_gpu.py" checkpoints "$WORK/ckpt"

run() {  # run NAME OVERRIDES...
    local name=$1; shift
    echo "== $name: $*" >&2
    loopserve bench model.device=cuda bench.progress=false "bench.results_file=$WORK/results/$name.json" \
        $EXTRA "$@" > /dev/null
}

for m in $MODELS; do
    ck="model.path=$WORK/ckpt/$m"
    for loop in normal overlap; do
        run "$m-torch-nograph-$loop"  "$ck" attention.backend=torch  model.cuda_graph=false "loop=$loop"
        run "$m-triton-nograph-$loop" "$ck" attention.backend=triton model.cuda_graph=false "loop=$loop"
    done
    run "$m-triton-graph-normal" "$ck" attention.backend=triton model.cuda_graph=true loop=normal
    run "$m-triton-graph-overlap" "$ck" attention.backend=triton model.cuda_graph=true loop=overlap \
        bench.peer=hf_generate
    run "$m-decode" "$ck" attention.backend=triton model.cuda_graph=true loop=overlap \
        bench.num_requests=256 bench.input_len_min=512 bench.input_len_max=512 \
        bench.output_len_min=256 bench.output_len_max=256
done

python "$HERE/bench_gpu.py" table "$WORK/results" --hbm-gbps "$HBM_GBPS"
