"""Paged decode attention: one new token per request, split-K over the context.

A request's context is cut into ``num_splits`` equal parts (the split length is worked out
in the kernel from the request's own length, so the launch shape depends only on the batch
size: that is what lets CUDA graphs capture it). Pass 1 runs one program per (request, K/V
head, split): the query heads that share the K/V head (GQA/MQA) are the rows of one
``tl.dot``, so each key is loaded once per group; it writes the split's normalized partial
output and its log-sum-exp. Pass 2 merges the splits of each (request, head). Long contexts
thus spread over ``batch x kv_heads x splits`` programs instead of ``batch x kv_heads``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loopserve.core.model.kernels import next_pow2


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqIdx, SeqLens, MidO, MidLse,
    sm_scale,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_rt,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    num_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(ReqIdx + b).to(tl.int64)
    seq_len = tl.load(SeqLens + b)
    split_len = (seq_len + num_splits - 1) // num_splits
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        slots = tl.load(ReqToToken + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # An empty split (a request shorter than num_splits tokens) contributes weight 0.
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    mo = MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(mo, out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, O,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ot, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask, other=float("-inf"))
    # Split 0 is never empty (every request has at least one key), so m is finite.
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)
    part = tl.load(MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)


# triton.jit picks the interpreter or the compiler when the module is imported. The
# interpreter (triton 3.9) gets half-precision tl.dot wrong, so there the dots run in float32
# (DOT_F32); compiled kernels keep bf16/fp16 operands for the tensor cores.
INTERPRETED = type(_decode_split_kernel).__name__ == "InterpretedFunction"


def decode_buffers(batch: int, num_heads: int, head_dim: int, num_splits: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for pass 1 (partial outputs [B, H, S, D] and log-sum-exps [B, H, S], float32),
    shared by every layer of a step."""
    mid_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    *,
    scale: float,
    block_n: int = 32,
) -> torch.Tensor:
    """Attention of ``q`` [B, H, D] (request b's one new token) over keys 0 .. seq_lens[b] - 1
    of request b, whose slots are ``req_to_token[req_pool_indices[b], :seq_lens[b]]``; the
    new token's K/V must already be in the cache. Writes and returns ``out`` [B, H, D].
    ``seq_lens`` must be >= 1. The number of splits is ``mid_o.shape[2]``."""
    b, h, d = q.shape
    s_cap, kvh = k_cache.shape[0], k_cache.shape[1]
    assert k_cache.shape == v_cache.shape == (s_cap, kvh, d), (k_cache.shape, v_cache.shape, q.shape)
    assert h % kvh == 0, f"{h} query heads do not share {kvh} K/V heads evenly"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out), ("mid_o", mid_o)):
        assert t.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    assert req_to_token.stride(1) == 1 and req_to_token.dtype in (torch.int32, torch.int64)
    assert req_pool_indices.shape == seq_lens.shape == (b,)
    num_splits = mid_o.shape[2]
    assert mid_o.shape == (b, h, num_splits, d) and mid_lse.shape == (b, h, num_splits)
    assert mid_o.dtype == mid_lse.dtype == torch.float32 and mid_lse.stride(-1) == 1
    if b == 0:
        return out
    group = h // kvh
    block_d = max(16, next_pow2(d))
    _decode_split_kernel[(b, kvh, num_splits)](
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        num_splits,
        GROUP=group, HEAD_DIM=d, BLOCK_H=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_F32=INTERPRETED,
    )
    _decode_merge_kernel[(b, h)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits),
    )
    return out
