"""The Triton kernels compile for a real GPU target (sm_90: H100/H200) on this machine, with
no GPU: Triton's compiler and ptxas run ahead of time. This catches what the interpreter
cannot (constructs the compiler rejects, tl.dot shape limits, type errors in the lowered
code) and checks that the half-precision attention dots use tensor cores (mma). It says
nothing about speed or about running on a device.

The compile runs in a subprocess: the kernels must be imported compiled, and the test
process may hold them interpreted (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from loopserve.core.model.kernels import decode_attention as da, extend_attention as ea, kv_store as ks, rmsnorm as rn

INDEX = {"ReqToToken", "ReqIdx", "SeqLens", "PrefixLens", "ExtendLens", "QStart", "Loc"}
FLOAT32 = {"MidO", "MidLse"}
SCALARS = {"sm_scale": "fp32", "eps": "fp32", "N": "i32"}

def signature(fn, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INDEX:
            sig[name] = "*i64"
        elif name in FLOAT32:
            sig[name] = "*fp32"
        elif name[0].isupper() and name not in SCALARS:
            sig[name] = "*bf16"
        else:
            sig[name] = SCALARS.get(name, "i32")
    return sig

CASES = [
    ("decode", da._decode_split_kernel, dict(GROUP=4, HEAD_DIM=128, BLOCK_H=16, BLOCK_D=128, BLOCK_N=32, DOT_F32=False)),
    ("decode-d24-mqa", da._decode_split_kernel, dict(GROUP=8, HEAD_DIM=24, BLOCK_H=16, BLOCK_D=32, BLOCK_N=32, DOT_F32=False)),
    ("merge", da._decode_merge_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=8)),
    ("extend", ea._extend_kernel, dict(GROUP=4, HEAD_DIM=128, BLOCK_M=32, BLOCK_N=32, BLOCK_D=128, DOT_F32=False)),
    ("extend-d64", ea._extend_kernel, dict(GROUP=1, HEAD_DIM=64, BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, DOT_F32=False)),
    ("kv_store", ks._kv_store_kernel, dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128)),
    ("rmsnorm", rn._rmsnorm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096)),
]
out = {}
for arch in (int(a) for a in sys.argv[1:]):
    for name, fn, consts in CASES:
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, consts), constexprs=consts),
                           target=GPUTarget("cuda", arch, 32))
        out[f"{name}@sm{arch}"] = {"cubin": len(k.asm["cubin"]), "mma": "mma" in k.asm["ttgir"]}
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, leave no cache behind
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "90"], capture_output=True, text=True, env=env,
                          timeout=240)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 7 and all(v["cubin"] > 0 for v in out.values())
    for name in ("decode", "decode-d24-mqa", "extend", "extend-d64"):
        assert out[f"{name}@sm90"]["mma"], f"{name}: the bf16 dots do not use tensor cores"
