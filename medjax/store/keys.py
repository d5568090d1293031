"""The key layout of a decoupled M-GRPO run's shared store (one namespace per run).

    main/run, sub/run  (`run_key`) the run the store serves
    main/epoch         (`MAIN_EPOCH`) +1 at every start of the main process
    main/steps/<s>     (`step_key`) the main trainer's published record of step s
    main/progress      (`MAIN_PROGRESS`) the main trainer's progress
    sub/progress       (`SUB_PROGRESS`) the sub trainer's progress
    sub/applied/<s>    (`applied_key`) what the sub trainer applied of step s

The records are described in training/decoupled.py, whose key names moved here (it still
exports them) so that the store package, its `status` command included, never imports from
the training package.
"""

import hashlib
import re

MAIN_EPOCH = "main/epoch"
MAIN_PROGRESS = "main/progress"
SUB_PROGRESS = "sub/progress"
STEPS_PREFIX = "main/steps/"
APPLIED_PREFIX = "sub/applied/"


def run_key(role: str) -> str:
    """Where the run that `role` ("main" or "sub") serves is recorded."""
    return f"{role}/run"


def step_key(step: int) -> str:
    return f"{STEPS_PREFIX}{step:08d}"


def applied_key(step: int) -> str:
    return f"{APPLIED_PREFIX}{step:08d}"


def step_of(key: str) -> int:
    """The step a `step_key` or `applied_key` names."""
    return int(key.rsplit("/", 1)[1])


def key_part(text: str) -> str:
    """`text` as one store key part (a short hash keeps distinct ids distinct)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:48]
    if clean == text:
        return text
    return f"{clean}~{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def rollout_key(step: int, query_id: str, rollout_index: int) -> str:
    """A main rollout's key within a step record."""
    return f"{step:08d}/{key_part(query_id)}/{rollout_index}"


def sub_trajectory_key(
    step: int, epoch: int, query_id: str, rollout_index: int, invocation_index: int
) -> str:
    """A sub-trajectory's id in the sub's log: unique per main step, main process epoch and
    call (the sub-agent endpoint's `sub_id` of a delegation)."""
    return f"{step:08d}/{epoch}/{key_part(query_id)}/{rollout_index}/{invocation_index}"
