"""The architecture of a Llama-family checkpoint, read from its Hugging Face ``config.json``.

``ModelArchConfig`` is the one place that knows how Llama 2/3, Mistral, Qwen2 and Qwen3 spell
their hyper-parameters (including the transformers 4 ``rope_scaling`` and transformers 5
``rope_parameters`` layouts) and how they differ (qkv bias, q/k norm, tied embeddings). The
decoder, the loader and the worker only read the normalized fields. Plain Python, no torch.
"""

from __future__ import annotations

import json
import math
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelArchConfig:
        """Parse a config.json dict; ValueError naming the field to fix.

        Every field the decoder reads is type- and range-checked here (a negative head count,
        a string where a number belongs, a boolean written as "false"), so a broken config
        fails with its key named instead of deep inside torch.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: must be a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(f"{source}: architectures must be a list of class names, got {archs!r}")
        arch = next((a for a in archs if isinstance(a, str) and a in _ARCHS), None)
        if arch is None:
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported; supported architectures "
                f"are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        qkv_bias_default, o_bias_follows, qk_norm = _ARCHS[arch]

        def need(key: str, default: int | None = None) -> int:
            value = raw.get(key)
            if value is None and default is not None:
                return default
            if not _is_int(value) or value < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value

        hidden_size = need("hidden_size")
        num_heads = need("num_attention_heads")
        num_kv_heads = need("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        if raw.get("head_dim") is None and hidden_size < num_heads:
            raise ValueError(f"{source}: hidden_size={hidden_size} is smaller than num_attention_heads="
                             f"{num_heads}; set head_dim or fix the sizes")
        head_dim = need("head_dim", hidden_size // num_heads)
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim={head_dim} must be even (rotary embeddings rotate pairs)")
        max_pos = need("max_position_embeddings")

        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; only silu (SwiGLU) is")

        _check_no_sliding_window(arch, raw, max_pos, source)
        rope_theta, rope_scaling = _parse_rope(raw, max_pos, source)

        def flag(key: str) -> bool:
            value = raw.get(key, False)
            if value is None:
                return False
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
            return value

        if qkv_bias_default is None:
            attention_bias = flag("attention_bias")
        else:
            attention_bias = qkv_bias_default
        o_proj_bias = attention_bias if o_bias_follows else False

        eos = raw.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(_is_int(t) and t >= 0 for t in eos_list):
            raise ValueError(f"{source}: eos_token_id must be a token id or a list of them, got {eos!r}")
        eos_ids = tuple(eos_list)
        bos = raw.get("bos_token_id")
        if bos is not None and not (_is_int(bos) and bos >= 0):
            raise ValueError(f"{source}: bos_token_id must be a token id or null, got {bos!r}")
        torch_dtype = raw.get("dtype") or raw.get("torch_dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ValueError(f"{source}: torch_dtype must be a string such as \"bfloat16\", got {torch_dtype!r}")

        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_float(raw, "rms_norm_eps", 1e-6, source),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=flag("mlp_bias") if arch == "LlamaForCausalLM" else False,
            qk_norm=qk_norm,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            torch_dtype=torch_dtype,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_float(raw: dict[str, Any], key: str, default: float, source: str) -> float:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


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
            max_window_layers = raw.get("max_window_layers", 28)
            if not _is_int(max_window_layers):
                raise ValueError(f"{source}: max_window_layers must be an integer, got {max_window_layers!r}")
            num_layers = raw.get("num_hidden_layers", 0)  # its own check comes later
            slides = max_window_layers < (num_layers if _is_int(num_layers) else 0)
        if not slides:
            window = None
    else:
        window = None
    if window is not None and not _is_int(window):
        raise ValueError(f"{source}: sliding_window must be an integer or null, got {window!r}")
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
    theta = _positive_float({"rope_theta": theta}, "rope_theta", 10000.0, source)
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
    factor = _positive_float(params, "factor", 1.0, source)
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor)
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"{source}: rope type 'llama3' needs {', '.join(missing)}")
    # transformers gives a top-level original_max_position_embeddings precedence.
    original = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", max_pos
    )
    if not _is_int(original) or original < 1:
        raise ValueError(f"{source}: original_max_position_embeddings must be a positive integer, got {original!r}")
    return float(theta), RopeScaling(
        "llama3",
        factor,
        low_freq_factor=_positive_float(params, "low_freq_factor", 1.0, source),
        high_freq_factor=_positive_float(params, "high_freq_factor", 1.0, source),
        original_max_position_embeddings=original,
    )
