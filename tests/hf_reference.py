"""Random-weight checkpoints and transformers references shared by test_engine.py and
test_cli.py (the user-level parity tests; test_model_worker.py checks the worker itself).

Checkpoints are written once per test session under pytest's base temp dir; transformers'
models, tokenizers and greedy outputs are cached per process, so the two modules share them.
"""

from __future__ import annotations

import os
import random
from typing import Callable
from functools import lru_cache

import pytest

from loopserve.core.model.tiny import EOS_ID, write_random_checkpoint

# name -> write_random_checkpoint arguments (all float32).
ARCHS: dict[str, dict] = {
    # GQA (4 query heads on 2 KV heads), untied lm_head.
    "llama": dict(arch="llama", num_kv_heads=2, tie_word_embeddings=False, seed=100),
    # Tied embeddings, q/k/v bias.
    "qwen2": dict(arch="qwen2", num_kv_heads=2, tie_word_embeddings=True, seed=101),
    # q/k norm, one KV head, head_dim (24) != hidden_size / num_heads (16).
    "qwen3": dict(arch="qwen3", num_kv_heads=1, head_dim=24, seed=102),
}

# Text prompts for the tokenizer path and the CLI: different lengths, and characters
# (comma, apostrophe, '=', '?') that a Hydra override would not take unquoted.
TEXT_PROMPTS = [
    "Hi",
    "Hello, world",
    "What's 2+2=? Tell me.",
    "A longer prompt about a scheduler that batches requests of many different lengths",
]


def checkpoint(root: str, name: str) -> str:
    """The directory of the ARCHS[name] checkpoint under ``root``, written on first use."""
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_random_checkpoint(path, dtype="float32", **ARCHS[name])
    return path


def engine_reference(ckpt, prompts: list[list[int]], params) -> Callable[[str], list[list[int]]]:
    """Factory: the single-process engine's (``loop=normal``) greedy tokens for ``prompts`` on
    each ARCHS checkpoint, computed once per checkpoint."""
    from loopserve.core import Engine

    cache: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            with Engine(overrides=[f"model.path={ckpt(arch)}", "loop=normal"]) as e:
                cache[arch] = [o.token_ids for o in e.generate(input_ids=prompts, sampling_params=params)]
        return cache[arch]

    return get


def random_id_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """Token-id prompts: <s> (256) then random bytes, ``lengths`` tokens in all."""
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in lengths]


def eos_candidates(n: int = 64) -> list[str]:
    """Plain-text prompts to search for one whose greedy output reaches </s>."""
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz     ABCDEFGHIJ."
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 40))).strip() or "a" for _ in range(n)]


@lru_cache(maxsize=None)
def _hf(path: str):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def hf_encode(path: str, text: str) -> list[int]:
    return list(_hf(path)[1](text).input_ids)


def hf_decode(path: str, ids: list[int]) -> str:
    return _hf(path)[1].decode(ids, skip_special_tokens=True)


@lru_cache(maxsize=None)
def _hf_greedy(path: str, ids: tuple[int, ...], max_new_tokens: int, ignore_eos: bool) -> tuple[int, ...]:
    import torch

    model, _ = _hf(path)
    x = torch.tensor([list(ids)])
    kwargs = dict(eos_token_id=None) if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=EOS_ID, **kwargs)
    gen = tuple(out[0, len(ids):].tolist())
    if ignore_eos:
        assert len(gen) == max_new_tokens, "transformers stopped early although eos was switched off"
    else:
        assert len(gen) == max_new_tokens or gen[-1] == EOS_ID
    return gen


def hf_greedy(path: str, ids: list[int], max_new_tokens: int, *, ignore_eos: bool) -> list[int]:
    """transformers' ``generate(do_sample=False)`` for one unpadded prompt: the new tokens.
    With ``ignore_eos`` it runs the full length (an </s> is just a token); without, it stops
    after </s>, which it includes."""
    return list(_hf_greedy(path, tuple(ids), max_new_tokens, ignore_eos))


@lru_cache(maxsize=None)
def find_eos_prompt(path: str, max_new_tokens: int) -> str | None:
    """The first of ``eos_candidates()`` whose greedy output (by loopserve) ends with </s>
    within ``max_new_tokens``; transformers is then checked against it."""
    from loopserve.core import Engine, SamplingParams

    cands = eos_candidates()
    with Engine(overrides=[f"model.path={path}", "loop=normal"]) as engine:
        outs = engine.generate(cands, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    for text, out in zip(cands, outs):
        if out.finish_reason == "stop" and len(out.token_ids) >= 2:
            assert out.token_ids[-1] == EOS_ID and out.matched_stop == EOS_ID
            return text
    return None


def hf_token_logprobs(path: str, ids: list[int]) -> list[float]:
    """transformers' log-probability of each token of ``ids`` after the first, given the
    tokens before it (one forward pass over the whole sequence)."""
    import torch

    model, _ = _hf(path)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return log_probs.gather(1, torch.tensor(ids[1:]).view(-1, 1)).view(-1).tolist()
