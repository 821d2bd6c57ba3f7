"""The CPU speed-ups behind one call, `install`, made only when they are on (`--tune_cpu_allocator`,
`--fast_cpu_dropout`; both on by default for CPU training).

Both reach below the libraries' public surface: glibc's `mallopt` through ctypes, and transformers' attention registry
and SDPA function (cpu_dropout.py). Neither changes the maths, so when one is unavailable (another libc, a
transformers release that moved its internals) the run says so in one line and goes on with the plain path: a speed-up
must never be the reason a training run fails.
"""

from __future__ import annotations

import ctypes

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def install(model: torch.nn.Module, allocator: bool, dropout: bool) -> list[str]:
    """Turn on the speed-ups asked for; returns the lines to print: what was swapped, and why a plain path runs."""
    lines = []
    if allocator and (problem := tune_allocator()):
        lines.append(problem)
    if dropout:
        lines.append(swap_dropout(model))
    return lines


def tune_allocator() -> str | None:
    """The same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>: big tensors reuse heap memory instead of a fresh
    mmap/munmap (and page faults) every step (benchmarks/RESULTS.md: 1.1-1.6x here)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
            return None
        reason = "mallopt refused"
    except (OSError, AttributeError) as e:  # not glibc (musl, macOS): no libc.so.6, or no mallopt in it
        reason = f"{type(e).__name__}: {e}"
    return f"tuneloop: --tune_cpu_allocator unavailable here ({reason}); the default allocator is used"


def swap_dropout(model: torch.nn.Module) -> str:
    try:
        from tuneloop import cpu_dropout

        swapped = cpu_dropout.swap(model)
    # Any failure here comes from transformers internals that moved (ImportError, AttributeError, a changed
    # registry signature...); the model is untouched until they have all worked, so the plain path is safe.
    except Exception as e:  # noqa: BLE001
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return f"tuneloop: --fast_cpu_dropout unavailable with this transformers ({reason}); torch's dropout is used"
    return f"tuneloop: CPU dropout kernels for {' and '.join(swapped) or 'nothing (no dropout)'} (--fast_cpu_dropout)"
