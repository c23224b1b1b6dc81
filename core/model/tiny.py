"""The embedded tiny model, and random-weight checkpoints for tests and benchmarks.

``ensure_tiny_model()`` writes, on first use, an ordinary Hugging Face checkpoint directory
(config.json, model.safetensors, a byte-level tokenizer.json plus tokenizer_config.json and
generation_config.json) under the user cache dir, so everything runs with no download and the
tiny model goes through the same loading path as any checkpoint; transformers loads it too.
Its weights are fixed-seed random, so its text is meaningless. They come from a counter-based
integer hash rather than torch's RNG, so the checkpoint is bit-identical on every machine and
torch version. This module does not import transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file

TINY_MODEL_NAME = "tiny-llama-v1"  # bump the suffix whenever the written files change
TINY_SEED = 20240601

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257  # ids 0..255 are the bytes themselves
BYTE_VOCAB_SIZE = 258

_ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> str:
    """$LOOPSERVE_CACHE_DIR, else $XDG_CACHE_HOME/loopserve, else ~/.cache/loopserve."""
    if os.environ.get("LOOPSERVE_CACHE_DIR"):
        return os.environ["LOOPSERVE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loopserve")


def ensure_tiny_model() -> str:
    """Path of the tiny model's checkpoint directory, writing it on first use.

    The directory is written under a temporary name and renamed into place, so readers never
    see a half-written checkpoint; if another process wins the race, its copy is used.
    """
    root = cache_dir()
    final = os.path.join(root, TINY_MODEL_NAME)
    if not os.path.isdir(final):
        try:
            os.makedirs(root, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.tmp-", dir=root)
        except OSError as e:
            raise ValueError(
                f"cannot write the tiny model under {root} ({e}); set LOOPSERVE_CACHE_DIR to a "
                "writable directory"
            ) from e
        try:
            write_random_checkpoint(tmp, "llama", seed=TINY_SEED)
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real I/O error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(final, f))]
    if missing:
        raise ValueError(f"the tiny model in {final} is incomplete (no {missing[0]}); delete that directory")
    return final


# ---- deterministic weights ------------------------------------------------------------


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # Logical shift on int64 (torch's >> is arithmetic); multiplication wraps mod 2**64.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _uniform(key: str, n: int) -> torch.Tensor:
    """``n`` float64 values in [0, 1): splitmix64 of a counter, keyed by ``key``."""
    start = _signed64(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    z = torch.arange(1, n + 1, dtype=torch.int64) * _GOLDEN + start
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * 2.0**-53


def _random_tensor(key: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    # Uniform with the requested std: as good as normal for a random model, and exact.
    u = _uniform(key, math.prod(shape))
    return (mean + (2.0 * u - 1.0) * (std * math.sqrt(3.0))).to(torch.float32).reshape(shape)


# ---- checkpoints ----------------------------------------------------------------------


def write_random_checkpoint(
    path: str,
    arch: str = "llama",
    *,
    seed: int,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 172,
    vocab_size: int = BYTE_VOCAB_SIZE,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    weight_std: float = 0.15,
    dtype: str = "float32",
) -> str:
    """Write a random-weight checkpoint of ``arch`` (llama, mistral, qwen2, qwen3) with the
    byte-level tokenizer into ``path`` (created if needed) and return ``path``.

    Architecture features follow the real models: qwen2 has q/k/v bias, qwen3 q/k norm.
    ``rope_scaling`` is written as in transformers 4 checkpoints (e.g. ``{"rope_type":
    "llama3", "factor": 8.0, ...}``). Same arguments, same bytes.
    """
    if arch not in _ARCH_CLASSES:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(_ARCH_CLASSES)}")
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {BYTE_VOCAB_SIZE} for the byte tokenizer")
    head_dim = head_dim or hidden_size // num_heads
    config: dict[str, Any] = {
        "architectures": [_ARCH_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": 0.02,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = False
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    if arch == "mistral":
        config["sliding_window"] = None

    def rand(name: str, shape: tuple[int, ...], std: float = weight_std, mean: float = 0.0) -> torch.Tensor:
        return _random_tensor(f"{seed}:{name}", shape, std, mean)

    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    # Embeddings with unit scale and norm weights near 1 keep activations O(1); the
    # projections' std makes attention and logits peaked enough that greedy tokens are well
    # separated (no flips from float rounding between implementations).
    tensors = {"model.embed_tokens.weight": rand("embed", (vocab_size, hidden_size), 1.0)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q_dim, hidden_size),
            "self_attn.k_proj.weight": (kv_dim, hidden_size),
            "self_attn.v_proj.weight": (kv_dim, hidden_size),
            "self_attn.o_proj.weight": (hidden_size, q_dim),
            "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            "mlp.up_proj.weight": (intermediate_size, hidden_size),
            "mlp.down_proj.weight": (hidden_size, intermediate_size),
        }
        for name, shape in shapes.items():
            tensors[p + name] = rand(p + name, shape)
        if arch == "qwen2":
            for proj, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                name = f"{p}self_attn.{proj}_proj.bias"
                tensors[name] = rand(name, (n,), 0.5)
        if arch == "qwen3":
            for norm in ("q_norm", "k_norm"):
                name = f"{p}self_attn.{norm}.weight"
                tensors[name] = rand(name, (head_dim,), 0.1, 1.0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}{norm}.weight"] = rand(f"{p}{norm}", (hidden_size,), 0.1, 1.0)
    tensors["model.norm.weight"] = rand("norm", (hidden_size,), 0.1, 1.0)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = rand("lm_head", (vocab_size, hidden_size), 0.3)

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    os.makedirs(path, exist_ok=True)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(path, "config.json"), config)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    _write_json(os.path.join(path, "generation_config.json"), generation)
    write_byte_tokenizer(path, model_max_length=max_position_embeddings)
    return path


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def write_byte_tokenizer(path: str, *, model_max_length: int = 2048) -> None:
    """Write tokenizer.json (one token per byte, id = byte value, plus <s> and </s>) and a
    tokenizer_config.json that makes transformers' AutoTokenizer behave the same way."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[BOS_TOKEN], vocab[EOS_TOKEN] = BOS_ID, EOS_ID
    # BPE without merges: every byte stays its own token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)])
    tok.save(os.path.join(path, "tokenizer.json"))
    _write_json(
        os.path.join(path, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        },
    )
