"""RMSNorm with the residual add fused in: one read of the hidden row and the residual, one
write of each result, instead of the add, the float32 upcast, the mean, the rsqrt and the
scale as separate kernels. Numerics follow the decoder's ``RMSNorm`` (float32 statistics, the
normalized row cast back to the input dtype before the weight multiplies it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loopserve.core.model.kernels import next_pow2


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y, ROut,
    stride_x, stride_r, stride_y, stride_ro,
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the input dtype, as ``x + residual`` in torch would be.
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ROut + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    # Products in float32, rounded once: what torch does for a half-precision multiply.
    tl.store(Y + row * stride_y + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty),
             mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rmsnorm(x + residual) * weight, x + residual)``, or ``(rmsnorm(x) * weight, None)``
    without a residual. ``x`` [T, N]; rows must be contiguous."""
    t, n = x.shape
    assert weight.shape == (n,) and weight.stride(0) == 1, (weight.shape, x.shape)
    assert x.stride(1) == 1, "x: rows must be contiguous"
    y = torch.empty_like(x)
    r_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
        r_out = torch.empty_like(x)
    if t == 0:
        return y, r_out
    _rmsnorm_kernel[(t,)](
        x, residual if residual is not None else x, weight, y, r_out if r_out is not None else y,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        r_out.stride(0) if r_out is not None else 0,
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(n),
    )
    return y, r_out
