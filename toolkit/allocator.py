"""The host allocator's policy, set by the entry when asked (``TOOLKIT_LEAN_MALLOC=1``): what a CPU
run holds is what its tensors hold.

Off by default: on the default job it cut training from 64.1 to 33.8 img/s (2026-12-07, 2 cores,
60 steps each way: 24 s of system time in page faults against 2 s), a cost no memory figure is
worth by default. ``bench/memory.py`` sets it, so the plan's CPU figures are for this policy.

glibc's malloc serves a large block from its own heap instead of a fresh mapping once a block of
that size has been freed (its mmap threshold grows up to 32 MiB), and keeps freed heap memory
resident. A diffusion step allocates and frees thousands of such blocks, so a CPU process's peak
resident memory ran 25–40 % above the most its live tensors ever held (a quarter-width SD-1.5
UNet's LoRA step, ``bench/memory.py``: 1.96 GiB resident for 1.46 GiB of tensors + libraries;
with gradient checkpointing 1.52 for 0.91). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``,
which also stops it from growing) maps every block of 128 KiB or more on its own and unmaps it
when freed, so resident memory follows live tensors and the memory plan's CPU figures hold
(``toolkit.plan``). The cost is a page fault per page of each new large block: measured in
bench/README.md §18 (`bench/allocator.py`). Not glibc (macOS, musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3          # glibc malloc.h
THRESHOLD = 128 * 1024         # glibc's own starting value, held fixed


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at ``threshold`` bytes (unless the user set
    ``MALLOC_MMAP_THRESHOLD_`` themselves); True when the policy is in force."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):   # not glibc
        return False
    if ok:   # processes this one starts (DDP ranks, torchrun workers) run the entry again; others inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    return ok
