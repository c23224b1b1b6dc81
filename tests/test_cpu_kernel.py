"""The CPU fast paths as users select them: ``attention.cpu_kernel`` (the native decode-attention
kernel, core/model/cpu_native.py), ``model.cpu_fused_ops`` (RMSNorm, rotary and SiLU x up as
native kernels) and ``model.cpu_linear`` (weight GEMMs in oneDNN's packed layout), and what
happens where they cannot be used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loopserve.core import Engine, SamplingParams
from loopserve.core.model import cpu_native

PROMPTS = [[5, 17, 99, 3], list(range(3, 60)), [200, 7] * 30, [42]]


def _native_or_skip():
    if cpu_native.load("auto") is None:
        if os.environ.get("CI"):
            pytest.fail("the native CPU kernel did not build on this CI machine (needs cc with OpenMP)")
        pytest.skip("no C compiler here")


def _tokens(*overrides: str) -> tuple[list[list[int]], object]:
    with Engine(overrides=list(overrides)) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params=SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                              ignore_eos=True))
        native = eng.worker.attn_backend.native
    return [list(o.token_ids) for o in outs], native


def test_auto_uses_the_kernel_and_off_gives_the_same_tokens():
    _native_or_skip()
    auto, native_auto = _tokens()
    off, native_off = _tokens("attention.cpu_kernel=off")
    assert native_auto is not None and native_off is None
    assert auto == off


def test_bfloat16_uses_the_kernel_and_agrees_with_the_torch_path():
    """A bfloat16 model's cache is read by the same kernels (widened to float32 as read). Its
    greedy tokens agree with the torch path's in bfloat16 up to bfloat16 rounding: the two
    round differently (the kernel keeps scores and sums in float32), so a close call late in
    a request may flip; these prompts agree on every token but one request's tail."""
    _native_or_skip()
    auto, native_auto = _tokens("model.dtype=bfloat16")
    on, native_on = _tokens("model.dtype=bfloat16", "attention.cpu_kernel=on")
    off, native_off = _tokens("model.dtype=bfloat16", "attention.cpu_kernel=off")
    assert native_auto is not None and native_on is not None and native_off is None
    assert auto == on
    assert all(a[:8] == b[:8] for a, b in zip(auto, off))
    assert sum(a == b for a, b in zip(auto, off)) >= len(PROMPTS) - 1


def test_on_with_a_head_size_it_cannot_take_says_what_to_change(tmp_path):
    from loopserve.core.model.tiny import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), arch="qwen3", num_kv_heads=1, head_dim=12, seed=7, dtype="float32")
    with pytest.raises(ValueError, match="multiple of 8.*head size 12.*attention.cpu_kernel=auto"):
        Engine(overrides=[f"model.path={tmp_path}", "attention.cpu_kernel=on"])
    with Engine(overrides=[f"model.path={tmp_path}"]) as eng:  # auto: the torch path
        assert eng.worker.attn_backend.native is None
        out = eng.generate(input_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=3))
        assert len(out[0].token_ids) == 3


def test_unknown_value_is_rejected():
    with pytest.raises(ValueError, match="attention.cpu_kernel must be one of auto, on, off"):
        Engine(overrides=["attention.cpu_kernel=fast"])


SCRIPT = r"""
import sys
from loopserve.core import Engine, SamplingParams
try:
    with Engine(overrides=[sys.argv[1]]) as eng:
        out = eng.generate(input_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=5, temperature=0.0))
        native = eng.worker.attn_backend.native is not None or eng.worker.fused_ops
        print("native" if native else "torch", len(out[0].token_ids))
except ValueError as e:
    print("ValueError:", e)
"""


@pytest.mark.parametrize("override", ["attention.cpu_kernel=auto", "attention.cpu_kernel=on", "model.cpu_fused_ops=on"])
def test_without_a_compiler(tmp_path, override):
    """No compiler (CC names none) and an empty cache: auto falls back to the torch path;
    on is a ValueError that says how to fix it."""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "LOOPSERVE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, override], capture_output=True, text=True, timeout=180,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if override.endswith("auto"):
        assert proc.stdout.split() == ["torch", "5"], proc.stdout
    else:
        assert f"ValueError: {override}" in proc.stdout and "C compiler" in proc.stdout, proc.stdout
        assert f"or set {override.split('=')[0]}=auto" in proc.stdout, proc.stdout


def test_fused_ops_auto_and_off_give_the_same_tokens():
    _native_or_skip()

    def run(*overrides):
        with Engine(overrides=list(overrides)) as eng:
            outs = eng.generate(input_ids=PROMPTS, sampling_params=SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                                  ignore_eos=True))
            return [list(o.token_ids) for o in outs], eng.worker.fused_ops

    fused, on = run()
    plain, off = run("model.cpu_fused_ops=off")
    assert (on, off) == (True, False)
    assert fused == plain


def test_fused_ops_in_bfloat16_agree_with_the_torch_path():
    """bfloat16 models run the bfloat16 kernels (rounding where torch's ops round); greedy
    tokens agree with the plain torch ops up to a late close call."""
    _native_or_skip()

    def run(*overrides):
        with Engine(overrides=["model.dtype=bfloat16", *overrides]) as eng:
            outs = eng.generate(input_ids=PROMPTS, sampling_params=SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                                  ignore_eos=True))
            return [list(o.token_ids) for o in outs], eng.worker.fused_ops

    fused, on = run()
    forced, forced_on = run("model.cpu_fused_ops=on")
    plain, off = run("model.cpu_fused_ops=off")
    assert (on, forced_on, off) == (True, True, False)
    assert fused == forced
    assert all(a[:8] == b[:8] for a, b in zip(fused, plain))
    assert sum(a == b for a, b in zip(fused, plain)) >= len(PROMPTS) - 1


def test_fused_ops_say_what_to_change():
    with pytest.raises(ValueError, match="model.cpu_fused_ops must be one of auto, on, off"):
        Engine(overrides=["model.cpu_fused_ops=yes"])


def _rmsnorm_native_and_torch(dtype, rows: int, hidden: int):
    """(native, torch) pairs of add_and_norm's output, its residual sum, and the plain norm,
    for random ``dtype`` inputs (seeded by ``rows``)."""
    import torch

    from loopserve.core.model.llama import RMSNorm, _Alloc

    torch.manual_seed(rows)
    norm = RMSNorm(hidden, 1e-6, _Alloc(dtype, torch.device("cpu")))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x, res = (torch.randn(rows, hidden) * 3).to(dtype), torch.randn(rows, hidden).to(dtype)
    with torch.no_grad():
        expect, expect_total = norm.add_and_norm(x, res)
        plain = norm(x)
        norm.native = cpu_native.load("auto")
        got, total = norm.add_and_norm(x, res)
        got_plain = norm(x)
    return (got, expect), (total, expect_total), (got_plain, plain)


@pytest.mark.parametrize("rows,hidden", [(1, 768), (37, 100), (300, 64)])
def test_native_rmsnorm_matches_torch(rows, hidden):
    import torch

    _native_or_skip()
    (got, expect), (total, expect_total), (got_plain, plain) = _rmsnorm_native_and_torch(torch.float32, rows, hidden)
    assert torch.equal(total, expect_total)  # the residual add is exact
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_plain, plain, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 12, 64), (37, 3, 24), (5, 2, 128)])
def test_native_rope_equals_transformers_expression_bit_for_bit(tokens, heads, head_dim):
    import torch

    from loopserve.core.model.llama import _rotate_half

    _native_or_skip()
    torch.manual_seed(tokens)
    x = torch.randn(tokens, heads, head_dim) * 4
    pos = torch.randint(0, 4000, (tokens,)).float()
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    expect = (x * cos) + (_rotate_half(x) * sin)
    got = cpu_native.rope_(cpu_native.load("auto"), x.clone(), cos, sin)
    assert torch.equal(got, expect)


@pytest.mark.parametrize("n", [1, 7, 1029, 70_001])
def test_native_silu_mul_matches_torch(n):
    import torch

    _native_or_skip()
    torch.manual_seed(n)
    gate, up = torch.randn(n) * 6, torch.randn(n)
    gate[0] = -100.0  # exp(-100) underflows (the kernel takes it as 0 below -87)
    got = cpu_native.silu_mul(cpu_native.load("auto"), gate, up)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)


def _bf16_ulps(a, b):
    """Per element, how many bfloat16 steps apart two bfloat16 tensors are (same sign)."""
    import torch

    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("rows,hidden", [(1, 768), (37, 100), (300, 64), (3, 13)])
def test_native_rmsnorm_bfloat16_matches_torch(rows, hidden):
    """The residual add equals torch's bfloat16 add exactly; the norm is within one bfloat16
    step of torch's (its float32 sum of squares is taken in another order) and equal almost
    everywhere. Hidden sizes that do and do not fill the 8-wide vectors."""
    import torch

    _native_or_skip()
    (got, expect), (total, expect_total), (got_plain, plain) = _rmsnorm_native_and_torch(torch.bfloat16, rows, hidden)
    assert got.dtype == total.dtype == got_plain.dtype == torch.bfloat16
    assert torch.equal(total, expect_total)
    for g, e in ((got, expect), (got_plain, plain)):
        ulps = _bf16_ulps(g, e)
        assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.98


@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 12, 64), (37, 3, 24), (5, 2, 128), (4, 2, 12)])
def test_native_rope_bfloat16_equals_the_torch_expression_bit_for_bit(tokens, heads, head_dim):
    import torch

    from loopserve.core.model.llama import _rotate_half

    _native_or_skip()
    torch.manual_seed(tokens)
    x = (torch.randn(tokens, heads, head_dim) * 4).bfloat16()
    pos = torch.randint(0, 4000, (tokens,)).float()
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)
    cos, sin = emb.cos().bfloat16()[:, None, :], emb.sin().bfloat16()[:, None, :]
    expect = (x * cos) + (_rotate_half(x) * sin)
    got = cpu_native.rope_(cpu_native.load("auto"), x.clone(), cos, sin)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expect)


@pytest.mark.parametrize("n", [1, 7, 1029, 70_001])
def test_native_silu_mul_bfloat16_matches_torch(n):
    import torch

    _native_or_skip()
    torch.manual_seed(n)
    gate, up = (torch.randn(n) * 6).bfloat16(), torch.randn(n).bfloat16()
    gate[0] = -100.0
    if n > 2:
        gate[1], gate[2] = float("nan"), float("inf")
    got = cpu_native.silu_mul(cpu_native.load("auto"), gate, up)
    expect = torch.nn.functional.silu(gate) * up
    assert got.dtype == torch.bfloat16
    if n > 2:
        assert got[1].isnan() and expect[1].isnan()
        got, expect = torch.cat((got[:1], got[2:])), torch.cat((expect[:1], expect[2:]))
    ulps = _bf16_ulps(got, expect)
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.98


def test_fused_ops_refuse_a_dtype_they_would_misread():
    """The kernels read raw memory at the dtype's width: other dtypes, or mixed ones, are a
    TypeError before any C code runs (also under ``python -O``)."""
    import torch

    lib = object()  # never reached
    half = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="not float16"):
        cpu_native.silu_mul(lib, half, half)
    with pytest.raises(TypeError, match="one dtype"):
        cpu_native.rmsnorm(lib, torch.zeros(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)


def _tokens_and_linear(*overrides: str) -> tuple[list[list[int]], str]:
    with Engine(overrides=list(overrides)) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params=SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                              ignore_eos=True))
        return [list(o.token_ids) for o in outs], eng.worker.linear_backend


def test_cpu_linear_onednn_and_torch_give_the_same_tokens():
    import torch

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    packed, backend = _tokens_and_linear()
    plain, backend_off = _tokens_and_linear("model.cpu_linear=torch")
    assert (backend, backend_off) == ("onednn", "torch")
    assert packed == plain


def test_packed_linear_matches_f_linear():
    import torch
    import torch.nn.functional as F

    from loopserve.core.model.llama import Linear, _Alloc

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True, alloc=_Alloc(torch.float32, torch.device("cpu")))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96))
        lin.bias.copy_(torch.randn(40))
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.pack_onednn()
    assert lin.weight.numel() == 0  # one copy of the weights, the packed one
    for rows in (1, 5, 64, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(lin(x), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_cpu_linear_without_onednn(monkeypatch):
    """A torch built without oneDNN: auto keeps F.linear, onednn says what to change."""
    import torch

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    tokens, backend = _tokens_and_linear()
    assert backend == "torch" and all(len(t) == 24 for t in tokens)
    with pytest.raises(ValueError, match="model.cpu_linear=onednn needs a torch built with oneDNN"):
        Engine(overrides=["model.cpu_linear=onednn"])


def test_cpu_linear_unknown_value():
    with pytest.raises(ValueError, match="model.cpu_linear must be one of auto, onednn, torch"):
        Engine(overrides=["model.cpu_linear=blas"])
