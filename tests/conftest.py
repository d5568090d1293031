"""Test-wide set-up. Runs before any test module, so before anything imports jax."""

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time

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

# Most tests compile many small programs once and run each for milliseconds: XLA's backend
# optimisations (LLVM at -O0 without its expensive passes) cost more than they save there
# (tests/unit/test_scoring.py + test_sampling.py: 136 s -> 91 s on 2 cores). The programs are
# the same HLO; only the machine code is less optimised. It is a compile option of this
# process only (no environment variable): run_train.py subprocesses and notebook kernels run
# long enough to need optimised code and compile at -O1 (see `run_train_env`).
# `optimized_xla` turns it back on.
jax.config.update("jax_disable_most_optimizations", True)


def _optimized_xla():
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


# XLA's backend optimisations on, for a test (or a module fixture) whose in-process run time
# dominates its compile time, such as a few dozen training steps.
optimized_xla = pytest.fixture(_optimized_xla)
optimized_xla_module = pytest.fixture(_optimized_xla, scope="module")


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """The run's temporary root that every xdist worker sees (a worker's own base temp is a
    child of it): for what workers build once and share, under a lock."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(shared_tmp):
    """One persistent XLA compilation cache for the run: the xdist workers and every
    subprocess they start (run_train.py, notebooks) reuse each other's compiled programs
    instead of compiling the same tiny models again. It lives under the run's pytest
    temporary root (xdist workers share its parent), so every run starts cold."""
    path = shared_tmp / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    yield path


@pytest.fixture
def x64():
    """Runs the test with float64 enabled, and turns it off again afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on 127.0.0.1 and a free port, stopped after the session. CI
    installs it (.ci/run); elsewhere the Redis cases skip when the binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI (.ci/run installs it).")
        pytest.skip("redis-server is not installed (apt install redis-server).")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def run_train_env(shared_tmp):
    """The environment of run_train.py subprocesses (2 CPU devices, one MEDJAX_CACHE) and the
    tiny KG-QA data folder, built once for the run under a lock: {"env", "data_dir"}."""
    from medjax import datasets

    # One cache and data folder for both xdist workers, built by the first under a lock.
    cache, data_dir = shared_tmp / "medjax_cache", shared_tmp / "tfds"
    env = dict(os.environ, MEDJAX_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    # LLVM at -O1: the same programs, compiled faster. Tiny runs are compile-bound (a cold
    # tiny GRAO arm: 52.6 s -> 38.4 s) and a prefill-heavy M-GRPO run is no slower (67.8 s ->
    # 65.1 s, the same metrics); the in-process tests go further (-O0, above).
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=1"
    env["JAX_PLATFORMS"] = "cpu"
    # Build both datasets here once (the subprocesses would each build them otherwise).
    old = os.environ.get("MEDJAX_CACHE")
    os.environ["MEDJAX_CACHE"] = str(cache)
    try:
        with open(shared_tmp / "integration_env.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            datasets.load("med_kg_qa/tiny", None, str(data_dir))
            datasets.load("med_kg_qa_trajectories/tiny", None, str(data_dir))
    finally:
        if old is None:
            del os.environ["MEDJAX_CACHE"]
        else:
            os.environ["MEDJAX_CACHE"] = old
    return {"env": env, "data_dir": str(data_dir)}
