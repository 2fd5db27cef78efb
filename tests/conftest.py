"""Test setup: 8 simulated CPU devices, and a float64 switch for references.

The device count must be set before JAX initialises its backend, hence at
import time here. float64 is switched on only inside tests that ask for the
``x64`` fixture, so every other test runs with the dtypes users get.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (for the slow references)."""
    with jax.enable_x64(True):
        yield
