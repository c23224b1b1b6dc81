"""vLLM's offline ``LLM.generate`` as a benchmark peer, run in vLLM's own interpreter.

``loopserve bench bench.peer=vllm`` starts this file as a script with ``bench.peer_python``
(a virtual environment with vLLM; it pins its own dependencies, so loopserve need not be
installed there) and writes one JSON job to its stdin::

    {"model": DIR, "dtype": "float32", "prompts": [[ids...], ...], "output_lens": [n, ...],
     "threads": null | N, "warmup": true, "kv_cache_gib": 4}

It prints one JSON line prefixed ``LOOPSERVE_PEER_RESULT`` on stdout: the ``generate`` call's
wall time (only that call: engine start-up and warm-up are not timed), the output tokens, each
request's token ids and the thread settings vLLM ran with. vLLM logs to stdout as well; the
caller passes every other line on to its stderr.

Threads: vLLM's CPU backend runs its model on OpenMP threads bound to the cores listed in
``VLLM_CPU_OMP_THREADS_BIND`` (by default all cores but one, which it leaves to its engine
process). ``threads: N`` binds N threads to the first N CPUs this process may use;
``null`` keeps vLLM's default (an ``VLLM_CPU_OMP_THREADS_BIND`` already in the environment
too).

No loopserve imports: this file must run in an environment that only has vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import time

RESULT_PREFIX = "LOOPSERVE_PEER_RESULT "


def _log(msg: str) -> None:
    print(f"vllm peer: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    job = json.loads(sys.stdin.read())
    threads = job.get("threads")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads is not None:
        n = int(threads)
        if n > len(cpus):
            raise SystemExit(f"vllm peer: {n} threads asked for but only {len(cpus)} CPUs are usable")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus[:n])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 4)))

    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise SystemExit(f"vllm peer: cannot import vllm in {sys.executable} ({e})") from None

    prompts = [list(map(int, p)) for p in job["prompts"]]
    output_lens = [int(n) for n in job["output_lens"]]
    # vLLM's own defaults otherwise (max_model_len from the checkpoint, its batch limits).
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), seed=0, skip_tokenizer_init=True)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=0, ignore_eos=True, detokenize=False)

    if job.get("warmup", True):
        # Different prompts from the workload's, as loopserve's own warm-up.
        llm.generate([TokensPrompt(prompt_token_ids=[(7 * i + j) % 200 + 3 for j in range(8 + 4 * i)])
                      for i in range(min(8, len(prompts)))], params(8), use_tqdm=False)

    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sps = [params(n) for n in output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(reqs, sps, use_tqdm=False)
    duration = time.perf_counter() - t0
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    import torch

    result = {
        "duration_s": duration,
        "output_tokens": sum(len(t) for t in token_ids),
        "token_ids": token_ids,
        "vllm": getattr(vllm, "__version__", "?"),
        "threads": {
            "source": "bench.peer_threads" if threads is not None else "vLLM default",
            "compute_threads": int(threads) if threads is not None else None,
            "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "torch_threads_in_frontend": torch.get_num_threads(),
            "usable_cpus": len(cpus),
        },
    }
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    _log(f"{result['output_tokens']} tokens in {duration:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
