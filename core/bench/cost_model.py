"""A roofline cost model of one forward pass: FLOPs and bytes moved for a named model shape on
a named device, turned into a time.

``time = max(flops / peak_flops, bytes / mem_bandwidth) + launch_overhead``, where

- flops = linear layers (``2 * tokens * linear params`` over all layers, plus the LM head for
  the sampled rows) + attention (``4 * heads * head_dim`` per query-key pair per layer, each
  query at position ``i`` seeing keys ``0 .. i``);
- bytes = the weights read once per step (the layers, plus the LM head when anything is
  sampled) + every request's KV context read once per layer + the new tokens' KV written.

Activations, norms and the embedding lookup are left out: they are small next to these terms
for every listed shape. The sim worker (``worker=sim``) sleeps for this time; the model is
plain Python (no torch) so it also documents how a step's cost scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder that set its cost."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_len: int
    tie_word_embeddings: bool = False

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the SwiGLU MLP."""
        h, q_dim, kv_dim = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * h * q_dim + 2 * h * kv_dim + 3 * h * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Weights counted by the model (the embedding table once when tied)."""
        embed = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_linear_params + embed + (0 if self.tie_word_embeddings else embed)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class DeviceSpec:
    """Peak dense bf16 FLOP/s, memory bandwidth (bytes/s), memory (bytes) and a fixed cost
    per forward pass (kernel launches, host sync)."""

    name: str
    peak_flops: float
    mem_bandwidth: float
    memory_bytes: float
    launch_overhead_s: float


MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
        ModelShape("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256, 8192),
        ModelShape("llama2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
        ModelShape("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32768, 32768),
        ModelShape("qwen3-0.6b", 28, 1024, 16, 8, 128, 3072, 151936, 40960, tie_word_embeddings=True),
        ModelShape("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936, 40960),
        # The embedded tiny model (core/model/tiny.py).
        ModelShape("tiny", 4, 64, 4, 2, 16, 172, 258, 2048),
    )
}

# Public datasheet figures (SXM parts, dense bf16); the CPU entry is a rough two-core laptop
# class part, useful for relative comparisons only.
DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec("h100", 989e12, 3.35e12, 80e9, 50e-6),
        DeviceSpec("h200", 989e12, 4.8e12, 141e9, 50e-6),
        DeviceSpec("a100", 312e12, 2.039e12, 80e9, 50e-6),
        DeviceSpec("cpu", 2e11, 2e10, 24e9, 1e-3),
    )
}


@dataclass(frozen=True)
class ForwardCost:
    """What one forward pass costs and how long the device takes for it."""

    flops: int
    bytes: int
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def get_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; use one of {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def get_device(name: str) -> DeviceSpec:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    return DEVICES[name]


def attention_pairs(prefix_lens: Sequence[int], extend_lens: Sequence[int]) -> int:
    """Query-key pairs of a batch: query ``j`` of a request (position ``prefix + j``) sees
    ``prefix + j + 1`` keys, so a request contributes ``e * p + e * (e + 1) / 2``."""
    return sum(e * p + e * (e + 1) // 2 for p, e in zip(prefix_lens, extend_lens))


def forward_cost(
    shape: ModelShape,
    device: DeviceSpec,
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    num_sampled: int | None = None,
    *,
    dtype_bytes: int = 2,
    num_devices: int = 1,
    launch_overhead_s: float | None = None,
) -> ForwardCost:
    """Cost of one forward over requests with ``prefix_lens[i]`` cached and ``extend_lens[i]``
    new tokens, sampling ``num_sampled`` rows (default: one per request).

    ``num_devices`` models ideal tensor parallelism (peak FLOP/s and bandwidth scale, no
    communication cost), so shapes larger than one device still run.
    """
    if num_sampled is None:
        num_sampled = len(extend_lens)
    tokens = sum(extend_lens)
    context = sum(prefix_lens) + tokens
    L = shape.num_layers
    linear_flops = 2 * tokens * L * shape.layer_linear_params + 2 * num_sampled * shape.lm_head_params
    attn_flops = 4 * L * shape.num_heads * shape.head_dim * attention_pairs(prefix_lens, extend_lens)
    weight_params = L * shape.layer_linear_params + (shape.lm_head_params if num_sampled else 0)
    kv_token = shape.kv_bytes_per_token(dtype_bytes)
    nbytes = weight_params * dtype_bytes + kv_token * context + kv_token * tokens
    flops = linear_flops + attn_flops
    overhead = device.launch_overhead_s if launch_overhead_s is None else launch_overhead_s
    if not extend_lens:
        return ForwardCost(0, 0, 0.0, 0.0, 0.0)
    return ForwardCost(
        flops=flops,
        bytes=nbytes,
        compute_s=flops / (device.peak_flops * num_devices),
        memory_s=nbytes / (device.mem_bandwidth * num_devices),
        overhead_s=overhead,
    )
