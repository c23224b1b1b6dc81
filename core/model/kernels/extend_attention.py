"""Paged extend (prefill) attention: new tokens after a cached prefix, causal among
themselves, many requests of different lengths in one launch.

Request b's ``extend_lens[b]`` new tokens are rows ``q_start[b] ..`` of the flat batch and sit
at positions ``prefix_lens[b] ..``; their K/V are already stored in the cache, so every key
(prefix or new) is read through the request-to-token table and the causal rule is simply
key position <= query position. One program per (request, query head, block of queries); a
block past its request's length reads nothing and stores nothing, so the grid is sized by the
longest request without costing the shorter ones more than a launch slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loopserve.core.model.kernels import next_pow2


@triton.jit
def _extend_kernel(
    Q, K, V, O, ReqToToken, ReqIdx, PrefixLens, ExtendLens, QStart,
    sm_scale,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.program_id(2)
    ext = tl.load(ExtendLens + b)
    prefix = tl.load(PrefixLens + b)
    row = tl.load(ReqIdx + b).to(tl.int64)
    q0 = tl.load(QStart + b).to(tl.int64)
    kvh = h // GROUP

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < ext
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + offs_m
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys up to the last query of this block; none for a block past the request's end (its
    # queries are all masked, so it stores nothing).
    end = tl.where(blk * BLOCK_M < ext, prefix + tl.minimum((blk + 1) * BLOCK_M, ext), 0)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        slots = tl.load(ReqToToken + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        attend = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(attend, s, float("-inf"))
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

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(O + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# See decode_attention.py: float32 dots under the interpreter only.
_DOT_F32 = type(_extend_kernel).__name__ == "InterpretedFunction"


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    q_start: torch.Tensor,
    max_extend: int,
    out: torch.Tensor,
    *,
    scale: float,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """Attention of the flat new tokens ``q`` [T, H, D] of B requests (request b: rows
    ``q_start[b] .. q_start[b] + extend_lens[b] - 1``) over their prefix and their causal new
    keys, all read from the cache. ``max_extend`` is max(extend_lens) (known on the host;
    it sizes the grid). Writes and returns ``out`` [T, H, D]."""
    t, h, d = q.shape
    s_cap, kvh = k_cache.shape[0], k_cache.shape[1]
    assert k_cache.shape == v_cache.shape == (s_cap, kvh, d), (k_cache.shape, v_cache.shape, q.shape)
    assert h % kvh == 0, f"{h} query heads do not share {kvh} K/V heads evenly"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        assert x.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    assert req_to_token.stride(1) == 1 and req_to_token.dtype in (torch.int32, torch.int64)
    b = req_pool_indices.shape[0]
    assert prefix_lens.shape == extend_lens.shape == q_start.shape == (b,)
    if b == 0 or t == 0:
        return out
    grid = (b, h, triton.cdiv(max_extend, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, q_start,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=h // kvh, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
        DOT_F32=_DOT_F32,
    )
    return out
