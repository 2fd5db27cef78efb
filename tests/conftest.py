"""Test setup: 8 simulated CPU devices, a float64 switch, a compilation cache.

The device count must be set before JAX initialises its backend, hence at
import time here. float64 is switched on only inside tests that ask for the
``x64`` fixture, so every other test runs with the dtypes users get. A
per-session persistent compilation cache lets tests that build the same
program (the same tiny model in several tests) share one compilation.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

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
