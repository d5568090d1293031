"""Decoupled M-GRPO: the main agent's and the sub-agent's trainers as separate processes
(separate hosts) that exchange statistics through a shared store, never tensors.

    sub process                                   main process
    -----------                                   ------------
    SubAgentServer: POST /delegate  <-- HTTP ---  RemoteSubAgent (the `delegate` tool)
      runs sub episodes (batched), logs each        rollouts, R_M, main update
      to its local trajectory log, returns          publish_step(): one record per step
      {summary, sub_id, version}                      main/steps/<step> (put if_absent)
    trainer: wait for main/steps/<s>  <-- store --
      sub rows from its log + the record,
      update, checkpoint(applied set),
      sub/applied/<s>, sub/progress

Store keys (one namespace per run; named in `medjax.store.keys`):

    main/run, sub/run  {"id"}: the run (directory and creation time) the store serves
    main/epoch         {"epoch"}: +1 at every start of the main process (compare-and-set)
    main/steps/<s>     {"step", "epoch", "main_version", "num_rollouts", "time",
                        "rollouts": [{"key", "query_id", "rollout_index", "format_valid",
                                      "correct", "main_reward", "sub_ids", "sub_versions",
                                      "delegate_failures"}]}
    main/progress      {"published_steps", "epoch", "delegate_failures", "time", "done"}
    sub/progress       {"applied_steps", "version", "url", "dropped_stale", "missing",
                        "time", "status"}
    sub/applied/<s>    {"step", "version", "rollouts": [the applied statistics], ...}

A step record is the commit point: it is written once (`put(if_absent)`), whole, after the
step's rollouts; a main process that died and re-runs an already published step does not
publish it again (its new sub-trajectories are never referenced). The sub trainer applies
steps in order and keeps the keys it applied in its checkpoint, so a restarted sub process
restores the applied set with the policy it belongs to and continues at the next step:
nothing applied twice, nothing skipped. Sub-trajectories are written to the sub's local log
before their summary is returned, so a crash loses none that a record can name.

Staleness: each sub-trajectory carries the sub policy version (its number of updates) that
produced it. When the sub trainer at version v applies a record, sub-trajectories older
than v - `staleness_window` are left out of its batch (as for a rollout that delegated
nothing) and counted in `dropped_stale`.

The sub-agent's HTTP endpoint (`SubAgentServer`, its request checks and shared secret) lives
in `medjax.training.sub_agent_endpoint`, its client (`RemoteSubAgent`) in
`medjax.training.sub_agent_client`, and the store key names in `medjax.store.keys`; they
moved there from this module, which still exports their public names.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medjax import agents
from medjax.store import Store
from medjax.store.keys import (
    MAIN_EPOCH,
    applied_key,
    rollout_key,
    run_key,
    step_key,
)
from medjax.training.sub_agent_client import (
    RemoteSubAgent,
    SubAgentRefusedError,
    SubAgentUnavailableError,
)
from medjax.training.sub_agent_endpoint import (
    SECRET_ENV,
    BadRequestError,
    SubAgentServer,
    check_payload,
    is_loopback,
    sub_id,
)

__all__ = [
    "ROLES",
    "SECRET_ENV",
    "AppliedStep",
    "BadRequestError",
    "Decoupled",
    "RemoteSubAgent",
    "StoreInUseError",
    "SubAgentRefusedError",
    "SubAgentServer",
    "SubAgentUnavailableError",
    "WaitTimeoutError",
    "applied_key",
    "check_payload",
    "claim",
    "gather_step",
    "is_loopback",
    "next_epoch",
    "publish_step",
    "rollout_key",
    "step_key",
    "sub_id",
    "wait_for",
]

ROLES = ("main", "sub")


@dataclasses.dataclass(frozen=True)
class Decoupled:
    """Where an M-GRPO stage's process stands in a decoupled run (`RLStage.decoupled`).

    Attributes:
      role: "main" (main agent's rollouts and trainer) or "sub" (serves the sub-agent and
        trains it).
      store: the shared store's URL (`medjax.store.open_store`): "file:///shared/run" or
        "redis://host:6379/0?namespace=run".
      sub_url: main: the sub-agent's endpoint; None: the URL the sub process published
        in the store.
      host, port: sub: where to serve (127.0.0.1 by default; port 0 picks a free one).
        Beyond loopback the endpoint needs a shared secret in the variable `secret_env`
        on both processes: the sub process refuses to start without it, and the main
        process sends it as `Authorization: Bearer ...`.
      secret_env: the environment variable holding that secret ($MEDJAX_SUB_AGENT_TOKEN);
        on 127.0.0.1 it is used when set.
      staleness_window: sub: sub-trajectories more than this many sub updates older than
        the trainer's policy are dropped from its batch (and counted).
      on_sub_failure: main: "error" (a failed `delegate` call becomes a counted tool
        error and the run goes on) or "wait" (retry until the sub-agent answers, up to
        `request_timeout_s`).
      max_sub_lag: main: before rolling out step s, wait until the sub trainer has applied
        s - max_sub_lag steps (0: lockstep, the one-process schedule, deterministic);
        None: never wait.
      request_timeout_s: main: the longest one delegate request may take.
      batch_window_s: sub: requests that arrive within this window share one batch of
        sampler calls.
      wait_timeout_s: how long either side waits for the other before giving up.
      status_every_s: a status line this often while waiting.
    """

    role: str = "main"
    store: str = "file:///tmp/medjax_mgrpo/store"
    sub_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8470
    secret_env: str = SECRET_ENV
    staleness_window: int = 2
    on_sub_failure: str = "error"
    max_sub_lag: int | None = None
    request_timeout_s: float = 600.0
    batch_window_s: float = 0.02
    wait_timeout_s: float = 3600.0
    status_every_s: float = 10.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Decoupled.role {self.role!r}: use one of {ROLES}.")
        if self.on_sub_failure not in ("error", "wait"):
            raise ValueError(
                f"Decoupled.on_sub_failure {self.on_sub_failure!r}: use 'error' or 'wait'."
            )


class WaitTimeoutError(RuntimeError):
    """The other process did not show up in time."""


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, every: float, status: Callable[[float], str],
    poll: float = 0.1,
):  # fmt: skip
    """Polls `predicate` until it returns something truthy; prints `status(waited s)` every
    `every` s; raises WaitTimeoutError after `timeout` s."""
    start = last = time.monotonic()
    while not (value := predicate()):
        now = time.monotonic()
        if now - start >= timeout:
            raise WaitTimeoutError(status(now - start) + f"; gave up after {timeout:.0f} s.")
        if now - last >= every:
            print(status(now - start), flush=True)
            last = now
        time.sleep(poll)
    return value


class StoreInUseError(RuntimeError):
    """The store holds another run's records."""


def claim(store: Store, role: str, run_id: str) -> None:
    """Marks the store as this run's for `role` ("main" or "sub"); raises when another
    run (another run directory, or the same path made anew) claimed it first, so a fresh
    run never mistakes an old run's records for its own."""
    key = run_key(role)
    if store.put(key, {"id": run_id}, if_absent=True):
        return
    holder = (store.get(key) or {}).get("id")
    if holder != run_id:
        raise StoreInUseError(
            f"the store holds the records of another {role} run ({holder}); this run is"
            f" {run_id}. Give each run its own store (a new folder or Redis namespace)."
        )


# ---------------------------------------------------------------------------------------
# Main side.


def next_epoch(store: Store) -> int:
    """Counts this start of the main process (compare-and-set: exactly once per start)."""
    while True:
        current = store.get(MAIN_EPOCH)
        epoch = (current or {"epoch": 0})["epoch"] + 1
        if store.compare_and_set(MAIN_EPOCH, current, {"epoch": epoch, "time": time.time()}):
            return epoch


def publish_step(
    store: Store, step: int, epoch: int, main_version: int, trajs: Sequence[agents.Trajectory],
    terms, main_rewards, num_rollouts: int,
):  # fmt: skip
    """Publishes the step's per-rollout statistics as one record; False when the step was
    published before (a main process re-running it after a crash)."""
    rollouts = []
    for traj, term, reward in zip(trajs, terms, np.asarray(main_rewards), strict=True):
        rollouts.append({
            "key": rollout_key(step, traj.query_id, traj.rollout_index),
            "query_id": traj.query_id,
            "rollout_index": traj.rollout_index,
            "format_valid": float(term.format_valid),
            "correct": float(term.correct),
            "main_reward": float(reward),
            "sub_ids": [s.metadata["sub_id"] for s in traj.sub_trajectories],
            "sub_versions": [s.metadata["version"] for s in traj.sub_trajectories],
            "delegate_failures": traj.tool_failures,
        })  # fmt: skip
    record = {
        "step": step, "epoch": epoch, "main_version": main_version,
        "num_rollouts": num_rollouts, "time": time.time(), "rollouts": rollouts,
    }  # fmt: skip
    return store.put(step_key(step), record, if_absent=True)


@dataclasses.dataclass
class AppliedStep:
    """What the sub trainer takes from one published step."""

    subs: list[agents.Trajectory]  # The sub-trajectories it trains on, by rollout.
    owner: np.ndarray  # Each one's rollout position.
    correct: np.ndarray  # Each rollout's correctness.
    applied: dict  # The record of what was applied (sub/applied/<step>).
    dropped_stale: int
    missing: int


def gather_step(record: dict, log: Store, version: int, staleness_window: int) -> AppliedStep:
    """The sub trainer's inputs for one published step record: its own sub-trajectories
    (from `log`) named by the record, minus those older than `staleness_window` versions."""
    subs, owner, dropped, missing, rows = [], [], 0, 0, []
    for position, r in enumerate(record["rollouts"]):
        used = []
        for ident in r["sub_ids"]:
            entry = log.get(ident)
            if entry is None:
                missing += 1
                continue
            if version - entry["version"] > staleness_window:
                dropped += 1
                continue
            subs.append(agents.Trajectory.from_dict(entry["trajectory"]))
            owner.append(position)
            used.append(ident)
        rows.append({**r, "applied_sub_ids": used})
    applied = {
        "step": record["step"], "epoch": record["epoch"], "version": version,
        "dropped_stale": dropped, "missing": missing, "time": time.time(), "rollouts": rows,
    }  # fmt: skip
    correct = np.array([r["correct"] for r in record["rollouts"]], np.float32)
    return AppliedStep(subs, np.asarray(owner, np.int32), correct, applied, dropped, missing)
