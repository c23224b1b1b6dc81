"""Attention over the paged KV cache: the backend interface and the torch reference backend.

The KV cache is one K and one V tensor per layer, shaped ``[num_slots, num_kv_heads,
head_dim]``; a slot holds one token. Which slots belong to which request is recorded in the
worker's request-to-token table ``req_to_token[row, position] = slot``. Per step the backend
builds ``AttentionMetadata`` once (writes the new tokens' slots into the table, and works out
the gather indices and masks); every layer then writes its new K/V and attends, batched over
requests. ``TorchAttentionBackend`` is the reference: plain torch gathers plus
``scaled_dot_product_attention``, exact enough in float32 that greedy tokens equal
transformers'.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopserve.core.forward_batch import ForwardBatch

# SDPA's enable_gqa (torch >= 2.5) shares K/V heads without copying them; older torch repeats.
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class _Group:
    """Requests attended together: padded to ``max_q`` queries and ``max_kv`` keys each."""

    # Rows of the flat token batch in this group, in order; None when it is every row.
    token_idx: torch.Tensor | None
    # [B, max_kv]: KV slot of each key position (padding points at the request's first slot,
    # which is always written, so gathers never touch uninitialized memory).
    kv_idx: torch.Tensor
    # Boolean, True = attend: [B, 1, max_q, max_kv]. None means plain causal (extend only).
    mask: torch.Tensor | None
    # Extend only: where each of the group's tokens sits in the padded [B * max_q] queries.
    pad_pos: torch.Tensor | None
    max_q: int


@dataclass
class AttentionMetadata:
    """Everything the layers of one forward share; built once per step."""

    backend: AttentionBackend
    positions: torch.Tensor  # [T] position of each token in its sequence
    out_cache_loc: torch.Tensor  # [T] KV slot of each token
    # Requests with one new token (decode, or an extend of one token) take the decode path;
    # the rest (prefill chunks) the padded extend path. A MIXED batch has both, so one long
    # prefill does not pad every decode request to its length.
    decode: _Group | None
    extend: _Group | None


class AttentionBackend(ABC):
    """Computes attention for every layer of a forward pass over the paged KV cache.

    ``init_forward_metadata`` is called once per step before the model runs: it must record
    ``fb.out_cache_loc`` in the request-to-token table. ``forward`` is called once per layer
    with the layer's new q/k/v (rotary already applied); it stores k/v in the cache at
    ``out_cache_loc`` and returns the attention output [T, num_heads, head_dim].
    """

    @abstractmethod
    def init_forward_metadata(self, fb: ForwardBatch) -> AttentionMetadata: ...

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...


class TorchAttentionBackend(AttentionBackend):
    """Reference attention: gather each request's keys by its request-to-token row, mask,
    and run SDPA batched over requests. No loop over tokens or requests."""

    def __init__(
        self,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        req_to_token: torch.Tensor,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        assert len(k_cache) == len(v_cache) and k_cache, "one K and one V tensor per layer"
        assert k_cache[0].shape[1:] == (num_kv_heads, head_dim), k_cache[0].shape
        assert req_to_token.dtype == torch.int64
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.req_to_token = req_to_token
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group_size = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        self.device = req_to_token.device

    # ---- per step ---------------------------------------------------------------------

    def init_forward_metadata(self, fb: ForwardBatch) -> AttentionMetadata:
        dev = self.device
        num_reqs, num_tokens = fb.batch_size, fb.num_tokens
        rows = torch.tensor(fb.req_pool_indices, dtype=torch.int64, device=dev)
        prefix = torch.tensor(fb.prefix_lens, dtype=torch.int64, device=dev)
        loc = torch.tensor(fb.out_cache_loc, dtype=torch.int64, device=dev)

        if num_tokens == num_reqs:
            # NOTE: extend_lens are >= 1, so T == B means one new token per request.
            self.req_to_token[rows, prefix] = loc
            decode = self._decode_group(None, rows, prefix + 1, max(fb.prefix_lens) + 1)
            return AttentionMetadata(self, prefix, loc, decode, None)

        ext = torch.tensor(fb.extend_lens, dtype=torch.int64, device=dev)
        req_of_tok = torch.repeat_interleave(
            torch.arange(num_reqs, device=dev), ext, output_size=num_tokens
        )
        starts = torch.cumsum(ext, 0) - ext
        offset = torch.arange(num_tokens, device=dev) - starts[req_of_tok]
        positions = prefix[req_of_tok] + offset
        self.req_to_token[rows[req_of_tok], positions] = loc
        seq_lens = prefix + ext

        one = [i for i, n in enumerate(fb.extend_lens) if n == 1]
        many = [i for i, n in enumerate(fb.extend_lens) if n > 1] if one else list(range(num_reqs))
        decode = extend = None
        if one:
            sel = torch.tensor(one, dtype=torch.int64, device=dev)
            # The only token of request i is its last: starts[i].
            decode = self._decode_group(
                starts[sel], rows[sel], seq_lens[sel], max(fb.prefix_lens[i] for i in one) + 1
            )
        if many:
            extend = self._extend_group(fb, many, len(many) == num_reqs, rows, prefix, ext, seq_lens,
                                        req_of_tok, offset)
        return AttentionMetadata(self, positions, loc, decode, extend)

    def _kv_index(
        self, rows: torch.Tensor, seq_lens: torch.Tensor, max_kv: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Slice columns before indexing rows: copies [B, max_kv], not whole table rows.
        idx = self.req_to_token[:, :max_kv][rows]
        valid = torch.arange(max_kv, device=self.device)[None, :] < seq_lens[:, None]
        return torch.where(valid, idx, idx[:, :1]), valid

    def _decode_group(
        self, token_idx: torch.Tensor | None, rows: torch.Tensor, seq_lens: torch.Tensor, max_kv: int
    ) -> _Group:
        kv_idx, valid = self._kv_index(rows, seq_lens, max_kv)
        return _Group(token_idx, kv_idx, valid[:, None, None, :], None, 1)

    def _extend_group(
        self,
        fb: ForwardBatch,
        reqs: list[int],
        is_all: bool,
        rows: torch.Tensor,
        prefix: torch.Tensor,
        ext: torch.Tensor,
        seq_lens: torch.Tensor,
        req_of_tok: torch.Tensor,
        offset: torch.Tensor,
    ) -> _Group:
        dev = self.device
        max_q = max(fb.extend_lens[i] for i in reqs)
        max_kv = max(fb.prefix_lens[i] + fb.extend_lens[i] for i in reqs)
        if is_all:
            token_idx = None
            local_req = req_of_tok
        else:
            sel = torch.tensor(reqs, dtype=torch.int64, device=dev)
            rows, prefix, seq_lens = rows[sel], prefix[sel], seq_lens[sel]
            in_group = torch.zeros(fb.batch_size, dtype=torch.bool, device=dev)
            in_group[sel] = True
            token_idx = torch.nonzero(in_group[req_of_tok]).squeeze(1)
            local_of = torch.cumsum(in_group, 0) - 1
            local_req = local_of[req_of_tok[token_idx]]
            offset = offset[token_idx]
        kv_idx, valid = self._kv_index(rows, seq_lens, max_kv)
        pad_pos = local_req * max_q + offset
        if all(fb.prefix_lens[i] == 0 and fb.extend_lens[i] == max_q for i in reqs):
            # Fresh prompts of one length: plain causal attention, no padding, and SDPA can
            # skip the masked half.
            return _Group(token_idx, kv_idx, None, pad_pos, max_q)
        # Query i of a request sits at position prefix + i and sees keys 0 .. prefix + i.
        # Padded queries (i >= extend_len) see the whole sequence, so no row is all-masked
        # (that would give NaN); their outputs are dropped.
        q_pos = prefix[:, None] + torch.arange(max_q, device=dev)[None, :]
        causal = torch.arange(max_kv, device=dev)[None, None, :] <= q_pos[:, :, None]
        mask = (causal & valid[:, None, :])[:, None]  # [B, 1, max_q, max_kv]
        return _Group(token_idx, kv_idx, mask, pad_pos, max_q)

    # ---- per layer --------------------------------------------------------------------

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer_id], self.v_cache[layer_id]
        # The cache is inference state, never part of an autograd graph: a graph through it
        # would chain every step to the previous ones.
        k_cache[meta.out_cache_loc] = k.detach().to(k_cache.dtype)
        v_cache[meta.out_cache_loc] = v.detach().to(v_cache.dtype)
        dec, ext = meta.decode, meta.extend
        if ext is None:
            assert dec is not None
            if dec.token_idx is None:
                return self._attend_decode(q, k_cache, v_cache, dec)
        out = torch.empty_like(q)
        if dec is not None:
            assert dec.token_idx is not None
            out[dec.token_idx] = self._attend_decode(q[dec.token_idx], k_cache, v_cache, dec)
        if ext is not None:
            q_ext = q if ext.token_idx is None else q[ext.token_idx]
            o = self._attend_extend(q_ext, k_cache, v_cache, ext)
            if ext.token_idx is None:
                return o
            out[ext.token_idx] = o
        return out

    def _gather(self, cache: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """[B, max_kv, kv_heads, D] keys or values of the slots in ``kv_idx``."""
        # A row gather over a 2-D view (embedding lookup) is several times faster on the
        # CPU than advanced indexing of the 3-D cache.
        flat = cache.view(cache.shape[0], self.num_kv_heads * self.head_dim)
        return F.embedding(kv_idx, flat).view(*kv_idx.shape, self.num_kv_heads, self.head_dim)

    def _attend_decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group
    ) -> torch.Tensor:
        b = q.shape[0]
        # GQA without repeating K/V: the G query heads of a KV head act as G query rows.
        qp = q.reshape(b, self.num_kv_heads, self.group_size, self.head_dim)
        kk = self._gather(k_cache, g.kv_idx).transpose(1, 2)  # [B, kv_heads, max_kv, D]
        vv = self._gather(v_cache, g.kv_idx).transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, kk, vv, attn_mask=g.mask, scale=self.scale)
        return o.reshape(b, self.num_heads, self.head_dim)

    def _attend_extend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group
    ) -> torch.Tensor:
        assert g.pad_pos is not None
        b, max_q = g.kv_idx.shape[0], g.max_q
        if b * max_q == q.shape[0]:
            padded = q  # no padding needed: every request has max_q tokens
        else:
            padded = q.new_zeros(b * max_q, self.num_heads, self.head_dim)
            padded[g.pad_pos] = q
        qp = padded.view(b, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        kk = self._gather(k_cache, g.kv_idx).transpose(1, 2)
        vv = self._gather(v_cache, g.kv_idx).transpose(1, 2)
        o = _sdpa_gqa(qp, kk, vv, g.mask, self.scale, self.group_size)
        o = o.transpose(1, 2).reshape(b * max_q, self.num_heads, self.head_dim)
        return o if padded is q else o[g.pad_pos]


def _sdpa_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, group: int
) -> torch.Tensor:
    """SDPA where ``group`` query heads share each K/V head; causal when ``mask`` is None."""
    causal = mask is None
    if group > 1 and not _HAS_ENABLE_GQA:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    elif group > 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
