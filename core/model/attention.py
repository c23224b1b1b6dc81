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

from loopserve.core.model.cpu_native import decode_attention, extend_attention
from loopserve.core.sched.forward_batch import ForwardBatch

# Decode groups on the CPU gather at most this many bytes of keys (and as many of values),
# so the attention reads them from the cache the gather left them in.
CPU_GROUP_KV_BYTES = 2 << 20
MAX_DECODE_GROUPS = 64

# SDPA's enable_gqa (torch >= 2.5) shares K/V heads without copying them; older torch repeats.
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class _Group:
    """Requests attended together in one SDPA call, padded to ``max_q`` queries and
    ``max_kv`` keys each."""

    # Rows of the flat token batch in this group, in order; None when it is every row.
    token_idx: torch.Tensor | None
    # [B, max_kv]: KV slot of each key position (padding points at the request's first slot,
    # which is always written, so gathers never touch uninitialized memory).
    kv_idx: torch.Tensor
    # Additive (0 = attend, -inf = masked), in the cache dtype: [B, 1, max_q, max_kv]. None
    # means plain causal (extend only).
    mask: torch.Tensor | None
    # Extend only: where each of the group's tokens sits in the padded [B * max_q] queries.
    pad_pos: torch.Tensor | None
    max_q: int


@dataclass
class _Seq:
    """One request of a prefill attended on its own (no padding): its ``n`` new tokens are
    rows ``start .. start + n - 1`` of the flat batch, after ``prefix`` cached tokens."""

    start: int
    n: int
    # None for a fresh prompt (no cached prefix): its keys are exactly this pass's new
    # keys and plain causal attention applies. Else the slots of positions 0 .. prefix + n - 1
    # and the additive causal mask [1, 1, n, prefix + n] aligned to the end.
    kv_idx: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _NativeDecode:
    """Requests with one new token attended by the native CPU kernel, in place in the cache."""

    rows: torch.Tensor  # [n] request-table row of each request
    seq_lens: torch.Tensor  # [n] keys of each (its new token included)
    q_rows: torch.Tensor | None  # [n] flat-batch row of each one's token; None = row i
    max_len: int


@dataclass
class _NativeExtend:
    """Requests with several new tokens attended by the native CPU kernel, in place in the cache."""

    rows: torch.Tensor  # [n] request-table row of each request
    prefix: torch.Tensor  # [n] tokens already in the cache before this pass
    ext: torch.Tensor  # [n] new tokens
    starts: torch.Tensor  # [n] flat-batch row of each one's first new token
    max_len: int


@dataclass
class AttentionMetadata:
    """Everything the layers of one forward share; built once per step."""

    backend: AttentionBackend
    positions: torch.Tensor  # [T] position of each token in its sequence
    out_cache_loc: torch.Tensor  # [T] KV slot of each token
    # Padded groups: requests with one new token (decode) in buckets of similar length, and
    # prefill requests of similar shape batched together.
    groups: list[_Group]
    # Prefill requests whose shapes differ too much to pad together, one by one.
    seqs: list[_Seq]
    # Decode requests for the native CPU kernel (then not in ``groups``).
    native: _NativeDecode | None = None
    # Prefill requests for the native CPU kernel (then not in ``groups`` or ``seqs``).
    native_ext: _NativeExtend | None = None


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


def length_buckets(lens: list[int], max_buckets: int, min_size: int, ratio: float) -> list[list[int]]:
    """Split request indices into at most ``max_buckets`` groups of similar ``lens``, longest
    first: a group takes every request at least ``ratio`` times as long as its longest one
    (and at least ``min_size`` requests), so padding each group to its own longest wastes
    little. Per-group work is a few kernel calls per layer, hence the caps."""
    order = sorted(range(len(lens)), key=lens.__getitem__, reverse=True)
    buckets: list[list[int]] = []
    i, n = 0, len(order)
    while i < n:
        if len(buckets) == max_buckets - 1 or n - i <= 2 * min_size:
            j = n
        else:
            floor = ratio * lens[order[i]]
            j = i + min_size
            while j < n and lens[order[j]] >= floor:
                j += 1
            if n - j < min_size:
                j = n
        buckets.append(order[i:j])
        i = j
    return buckets


class TorchAttentionBackend(AttentionBackend):
    """Reference attention in plain torch: gather each request's keys through its
    request-to-token row and run SDPA.

    Decode requests (one new token) are attended in a few SDPA calls over buckets of similar
    context length, so a short request is not padded to the longest one's length. Prefill
    requests are batched when they pad well (e.g. prompts of one length); otherwise each
    runs on its own, with plain causal attention and no gather when nothing of it is
    cached — padding a batch of mixed-length prompts to its longest one and masking would
    cost several times the work. No loop over tokens; at most a loop over prefill requests.

    ``decode_buckets`` (max buckets), ``bucket_min_size`` and ``bucket_ratio`` tune the
    decode split (``decode_buckets=1`` pads all to one); ``group_kv_bytes`` caps a decode
    group's gathered keys (default: 2 MiB on the CPU, no cap elsewhere); ``varlen_waste`` is
    the padded / real attention-area ratio above which prefill requests run one by one.
    """

    def __init__(
        self,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        req_to_token: torch.Tensor,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        decode_buckets: int = 4,
        bucket_min_size: int = 16,
        bucket_ratio: float = 0.6,
        varlen_waste: float = 2.0,
        group_kv_bytes: int | None = None,
        native: object | None = None,
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
        self.dtype = k_cache[0].dtype
        self.decode_buckets = decode_buckets
        self.bucket_min_size = bucket_min_size
        self.bucket_ratio = bucket_ratio
        self.varlen_waste = varlen_waste
        if group_kv_bytes is None:
            group_kv_bytes = CPU_GROUP_KV_BYTES if self.device.type == "cpu" else 0
        # Keys of one decode group at most (0: no limit); values take as much again.
        self.group_kv_tokens = group_kv_bytes // (num_kv_heads * head_dim * self.dtype.itemsize)
        # The native CPU decode kernel (core/model/cpu_native.py): decode requests read the
        # cache in place instead of being gathered into padded groups.
        self.native = native
        if native is not None:
            assert self.dtype in (torch.float32, torch.bfloat16) and head_dim % 8 == 0 and self.device.type == "cpu"
            assert all(c.is_contiguous() for c in (*k_cache, *v_cache)) and req_to_token.is_contiguous()

    # ---- per step ---------------------------------------------------------------------

    def init_forward_metadata(self, fb: ForwardBatch) -> AttentionMetadata:
        dev = self.device
        num_reqs, num_tokens = fb.batch_size, fb.num_tokens
        rows = torch.tensor(fb.req_pool_indices, dtype=torch.int64, device=dev)
        prefix = torch.tensor(fb.prefix_lens, dtype=torch.int64, device=dev)
        loc = torch.tensor(fb.out_cache_loc, dtype=torch.int64, device=dev)

        if num_tokens == num_reqs:
            # NOTE: extend_lens are >= 1, so T == B means one new token per request, and
            # token i is request i's.
            self.req_to_token[rows, prefix] = loc
            if self.native is not None:
                native = _NativeDecode(rows, prefix + 1, None, max(fb.prefix_lens) + 1)
                return AttentionMetadata(self, prefix, loc, [], [], native)
            groups = self._decode_groups(list(range(num_reqs)), fb.prefix_lens, rows, prefix + 1, None)
            return AttentionMetadata(self, prefix, loc, groups, [])

        ext = torch.tensor(fb.extend_lens, dtype=torch.int64, device=dev)
        req_of_tok = torch.repeat_interleave(torch.arange(num_reqs, device=dev), ext, output_size=num_tokens)
        starts = torch.cumsum(ext, 0) - ext
        offset = torch.arange(num_tokens, device=dev) - starts[req_of_tok]
        positions = prefix[req_of_tok] + offset
        self.req_to_token[rows[req_of_tok], positions] = loc
        seq_lens = prefix + ext

        one = [i for i, n in enumerate(fb.extend_lens) if n == 1]
        many = [i for i, n in enumerate(fb.extend_lens) if n > 1]
        groups: list[_Group] = []
        seqs: list[_Seq] = []
        native = None
        if one and self.native is not None:
            sel = torch.tensor(one, dtype=torch.int64, device=dev)
            native = _NativeDecode(rows[sel], seq_lens[sel], starts[sel], max(fb.prefix_lens[i] for i in one) + 1)
        elif one:
            # The only token of request i is its last: starts[i].
            groups = self._decode_groups(one, fb.prefix_lens, rows, seq_lens, starts)
        if many and self.native is not None:
            sel = torch.tensor(many, dtype=torch.int64, device=dev)
            ext_native = _NativeExtend(rows[sel], prefix[sel], ext[sel], starts[sel],
                                       max(fb.prefix_lens[i] + fb.extend_lens[i] for i in many))
            return AttentionMetadata(self, positions, loc, groups, seqs, native, ext_native)
        if many:
            pl, el = fb.prefix_lens, fb.extend_lens
            max_q = max(el[i] for i in many)
            max_kv = max(pl[i] + el[i] for i in many)
            real = sum(el[i] * (pl[i] + el[i]) for i in many)
            if len(many) * max_q * max_kv <= self.varlen_waste * real:
                groups.append(self._extend_group(fb, many, len(many) == num_reqs, rows, prefix, seq_lens,
                                                 req_of_tok, offset, max_q, max_kv))
            else:
                tok_starts = starts.tolist()
                seqs = [self._seq(tok_starts[i], pl[i], el[i], fb.req_pool_indices[i]) for i in many]
        return AttentionMetadata(self, positions, loc, groups, seqs, native)

    def _kv_index(
        self, rows: torch.Tensor, seq_lens: torch.Tensor, max_kv: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Slice columns before indexing rows: copies [B, max_kv], not whole table rows.
        idx = self.req_to_token[:, :max_kv][rows]
        valid = torch.arange(max_kv, device=self.device)[None, :] < seq_lens[:, None]
        return torch.where(valid, idx, idx[:, :1]), valid

    def _decode_groups(
        self, reqs: list[int], prefix_lens: list[int], rows: torch.Tensor, seq_lens: torch.Tensor,
        tok_of_req: torch.Tensor | None,
    ) -> list[_Group]:
        """Groups for requests ``reqs`` with one new token each (``tok_of_req[i]`` is the
        flat-batch row of request i's token; None means row i)."""
        lens = [prefix_lens[i] for i in reqs]
        if self.decode_buckets > 1 and len(reqs) > 2 * self.bucket_min_size:
            buckets = [[reqs[j] for j in b] for b in
                       length_buckets(lens, self.decode_buckets, self.bucket_min_size, self.bucket_ratio)]
        else:
            buckets = [reqs]
        if self.group_kv_tokens:
            # Split big groups so that one group's gathered keys and values stay in the CPU
            # cache between the gather and the attention that reads them (a 3-5x faster
            # decode step than one big gather on the tiny model), within a bound on the
            # number of groups (each costs a few kernel calls per layer).
            total = sum(len(b) * (max(prefix_lens[i] for i in b) + 1) for b in buckets)
            cap = max(self.group_kv_tokens, -(-total // MAX_DECODE_GROUPS))
            chunked = []
            for bucket in buckets:
                per = max(1, cap // (max(prefix_lens[i] for i in bucket) + 1))
                chunked += [bucket[i : i + per] for i in range(0, len(bucket), per)]
            buckets = chunked
        every_row = tok_of_req is None and len(buckets) == 1 and len(reqs) == len(prefix_lens)
        groups = []
        for bucket in buckets:
            if every_row:
                g_rows, g_lens, token_idx = rows, seq_lens, None
            else:
                sel = torch.tensor(bucket, dtype=torch.int64, device=self.device)
                g_rows, g_lens = rows[sel], seq_lens[sel]
                token_idx = sel if tok_of_req is None else tok_of_req[sel]
            max_kv = max(prefix_lens[i] for i in bucket) + 1
            kv_idx, valid = self._kv_index(g_rows, g_lens, max_kv)
            groups.append(_Group(token_idx, kv_idx, self._additive(valid[:, None, None, :]), None, 1))
        return groups

    def _extend_group(
        self,
        fb: ForwardBatch,
        reqs: list[int],
        is_all: bool,
        rows: torch.Tensor,
        prefix: torch.Tensor,
        seq_lens: torch.Tensor,
        req_of_tok: torch.Tensor,
        offset: torch.Tensor,
        max_q: int,
        max_kv: int,
    ) -> _Group:
        dev = self.device
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
        return _Group(token_idx, kv_idx, self._additive(mask), pad_pos, max_q)

    def _seq(self, start: int, prefix: int, n: int, row: int) -> _Seq:
        if prefix == 0:
            return _Seq(start, n, None, None)
        kv_idx = self.req_to_token[row, : prefix + n]
        q_pos = prefix + torch.arange(n, device=self.device)
        attend = torch.arange(prefix + n, device=self.device)[None, :] <= q_pos[:, None]
        return _Seq(start, n, kv_idx, self._additive(attend[None, None]))

    def _additive(self, attend: torch.Tensor) -> torch.Tensor:
        """A boolean mask (True = attend) as SDPA's additive float mask."""
        return torch.zeros(attend.shape, dtype=self.dtype, device=self.device).masked_fill_(~attend, float("-inf"))

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
        groups, seqs = meta.groups, meta.seqs
        if (meta.native is None and meta.native_ext is None and not seqs and len(groups) == 1
                and groups[0].token_idx is None):
            return self._attend(q, k_cache, v_cache, groups[0])
        # NOTE: the native kernels take float32 queries and write float32 rows (a bfloat16
        # cache is widened as it is read); the other paths' rows are cast into that buffer
        # (bfloat16 -> float32 -> bfloat16 is exact).
        native = meta.native is not None or meta.native_ext is not None
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device) if native else torch.empty_like(q)
        if native:
            qc = q.detach().to(torch.float32).contiguous()
        if meta.native is not None:
            nd = meta.native
            decode_attention(self.native, qc, k_cache, v_cache, self.req_to_token, nd.rows, nd.seq_lens,
                             nd.q_rows, out, self.scale, nd.max_len)
        if meta.native_ext is not None:
            ne = meta.native_ext
            extend_attention(self.native, qc, k_cache, v_cache, self.req_to_token, ne.rows, ne.prefix, ne.ext,
                             ne.starts, out, self.scale, ne.max_len)
        for g in groups:
            assert g.token_idx is not None
            out[g.token_idx] = self._attend(q[g.token_idx], k_cache, v_cache, g)
        for sq in seqs:
            out[sq.start : sq.start + sq.n] = self._attend_seq(q, k, v, k_cache, v_cache, sq)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group) -> torch.Tensor:
        return self._attend_decode(q, k_cache, v_cache, g) if g.pad_pos is None else \
            self._attend_extend(q, k_cache, v_cache, g)

    def _gather(self, cache: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """[*kv_idx.shape, kv_heads, D] keys or values of the slots in ``kv_idx``."""
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

    def _attend_seq(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        sq: _Seq,
    ) -> torch.Tensor:
        rows = slice(sq.start, sq.start + sq.n)
        qs = q[rows].transpose(0, 1)[None]  # [1, heads, n, D]
        if sq.kv_idx is None:
            # A fresh prompt: its keys are this pass's (the cache holds the same values).
            ks = k[rows].detach().to(k_cache.dtype)
            vs = v[rows].detach().to(v_cache.dtype)
        else:
            ks, vs = self._gather(k_cache, sq.kv_idx), self._gather(v_cache, sq.kv_idx)
        o = _sdpa_gqa(qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], sq.mask, self.scale, self.group_size)
        return o[0].transpose(0, 1)


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
