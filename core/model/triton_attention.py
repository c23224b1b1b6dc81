"""The Triton attention backend: same interface as ``TorchAttentionBackend``, but attention
reads the paged KV cache directly in Triton kernels (core/model/kernels/) instead of
gathering each request's keys into a padded tensor first.

A step is either a pure decode (one new token per request: the split-K decode kernel, whose
launch shape depends only on the batch size, so CUDA graphs can capture it) or anything
with a prefill chunk in it (EXTEND / MIXED: the varlen extend kernel, which handles a
one-token request as a one-query extend). New K/V go into the cache through one store
kernel per layer before attention reads them.

On CUDA the kernels are compiled; on the CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is first imported), which is for tests: it is exact
but orders of magnitude slower than the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopserve.core.model.attention import AttentionBackend
from loopserve.core.model.kernels.decode_attention import decode_attention, decode_buffers
from loopserve.core.model.kernels.extend_attention import extend_attention
from loopserve.core.model.kernels.kv_store import kv_store
from loopserve.core.sched.forward_batch import ForwardBatch

# Splits of a decode request's context: enough programs to fill a GPU at small batch sizes
# with long contexts; on the CPU (interpreter) every program is slow Python, so few.
DEFAULT_KV_SPLITS_CUDA = 8
DEFAULT_KV_SPLITS_CPU = 2


@dataclass
class TritonMetadata:
    """What every layer of one step shares (the fields the decoder reads, ``backend`` and
    ``positions``, are named as in ``AttentionMetadata``)."""

    backend: TritonAttentionBackend
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T]
    req_pool_indices: torch.Tensor  # [B]
    decode: bool
    # decode: [B] context length including the new token; scratch for the split pass.
    seq_lens: torch.Tensor | None = None
    mid_o: torch.Tensor | None = None
    mid_lse: torch.Tensor | None = None
    # extend: [B] cached prefix, new tokens, first flat row; the longest extend.
    prefix_lens: torch.Tensor | None = None
    extend_lens: torch.Tensor | None = None
    q_start: torch.Tensor | None = None
    max_extend: int = 0


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels over per-layer K/V caches ``[slots, kv_heads, D]``
    and the request-to-token table (int64). ``num_kv_splits`` is the decode split-K factor."""

    def __init__(
        self,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        req_to_token: torch.Tensor,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        num_kv_splits: int | None = None,
    ) -> None:
        assert len(k_cache) == len(v_cache) and k_cache, "one K and one V tensor per layer"
        assert k_cache[0].shape[1:] == (num_kv_heads, head_dim), k_cache[0].shape
        assert req_to_token.dtype == torch.int64
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.req_to_token = req_to_token
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.device = req_to_token.device
        if num_kv_splits is None:
            num_kv_splits = DEFAULT_KV_SPLITS_CUDA if self.device.type == "cuda" else DEFAULT_KV_SPLITS_CPU
        if num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits

    # ---- per step ---------------------------------------------------------------------

    def init_forward_metadata(self, fb: ForwardBatch) -> TritonMetadata:
        dev = self.device
        num_reqs, num_tokens = fb.batch_size, fb.num_tokens
        rows = torch.tensor(fb.req_pool_indices, dtype=torch.int64, device=dev)
        prefix = torch.tensor(fb.prefix_lens, dtype=torch.int64, device=dev)
        loc = torch.tensor(fb.out_cache_loc, dtype=torch.int64, device=dev)
        if num_tokens == num_reqs:
            # NOTE: extend_lens are >= 1, so T == B means one new token per request.
            mid_o, mid_lse = decode_buffers(num_reqs, self.num_heads, self.head_dim, self.num_kv_splits, dev)
            return self.decode_metadata(rows, prefix, loc, mid_o, mid_lse)
        ext = torch.tensor(fb.extend_lens, dtype=torch.int64, device=dev)
        req_of_tok = torch.repeat_interleave(torch.arange(num_reqs, device=dev), ext, output_size=num_tokens)
        starts = torch.cumsum(ext, 0) - ext
        positions = prefix[req_of_tok] + torch.arange(num_tokens, device=dev) - starts[req_of_tok]
        self.req_to_token[rows[req_of_tok], positions] = loc
        return TritonMetadata(self, positions, loc, rows, decode=False, prefix_lens=prefix, extend_lens=ext,
                              q_start=starts, max_extend=max(fb.extend_lens))

    def decode_metadata(self, rows: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor,
                        mid_o: torch.Tensor, mid_lse: torch.Tensor) -> TritonMetadata:
        """Decode metadata from device tensors alone (request rows, the new tokens' positions
        and slots): records the slots in the table and derives the lengths with no host
        round trip, so a CUDA graph can capture it over static buffers."""
        self.req_to_token[rows, positions] = loc
        return TritonMetadata(self, positions, loc, rows, decode=True, seq_lens=positions + 1,
                              mid_o=mid_o, mid_lse=mid_lse)

    # ---- per layer --------------------------------------------------------------------

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TritonMetadata,  # type: ignore[override]
    ) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer_id], self.v_cache[layer_id]
        # The cache is inference state, never part of an autograd graph.
        kv_store(k.detach().contiguous(), v.detach().contiguous(), k_cache, v_cache, meta.out_cache_loc)
        q = q.detach().to(k_cache.dtype).contiguous()
        out = torch.empty_like(q)
        if meta.decode:
            assert meta.seq_lens is not None and meta.mid_o is not None and meta.mid_lse is not None
            return decode_attention(q, k_cache, v_cache, self.req_to_token, meta.req_pool_indices, meta.seq_lens,
                                    out, meta.mid_o, meta.mid_lse, scale=self.scale)
        assert meta.prefix_lens is not None and meta.extend_lens is not None and meta.q_start is not None
        return extend_attention(q, k_cache, v_cache, self.req_to_token, meta.req_pool_indices, meta.prefix_lens,
                                meta.extend_lens, meta.q_start, meta.max_extend, out, scale=self.scale)
