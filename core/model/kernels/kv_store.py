"""Store a layer's new K and V into their cache slots, both in one launch (the torch way is
two index-put kernels per layer)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loopserve.core.model.kernels import next_pow2


@triton.jit
def _kv_store_kernel(
    K, V, KCache, VCache, Loc,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcs, stride_kch,
    stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(KCache + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
             k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(VCache.dtype.element_ty), mask=mask)


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             loc: torch.Tensor) -> None:
    """``k_cache[loc[t]] = k[t]`` and ``v_cache[loc[t]] = v[t]`` for every token t (cast to the
    cache dtype). ``k``/``v`` [T, kv_heads, D]; ``loc`` [T] integer slots."""
    t, kvh, d = k.shape
    assert v.shape == k.shape and loc.shape == (t,), (k.shape, v.shape, loc.shape)
    assert k_cache.shape[1:] == v_cache.shape[1:] == (kvh, d), (k_cache.shape, k.shape)
    for name, x in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert x.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    if t == 0:
        return
    _kv_store_kernel[(t,)](
        k, v, k_cache, v_cache, loc,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        NUM_HEADS=kvh, HEAD_DIM=d, BLOCK_H=next_pow2(kvh), BLOCK_D=next_pow2(d),
    )
