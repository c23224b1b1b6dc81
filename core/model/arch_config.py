"""The architecture of a Llama-family checkpoint, read from its Hugging Face ``config.json``.

``ModelArchConfig`` is the one place that knows how Llama 2/3, Mistral, Qwen2 and Qwen3 spell
their hyper-parameters (including the transformers 4 ``rope_scaling`` and transformers 5
``rope_parameters`` layouts) and how they differ (qkv bias, q/k norm, tied embeddings). The
decoder, the loader and the worker only read the normalized fields. Plain Python, no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

# Per architecture: (qkv bias default, o_proj bias follows attention_bias, q/k norm).
# Qwen2 hard-codes bias on q/k/v only; Llama and Qwen3 put ``attention_bias`` on all four
# projections; Mistral has no bias at all.
_ARCHS: dict[str, tuple[bool | None, bool, bool]] = {
    "LlamaForCausalLM": (None, True, False),
    "MistralForCausalLM": (False, False, False),
    "Qwen2ForCausalLM": (True, False, False),
    "Qwen3ForCausalLM": (None, True, True),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

# transformers' MistralConfig default: a config.json without the key gets a 4096-token window.
_MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. ``rope_type`` is ``"linear"`` or ``"llama3"``; the three
    llama3-only fields are None for linear."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelArchConfig:
    """Normalized hyper-parameters of one supported decoder checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q_proj/k_proj/v_proj
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before rotary
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None  # as written in the checkpoint ("bfloat16", ...), None if absent

    @property
    def num_kv_groups(self) -> int:
        """Query heads that share one KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token needs at 1 byte per element (multiply by element size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @classmethod
    def from_model_dir(cls, model_dir: str) -> ModelArchConfig:
        """Read ``model_dir/config.json``; ValueError if it is missing or unsupported."""
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} not found: model.path must be a Hugging Face checkpoint directory "
                "with a config.json (or leave model.path unset for the embedded tiny model)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelArchConfig:
        """Parse a config.json dict; ValueError naming the field to fix."""
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in _ARCHS), None)
        if arch is None:
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported; supported architectures "
                f"are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        qkv_bias_default, o_bias_follows, qk_norm = _ARCHS[arch]

        def need(key: str) -> int:
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value

        hidden_size = need("hidden_size")
        num_heads = need("num_attention_heads")
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        max_pos = need("max_position_embeddings")

        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; only silu (SwiGLU) is")

        _check_no_sliding_window(arch, raw, max_pos, source)
        rope_theta, rope_scaling = _parse_rope(raw, max_pos, source)

        if qkv_bias_default is None:
            attention_bias = bool(raw.get("attention_bias", False))
        else:
            attention_bias = qkv_bias_default
        o_proj_bias = attention_bias if o_bias_follows else False

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
            qk_norm=qk_norm,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def _check_no_sliding_window(arch: str, raw: dict[str, Any], max_pos: int, source: str) -> None:
    """Sliding-window attention changes which keys a query sees; the attention backends do
    full causal attention, so a window that could actually bind is refused rather than
    silently producing different tokens than the reference."""
    if arch == "MistralForCausalLM":
        window = raw.get("sliding_window", _MISTRAL_DEFAULT_SLIDING_WINDOW)
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # transformers drops the window unless use_sliding_window is set, and then slides
        # only the layers marked in layer_types (default: layers >= max_window_layers).
        window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
        layer_types = raw.get("layer_types")
        if layer_types:
            slides = "sliding_attention" in layer_types
        else:
            slides = raw.get("max_window_layers", 28) < raw.get("num_hidden_layers", 0)
        if not slides:
            window = None
    else:
        window = None
    if window is not None and window < max_pos:
        raise ValueError(
            f"{source}: sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={max_pos}) is not supported; use a checkpoint without a "
            "sliding window (sliding_window: null)"
        )


def _parse_rope(raw: dict[str, Any], max_pos: int, source: str) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling from either the transformers 4 keys (``rope_theta``,
    ``rope_scaling``) or the transformers 5 ``rope_parameters`` dict."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters/rope_scaling must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope parameters are not supported")
    theta = raw.get("rope_theta") or params.get("rope_theta") or 10000.0
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope type {rope_type!r} is not supported; supported rope types are "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if "factor" not in params:
        raise ValueError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    factor = float(params["factor"])
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor)
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"{source}: rope type 'llama3' needs {', '.join(missing)}")
    # transformers gives a top-level original_max_position_embeddings precedence.
    original = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", max_pos
    )
    return float(theta), RopeScaling(
        "llama3",
        factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )
