"""Test setup: 8 simulated CPU devices, a float64 switch, fast compilation.

The device count must be set before JAX initialises its backend, hence at
import time here. float64 is switched on only inside tests that ask for the
``x64`` fixture (``global_x64`` where other threads must see it: TPU interpret
mode), so every other test runs with the dtypes users get. A
per-session persistent compilation cache lets tests that build the same
program (the same tiny model in several tests) share one compilation.

Tests run tiny shapes, so XLA's compile time dominates their run time: they
compile with LLVM optimisations off (``--xla_backend_optimization_level=0``),
which halved the time of tests/models/test_registry.py, and with XLA:CPU's
older elemental emitters instead of its fusion emitters
(``--xla_cpu_use_fusion_emitters=false``), which halved the CPU time of
tests/reducers/test_zero_tprune.py and tests/mixers/test_combiner.py again.
XLA's own HLO passes still run, and the float semantics are unchanged (no
fast-math either way).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU flags are for the suite's CPU run only: a GPU run of tests/kernels/
# test_kernels_on_gpu.py (JAX_PLATFORMS=cuda) keeps XLA's defaults, and another
# jaxlib may not know a CPU flag (XLA then exits at start-up, before pytest reports).
if os.environ["JAX_PLATFORMS"] == "cpu":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        _flags += " --xla_force_host_platform_device_count=8"
    if "xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if "xla_cpu_use_fusion_emitters" not in _flags:
        _flags += " --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="effformer-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (for the slow references)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def global_x64():
    """float64 for the test body, switched on process-wide and restored after.

    For TPU interpret mode: it runs the kernel body in host callbacks on other
    threads, which do not see ``x64``'s thread-local switch and then return float32
    where float64 is expected ("Incorrect output dtype ... Actual: float32").
    """
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
