"""The model worker half: decoder parity with transformers, attention over the paged cache,
sampling, loading errors, the tiny model and the tokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode
from loopserve.core.model.arch_config import ModelArchConfig
from loopserve.core.model.loader import load_model
from loopserve.core.model.tiny import (
    BOS_ID,
    EOS_ID,
    TINY_MODEL_NAME,
    _uniform,
    ensure_tiny_model,
    write_random_checkpoint,
)
from loopserve.core.model.worker import ModelWorker
from loopserve.core.model.sampler import Sampler, apply_penalties
from loopserve.core.sched.sampling_params import SamplingParams
from loopserve.core.model.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=64)

# name -> write_random_checkpoint arguments. Together they cover GQA, MQA and MHA, tied
# embeddings, qkv bias, q/k norm with head_dim != hidden / heads, and both rope scalings.
VARIANTS: dict[str, dict] = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "qwen2-tied-bias": dict(arch="qwen2", tie_word_embeddings=True, num_kv_heads=2),
    "qwen3-qknorm": dict(arch="qwen3", num_kv_heads=1, head_dim=24),
    "mistral-mha": dict(arch="mistral", num_kv_heads=4),
    "llama3-rope": dict(
        arch="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Factory: the path of a random checkpoint for a VARIANTS name (written once)."""
    root = tmp_path_factory.mktemp("checkpoints")
    written: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in written:
            written[name] = write_random_checkpoint(str(root / name), seed=len(written) + 1, **VARIANTS[name])
        return written[name]

    return get


@pytest.fixture(scope="module")
def tiny_worker():
    return ModelWorker(None, dtype="float32", device="cpu", kv_num_tokens=1024, max_running_requests=8)


# ---- a tiny scheduler stand-in ---------------------------------------------------------


class Driver:
    """Drives ModelWorker.forward_batch by hand: assigns request rows and scattered KV
    slots, chunks prompts, and collects the sampled tokens per request."""

    def __init__(self, worker: ModelWorker, prompts: list[list[int]], *, seed: int = 0) -> None:
        self.worker = worker
        self.prompts = prompts
        rng = random.Random(seed)
        rows = list(range(worker.max_running_requests))
        rng.shuffle(rows)
        self.rows = rows[: len(prompts)]
        slots = list(range(worker.num_kv_slots))
        rng.shuffle(slots)  # scattered slots exercise the paged gather
        self.slots: list[list[int]] = []
        per = worker.num_kv_slots // len(prompts)
        for i in range(len(prompts)):
            self.slots.append(slots[i * per : (i + 1) * per])
        self.seqs = [list(p) for p in prompts]  # tokens whose KV is (or is about to be) cached
        self.cached = [0] * len(prompts)
        self.out: list[list[int]] = [[] for _ in prompts]

    def step(self, reqs: list[int], chunks: list[int | None], mode: ForwardMode, sp=GREEDY) -> None:
        """One forward over ``reqs``; chunk None = all remaining tokens of the request."""
        ids, prefix, ext, loc, need = [], [], [], [], []
        for r, chunk in zip(reqs, chunks):
            todo = self.seqs[r][self.cached[r] :]
            n = len(todo) if chunk is None else chunk
            ids += todo[:n]
            prefix.append(self.cached[r])
            ext.append(n)
            loc += self.slots[r][self.cached[r] : self.cached[r] + n]
            need.append(self.cached[r] + n == len(self.seqs[r]))
            self.cached[r] += n
        fb = ForwardBatch(
            forward_mode=mode,
            req_pool_indices=[self.rows[r] for r in reqs],
            input_ids=ids,
            prefix_lens=prefix,
            extend_lens=ext,
            out_cache_loc=loc,
            sampling_params=[sp] * len(reqs),
            need_sample=need,
        )
        res = self.worker.forward_batch(fb)
        assert len(res.next_token_ids) == len(reqs) and res.forward_time_s > 0
        for r, tok, n in zip(reqs, res.next_token_ids, need):
            if n:
                self.out[r].append(tok)
                self.seqs[r].append(tok)

    def decode(self, reqs: list[int]) -> None:
        self.step(reqs, [1] * len(reqs), ForwardMode.DECODE)


def run_scenario(worker: ModelWorker, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Prefill (request 2 in two chunks, the second inside a MIXED batch with decodes of
    requests 0 and 1), then decode until every request has ``num_new`` tokens."""
    d = Driver(worker, prompts)
    first = len(prompts[2]) // 2
    d.step([0, 1, 2], [None, None, first], ForwardMode.EXTEND)
    assert d.out[2] == [] and len(d.out[0]) == len(d.out[1]) == 1
    d.step([0, 1, 2], [1, 1, None], ForwardMode.MIXED)
    while any(len(o) < num_new for o in d.out):
        d.decode([r for r in range(len(prompts)) if len(d.out[r]) < num_new])
    return d.out


def hf_greedy(path: str, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:  # one prompt per call: no padding in the reference
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=num_new,
                do_sample=False,
                pad_token_id=EOS_ID,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


# ---- parity with transformers ------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_equal_transformers(checkpoint, variant):
    path = checkpoint(variant)
    worker = ModelWorker(path, dtype="float32", device="cpu", kv_num_tokens=256, max_running_requests=6)
    prompts = random_prompts([5, 11, 17], seed=7)
    ours = run_scenario(worker, prompts, num_new=13)
    ref = hf_greedy(path, prompts, num_new=13)
    for i, (a, b) in enumerate(zip(ours, ref)):
        # transformers stops at </s>; up to there the tokens must agree exactly.
        assert b and a[: len(b)] == b, f"prompt {i}: ours {a} vs transformers {b}"


def test_equal_length_prompts_and_single_prompt_match_transformers(checkpoint):
    path = checkpoint("llama-gqa")
    worker = ModelWorker(path, dtype="float32", device="cpu", kv_num_tokens=256, max_running_requests=4)
    prompts = random_prompts([9, 9], seed=3)  # unpadded causal fast path
    d = Driver(worker, prompts)
    d.step([0, 1], [None, None], ForwardMode.EXTEND)
    for _ in range(7):
        d.decode([0, 1])
    ref = hf_greedy(path, prompts, num_new=8)
    assert [o[: len(r)] for o, r in zip(d.out, ref)] == ref


def test_random_chunking_and_batching_give_the_same_tokens_as_running_alone(tiny_worker):
    rng = random.Random(5)
    prompts = random_prompts([rng.randint(1, 40) for _ in range(7)], seed=9)
    alone = []
    for p in prompts:
        d = Driver(tiny_worker, [p])
        d.step([0], [None], ForwardMode.EXTEND)
        while len(d.out[0]) < 6:
            d.decode([0])
        alone.append(d.out[0])
    d = Driver(tiny_worker, prompts, seed=1)
    while any(len(o) < 6 for o in d.out):
        # Every step: random chunks for requests still prefilling, decodes for the rest,
        # a random subset of requests in the batch.
        reqs = [r for r in range(len(prompts)) if len(d.out[r]) < 6 and rng.random() < 0.7]
        if not reqs:
            continue
        chunks = [rng.randint(1, 12) if d.cached[r] < len(prompts[r]) else 1 for r in reqs]
        chunks = [min(c, len(d.seqs[r]) - d.cached[r]) for c, r in zip(chunks, reqs)]
        d.step(reqs, chunks, ForwardMode.MIXED)
    assert d.out == alone


def test_results_do_not_depend_on_grad_mode(tiny_worker):
    prompts = random_prompts([4, 9, 6], seed=11)
    with torch.no_grad():
        expected = run_scenario(tiny_worker, prompts, num_new=6)
    with torch.inference_mode():
        assert run_scenario(tiny_worker, prompts, num_new=6) == expected
    with torch.enable_grad():
        assert run_scenario(tiny_worker, prompts, num_new=6) == expected
        assert not tiny_worker.k_cache[0].requires_grad


def test_worker_built_in_inference_mode_runs_under_no_grad():
    with torch.inference_mode():
        worker = ModelWorker(None, device="cpu", kv_num_tokens=128, max_running_requests=3)
    with torch.no_grad():
        out = run_scenario(worker, random_prompts([3, 4, 5], seed=1), num_new=3)
    assert all(len(o) == 3 for o in out)


def test_logits_only_for_sampled_rows(tiny_worker, monkeypatch):
    rows_seen = []
    original = tiny_worker.model.compute_logits

    def spy(hidden):
        rows_seen.append(hidden.shape[0])
        return original(hidden)

    monkeypatch.setattr(tiny_worker.model, "compute_logits", spy)
    d = Driver(tiny_worker, random_prompts([30, 40, 50], seed=2))
    d.step([0, 1, 2], [None, None, 20], ForwardMode.EXTEND)
    assert rows_seen == [2]  # 120 prompt tokens, two requests sampled


def test_idle_batch_returns_without_compute(tiny_worker):
    fb = ForwardBatch(ForwardMode.IDLE, [], [], [], [], [], [])
    assert tiny_worker.forward_batch(fb).next_token_ids == []


# ---- worker configuration ----------------------------------------------------------------


def test_worker_attributes_and_kv_pool_size():
    w = ModelWorker(None, device="cpu", kv_num_tokens=1000, page_size=16, max_running_requests=4, max_context_len=512)
    assert w.num_kv_slots == 992 and w.num_kv_slots % 16 == 0
    assert w.context_len == 512 and tuple(w.req_to_token.shape) == (4, 512)
    assert w.k_cache[0].shape == (992, w.arch.num_key_value_heads, w.arch.head_dim)
    assert w.vocab_size == 258 and EOS_ID in w.eos_token_ids
    auto = ModelWorker(None, device="cpu", max_running_requests=2, page_size=8)
    assert auto.num_kv_slots == 2 * auto.context_len  # the tiny model's pool fits any budget
    auto.shutdown()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_backend="triton"), "attention.backend=torch"),
        (dict(attention_backend="flash"), "unknown"),
        (dict(dtype="float64"), "model.dtype"),
        (dict(dtype="float16"), "bfloat16 or float32"),
        (dict(max_context_len=10**6), "max_position_embeddings"),
        (dict(kv_num_tokens=4, page_size=16), "page"),
        (dict(device="tpu"), "model.device"),
    ],
)
def test_worker_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelWorker(None, **{"device": "cpu", **kwargs})


def test_bfloat16_on_cpu_when_asked(tiny_worker):
    w = ModelWorker(None, dtype="bfloat16", device="cpu", kv_num_tokens=128, max_running_requests=3)
    assert w.dtype == torch.bfloat16 and w.k_cache[0].dtype == torch.bfloat16
    out = run_scenario(w, random_prompts([3, 4, 5], seed=4), num_new=2)
    assert all(0 <= t < 258 for o in out for t in o)


# ---- loading -----------------------------------------------------------------------------


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    path = write_random_checkpoint(str(tmp_path / "ck"), seed=1, num_layers=1)
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(path)
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer(path)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    path = write_random_checkpoint(str(tmp_path / "ck"), seed=5, num_layers=2)
    single = load_model(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(weights)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    # A stale rotary buffer, as older checkpoints carry, is ignored.
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, os.path.join(path, "extra.safetensors"))
    weight_map["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    sharded = load_model(path)
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not any(p.requires_grad for p in sharded.parameters())


def _config(**over):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "eos_token_id": [1, 2],
    }
    base.update(over)
    return base


def test_arch_config_parses_both_rope_layouts():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v4 = ModelArchConfig.from_dict(_config(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3}))
    v5 = ModelArchConfig.from_dict(_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3}))
    assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling.rope_type == "llama3"
    old = ModelArchConfig.from_dict(_config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert old.rope_scaling.rope_type == "linear" and old.rope_theta == 10000.0
    assert v4.head_dim == 8 and v4.num_kv_groups == 2 and v4.eos_token_ids == (1, 2)
    q2 = ModelArchConfig.from_dict(_config(architectures=["Qwen2ForCausalLM"], sliding_window=4096, use_sliding_window=False))
    assert q2.attention_bias and not q2.o_proj_bias


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "LlamaForCausalLM, MistralForCausalLM"),
        (dict(architectures=["MistralForCausalLM"], sliding_window=4096), "not supported"),
        (dict(architectures=["MistralForCausalLM"]), "not supported"),  # transformers' default window
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_arch_config_rejects_unsupported(over, match):
    with pytest.raises(ValueError, match=match):
        ModelArchConfig.from_dict(_config(**over))


def test_mistral_without_window_is_accepted():
    cfg = ModelArchConfig.from_dict(_config(architectures=["MistralForCausalLM"], sliding_window=None))
    assert cfg.architecture == "MistralForCausalLM" and not cfg.attention_bias


# ---- sampling ----------------------------------------------------------------------------


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.5, top_k=1) if i % 2 else SamplingParams(temperature=0.0) for i in range(64)]
    params[5] = SamplingParams(temperature=1.0)  # one sampled row in the batch
    tokens = Sampler(seed=1).sample(logits.clone(), params)
    keep = [i for i in range(64) if i != 5]
    assert tokens[keep].tolist() == logits.argmax(-1)[keep].tolist()


def test_seeded_rows_reproduce_regardless_of_batch():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, 300, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0, top_p=0.9)
    alone = Sampler(seed=0).sample(row.clone(), [seeded], step_seeds=[1234])
    batch = torch.cat([torch.randn(3, 300, generator=g), row, torch.randn(2, 300, generator=g)])
    mixed = Sampler(seed=99).sample(batch, [other] * 3 + [seeded] + [other] * 2, step_seeds=[None] * 3 + [1234] + [None] * 2)
    assert mixed[3].item() == alone.item()
    draws = {Sampler().sample(row.clone(), [seeded], step_seeds=[s]).item() for s in range(40)}
    assert len(draws) > 5  # different step seeds do give different draws


def test_unseeded_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3).contiguous()
    tokens = Sampler(seed=0).sample(logits, [SamplingParams(temperature=1.0)] * 20000)
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)
    again = Sampler(seed=0).sample(probs.log().expand(20000, 3).contiguous(), [SamplingParams()] * 20000)
    assert torch.equal(tokens, again)  # the worker seed makes unseeded sampling reproducible


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.8), {0, 1}),  # 0.5 + 0.3 reaches 0.8: the rest goes
        (SamplingParams(top_p=0.81), {0, 1, 2}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # 0.05 < 0.2 * 0.5
        (SamplingParams(top_k=3, top_p=0.6), {0, 1}),  # top-p on the top-3 renormalized
        (SamplingParams(temperature=0.5), {0, 1, 2, 3}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    tokens = Sampler(seed=0).sample(probs.log().expand(n, 4).contiguous(), [params] * n)
    assert set(tokens.tolist()) == allowed


def test_filters_apply_per_row():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = [SamplingParams(top_k=1 + i % 4) for i in range(4000)]
    tokens = Sampler(seed=0).sample(probs.log().expand(4000, 4).contiguous(), params)
    for k in range(1, 5):
        assert set(tokens[k - 1 :: 4].tolist()) == set(range(k))


def test_repetition_penalty_follows_transformers():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    apply_penalties(logits, params, output_ids=[[1], [1]], prompt_ids=[[0, 0], [0]])
    assert logits.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]]


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(1, 5)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    apply_penalties(logits, params, output_ids=[[2, 2, 3]], prompt_ids=[[4, 4, 4]])
    assert logits.tolist() == [[0.0, 0.0, -1.25, -0.75, 0.0]]  # the prompt does not count


def test_greedy_rows_see_penalties():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    sp = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler().sample(logits, [sp], output_ids=[[0]], prompt_ids=[[]]).tolist() == [1]


# ---- the tiny model and the tokenizer ----------------------------------------------------


def test_tiny_model_written_once_and_loadable_by_transformers():
    path = ensure_tiny_model()
    assert os.path.basename(path) == TINY_MODEL_NAME
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert ensure_tiny_model() == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer(path)
    for text in ["Hello world", "", "  two  spaces", "naïve café ☃ 日本", "<s> literal"]:
        assert ours.encode(text) == hf_tok(text).input_ids
        assert ours.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
        if "<s>" not in text:  # a literal "<s>" encodes as the special token, like in transformers
            assert ours.decode(ours.encode(text)) == text
    assert ours.bos_token_id == BOS_ID == hf_tok.bos_token_id
    assert ours.eos_token_ids == {EOS_ID}
    assert ours.decode([BOS_ID, 72, 105, EOS_ID], skip_special_tokens=False) == "<s>Hi</s>"


def test_tiny_model_greedy_matches_transformers(tiny_worker):
    prompts = [Tokenizer(ensure_tiny_model()).encode(t) for t in ["Hello", "The quick brown fox", "Once upon a time, there"]]
    ours = run_scenario(tiny_worker, prompts, num_new=10)
    ref = hf_greedy(ensure_tiny_model(), prompts, num_new=10)
    assert [o[: len(r)] for o, r in zip(ours, ref)] == ref


def test_tiny_model_tolerates_a_concurrent_writer(tmp_path, monkeypatch):
    import loopserve.core.model.tiny as tiny

    monkeypatch.setenv("LOOPSERVE_CACHE_DIR", str(tmp_path))
    real = tiny.write_random_checkpoint

    def racing(path, *args, **kwargs):
        # Another process finishes first, then our own write completes.
        real(os.path.join(str(tmp_path), TINY_MODEL_NAME), *args, **kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tiny, "write_random_checkpoint", racing)
    path = tiny.ensure_tiny_model()
    assert path == os.path.join(str(tmp_path), TINY_MODEL_NAME)
    assert sorted(os.listdir(tmp_path)) == [TINY_MODEL_NAME]  # our temp dir is gone


def test_weight_stream_is_a_fixed_function_of_the_key():
    # Pure-Python splitmix64 as the reference for the vectorized torch version.
    import hashlib

    m = (1 << 64) - 1
    state = int.from_bytes(hashlib.sha256(b"k").digest()[:8], "little")
    expected = []
    for i in range(1, 6):
        z = (state + i * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
        expected.append((z >> 11) * 2.0**-53)
    assert _uniform("k", 5).tolist() == expected


def test_same_arguments_same_checkpoint(tmp_path):
    a = write_random_checkpoint(str(tmp_path / "a"), seed=3, num_layers=1)
    b = write_random_checkpoint(str(tmp_path / "b"), seed=3, num_layers=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read()


def test_incremental_detokenizer_holds_back_partial_characters():
    tok = Tokenizer(ensure_tiny_model())
    text = "a☃b日本語 ok"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer(prompt_ids=tok.encode("prompt"))
    deltas = [detok.step(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[1:4] == ["", "", "☃"]  # three bytes, one character
    cut = Tokenizer(ensure_tiny_model()).detokenizer()
    assert cut.step(ids[:2]) == "" and cut.finish() == "a\ufffd"  # the stream ended mid-character


def test_tokenizer_json_post_processor_decides_about_bos(tmp_path):
    path = str(tmp_path / "tok")
    shutil.copytree(ensure_tiny_model(), path)
    tok_path = os.path.join(path, "tokenizer.json")
    with open(tok_path) as f:
        spec = json.load(f)
    spec["post_processor"] = None
    with open(tok_path, "w") as f:
        json.dump(spec, f)
    ours = Tokenizer(path)
    assert ours.encode("hi") == [104, 105]
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(path)("hi").input_ids == ours.encode("hi")
