"""Random-weight checkpoints of realistic shapes for ``loopserve bench bench.model_shape=NAME``.

The embedded tiny model (hidden 64) measures the scheduler more than the model: on a CPU its
forward passes are a few small matmuls. These shapes give figures for models whose weight
GEMMs dominate, written once (fixed seed, HF checkpoint format, the byte-level tokenizer) under
``$LOOPSERVE_CACHE_DIR/shapes/`` and reused. Weights are random, so the tokens mean nothing, but
both loopserve and a peer run the same weights and the same work.

The byte tokenizer keeps the vocabulary at 258 tokens: the shapes follow real models' decoder
layers, not their vocabularies (a 150k-token embedding would be most of a 0.5B model's
weights and would have to be written out by every machine that runs the benchmark).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

SHAPES_VERSION = "v1"  # bump whenever the written files change


@dataclass(frozen=True)
class CheckpointShape:
    name: str
    arch: str  # llama | qwen3 (see write_random_checkpoint)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    note: str = ""

    @property
    def num_params(self) -> int:
        from loopserve.core.model.tiny import BYTE_VOCAB_SIZE

        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size
        embed = BYTE_VOCAB_SIZE * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed


MODEL_SHAPES: dict[str, CheckpointShape] = {
    s.name: s
    for s in (
        CheckpointShape("tiny-h32", "llama", 64, 4, 2, 1, 32, 172,
                        note="the embedded tiny model's size with 2 heads x 32 (1 KV head) instead of "
                             "4 x 16: same FLOPs per token, a head size vLLM's CPU attention supports"),
        CheckpointShape("llama-75m", "llama", 768, 12, 12, 4, 64, 2048,
                        note="a ~75M-parameter Llama: hidden 768, 12 layers, 12 heads x 64, 4 KV heads, MLP 2048"),
        CheckpointShape("qwen3-0.5b", "qwen3", 1024, 28, 16, 8, 128, 3072, tie_word_embeddings=True,
                        note="Qwen3-0.6B's decoder layers (28 x hidden 1024, 16 heads x 128, 8 KV heads, "
                             "MLP 3072, q/k norms) with the byte vocabulary: 0.44B parameters"),
    )
}


def shape_names() -> list[str]:
    return list(MODEL_SHAPES)


def get_shape(name: str) -> CheckpointShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"bench.model_shape={name!r} is not a known shape; use one of {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def ensure_shape_checkpoint(name: str) -> str:
    """The checkpoint directory of shape ``name``, written on first use (under a temporary name,
    then renamed into place, like the tiny model)."""
    from loopserve.core.model.tiny import cache_dir, write_random_checkpoint

    shape = get_shape(name)
    root = os.path.join(cache_dir(), "shapes")
    final = os.path.join(root, f"{name}-{SHAPES_VERSION}")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
    except OSError as e:
        raise ValueError(f"cannot write the {name} checkpoint under {root} ({e}); set LOOPSERVE_CACHE_DIR "
                         "to a writable directory") from e
    try:
        write_random_checkpoint(
            tmp, shape.arch, seed=0, tie_word_embeddings=shape.tie_word_embeddings,
            hidden_size=shape.hidden_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            intermediate_size=shape.intermediate_size,
            # The tiny model's 0.15 at hidden 64, scaled so a projection's output keeps its size.
            weight_std=round(0.15 * math.sqrt(64 / shape.hidden_size), 6),
        )
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, "model.safetensors")):  # not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
