"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in plain torch.

Module and parameter names mirror Hugging Face's ``*ForCausalLM`` classes so a checkpoint's
tensors load by name. Numerics follow transformers op for op (float32 RMSNorm, rotary tables
built the same way, SwiGLU) so greedy tokens match its ``generate``. The decoder works on a
flat batch of ``T`` tokens from many requests; attention over the paged KV cache is delegated
to the attention backend carried by the metadata, and logits are computed only for the rows
that are sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loopserve.core.model import cpu_native
from loopserve.core.model.arch_config import ModelArchConfig, RopeScaling
from loopserve.core.model.attention import AttentionMetadata


@dataclass(frozen=True)
class _Alloc:
    """Where and in which dtype parameters are allocated."""

    dtype: torch.dtype
    device: torch.device

    def empty(self, *shape: int) -> nn.Parameter:
        # Uninitialized on purpose: the loader overwrites every parameter (and fails on a
        # missing one), so random init would only cost time.
        return nn.Parameter(torch.empty(*shape, dtype=self.dtype, device=self.device), requires_grad=False)


class Linear(nn.Module):
    """``nn.Linear`` without the init (same parameter names: weight [out, in], bias).

    ``pack_onednn`` (CPU) replaces the weight by a copy in oneDNN's blocked layout, used
    through ``torch.ops.mkldnn._linear_pointwise``: on the project's AMD CPU that ran the
    model's float32 GEMMs 2.2-2.5x faster than ``F.linear`` (MKL's sgemm), with float32
    accuracy (docs/benchmarks.md, "CPU throughput against vLLM").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, alloc: _Alloc) -> None:
        super().__init__()
        self.weight = alloc.empty(out_features, in_features)
        self.bias = alloc.empty(out_features) if bias else None
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def pack_onednn(self) -> None:
        """Keep the weight only in oneDNN's layout (no second copy of it)."""
        w = self.weight.detach()
        # The batch size is only a hint for the layout; any number of rows works.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        self.weight = nn.Parameter(w.new_empty(0), requires_grad=False)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like transformers' ``LlamaRMSNorm``.

    ``fused`` (set by ``LlamaForCausalLM.use_fused_norm``) runs it as one Triton kernel, with
    the residual add folded in for ``add_and_norm``; same numerics.
    """

    native: Any = None  # the native CPU kernels (model.cpu_fused_ops), or None

    def __init__(self, dim: int, eps: float, alloc: _Alloc) -> None:
        super().__init__()
        self.weight = alloc.empty(dim)
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.is_contiguous():
            return cpu_native.rmsnorm(self.native, x, self.weight, self.eps)[0]
        if self.fused:
            from loopserve.core.model.kernels.rmsnorm import rmsnorm

            return rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].view(x.shape)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``."""
        if self.native is not None and x.is_contiguous() and residual.is_contiguous():
            return cpu_native.rmsnorm(self.native, x, self.weight, self.eps, residual)
        if self.fused:
            from loopserve.core.model.kernels.rmsnorm import rmsnorm

            y, total = rmsnorm(x, self.weight, self.eps, residual=residual)
            assert total is not None
            return y, total
        total = x + residual
        return self(total), total


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim / 2] in float32, computed with the same ops as
    transformers' rope init functions so the tables agree bit for bit."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling
    assert scaling.low_freq_factor is not None and scaling.high_freq_factor is not None
    assert scaling.original_max_position_embeddings is not None
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    native: Any = None  # the native CPU kernels (model.cpu_fused_ops): rotary in place

    def __init__(self, arch: ModelArchConfig, layer_id: int, alloc: _Alloc) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        h, d = arch.hidden_size, arch.head_dim
        self.q_proj = Linear(h, self.num_heads * d, bias=arch.attention_bias, alloc=alloc)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=arch.attention_bias, alloc=alloc)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=arch.attention_bias, alloc=alloc)
        self.o_proj = Linear(self.num_heads * d, h, bias=arch.o_proj_bias, alloc=alloc)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps, alloc)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps, alloc)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.native is not None and q.is_contiguous() and k.is_contiguous() and cos.is_contiguous():
            cpu_native.rope_(self.native, q, cos, sin)  # the expression below, bit for bit
            cpu_native.rope_(self.native, k, cos, sin)
        else:
            # Same expression as transformers' apply_rotary_pos_emb, so rounding agrees.
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
        out = meta.backend.forward(self.layer_id, q, k, v, meta)
        return self.o_proj(out.view(t, self.num_heads * self.head_dim))


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, alloc: _Alloc) -> None:
        super().__init__()
        self.weight = alloc.empty(num, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LlamaMLP(nn.Module):
    native: Any = None  # the native CPU kernels (model.cpu_fused_ops): silu(gate) * up in one pass

    def __init__(self, arch: ModelArchConfig, alloc: _Alloc) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = Linear(h, i, bias=arch.mlp_bias, alloc=alloc)
        self.up_proj = Linear(h, i, bias=arch.mlp_bias, alloc=alloc)
        self.down_proj = Linear(i, h, bias=arch.mlp_bias, alloc=alloc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.down_proj(cpu_native.silu_mul(self.native, self.gate_proj(x).contiguous(),
                                                      self.up_proj(x).contiguous()))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_id: int, alloc: _Alloc) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_id, alloc)
        self.mlp = LlamaMLP(arch, alloc)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, alloc)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, alloc)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta)
        normed, x = self.post_attention_layernorm.add_and_norm(h, x)  # x + h, and its norm
        return x + self.mlp(normed)


class LlamaModel(nn.Module):
    """The decoder stack, or one pipeline stage's share of it: layers ``start .. end - 1``,
    the embedding only where it is used (first stage; last stage with tied embeddings), the
    final norm only on the last stage. Layers keep their checkpoint names
    (``model.layers.{i}``); their KV cache index is the local one (``i - start``)."""

    def __init__(self, arch: ModelArchConfig, alloc: _Alloc, start: int, end: int) -> None:
        super().__init__()
        last = end == arch.num_hidden_layers
        if start == 0 or (last and arch.tie_word_embeddings):
            self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, alloc)
        if start == 0 and end == arch.num_hidden_layers:
            self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, alloc) for i in range(end))
        else:
            # A dict keyed by the global index keeps the checkpoint's parameter names.
            self.layers = nn.ModuleDict(
                {str(i): LlamaDecoderLayer(arch, i - start, alloc) for i in range(start, end)})
        if last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, alloc)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. ``forward`` maps ``T`` flat tokens to hidden states [T, H];
    ``compute_logits`` turns the selected rows into float32 logits [N, vocab].

    Built with uninitialized parameters of ``dtype`` on ``device``; load weights before use.
    ``layer_range=(start, end)`` builds one pipeline stage: ``forward`` then takes the
    previous stage's hidden states instead of token ids unless ``start == 0``, and only the
    last stage (``end`` = the layer count) has ``compute_logits``.
    """

    def __init__(
        self, arch: ModelArchConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        start, end = layer_range or (0, arch.num_hidden_layers)
        if not 0 <= start < end <= arch.num_hidden_layers:
            raise ValueError(f"layer range {start}..{end} is not within the model's "
                             f"{arch.num_hidden_layers} layers")
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == arch.num_hidden_layers
        alloc = _Alloc(dtype, torch.device(device))
        self.model = LlamaModel(arch, alloc, start, end)
        if self.is_last and not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False, alloc=alloc)
        # A plain float32 attribute, not a buffer: ``module.to(dtype)`` must not round it.
        self.inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling).to(device)

    def pack_linear_weights(self) -> int:
        """Every ``Linear`` (CPU) to oneDNN's packed layout; returns how many were packed. A head
        tied to the embedding stays as it is (packing it would copy the embedding)."""
        n = 0
        for m in self.modules():
            if isinstance(m, Linear) and m.packed is None:
                m.pack_onednn()
                n += 1
        return n

    def use_native_cpu_ops(self, lib: Any) -> None:
        """Run RMSNorm (with the residual add), rotary embedding and SiLU x up through the native
        CPU kernels (core/model/cpu_native.py; float32 or bfloat16, on the CPU only)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, LlamaAttention, LlamaMLP)):
                m.native = lib

    def use_fused_norm(self) -> None:
        """Run every RMSNorm as one Triton kernel (the residual add fused in after attention)."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = True

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, head_dim] for the given positions, shared by every layer."""
        freqs = positions[:, None].to(torch.float32) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Token ids [T] (first stage) or the previous stage's hidden states [T, H] in, this
        stage's hidden states [T, H] out."""
        x = self.model.embed_tokens(input_ids) if self.is_first else input_ids
        cos, sin = self.rotary_tables(positions, x.dtype)
        layers = self.model.layers
        for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):
            x = layer(x, cos, sin, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the rows to sample only (never all prefill tokens)."""
        hidden = self.model.norm(hidden)
        if self.arch.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
