"""What the integration tests share: the environment of their run_train.py subprocesses."""

import pytest


@pytest.fixture(scope="session")
def env(run_train_env):
    return run_train_env
