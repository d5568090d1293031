"""Where a decoupled M-GRPO run stands, from its shared store alone.

    python -m medjax.store.status --store file:///shared/mgrpo/store
    python -m medjax.store.status --store redis://127.0.0.1:6379/0?namespace=run1 --json

Prints the main trainer's published steps and epoch (restarts), the sub trainer's applied
steps and policy version, the queue between them (published, not yet applied), the lag,
the policy versions in the last record, and the sub-trajectories dropped as stale or
missing. Reads only; safe while both trainers run. The key names come from
`medjax.store.keys`.
"""

import argparse
import json
import sys
import time

from medjax.store import keys, open_store
from medjax.store.base import Store


def summary(store: Store, now: float | None = None) -> dict:
    """The run's state as a dict (what the command prints)."""
    now = time.time() if now is None else now
    main = store.get(keys.MAIN_PROGRESS) or {}
    sub = store.get(keys.SUB_PROGRESS) or {}
    epoch = (store.get(keys.MAIN_EPOCH) or {}).get("epoch", 0)
    published = sorted(keys.step_of(k) for k in store.list(keys.STEPS_PREFIX))
    applied = sub.get("applied_steps", 0)
    waiting = [s for s in published if s >= applied]
    waiting_rollouts, oldest = 0, None
    for step in waiting:
        record = store.get(keys.step_key(step)) or {"rollouts": [], "time": now}
        waiting_rollouts += len(record["rollouts"])
        oldest = record["time"] if oldest is None else min(oldest, record["time"])
    last = store.get(keys.step_key(published[-1])) if published else None
    sub_versions = sorted({v for r in (last or {}).get("rollouts", []) for v in r["sub_versions"]})
    return {
        "main": {
            "epoch": epoch,
            "published_steps": len(published),
            "last_published_step": published[-1] if published else None,
            "last_update_s_ago": now - main["time"] if main else None,
            "delegate_failures": main.get("delegate_failures", 0),
            "done": main.get("done", False),
        },
        "sub": {
            "applied_steps": applied,
            "version": sub.get("version"),
            "url": sub.get("url"),
            "status": sub.get("status", "not started"),
            "last_update_s_ago": now - sub["time"] if sub else None,
            "dropped_stale": sub.get("dropped_stale", 0),
            "missing": sub.get("missing", 0),
        },
        "queue": {
            "steps": len(waiting),
            "rollouts": waiting_rollouts,
            "lag_steps": (published[-1] + 1 - applied) if published else 0,
            "oldest_waiting_s": now - oldest if oldest is not None else 0.0,
        },
        "last_record": {
            "main_version": last["main_version"] if last else None,
            "epoch": last["epoch"] if last else None,
            "sub_versions": sub_versions,
        },
    }


def _ago(seconds) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s ago"


def render(s: dict) -> str:
    m, sub, q, last = s["main"], s["sub"], s["queue"], s["last_record"]
    return "\n".join([
        f"main   epoch {m['epoch']}, {m['published_steps']} steps published (last step"
        f" {m['last_published_step']}), updated {_ago(m['last_update_s_ago'])},"
        f" delegate failures {m['delegate_failures']}{', done' if m['done'] else ''}",
        f"sub    {sub['applied_steps']} steps applied, policy version {sub['version']},"
        f" {sub['status']} at {sub['url']}, updated {_ago(sub['last_update_s_ago'])}",
        f"queue  {q['steps']} steps / {q['rollouts']} rollout statistics waiting; lag"
        f" {q['lag_steps']} steps, oldest waiting {q['oldest_waiting_s']:.0f} s",
        f"last   main version {last['main_version']} (epoch {last['epoch']}), sub versions"
        f" {last['sub_versions']}",
        f"stale  {sub['dropped_stale']} sub-trajectories dropped as stale, {sub['missing']}"
        " missing from the sub's log",
    ])  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.store.status", description=__doc__)
    parser.add_argument("--store", required=True, help="the run's store URL")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args(argv)
    try:
        state = summary(open_store(args.store, create=False))
    except Exception as e:  # One line, no traceback: a wrong URL or an unreachable server.
        print(f"status: error: {args.store}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=1) if args.json else render(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
