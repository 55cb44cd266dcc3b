"""segflow.runtime: the malloc settings the flows apply."""

from __future__ import annotations

import subprocess
import sys

import pytest

# glibc's own account (mallinfo2, glibc >= 2.33): hblkhd is the bytes held in mmap'ed blocks
SCRIPT = """
import ctypes, sys
import numpy as np
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    from segflow.runtime import tune_malloc
    assert tune_malloc() and tune_malloc()  # applied, and idempotent
a = np.ones(256 * 2**20 // 8)  # a 256 MiB activation, say
print(libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_tuned_malloc_serves_large_blocks_from_the_heap() -> None:
    """Untuned, glibc mmaps a 256 MiB block (and unmaps it when freed: the next one is faulted
    in again); tuned, it comes from the heap, where a freed block is reused."""

    def mmapped(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True
        )
        return int(out.stdout.strip())

    assert mmapped("plain") >= 256 * 2**20
    assert mmapped("tuned") < 256 * 2**20
