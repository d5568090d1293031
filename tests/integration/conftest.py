"""What the integration tests share: the environment of their run_train.py subprocesses."""

import fcntl
import os

import pytest

from medjax import datasets


@pytest.fixture(scope="session")
def env(shared_tmp):
    # One cache and data folder for both xdist workers, built by the first under a lock.
    cache, data_dir = shared_tmp / "medjax_cache", shared_tmp / "tfds"
    env = dict(os.environ, MEDJAX_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
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
