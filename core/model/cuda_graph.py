"""CUDA graphs for decode steps: capture the whole decode forward (table write, every layer,
final norm and LM head) once per batch-size bucket at start-up, then replay it.

A decode step of a small model is mostly Python and kernel-launch overhead; a replay is one
launch. Graphs need fixed shapes and fixed addresses, so the runner owns static input
buffers sized for the largest bucket; a batch of ``n`` requests is padded to the smallest
captured bucket >= n. Padding rows point at a reserved request row of the request-to-token
table whose one key is a reserved scratch KV slot (both outside what the scheduler hands
out), so they write and read only that slot; their logits are never looked at.

Only the Triton backend can be captured: its decode metadata is derived on the device
(``TritonAttentionBackend.decode_metadata``) and its kernels' launch shapes depend only on
the batch size. Sampling stays outside the graph (it has data-dependent branches per
request); it reads the replayed logits. Token ids are copied into the static buffer from a
device tensor, so ids produced on the device by a previous step (the overlap loop's
placeholders, once resolved there) need no host round trip.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

# Largest batch captured by default: beyond it a step's launch overhead is small next to
# its compute, and each bucket costs capture time and graph memory.
DEFAULT_MAX_CAPTURE_BS = 256


def capture_sizes(max_bs: int) -> list[int]:
    """Bucket sizes to capture for batches up to ``max_bs``: 1, 2, 4, 8, then every 8 (so a
    batch pads by fewer than 8 rows past 8), and ``max_bs`` itself."""
    if max_bs < 1:
        raise ValueError(f"the largest CUDA-graph batch must be >= 1, got {max_bs}")
    sizes = [s for s in (1, 2, 4) if s < max_bs] + list(range(8, max_bs, 8))
    return sizes + [max_bs]


def select_bucket(sizes: list[int], batch_size: int) -> int | None:
    """The smallest captured size >= ``batch_size`` (``sizes`` ascending); None when the
    batch is larger than every bucket (it then runs without a graph)."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


def resolve_cuda_graph(setting: bool | None, device: str, attention_backend: str) -> bool:
    """``model.cuda_graph``: None (auto) means on exactly when the device is CUDA and the
    attention backend is triton; true elsewhere is a configuration error."""
    if setting is None:
        return device.startswith("cuda") and attention_backend == "triton"
    if setting and not device.startswith("cuda"):
        raise ValueError("model.cuda_graph=true needs model.device=cuda; use model.cuda_graph=false on the CPU")
    if setting and attention_backend != "triton":
        raise ValueError("model.cuda_graph=true needs attention.backend=triton (the torch backend's decode "
                         "shapes vary per step); set attention.backend=triton or model.cuda_graph=false")
    return bool(setting)


class CudaGraphRunner:
    """Captured decode forwards for every bucket of ``capture_sizes(max_bs)``.

    ``model`` is the decoder (``forward(ids, positions, meta)``, ``compute_logits``),
    ``backend`` a ``TritonAttentionBackend``; ``dummy_row`` / ``scratch_slot`` are the reserved
    table row and KV slot the padding uses. Must be built and replayed on the same thread.
    """

    def __init__(self, model: Any, backend: Any, *, max_bs: int, dummy_row: int, scratch_slot: int) -> None:
        from loopserve.core.model.kernels.decode_attention import decode_buffers

        self.model = model
        self.backend = backend
        self.sizes = capture_sizes(max_bs)
        self.dummy_row = dummy_row
        self.scratch_slot = scratch_slot
        dev = backend.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.rows = torch.full((n,), dummy_row, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.loc = torch.full((n,), scratch_slot, dtype=torch.int64, device=dev)
        self.mid_o, self.mid_lse = decode_buffers(n, backend.num_heads, backend.head_dim, backend.num_kv_splits, dev)
        # One logits buffer for every bucket, written by the graphs: outputs kept per graph
        # would hold sum(buckets) x vocab floats (GBs for a 150k vocabulary).
        self.logits = torch.zeros((n, model.arch.vocab_size), dtype=torch.float32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _run(self, bs: int) -> None:
        meta = self.backend.decode_metadata(self.rows[:bs], self.positions[:bs], self.loc[:bs],
                                            self.mid_o[:bs], self.mid_lse[:bs])
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], meta)
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones then reuse its memory pool);
        logs the sizes, the time and the device memory the graphs took."""
        free_before = torch.cuda.mem_get_info(self.backend.device)[0]
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(device=self.backend.device)
        with torch.inference_mode(False), torch.no_grad():
            for bs in reversed(self.sizes):
                # Warm-up on a side stream (compiles the Triton kernels and lets cuBLAS pick
                # its algorithms outside the capture), then capture.
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._run(bs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._run(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.backend.device)
        used = free_before - torch.cuda.mem_get_info(self.backend.device)[0]
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s; %.1f MiB of device memory",
                 self.sizes, time.perf_counter() - t0, used / 2**20)

    def can_run(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.sizes[-1]

    def stage(self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
              loc: torch.Tensor) -> int:
        """Copy one decode step's device tensors [B] (token ids, request rows, the new tokens'
        positions, their KV slots) into the static buffers, pad them to the bucket (padding:
        the dummy row at position 0 writing the scratch slot) and return the bucket."""
        bs = input_ids.shape[0]
        bucket = select_bucket(self.sizes, bs)
        assert bucket is not None, f"batch of {bs} is larger than the largest captured graph"
        self.input_ids[:bs].copy_(input_ids)
        self.rows[:bs].copy_(rows)
        self.positions[:bs].copy_(positions)
        self.loc[:bs].copy_(loc)
        if bucket > bs:
            self.input_ids[bs:bucket].zero_()
            self.rows[bs:bucket].fill_(self.dummy_row)
            self.positions[bs:bucket].zero_()
            self.loc[bs:bucket].fill_(self.scratch_slot)
        return bucket

    def replay(self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               loc: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one decode step (inputs as ``stage`` takes them). Before
        ``capture`` (and in CPU tests) the bucket's forward runs eagerly over the same
        static, padded buffers."""
        bs = input_ids.shape[0]
        bucket = self.stage(input_ids, rows, positions, loc)
        graph = self.graphs.get(bucket)
        if graph is None:
            self._run(bucket)
        else:
            graph.replay()
        return self.logits[:bs]
