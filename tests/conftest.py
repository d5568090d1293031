"""Test-wide set-up. Runs before any test module, so before anything imports jax."""

import os
import sys

# Eight host devices so tests/multidevice/ can build meshes in the same pytest run. XLA reads
# the flag once, when jax starts: setting it in a test module would silently do nothing.
if "jax" in sys.modules:
    raise RuntimeError("jax was imported before tests/conftest.py could set XLA_FLAGS.")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs the test with float64 enabled, and turns it off again afterwards."""
    with jax.enable_x64(True):
        yield
