"""Wall-clock timing of jitted JAX calls that does not count dispatch as device time.

A call is dispatched asynchronously: timing one call and blocking on it counts
the host's dispatch (tens of microseconds) as if the device spent it, which is
most of a decode step or a small kernel. :func:`median_seconds` instead times
``calls`` back-to-back calls and blocks on the last, so the device works on one
call while the host dispatches the next; ``calls`` is chosen so that a repeat
lasts about ``min_repeat_seconds``. The median over ``repeats`` of (repeat time
/ calls) is returned. Used by the kernel benchmarks (``kernels_*.py``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 10,
    min_repeat_seconds: float = 0.02,
    max_calls: int = 200,
) -> float:
    """Median seconds per call of ``fn(*args)`` after a compiling warm-up call."""
    if repeats < 1:
        raise ValueError(f"median_seconds: repeats must be >= 1, got {repeats}.")
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = time.perf_counter() - start
    calls = max(1, min(max_calls, math.ceil(min_repeat_seconds / max(single, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
