"""The torch attention backend against a dense reference, on every path it takes.

Decode requests go through length buckets (or one padded group), prefill requests through a
padded batch or one by one (with and without a cached prefix); a MIXED batch has both. Each
path must give, for every token, exactly the attention over its own request's keys
0 .. position, computed here in float64 from the request's keys laid out contiguously.
"""

from __future__ import annotations

import random

import pytest
import torch

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode
from loopserve.core.model.attention import TorchAttentionBackend, length_buckets
from loopserve.core.sched.sampling_params import SamplingParams

D = 8
NUM_SLOTS = 20000


def _reference(q, keys, values, positions, heads, kv_heads):
    """Attention of queries at ``positions`` over ``keys[:pos + 1]`` (float64)."""
    group = heads // kv_heads
    out = []
    for qi, pos in zip(q.double(), positions):
        k = keys[: pos + 1].double().repeat_interleave(group, dim=1)  # [L, heads, D]
        v = values[: pos + 1].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", qi, k) * D**-0.5
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _case(seed: int, prefix_lens: list[int], extend_lens: list[int], heads: int, kv_heads: int,
          kv_dtype: torch.dtype = torch.float32):
    """A backend whose cache holds each request's earlier keys in scattered slots, and one
    forward batch over the requests; returns what the test and the reference need. New keys
    and values are float32 values that ``kv_dtype`` holds exactly (the reference sees what the
    cache stores)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k_cache = [torch.randn(NUM_SLOTS, kv_heads, D).to(kv_dtype)]
    v_cache = [torch.randn(NUM_SLOTS, kv_heads, D).to(kv_dtype)]
    table = torch.zeros(len(prefix_lens), 512, dtype=torch.int64)
    free = list(range(NUM_SLOTS))
    rng.shuffle(free)
    seq_keys, seq_values, out_loc = [], [], []
    for row, (p, n) in enumerate(zip(prefix_lens, extend_lens)):
        slots = [free.pop() for _ in range(p + n)]
        table[row, :p] = torch.tensor(slots[:p], dtype=torch.int64)
        out_loc += slots[p:]
        seq_keys.append(k_cache[0][slots].clone())  # new tokens' rows are overwritten below
        seq_values.append(v_cache[0][slots].clone())
    num_tokens = sum(extend_lens)
    q = torch.randn(num_tokens, heads, D)
    k = torch.randn(num_tokens, kv_heads, D).to(kv_dtype).float()
    v = torch.randn(num_tokens, kv_heads, D).to(kv_dtype).float()
    t = 0
    for keys, values, p, n in zip(seq_keys, seq_values, prefix_lens, extend_lens):
        keys[p : p + n] = k[t : t + n]
        values[p : p + n] = v[t : t + n]
        t += n
    mode = ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND
    fb = ForwardBatch(mode, list(range(len(prefix_lens))), [0] * num_tokens, list(prefix_lens),
                      list(extend_lens), out_loc, [SamplingParams()] * len(prefix_lens))
    return k_cache, v_cache, table, fb, (q, k, v), (seq_keys, seq_values)


def _check(backend_kwargs, prefix_lens, extend_lens, heads=4, kv_heads=2, seed=0, kv_dtype=torch.float32,
           q_dtype=torch.float32):
    """The backend's output against the float64 reference: to float32 accuracy where the
    queries are float32 (a bfloat16 cache included: its values are what the reference sees),
    to bfloat16's where they are bfloat16 (queries rounded first, the output rounded last)."""
    k_cache, v_cache, table, fb, (q, k, v), (keys, values) = _case(seed, prefix_lens, extend_lens, heads, kv_heads,
                                                                   kv_dtype)
    backend = TorchAttentionBackend(k_cache, v_cache, table, num_heads=heads, num_kv_heads=kv_heads, head_dim=D,
                                    **backend_kwargs)
    meta = backend.init_forward_metadata(fb)
    q = q.to(q_dtype)
    out = backend.forward(0, q, k.to(q_dtype), v.to(q_dtype), meta)
    assert out.dtype == q_dtype
    tol = dict(atol=2e-5, rtol=1e-5) if q_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    t = 0
    for r, (p, n) in enumerate(zip(prefix_lens, extend_lens)):
        expect = _reference(q[t : t + n], keys[r], values[r], range(p, p + n), heads, kv_heads)
        torch.testing.assert_close(out[t : t + n].double(), expect, **tol)
        t += n
    return meta


# Every path forced on (varlen_waste=0: prefill one by one; 1e9: always padded together).
PATHS = {
    "buckets+varlen": dict(decode_buckets=4, bucket_min_size=4, varlen_waste=0.0),
    "buckets+padded": dict(decode_buckets=4, bucket_min_size=4, varlen_waste=1e9),
    "one-group+padded": dict(decode_buckets=1, varlen_waste=1e9, group_kv_bytes=0),
    # Decode groups split into chunks of a few requests (capped at MAX_DECODE_GROUPS).
    "chunked": dict(decode_buckets=4, bucket_min_size=4, group_kv_bytes=8 * 2 * D * 4 * 20),
    "default": {},
    # Decode requests through the native CPU kernel (in place, no gather); prefill as default.
    "native": "native",
}


def _kwargs(path: str) -> dict:
    if PATHS[path] != "native":
        return PATHS[path]
    import os

    from loopserve.core.model import cpu_native

    lib = cpu_native.load("auto")
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail("the native CPU kernel did not build on this CI machine (needs cc with OpenMP)")
        pytest.skip("no C compiler: the native CPU kernel is not built here")
    return dict(native=lib)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_decode_batch_matches_reference(path, heads, kv_heads):
    rng = random.Random(1)
    prefix = [rng.choice([1, 3, 20, 90, 200, 400]) + rng.randint(0, 9) for _ in range(48)]
    meta = _check(_kwargs(path), prefix, [1] * len(prefix), heads, kv_heads)
    if path.startswith("buckets"):
        assert len(meta.groups) > 1, "the lengths spread enough to be bucketed"
    if path == "one-group+padded":
        assert len(meta.groups) == 1
    if path == "chunked":
        assert len(meta.groups) > 8
    if path == "native":
        assert meta.native is not None and not meta.groups


@pytest.mark.parametrize("num_reqs", [1, 3, 7, 8])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 4)])
def test_native_decode_few_requests(num_reqs, heads, kv_heads):
    """Under 8 requests the kernel splits work per KV head instead of per request."""
    rng = random.Random(num_reqs)
    prefix = [rng.randint(0, 300) for _ in range(num_reqs)]
    meta = _check(_kwargs("native"), prefix, [1] * num_reqs, heads, kv_heads, seed=num_reqs)
    assert meta.native is not None


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(12, 4), (8, 1), (4, 4)])
@pytest.mark.parametrize("num_reqs", [3, 20])
def test_native_decode_vectorized_head_sizes(monkeypatch, head_dim, heads, kv_heads, num_reqs):
    """Head sizes 64 and 128 take the kernel's vectorized path (eight keys per reduction,
    chunks of keys, register accumulators): contexts shorter than eight keys, not a multiple
    of eight, and several chunks long, per request and per KV head (under 8 requests)."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "D", head_dim)
    rng = random.Random(num_reqs * head_dim)
    prefix = ([0, 3, 7, 8, 31, 32, 33, 65, 200, 401] * 2)[:num_reqs]
    prefix = [p + rng.choice([0, 0, 1]) for p in prefix]
    meta = _check(_kwargs("native"), prefix, [1] * num_reqs, heads, kv_heads, seed=head_dim + num_reqs)
    assert meta.native is not None and not meta.groups


@pytest.mark.parametrize("path", list(PATHS))
def test_prefill_batch_matches_reference(path):
    # Fresh prompts of different lengths, a request with a cached prefix, a short chunk.
    meta = _check(_kwargs(path), [0, 0, 0, 37, 5], [50, 7, 120, 16, 2])
    if path == "buckets+varlen":
        assert len(meta.seqs) == 5 and not meta.groups
    if path == "buckets+padded":
        assert len(meta.groups) == 1 and not meta.seqs


@pytest.mark.parametrize("path", list(PATHS))
def test_mixed_batch_matches_reference(path):
    # Prefill chunks and many decodes in one pass, prefill first as the scheduler's MIXED
    # batches are, so a decode token's row differs from its request's index.
    rng = random.Random(2)
    prefix = [0, 64] + [rng.randint(1, 300) for _ in range(40)]
    extend = [33, 20] + [1] * 40
    meta = _check(_kwargs(path), prefix, extend)
    if path == "native":
        assert meta.native is not None and meta.native.q_rows is not None and len(meta.native.rows) == 40


@pytest.mark.parametrize("head_dim", [8, 24, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (3, 3), (8, 1)])
def test_native_extend_matches_reference(monkeypatch, head_dim, heads, kv_heads):
    """The native kernel's prefill path: fresh prompts, cached prefixes, a 2-token chunk and
    a decode token in one batch, over scattered slots, for head sizes that do and do not fill
    its 16-wide tiles and row counts that do not fill its 8-row tiles."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "D", head_dim)
    meta = _check(_kwargs("native"), [0, 0, 37, 5, 0, 200], [50, 7, 16, 2, 1, 130], heads, kv_heads, seed=head_dim)
    assert meta.native_ext is not None and len(meta.native_ext.rows) == 5
    assert meta.native is not None and len(meta.native.rows) == 1 and not meta.groups and not meta.seqs


@pytest.mark.parametrize("prefix,extend", [([0], [300]), ([100], [150]), ([0, 7], [90, 33])])
def test_native_extend_splits_a_long_prompt_over_the_team(prefix, extend):
    """Fewer (request, KV head) pairs than twice the team: each request's tokens are split
    into chunks that run as separate work items (each copying the keys it sees)."""
    meta = _check(_kwargs("native"), prefix, extend, heads=4, kv_heads=1, seed=len(prefix))
    assert meta.native_ext is not None and len(meta.native_ext.rows) == len(prefix)


@pytest.mark.parametrize("head_dim", [24, 64, 128])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_native_kernels_read_a_bfloat16_cache(monkeypatch, head_dim, q_dtype):
    """A bfloat16 cache (model.dtype=bfloat16): both kernels widen each key and value as they
    read it, so with float32 queries the result is float32-exact against the reference over
    the stored values; with bfloat16 queries (the model's) it is within bfloat16 rounding.
    Decode (20 requests: vectorized for 64/128, generic for 24; and 3: per KV head), prefill
    with and without a cached prefix, and a chunk, in one mixed batch."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "D", head_dim)
    rng = random.Random(head_dim)
    decode = [rng.choice([0, 7, 33, 200, 401]) for _ in range(20)]
    for prefix, extend in (([0, 37, 5, 0] + decode, [50, 16, 2, 90] + [1] * 20), (decode[:3], [1] * 3)):
        meta = _check(_kwargs("native"), prefix, extend, heads=12, kv_heads=4, seed=head_dim,
                      kv_dtype=torch.bfloat16, q_dtype=q_dtype)
        assert meta.native is not None and not meta.groups and not meta.seqs
        assert (meta.native_ext is not None) == (len(prefix) > 3)


def test_bfloat16_native_and_torch_paths_agree():
    """The same bfloat16 batch through the native kernels and the torch gather / SDPA path:
    outputs within bfloat16 rounding of each other."""
    k_cache, v_cache, table, fb, (q, k, v), _ = _case(5, [0, 40, 300, 9], [30, 1, 1, 1], 4, 2, torch.bfloat16)
    outs = []
    for kw in (_kwargs("native"), {}):
        kc, vc = [k_cache[0].clone()], [v_cache[0].clone()]
        backend = TorchAttentionBackend(kc, vc, table, num_heads=4, num_kv_heads=2, head_dim=D, **kw)
        outs.append(backend.forward(0, q.bfloat16(), k.bfloat16(), v.bfloat16(), backend.init_forward_metadata(fb)))
    assert all(o.dtype == torch.bfloat16 for o in outs)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=1e-2, rtol=1e-2)


def test_equal_fresh_prompts_take_the_causal_batch():
    meta = _check({}, [0] * 6, [24] * 6)
    assert len(meta.groups) == 1 and meta.groups[0].mask is None and not meta.seqs


def test_length_buckets_cover_every_request_once_longest_first():
    rng = random.Random(3)
    for _ in range(200):
        lens = [rng.randint(1, 2000) for _ in range(rng.randint(1, 300))]
        buckets = length_buckets(lens, max_buckets=4, min_size=8, ratio=0.6)
        flat = [i for b in buckets for i in b]
        assert sorted(flat) == list(range(len(lens)))
        assert len(buckets) <= 4
        assert all(len(b) >= 8 for b in buckets[:-1])
        assert [lens[i] for i in flat] == sorted(lens, reverse=True)
