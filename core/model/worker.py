"""The model worker: turns a ``ForwardBatch`` into sampled tokens with a real model.

It owns everything on the device: the weights, the paged KV cache (per layer K and V of
``[num_kv_slots, num_kv_heads, head_dim]``), the request-to-token table the scheduler's
slots are written into, the attention backend and the sampler. The scheduler only sees the
``Worker`` interface (``forward_batch``, ``context_len``, ``num_kv_slots``, ...). Forward passes
run under whatever autograd mode the calling loop set (``DynamicGradMode``); the weights are
frozen and the cache is written detached, so results are the same in every mode.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from loopserve.core.mem.budget import Need, available_host_bytes, check_fits
from loopserve.core.model.compute_thread import ComputeThread
from loopserve.core.model.cpu_threads import CpuThreads
from loopserve.core.model.cuda_graph import DEFAULT_MAX_CAPTURE_BS, CudaGraphRunner, resolve_cuda_graph
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode, ForwardResult
from loopserve.core.model.arch_config import ModelArchConfig
from loopserve.core.model.attention import AttentionBackend, TorchAttentionBackend
from loopserve.core.model.loader import check_model_dir, load_model, resolve_dtype
from loopserve.core.model.sampler import Sampler, suppress_early_stops, token_logprobs
from loopserve.core.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from loopserve.core.disagg.base import KVArgs

ATTENTION_BACKENDS = ("torch", "triton")
# Share of the device memory still free after loading the weights (on the CPU: the host's
# available memory) that the KV pool may take when its size is not given in tokens.
DEFAULT_KV_MEM_FRACTION = 0.3
# Prompt scoring computes the logits of this many prompt positions at a time.
PROMPT_SCORE_BLOCK = 512

log = logging.getLogger(__name__)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"model.device={device!r} is not supported; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but no CUDA device is available; use model.device=cpu")
    return torch.device(device)


_cpu_available_bytes = available_host_bytes

CPU_LINEAR_MODES = ("auto", "onednn", "torch")


def weight_bytes(a: ModelArchConfig, itemsize: int) -> int:
    """Bytes of the decoder's parameters (biases and norms included, roughly)."""
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    per_layer = a.hidden_size * (2 * q + 2 * kv) + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
    per_layer += q + 2 * kv + a.hidden_size + 2 * a.head_dim  # biases, q/k norms
    embed = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    return (a.num_hidden_layers * per_layer + embed + a.hidden_size) * itemsize


class ModelWorker:
    """Runs a Llama-family checkpoint over a paged KV cache.

    ``model_path`` None means the embedded tiny model. ``kv_num_tokens`` fixes the KV pool
    size; otherwise it is ``max_running_requests * context_len`` capped by ``kv_mem_fraction``
    of the memory free after loading the weights. ``num_kv_slots`` is always a multiple of ``page_size``; every slot in
    ``0 .. num_kv_slots - 1`` is usable. ``req_to_token`` has one row per running request
    (``ForwardBatch.req_pool_indices`` index it) and ``context_len`` columns.

    ``attention_backend`` is ``torch`` (reference) or ``triton`` (core/model/kernels/; on the
    CPU only under ``TRITON_INTERPRET=1``; on CUDA it also fuses RMSNorm). ``cuda_graph``
    (None = on with CUDA + triton) captures decode steps at start-up (core/model/cuda_graph.py);
    the cache and the table then hold one extra slot and row for the padding of a bucket.
    """

    def __init__(
        self,
        model_path: str | None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        attention_backend: str = "torch",
        kv_num_tokens: int | None = None,
        kv_mem_fraction: float | None = None,
        page_size: int = 1,
        max_running_requests: int = 256,
        max_context_len: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        cuda_graph: bool | None = None,
        layer_range: tuple[int, int] | None = None,
        kv_size_layers: int | None = None,
        cpu_kernel: str = "auto",
        cpu_linear: str = "auto",
        cpu_malloc: str = "auto",
        cpu_fused_ops: str = "auto",
    ) -> None:
        """:param layer_range: ``(start, end)``: run only these decoder layers (a pipeline
            stage); its KV cache holds only them. Default: the whole model.
        :param kv_size_layers: size the KV pool (when ``kv_num_tokens`` is unset) as if this
            many layers shared the memory: every pipeline stage needs a pool of the same
            size, so stages size it by their largest stage."""
        if model_path is None:
            from loopserve.core.model.tiny import ensure_tiny_model

            model_path = ensure_tiny_model()
        check_model_dir(model_path)
        if page_size < 1:
            raise ValueError(f"kv_cache.page_size must be >= 1, got {page_size}")
        if max_running_requests < 1:
            raise ValueError(f"scheduler.max_running_requests must be >= 1, got {max_running_requests}")
        if kv_mem_fraction is not None and not 0.0 < kv_mem_fraction <= 1.0:
            raise ValueError(f"kv_cache.mem_fraction must be in (0, 1], got {kv_mem_fraction}")
        self.device = _resolve_device(device)
        self._check_backend(attention_backend)
        # The OpenMP team of the compute thread: sized to the CPUs this process may use and
        # shrunk while other processes keep cores busy (core/model/cpu_threads.py).
        self.cpu_threads = CpuThreads(num_threads)
        self.attention_backend = attention_backend
        from loopserve.core.model.cpu_native import CPU_KERNEL_MODES

        if cpu_kernel not in CPU_KERNEL_MODES:
            raise ValueError(f"attention.cpu_kernel must be one of {', '.join(CPU_KERNEL_MODES)}; got {cpu_kernel!r}")
        self.cpu_kernel = cpu_kernel
        if cpu_linear not in CPU_LINEAR_MODES:
            raise ValueError(f"model.cpu_linear must be one of {', '.join(CPU_LINEAR_MODES)}; got {cpu_linear!r}")
        self.cpu_linear = cpu_linear
        if cpu_fused_ops not in CPU_KERNEL_MODES:
            raise ValueError(f"model.cpu_fused_ops must be one of {', '.join(CPU_KERNEL_MODES)}; got {cpu_fused_ops!r}")
        self.cpu_fused_ops = cpu_fused_ops
        from loopserve.core.model.cpu_malloc import CPU_MALLOC_MODES, tune

        if cpu_malloc not in CPU_MALLOC_MODES:
            raise ValueError(f"model.cpu_malloc must be one of {', '.join(CPU_MALLOC_MODES)}; got {cpu_malloc!r}")
        self.malloc_tuned = tune(cpu_malloc) if self.device.type == "cpu" else False
        self.use_cuda_graph = resolve_cuda_graph(cuda_graph, self.device.type, attention_backend)
        if layer_range is not None:
            self.use_cuda_graph = False  # graphs capture the whole model's decode step

        self.model_path = model_path
        self.arch: ModelArchConfig = ModelArchConfig.from_model_dir(model_path)
        resolve_dtype(dtype, self.arch, self.device)  # fail on a bad dtype before any loading
        self.tokenizer = Tokenizer(model_path)
        self.vocab_size = self.arch.vocab_size
        self.eos_token_ids: frozenset[int] = self.tokenizer.eos_token_ids | frozenset(self.arch.eos_token_ids)

        max_pos = self.arch.max_position_embeddings
        if max_context_len is not None and not 1 <= max_context_len <= max_pos:
            raise ValueError(
                f"model.context_length={max_context_len} must be between 1 and the model's "
                f"max_position_embeddings ({max_pos})"
            )
        self.context_len: int = max_context_len or max_pos
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.layer_range = layer_range
        self.kv_size_layers = kv_size_layers
        self._check_memory(resolve_dtype(dtype, self.arch, self.device).itemsize, kv_num_tokens)

        # Every torch computation of this worker (loading, allocation, forward passes) runs on
        # the process's compute thread: see core/compute_thread.py for why that matters.
        self._compute: ComputeThread | None = ComputeThread.acquire()
        try:
            self._compute.call(self._build_device_state, dtype, kv_num_tokens, kv_mem_fraction, seed)
        except BaseException:
            self._release_compute()
            raise

    def _build_device_state(self, dtype: str, kv_num_tokens: int | None, kv_mem_fraction: float | None,
                            seed: int) -> None:
        model_path, max_running_requests = self.model_path, self.max_running_requests
        self.cpu_threads.start()
        # Device state is built outside inference mode so that a worker made inside
        # torch.inference_mode() can still be run by a loop in no_grad or enable_grad mode
        # (inference tensors cannot be written outside inference mode).
        with torch.inference_mode(False), torch.no_grad():
            self.model = load_model(model_path, dtype=dtype, device=self.device, arch=self.arch,
                                    layer_range=self.layer_range)
            self.dtype = next(self.model.parameters()).dtype
            self.linear_backend = self._pack_linears()
            self.fused_ops = self._use_native_ops()
            if not (self.model.is_first and self.model.is_last):
                self.use_cuda_graph = False  # graphs capture the whole model's decode step
            self.num_kv_slots: int = self._kv_pool_size(kv_num_tokens, kv_mem_fraction)
            a = self.arch
            shape = (self.num_kv_slots, a.num_key_value_heads, a.head_dim)
            # On the CPU the pool is left unfilled: zero-filling a default pool (max requests x
            # context) costs a second and commits all its memory up front, while untouched
            # pages cost nothing. Attention never reads a slot before it is written (padding
            # points at a request's own first slot).
            alloc = torch.empty if self.device.type == "cpu" else torch.zeros
            layers = range(self.model.num_layers)  # a pipeline stage holds its own layers' KV
            # CUDA graphs pad a batch with a reserved table row whose one key is a reserved
            # KV slot, both past what the scheduler hands out.
            extra = 1 if self.use_cuda_graph else 0
            shape = (self.num_kv_slots + extra, *shape[1:])
            self.k_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in layers]
            self.v_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in layers]
            self.req_to_token = torch.zeros(
                (max_running_requests + extra, self.context_len), dtype=torch.int64, device=self.device
            )
        self.attn_backend: AttentionBackend = self._make_backend()
        if self.attention_backend == "triton" and self.device.type == "cuda":
            self.model.use_fused_norm()
        self.sampler = Sampler(self.device, seed=seed)
        self.cuda_graphs: CudaGraphRunner | None = None
        if self.use_cuda_graph:
            self.cuda_graphs = CudaGraphRunner(
                self.model, self.attn_backend, max_bs=min(max_running_requests, DEFAULT_MAX_CAPTURE_BS),
                dummy_row=max_running_requests, scratch_slot=self.num_kv_slots)
            self.cuda_graphs.capture()

    def _make_backend(self) -> AttentionBackend:
        kw = dict(num_heads=self.arch.num_attention_heads, num_kv_heads=self.arch.num_key_value_heads,
                  head_dim=self.arch.head_dim)
        if self.attention_backend == "triton":
            from loopserve.core.model.triton_attention import TritonAttentionBackend

            return TritonAttentionBackend(self.k_cache, self.v_cache, self.req_to_token, **kw)
        return TorchAttentionBackend(self.k_cache, self.v_cache, self.req_to_token, native=self._native_kernels(),
                                     **kw)

    def _pack_linears(self) -> str:
        """``model.cpu_linear``: the weight GEMMs through oneDNN's packed layout on the CPU
        (core/model/llama.py ``Linear.pack_onednn``); returns which path runs them."""
        mode = self.cpu_linear
        if mode == "torch" or self.device.type != "cpu":
            return "torch"
        fits = torch.backends.mkldnn.is_available() and self.dtype in (torch.float32, torch.bfloat16)
        if not fits:
            if mode == "onednn":
                raise ValueError(f"model.cpu_linear=onednn needs a torch built with oneDNN and float32 or bfloat16 "
                                 f"weights (this model: {self.dtype}, oneDNN "
                                 f"{'available' if torch.backends.mkldnn.is_available() else 'missing'}); set "
                                 "model.cpu_linear=auto")
            return "torch"
        self.model.pack_linear_weights()
        return "onednn"

    def _use_native_ops(self) -> bool:
        """``model.cpu_fused_ops``: RMSNorm, rotary and SiLU x up through the native CPU kernels
        (the CPU; float32 or bfloat16); True where they run."""
        mode = self.cpu_fused_ops
        if mode == "off" or self.device.type != "cpu":
            if mode == "on":
                raise ValueError("model.cpu_fused_ops=on runs on the CPU only; set model.cpu_fused_ops=auto")
            return False
        if self.dtype not in (torch.float32, torch.bfloat16):
            if mode == "on":
                raise ValueError(f"model.cpu_fused_ops=on needs float32 or bfloat16 weights (this model: "
                                 f"{self.dtype}); set model.cpu_fused_ops=auto")
            return False
        from loopserve.core.model import cpu_native

        try:
            lib = cpu_native.load(mode)
        except ValueError as exc:
            raise ValueError(str(exc).replace("attention.cpu_kernel", "model.cpu_fused_ops")) from None
        if lib is None:
            return False
        self.model.use_native_cpu_ops(lib)
        return True

    def _native_kernels(self) -> Any:
        """The native CPU attention kernels (core/model/cpu_native.py) where they apply: the
        CPU, a float32 or bfloat16 KV cache, a head size that is a multiple of 8."""
        mode = self.cpu_kernel
        if mode == "off" or self.device.type != "cpu":
            return None
        fits = self.dtype in (torch.float32, torch.bfloat16) and self.arch.head_dim % 8 == 0
        if not fits:
            if mode == "on":
                raise ValueError(f"attention.cpu_kernel=on needs float32 or bfloat16 and a head size that is a "
                                 f"multiple of 8 (this model: {self.dtype}, head size {self.arch.head_dim}); set "
                                 "attention.cpu_kernel=auto")
            return None
        from loopserve.core.model import cpu_native

        return cpu_native.load(mode)

    def _check_memory(self, itemsize: int, kv_num_tokens: int | None) -> None:
        """Weights, request table and a fixed KV pool must fit before any of them is allocated."""
        needs = [
            Need("weights", weight_bytes(self.arch, itemsize),
                 "use a smaller model or a half-precision model.dtype"),
            Need("request table", self.max_running_requests * self.context_len * 8,
                 f"lower scheduler.max_running_requests ({self.max_running_requests}) or set "
                 f"model.context_length (the context length is {self.context_len}, from config.json's "
                 "max_position_embeddings unless capped)"),
        ]
        if kv_num_tokens is not None:
            needs.append(Need("KV cache", kv_num_tokens * self.arch.kv_bytes_per_token * itemsize,
                              f"lower kv_cache.num_tokens ({kv_num_tokens})"))
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0]
        else:
            available = _cpu_available_bytes()
        check_fits(needs, available, str(self.device))

    def _check_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention.backend={name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if name == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                raise ValueError(
                    "attention.backend=triton needs the triton package (pip install triton); use "
                    "attention.backend=torch"
                ) from None
            if self.device.type != "cuda":
                from loopserve.core.model import kernels

                # The interpreter is decided when the kernels are first imported; both the
                # environment now and the kernels as built must agree.
                if not (kernels.interpret_requested() and kernels.interpreted()):
                    raise ValueError(
                        "attention.backend=triton on the CPU runs only in Triton's interpreter: set "
                        "TRITON_INTERPRET=1 in the environment before starting (slow; for tests), or "
                        "use attention.backend=torch (or model.device=cuda)"
                    )

    def _kv_pool_size(self, kv_num_tokens: int | None, mem_fraction: float | None) -> int:
        layers = self.kv_size_layers or self.arch.num_hidden_layers
        bytes_per_token = self.arch.kv_bytes_per_token // self.arch.num_hidden_layers * layers * self.dtype.itemsize
        if kv_num_tokens is not None:
            tokens = kv_num_tokens
        else:
            fraction = mem_fraction or DEFAULT_KV_MEM_FRACTION
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = _cpu_available_bytes()
            budget = fraction * free
            tokens = min(self.max_running_requests * self.context_len, int(budget // bytes_per_token))
        tokens -= tokens % self.page_size
        if tokens < self.page_size:
            raise ValueError(
                f"the KV cache would hold {tokens} tokens, less than one page of {self.page_size}; "
                "raise kv_cache.num_tokens (or kv_cache.mem_fraction) or free memory"
            )
        return tokens

    def forward_batch(self, fb: ForwardBatch) -> ForwardResult:
        """Run one forward pass and sample one token per request (on the compute thread,
        under the caller's autograd mode)."""
        if self._compute is None:
            raise RuntimeError("the model worker is shut down")
        return self._compute.call(self._forward_batch, fb)

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    def forward_stage(self, fb: ForwardBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One pipeline stage's part of a forward pass (on the compute thread): the previous
        stage's hidden states in (None on the first stage); this stage's hidden states out,
        or the sampled token ids [B] on the last stage."""
        if self._compute is None:
            raise RuntimeError("the model worker is shut down")
        self._logprobs, self._prompt_logprobs = None, None
        return self._compute.call(self._forward_tokens, fb, hidden)

    def stage_extras(self) -> tuple[Any, Any, Any]:
        """The last pipeline stage's logprobs of its latest ``forward_stage``, as
        ``ForwardResult``'s (logprobs, top_logprobs, prompt_logprobs)."""
        lps, tops = self._logprobs if self._logprobs is not None else (None, None)
        return lps, tops, self._prompt_logprobs

    def launch_batch(self, fb: ForwardBatch, job: Any) -> None:
        """Asynchronous launch for the overlap and pipeline loops: queue ``job.run`` on the
        compute thread and return at once (no forward-thread hop; see core/loop/runner.py)."""
        if self._compute is None:
            raise RuntimeError("the model worker is shut down")
        self._compute.submit(job.run, self._forward_batch)

    def _release_compute(self) -> None:
        if self._compute is not None:
            self._compute = None
            ComputeThread.release()

    #: Fills ``ForwardResult.logprobs`` (and ``prompt_logprobs``) for requests that ask (the
    #: server checks this).
    supports_logprobs = True

    def _forward_batch(self, fb: ForwardBatch) -> ForwardResult:
        start = time.perf_counter()
        self.cpu_threads.before_forward()
        self._logprobs: tuple[list, list] | None = None
        self._prompt_logprobs: list | None = None
        tokens = self._forward_tokens(fb)
        ids: list[int] = tokens.tolist()
        result = ForwardResult(next_token_ids=ids, forward_time_s=time.perf_counter() - start)
        if self._logprobs is not None:
            result.logprobs, result.top_logprobs = self._logprobs
        result.prompt_logprobs = self._prompt_logprobs
        return result

    def _forward_tokens(self, fb: ForwardBatch, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """The sampled tokens [B] on the device (a non-last pipeline stage: its hidden
        states [T, H], from ``hidden_in`` unless it is the first stage)."""
        if fb.forward_mode is ForwardMode.IDLE or fb.batch_size == 0:
            if not self.model.is_last:
                return torch.zeros((0, self.arch.hidden_size), dtype=self.dtype, device=self.device)
            return torch.zeros(fb.batch_size, dtype=torch.int64, device=self.device)
        # NOTE: the scheduler must send consistent lists; a mismatch is a scheduler bug.
        assert len(fb.extend_lens) == len(fb.prefix_lens) == fb.batch_size
        assert len(fb.out_cache_loc) == fb.num_tokens == sum(fb.extend_lens)
        for i, slots in fb.prefix_slots:
            self.req_to_token[fb.req_pool_indices[i], : len(slots)] = torch.tensor(
                slots, dtype=torch.int64, device=self.device)
        need = fb.need_sample or [True] * fb.batch_size
        rows = [i for i, n in enumerate(need) if n]
        all_rows = len(rows) == fb.batch_size
        input_ids = torch.tensor(fb.input_ids, dtype=torch.int64, device=self.device) if self.model.is_first else None
        whole = self.model.is_first and self.model.is_last  # not a pipeline stage
        if (whole and self.cuda_graphs is not None and fb.num_tokens == fb.batch_size
                and self.cuda_graphs.can_run(fb.batch_size)):
            logits = self._decode_graph_logits(fb, input_ids)
            if not rows:
                return torch.zeros(fb.batch_size, dtype=torch.int64, device=self.device)
            if not all_rows:
                logits = logits[torch.tensor(rows, device=self.device)]
        else:
            meta = self.attn_backend.init_forward_metadata(fb)
            # Last token of each request; logits for those rows only. Built before the forward
            # is launched: a host-to-device copy after it would wait for it on a GPU.
            last = None
            if rows and (fb.num_tokens != fb.batch_size or not all_rows):
                ends = list(itertools.accumulate(fb.extend_lens))
                last = torch.tensor([ends[i] - 1 for i in rows], dtype=torch.int64, device=self.device)
            if self.model.is_first:
                x = input_ids
            else:
                assert hidden_in is not None and hidden_in.shape[0] == fb.num_tokens
                x = hidden_in
            hidden = self.model(x, meta.positions, meta)
            if not self.model.is_last:
                return hidden
            if fb.prompt_scores:
                self._prompt_logprobs = self._score_prompts(fb, hidden)
            if not rows:
                return torch.zeros(fb.batch_size, dtype=torch.int64, device=self.device)
            if last is not None:
                hidden = hidden[last]
            logits = self.model.compute_logits(hidden)

        def pick(values: list, default: object = None) -> list:
            if not values:
                return [default] * len(rows)
            return values if all_rows else [values[i] for i in rows]

        params = pick(fb.sampling_params)
        # Logprobs of the model's own distribution: taken before the sampler transforms
        # ``logits`` in place, and only for the rows that ask (none: no cost).
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        log_probs = torch.log_softmax(logits[want].float(), dim=-1) if want else None
        if any(p.min_new_tokens for p in params):
            suppress_early_stops(logits, params, pick(fb.output_ids), sorted(self.eos_token_ids))
        tokens = self.sampler.sample(
            logits,
            params,
            output_ids=pick(fb.output_ids),
            prompt_ids=pick(fb.prompt_ids),
            step_seeds=pick(fb.step_seeds),
        )
        if log_probs is not None:
            chosen, top = token_logprobs(log_probs, tokens[want], [params[i].logprobs for i in want])
            lps: list = [None] * fb.batch_size
            tops: list = [None] * fb.batch_size
            for j, i in enumerate(want):
                lps[rows[i]], tops[rows[i]] = chosen[j], top[j]
            self._logprobs = (lps, tops)
        if all_rows:
            return tokens
        out = torch.zeros(fb.batch_size, dtype=torch.int64, device=self.device)
        out[torch.tensor(rows, device=self.device)] = tokens
        return out

    def _score_prompts(self, fb: ForwardBatch, hidden: torch.Tensor) -> list:
        """``ForwardResult.prompt_logprobs`` for the requests ``fb.prompt_scores`` names: the
        logits of their scored positions, each against the prompt token that follows it."""
        out: list = [None] * fb.batch_size
        offset = 0
        for i, (n, spec) in enumerate(zip(fb.extend_lens, fb.prompt_scores)):
            if spec is not None and spec[0] > 0:
                scored, next_id = spec
                targets = fb.input_ids[offset + 1: offset + 1 + scored]
                if len(targets) < scored:  # the last scored position is this pass's last token
                    assert next_id is not None and len(targets) == scored - 1
                    targets = [*targets, next_id]
                k = fb.sampling_params[i].prompt_logprobs or 0
                chosen: list[float] = []
                top: list = []
                # In blocks: a long prompt's [tokens, vocab] logits at once could be gigabytes.
                for a in range(0, scored, PROMPT_SCORE_BLOCK):
                    b = min(scored, a + PROMPT_SCORE_BLOCK)
                    logits = self.model.compute_logits(hidden[offset + a: offset + b])
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    ids = torch.tensor(targets[a:b], dtype=torch.int64, device=log_probs.device)
                    c, t = token_logprobs(log_probs, ids, [k] * (b - a))
                    chosen += c
                    top += t
                out[i] = (chosen, top)
            elif spec is not None:
                out[i] = ([], [])
            offset += n
        return out

    def _decode_graph_logits(self, fb: ForwardBatch, input_ids: torch.Tensor) -> torch.Tensor:
        """A decode step replayed from its CUDA graph: logits [B, vocab]."""
        assert self.cuda_graphs is not None
        dev = self.device
        rows = torch.tensor(fb.req_pool_indices, dtype=torch.int64, device=dev)
        positions = torch.tensor(fb.prefix_lens, dtype=torch.int64, device=dev)
        loc = torch.tensor(fb.out_cache_loc, dtype=torch.int64, device=dev)
        return self.cuda_graphs.replay(input_ids, rows, positions, loc)
    def kv_buffers(self) -> "KVArgs":
        """The paged KV cache as raw bytes for a KV-transfer backend: per layer K then V, each a
        ``uint8`` array ``[num_kv_slots, bytes_per_slot]`` sharing memory with the cache, so a
        backend reads and writes pages in place (disaggregated prefill / decode)."""
        from loopserve.core.disagg.base import KVArgs

        if self.device.type != "cpu":
            raise ValueError("the built-in KV-transfer backends move CPU KV caches only; use "
                             "model.device=cpu or a transfer backend plugin for device memory")
        buffers = [t.view(self.num_kv_slots, -1).view(torch.uint8).numpy()
                   for t in (*self.k_cache, *self.v_cache)]
        layers = self.layer_range if self.layer_range is not None else (0, len(self.k_cache))
        return KVArgs(buffers=buffers, page_size=self.page_size, num_slots=self.num_kv_slots,
                      layers=(int(layers[0]), int(layers[1])))

    def shutdown(self) -> None:
        """Release the device memory (the worker is unusable afterwards); idempotent."""
        self._release_compute()
        self.k_cache.clear()
        self.v_cache.clear()
        self.model = None  # type: ignore[assignment]
        self.cuda_graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
