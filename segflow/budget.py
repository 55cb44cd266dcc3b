"""The memory budget that work sizes are checked against before anything is allocated.

A command asked for a 10^6-pixel tile would otherwise try to allocate terabytes and die with
a ``MemoryError`` (or be killed) minutes later. The budget is ``SEGFLOW_MEMORY_BUDGET``
(bytes, or with a unit: ``16GiB``, ``500MB``), else three quarters of the machine's memory.

Examples
--------
>>> parse_bytes("2GiB")
2147483648
>>> format_bytes(3 * 2**30)
'3.0 GiB'
"""

from __future__ import annotations

import os
import re

from segflow.errors import ConfigError

__all__ = ["ENV_MEMORY_BUDGET", "format_bytes", "memory_budget", "parse_bytes"]

ENV_MEMORY_BUDGET = "SEGFLOW_MEMORY_BUDGET"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"500 MB"`` or ``"1000000"`` as a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"not a size in bytes: {text!r}: write e.g. 16GiB, 500MB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below it, one decimal."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def memory_budget() -> int:
    """Bytes one run may plan to hold: ``$SEGFLOW_MEMORY_BUDGET``, else 3/4 of the RAM."""
    env = os.environ.get(ENV_MEMORY_BUDGET)
    if env:
        return parse_bytes(env)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        total = 8 * 2**30
    return int(total * 0.75)
