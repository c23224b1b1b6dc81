"""Native CPU kernels (``core/model/cpu_kernels/*.c``), compiled with the system C compiler on
first use and called through ctypes.

Why: decode attention over the paged KV cache in plain torch gathers every request's keys and
values into a padded tensor, then attention reads that copy again: on the CPU, with a
realistic model, the gather alone cost as much as attention itself (docs/benchmarks.md, "CPU
throughput against vLLM"). The decode kernel reads each key and value once, in place, through
the request-to-token table. Prefill attention in torch's SDPA runs its inner products through
MKL, about a fifth of the weight GEMMs' speed on the AMD CPU measured; the extend kernel
computes them in register tiles instead (about 1.8x SDPA on one thread).

Build: ``$CC`` (else ``cc``) with ``-O3 -march=native -fopenmp``, into
``$LOOPSERVE_CACHE_DIR/native/<hash>/``, where the hash covers the source, the flags, the
compiler's version and the CPU's model and flags (a cache shared between machines never hands
one a library built for another CPU). Written under a temporary name and renamed into place.
The library links libgomp by its soname; loaded after torch, it shares torch's OpenMP runtime
and so the compute thread's team size (core/model/cpu_threads.py).

Where no compiler is found or the build fails, ``load()`` returns None and the caller keeps
the torch path (``attention.cpu_kernel=auto``); ``attention.cpu_kernel=on`` makes that an
error and ``off`` never builds.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels", "decode_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
CPU_KERNEL_MODES = ("auto", "on", "off")

_lock = threading.Lock()
_cache: dict[str, Any] = {}


class NativeBuildError(RuntimeError):
    pass


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = [ln for ln in f if ln.startswith(("model name", "flags", "vendor_id"))]
        return "".join(sorted(set(keep)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str) -> str:
    from loopserve.core.model.tiny import cache_dir

    with open(SOURCE, "rb") as f:
        src = f.read()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{cc} --version failed ({e})") from None
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + version.encode() + _cpu_signature().encode()).hexdigest()[:16]
    root = os.path.join(cache_dir(), "native", key)
    lib = os.path.join(root, "loopserve_cpu_kernels.so")
    if os.path.isfile(lib):
        return lib
    try:
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=root)
        os.close(fd)
    except OSError as e:
        raise NativeBuildError(f"cannot write under {root} ({e})") from None
    try:
        proc = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise NativeBuildError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{cc} could not build {SOURCE} ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(mode: str = "auto") -> Any | None:
    """The kernel library (ctypes), or None where ``mode`` is off or (auto) it cannot be built."""
    if mode not in CPU_KERNEL_MODES:
        raise ValueError(f"attention.cpu_kernel must be one of {', '.join(CPU_KERNEL_MODES)}; got {mode!r}")
    if mode == "off":
        return None
    with _lock:
        if "lib" in _cache:
            lib = _cache["lib"]
            if lib is None and mode == "on":
                raise ValueError(f"attention.cpu_kernel=on: the native CPU kernels are not available "
                                 f"({_cache.get('why')}); install a C compiler with OpenMP (gcc) or set "
                                 "attention.cpu_kernel=auto")
            return lib
        import torch  # noqa: F401 - torch's libgomp must be loaded first (see the module docstring)

        why = None
        lib = None
        cc = _compiler()
        if cc is None:
            why = f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
        else:
            try:
                lib = _setup(ctypes.CDLL(_build(cc)))
            except (NativeBuildError, OSError) as e:
                why = str(e)
        _cache["lib"], _cache["why"] = lib, why
        if lib is None:
            if mode == "on":
                raise ValueError(f"attention.cpu_kernel=on: the native CPU kernels are not available ({why}); "
                                 "install a C compiler with OpenMP (gcc) or set attention.cpu_kernel=auto")
            log.info("native CPU attention unavailable (%s); using the torch gather path", why)
        return lib


def _setup(lib: Any) -> Any:
    f = lib.loopserve_decode_attention
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [p, p, p, p, i64, p, p, p, p, i64, i64, i64, i64, ctypes.c_float, i64, i64]
    f.restype = ctypes.c_int
    f = lib.loopserve_extend_attention
    f.argtypes = [p, p, p, p, i64, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_float, i64, i64]
    f.restype = ctypes.c_int
    elementwise = {"rmsnorm": [p, p, p, p, p, i64, i64, ctypes.c_float], "silu_mul": [p, p, p, i64],
                   "rope": [p, i64, i64, i64, i64, p, p]}
    for name, args in elementwise.items():
        for sfx in ("f32", "bf16"):
            f = getattr(lib, f"loopserve_{name}_{sfx}")
            f.argtypes, f.restype = args, None
    return lib


FUSED_DTYPES = ("float32", "bfloat16")  # what the elementwise kernels take


def _suffix(t: Any, *same: Any) -> str:
    """The kernel name suffix for ``t``'s dtype; every tensor in ``same`` must share it (the C
    side reads raw memory at that width)."""
    name = str(t.dtype).removeprefix("torch.")
    # Checked even under ``python -O``: a wrong width would read past the tensors' memory.
    if name not in FUSED_DTYPES:
        raise TypeError(f"the fused CPU kernels take float32 or bfloat16, not {name}")
    if any(o.dtype != t.dtype for o in same):
        raise TypeError("the fused CPU kernels take tensors of one dtype")
    return "f32" if name == "float32" else "bf16"


def rmsnorm(lib: Any, x: Any, weight: Any, eps: float, residual: Any | None = None) -> tuple[Any, Any]:
    """``(norm(x [+ residual]), x + residual or None)`` over the last dimension, as
    ``RMSNorm.forward`` / ``add_and_norm``; float32 or bfloat16 (all the same dtype), contiguous."""
    import torch

    H = x.shape[-1]
    T = x.numel() // H
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    fn = getattr(lib, f"loopserve_rmsnorm_{_suffix(x, weight, *([] if residual is None else [residual]))}")
    fn(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
       None if total is None else total.data_ptr(), T, H, eps)
    return out, total


def silu_mul(lib: Any, gate: Any, up: Any) -> Any:
    """``silu(gate) * up``; float32 or bfloat16, contiguous, same shape and dtype."""
    import torch

    out = torch.empty_like(gate)
    fn = getattr(lib, f"loopserve_silu_mul_{_suffix(gate, up)}")
    fn(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
    return out


def rope_(lib: Any, x: Any, cos: Any, sin: Any) -> Any:
    """Rotary embedding in place on ``x`` [T, heads, D] (contiguous rows) with ``cos``/``sin``
    holding [T, D] contiguously, all float32 or all bfloat16; returns ``x``."""
    T, heads, D = x.shape
    fn = getattr(lib, f"loopserve_rope_{_suffix(x, cos, sin)}")
    fn(x.data_ptr(), T, heads, D, x.stride(0), cos.data_ptr(), sin.data_ptr())
    return x


KV_DTYPES = ("float32", "bfloat16")  # what the attention kernels read the cache as


def kv_bf16(k_cache: Any) -> int:
    """1 for a bfloat16 cache, 0 for float32 (anything else is the caller's error)."""
    name = str(k_cache.dtype).removeprefix("torch.")
    assert name in KV_DTYPES, f"native attention reads a float32 or bfloat16 cache, not {name}"
    return int(name == "bfloat16")


def decode_attention(lib: Any, q: Any, k_cache: Any, v_cache: Any, req_to_token: Any, rows: Any, seq_lens: Any,
                     q_rows: Any | None, out: Any, scale: float, max_len: int) -> None:
    """``out[q_rows[i]] = attention(q[q_rows[i]], keys/values of request i)`` for every i
    (``q_rows`` None: row i). ``q`` and ``out`` float32, the cache float32 or bfloat16, all
    contiguous on the CPU; ``rows``, ``seq_lens`` and ``q_rows`` int64; ``max_len`` >= every
    ``seq_lens[i]``."""
    num_reqs = rows.shape[0]
    if num_reqs == 0:
        return
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    rc = lib.loopserve_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), req_to_token.data_ptr(), req_to_token.stride(0),
        rows.data_ptr(), seq_lens.data_ptr(), None if q_rows is None else q_rows.data_ptr(), out.data_ptr(),
        num_reqs, num_heads, num_kv_heads, head_dim, scale, max_len, kv_bf16(k_cache))
    if rc != 0:
        raise MemoryError("native decode attention could not allocate its score buffers")


def extend_attention(lib: Any, q: Any, k_cache: Any, v_cache: Any, req_to_token: Any, rows: Any, prefix: Any,
                     ext: Any, starts: Any, out: Any, scale: float, max_len: int) -> None:
    """Causal attention for requests with several new tokens: request i's ``ext[i]`` tokens
    (rows ``starts[i]`` .. of ``q`` / ``out``) at positions ``prefix[i]`` .. see the keys and
    values of slots ``req_to_token[rows[i], :prefix[i] + ext[i]]`` (this pass's stored
    already). ``q`` and ``out`` float32, the cache float32 or bfloat16, contiguous; index
    tensors int64; ``max_len`` >= every prefix + ext."""
    num_reqs = rows.shape[0]
    if num_reqs == 0:
        return
    _, num_heads, head_dim = q.shape
    rc = lib.loopserve_extend_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), req_to_token.data_ptr(), req_to_token.stride(0),
        rows.data_ptr(), prefix.data_ptr(), ext.data_ptr(), starts.data_ptr(), out.data_ptr(),
        num_reqs, num_heads, k_cache.shape[1], head_dim, scale, max_len, kv_bf16(k_cache))
    if rc != 0:
        raise MemoryError("native extend attention could not allocate its buffers")
