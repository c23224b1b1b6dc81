"""``model.cpu_malloc``: glibc's malloc tuned for CPU prefill (core/model/cpu_malloc.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes, json, sys
from loopserve.core.model import cpu_malloc
first = cpu_malloc.tune(sys.argv[1])
# A 40 MiB block is above even the raised threshold (mmap'ed); an 8 MiB one is not once tuned:
# glibc's mallinfo2 counts mmap'ed bytes in hblkhd.
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
p = libc.malloc(8 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(p)
print(json.dumps({"tuned": first, "again": cpu_malloc.tune(sys.argv[1]), "mmapped_8mib": mmapped > 0}))
"""


def run(mode: str, env: dict[str, str] | None = None) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, timeout=60,
                         env={**clean, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_auto_keeps_prefill_sized_blocks_off_mmap():
    assert run("auto") == {"tuned": True, "again": True, "mmapped_8mib": False}
    assert run("off") == {"tuned": False, "again": False, "mmapped_8mib": True}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_users_malloc_environment_wins():
    assert run("auto", {"MALLOC_ARENA_MAX": "2"})["tuned"] is False


def test_bad_mode_is_a_value_error_naming_the_key():
    from loopserve.core.model import cpu_malloc

    with pytest.raises(ValueError, match="model.cpu_malloc must be one of auto, off"):
        cpu_malloc.tune("on")
