"""The Triton kernels and backend against a dense float64 reference, run on the CPU in
Triton's interpreter, plus the CUDA-graph bucket/padding logic and an end-to-end greedy run.

Not collected by the main test run: ``triton.jit`` chooses interpreter or compiler when a
function is decorated — including triton's own library functions, decorated when triton is
first imported —, so these tests need TRITON_INTERPRET=1 before anything in the process
imports triton. tests/test_triton_kernels.py runs this file in a subprocess with it set; to
run it directly:

    TRITON_INTERPRET=1 python -m pytest tests/triton_interp_cases.py

Interpreted Triton runs every program in Python, so shapes are small.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from loopserve.core.model.cuda_graph import CudaGraphRunner, capture_sizes, resolve_cuda_graph, select_bucket
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode
from loopserve.core.sched.sampling_params import SamplingParams

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.fail("run with TRITON_INTERPRET=1 (tests/test_triton_kernels.py does)", pytrace=False)

from loopserve.core.model import kernels  # noqa: E402
from loopserve.core.model.kernels.decode_attention import decode_attention, decode_buffers  # noqa: E402
from loopserve.core.model.kernels.extend_attention import extend_attention  # noqa: E402
from loopserve.core.model.kernels.kv_store import kv_store  # noqa: E402
from loopserve.core.model.kernels.rmsnorm import rmsnorm  # noqa: E402
from loopserve.core.model.triton_attention import TritonAttentionBackend  # noqa: E402

assert kernels.interpreted(), "TRITON_INTERPRET=1 is set, yet the kernels were built compiled"


# ---- a paged cache with scattered pages and its dense reference ------------------------------


def _case(seed, prefix_lens, extend_lens, *, heads, kv_heads, d, page, dtype=torch.float32):
    """Per-layer K/V caches whose pages (``page`` consecutive slots) are handed to requests
    in random order, a request-to-token table, one forward batch and the new q/k/v; plus each
    request's keys and values laid out contiguously for the reference."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = sum(-(-(p + n) // page) for p, n in zip(prefix_lens, extend_lens)) + 2
    num_pages = need + 3
    k_cache = torch.randn(num_pages * page, kv_heads, d).to(dtype)
    v_cache = torch.randn(num_pages * page, kv_heads, d).to(dtype)
    pages = list(range(num_pages))
    rng.shuffle(pages)
    rows = rng.sample(range(len(prefix_lens) + 3), len(prefix_lens))
    table = torch.zeros(len(prefix_lens) + 3, 256, dtype=torch.int64)
    seq_keys, seq_values, out_loc = [], [], []
    for row, p, n in zip(rows, prefix_lens, extend_lens):
        own = [pages.pop() for _ in range(-(-(p + n) // page))]
        slots = [own[i // page] * page + i % page for i in range(p + n)]
        table[row, :p] = torch.tensor(slots[:p], dtype=torch.int64)
        out_loc += slots[p:]
        seq_keys.append(k_cache[slots].double())
        seq_values.append(v_cache[slots].double())
    t = sum(extend_lens)
    q = torch.randn(t, heads, d).to(dtype)
    k = torch.randn(t, kv_heads, d).to(dtype)
    v = torch.randn(t, kv_heads, d).to(dtype)
    i = 0
    for keys, values, p, n in zip(seq_keys, seq_values, prefix_lens, extend_lens):
        keys[p : p + n] = k[i : i + n].double()
        values[p : p + n] = v[i : i + n].double()
        i += n
    mode = ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND
    fb = ForwardBatch(mode, rows, [0] * t, list(prefix_lens), list(extend_lens), out_loc,
                      [SamplingParams()] * len(rows))
    return k_cache, v_cache, table, fb, (q, k, v), (seq_keys, seq_values)


def _reference(q, keys, values, positions, heads, kv_heads):
    """Attention of each query at ``positions`` over keys 0 .. pos (float64)."""
    group, d = heads // kv_heads, q.shape[-1]
    out = []
    for qi, pos in zip(q.double(), positions):
        k = keys[: pos + 1].repeat_interleave(group, dim=1)
        v = values[: pos + 1].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", qi, k) * d**-0.5
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _check_backend(prefix_lens, extend_lens, *, heads, kv_heads, d, page, splits=3, dtype=torch.float32, tol=2e-5):
    k_cache, v_cache, table, fb, (q, k, v), (keys, values) = _case(
        7, prefix_lens, extend_lens, heads=heads, kv_heads=kv_heads, d=d, page=page, dtype=dtype)
    backend = TritonAttentionBackend([k_cache], [v_cache], table, num_heads=heads, num_kv_heads=kv_heads,
                                     head_dim=d, num_kv_splits=splits)
    meta = backend.init_forward_metadata(fb)
    assert meta.decode == (fb.num_tokens == fb.batch_size)
    out = backend.forward(0, q, k, v, meta)
    assert out.shape == q.shape and out.dtype == dtype
    t = 0
    for r, (p, n) in enumerate(zip(prefix_lens, extend_lens)):
        expect = _reference(q[t : t + n], keys[r], values[r], range(p, p + n), heads, kv_heads)
        torch.testing.assert_close(out[t : t + n].double(), expect, atol=tol, rtol=tol)
        t += n
    # The new tokens' K/V are in the cache at their slots, cast to the cache dtype.
    loc = torch.tensor(fb.out_cache_loc)
    assert torch.equal(k_cache[loc], k) and torch.equal(v_cache[loc], v)
    return meta


# (page size, query heads, kv heads, head dim): every page size, GQA ratio 1/2/4 (and MQA),
# and head dim 16/24/32/64 appear, with odd ones (24) paired with each page size.
SHAPES = [
    (1, 2, 2, 16),
    (16, 4, 2, 24),
    (1, 4, 1, 24),
    (16, 8, 2, 32),
    (1, 4, 2, 64),
    (16, 2, 2, 64),
]


@pytest.mark.parametrize("page,heads,kv_heads,d", SHAPES)
def test_decode_ragged_batch_matches_reference(page, heads, kv_heads, d):
    # Ragged contexts: shorter than the split count (empty splits), one block, several
    # blocks per split (split-K over a long context).
    meta = _check_backend([0, 1, 40, 150, 9], [1] * 5, heads=heads, kv_heads=kv_heads, d=d, page=page)
    assert meta.decode


@pytest.mark.parametrize("page,heads,kv_heads,d", SHAPES)
def test_extend_with_and_without_prefix_matches_reference(page, heads, kv_heads, d):
    # Fresh prompts, a cached prefix with a chunk longer than one query block, a one-token
    # request inside an extend batch (as in a MIXED batch), a short chunk after a long prefix.
    meta = _check_backend([0, 37, 0, 12, 70], [5, 40, 1, 3, 2], heads=heads, kv_heads=kv_heads, d=d, page=page)
    assert not meta.decode and meta.max_extend == 40


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_split_count_does_not_change_the_result(splits):
    _check_backend([3, 90, 33], [1] * 3, heads=4, kv_heads=2, d=32, page=16, splits=splits)


def test_bfloat16_cache():
    _check_backend([0, 20], [6, 1], heads=4, kv_heads=2, d=32, page=16, dtype=torch.bfloat16, tol=3e-2)
    _check_backend([5, 20], [1, 1], heads=4, kv_heads=2, d=32, page=16, dtype=torch.bfloat16, tol=3e-2)


def test_decode_launcher_leaves_padding_rows_alone():
    """The kernels directly: a decode over a subset of the table's rows in arbitrary order."""
    torch.manual_seed(3)
    k_cache, v_cache = torch.randn(64, 1, 16), torch.randn(64, 1, 16)
    table = torch.randperm(64)[None].repeat(4, 1)[:, :48].contiguous()
    rows, lens = torch.tensor([2, 0]), torch.tensor([48, 5])
    q = torch.randn(2, 2, 16)
    out = torch.full_like(q, float("nan"))
    mid_o, mid_lse = decode_buffers(2, 2, 16, 4, q.device)
    decode_attention(q, k_cache, v_cache, table, rows, lens, out, mid_o, mid_lse, scale=0.25)
    for b in range(2):
        slots = table[rows[b], : lens[b]]
        scores = torch.einsum("hd,ld->hl", q[b].double(), k_cache[slots, 0].double()) * 0.25
        expect = scores.softmax(-1) @ v_cache[slots, 0].double()
        torch.testing.assert_close(out[b].double(), expect, atol=2e-5, rtol=2e-5)


def test_extend_launcher_writes_only_its_rows():
    torch.manual_seed(4)
    k_cache, v_cache = torch.randn(32, 2, 24), torch.randn(32, 2, 24)
    table = torch.arange(32)[None].clone()
    q = torch.randn(6, 2, 24)
    out = torch.full_like(q, 7.0)
    extend_attention(q, k_cache, v_cache, table, torch.tensor([0]), torch.tensor([10]), torch.tensor([4]),
                     torch.tensor([1]), 4, out, scale=24**-0.5, block_m=16, block_n=16)
    assert torch.all(out[0] == 7.0) and torch.all(out[5] == 7.0)
    keys, values = k_cache.double(), v_cache.double()
    torch.testing.assert_close(out[1:5].double(), _reference(q[1:5], keys, values, range(10, 14), 2, 2),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads,d,dtype", [(2, 16, torch.float32), (3, 24, torch.bfloat16), (8, 64, torch.float32)])
def test_kv_store_writes_each_token_at_its_slot(heads, d, dtype):
    torch.manual_seed(5)
    k_cache, v_cache = torch.zeros(40, heads, d, dtype=dtype), torch.zeros(40, heads, d, dtype=dtype)
    loc = torch.tensor([17, 3, 39, 0])
    k, v = torch.randn(4, heads, d).to(dtype), torch.randn(4, heads, d).to(dtype)
    kv_store(k, v, k_cache, v_cache, loc)
    assert torch.equal(k_cache[loc], k) and torch.equal(v_cache[loc], v)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[loc] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_kv_store_casts_to_the_cache_dtype():
    k_cache, v_cache = torch.zeros(8, 2, 16, dtype=torch.bfloat16), torch.zeros(8, 2, 16, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    kv_store(k, v, k_cache, v_cache, torch.tensor([5, 1]))
    # Within one bfloat16 step (the interpreter truncates where a GPU rounds to nearest).
    torch.testing.assert_close(k_cache[[5, 1]].float(), k, atol=0, rtol=2**-7)
    torch.testing.assert_close(v_cache[[5, 1]].float(), v, atol=0, rtol=2**-7)


@pytest.mark.parametrize("n,dtype", [(64, torch.float32), (96, torch.float32), (64, torch.bfloat16)])
def test_rmsnorm_with_and_without_residual_matches_the_decoder(n, dtype):
    from loopserve.core.model.llama import RMSNorm, _Alloc

    torch.manual_seed(6)
    norm = RMSNorm(n, 1e-6, _Alloc(dtype, torch.device("cpu")))
    norm.weight.data = torch.randn(n).to(dtype)
    x, r = torch.randn(5, n).to(dtype), torch.randn(5, n).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    y, none = rmsnorm(x, norm.weight, 1e-6)
    assert none is None
    torch.testing.assert_close(y, norm(x), atol=tol, rtol=tol)
    y, r_out = rmsnorm(x, norm.weight, 1e-6, residual=r)
    if dtype == torch.float32:
        assert torch.equal(r_out, x + r)
    else:  # the interpreter truncates to bfloat16 where a GPU (and torch) rounds to nearest
        torch.testing.assert_close(r_out, x + r, atol=0, rtol=2**-7)
    torch.testing.assert_close(y, norm(x + r), atol=tol, rtol=tol)


# ---- CUDA graphs: what can be checked without a GPU ------------------------------------------


def test_capture_sizes_and_bucket_selection():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and all(b - a <= 8 for a, b in zip(sizes, sizes[1:]))
    for bs in range(1, 257):
        bucket = select_bucket(sizes, bs)
        assert bucket is not None and bs <= bucket and bucket - bs < 8
        assert bucket in sizes and not any(bs <= s < bucket for s in sizes)
    assert select_bucket(sizes, 257) is None
    with pytest.raises(ValueError, match="must be >= 1"):
        capture_sizes(0)


def test_cuda_graph_setting_resolution():
    assert resolve_cuda_graph(None, "cuda", "triton") is True
    assert resolve_cuda_graph(None, "cuda:1", "triton") is True
    assert resolve_cuda_graph(None, "cuda", "torch") is False
    assert resolve_cuda_graph(None, "cpu", "triton") is False
    assert resolve_cuda_graph(False, "cuda", "triton") is False
    with pytest.raises(ValueError, match="model.device=cuda"):
        resolve_cuda_graph(True, "cpu", "triton")
    with pytest.raises(ValueError, match="attention.backend=triton"):
        resolve_cuda_graph(True, "cuda", "torch")


def test_worker_rejects_cuda_graph_on_cpu():
    from loopserve.core.model.worker import ModelWorker

    with pytest.raises(ValueError, match="model.cuda_graph=true needs model.device=cuda"):
        ModelWorker(None, device="cpu", cuda_graph=True, kv_num_tokens=64)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    from loopserve.core.model.worker import ModelWorker

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ModelWorker(None, device="cpu", attention_backend="triton", kv_num_tokens=64)


@pytest.fixture(scope="module")
def worker_pair():
    """The tiny model with each backend (triton interpreted), small pools, on the CPU."""
    from loopserve.core.model.worker import ModelWorker

    tri = ModelWorker(None, dtype="float32", device="cpu", attention_backend="triton", kv_num_tokens=256,
                      page_size=16, max_running_requests=6)
    ref = ModelWorker(None, dtype="float32", device="cpu", attention_backend="torch", kv_num_tokens=256,
                      page_size=16, max_running_requests=6)
    yield tri, ref
    tri.shutdown()
    ref.shutdown()


def _greedy(worker, prompts, num_new):
    """Prefill all prompts in one batch, then decode greedily; the tokens per prompt."""
    slots = [list(range(i * 40, i * 40 + 40)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    rows = list(range(len(prompts)))
    fb = ForwardBatch(ForwardMode.EXTEND, rows, [t for p in seqs for t in p], [0] * len(seqs),
                      [len(p) for p in seqs], [s for p, sl in zip(seqs, slots) for s in sl[: len(p)]],
                      [SamplingParams(temperature=0.0)] * len(seqs))
    for r, tok in enumerate(worker.forward_batch(fb).next_token_ids):
        seqs[r].append(tok)
    for _ in range(num_new - 1):
        pos = [len(s) - 1 for s in seqs]
        ids, loc = [s[-1] for s in seqs], [sl[p] for sl, p in zip(slots, pos)]
        fb = ForwardBatch(ForwardMode.DECODE, rows, ids, pos, [1] * len(seqs), loc,
                          [SamplingParams(temperature=0.0)] * len(seqs))
        for s, tok in zip(seqs, worker.forward_batch(fb).next_token_ids):
            s.append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_greedy_tokens_equal_the_torch_backend(worker_pair):
    tri, ref = worker_pair
    prompts = [[1, 5, 9, 2, 7, 7, 3], [1, 4], [1, 8, 8, 8, 6, 2, 9, 11, 30, 2, 5]]
    assert _greedy(tri, prompts, 5) == _greedy(ref, prompts, 5)


def test_fused_rmsnorm_in_the_decoder_gives_the_same_tokens(worker_pair):
    tri, ref = worker_pair
    prompts = [[1, 5, 9, 2, 7, 7, 3], [1, 4, 4]]
    tri.model.use_fused_norm()
    try:
        assert _greedy(tri, prompts, 3) == _greedy(ref, prompts, 3)
    finally:
        for m in tri.model.modules():
            if hasattr(m, "fused"):
                m.fused = False


def test_auto_backend_and_cuda_graph_config():
    from loopserve.core.config import compose_config
    from loopserve.plugins.worker_model import resolve_attention_backend

    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert resolve_attention_backend("auto", "cuda") == "triton"  # triton is installed here
    assert resolve_attention_backend("torch", "cuda") == "torch"
    assert compose_config([]).model.cuda_graph is None
    assert compose_config(["model.cuda_graph=false"]).model.cuda_graph is False


def test_engine_passes_cuda_graph_to_the_worker():
    from loopserve.core import Engine

    with pytest.raises(ValueError, match="model.cuda_graph=true needs model.device=cuda"):
        Engine(overrides=["model.cuda_graph=true", "model.device=cpu", "kv_cache.num_tokens=64"])


def test_graph_runner_padded_path_gives_the_same_tokens(worker_pair):
    """The worker's decode steps through the CUDA-graph runner's static buffers padded to a
    bucket (3 requests -> bucket 4, padding on the reserved row and slot) give the eager
    decode's tokens. On the CPU nothing is captured: the runner runs the bucket's forward
    eagerly over the same buffers a replay would use."""
    tri, ref = worker_pair
    # Row 5 and slot 255 are never used by _greedy (3 prompts, slots 0..119).
    runner = CudaGraphRunner(tri.model, tri.attn_backend, max_bs=5, dummy_row=5, scratch_slot=255)
    assert runner.sizes == [1, 2, 4, 5]
    prompts = [[1, 5, 9, 2, 7], [1, 4], [1, 8, 8, 6]]
    replays = []
    real_replay = runner.replay
    runner.replay = lambda *a: replays.append(a[0].shape[0]) or real_replay(*a)
    tri.cuda_graphs = runner
    try:
        got = _greedy(tri, prompts, 4)
    finally:
        tri.cuda_graphs = None
    assert got == _greedy(ref, prompts, 4)
    assert replays == [3, 3, 3], "every decode step went through the runner"
    assert runner.rows[3].item() == 5 and runner.loc[3].item() == 255 and runner.positions[3].item() == 0
    assert tri.req_to_token[5, 0].item() == 255


def test_engine_end_to_end_with_the_triton_backend():
    from loopserve.core import Engine

    outs = {}
    for backend in ("triton", "torch"):
        eng = Engine(overrides=[f"attention.backend={backend}", "model.device=cpu", "kv_cache.num_tokens=512",
                                "scheduler.max_running_requests=4", "loop=normal"])
        try:
            res = eng.generate(["hello there", "a b c"], SamplingParams(temperature=0.0, max_new_tokens=4),
                               timeout=120)
            outs[backend] = [r.token_ids for r in res]
        finally:
            eng.shutdown()
    assert outs["triton"] == outs["torch"] and all(len(t) == 4 for t in outs["torch"])
