"""Decoupled M-GRPO's two processes (`medjax.training.decoupled`): the main trainer's side
of the exchange (`MainSide`: the remote sub-agent and the shared store, used by
`rl_loop.run_rl`) and the sub-agent trainer's loop (`run_sub`: serves the sub-agent and
trains it on each published main step).
"""

import os
import time

import jax
from flax import nnx

from medjax import store as store_lib
from medjax.llm import JaxPolicyBackend
from medjax.models.transformer import DecoderLM
from medjax.store import keys
from medjax.training import decoupled as decoupled_lib
from medjax.training import runtime
from medjax.training.runtime import TrainError

PROGRESS_KEYS = ("sub/reward_mean", "decoupled/dropped_stale", "update/grad_norm")


def claimed_store(config: decoupled_lib.Decoupled, role: str, run_id: str):
    """The shared store, claimed for `role` of the run `run_id`."""
    try:
        store = store_lib.open_store(config.store)
        decoupled_lib.claim(store, role, run_id)
    except Exception as e:  # The first contact: a wrong URL, no server, another run's store.
        raise TrainError(f"Decoupled.store {config.store}: {e}") from None
    return store


class MainSide:
    """Decoupled M-GRPO's main process: the remote sub-agent and the store."""

    def __init__(self, config: decoupled_lib.Decoupled, stage, run_id: str):
        self.config, self.stage = config, stage
        self.store = claimed_store(config, "main", run_id)
        self.epoch = decoupled_lib.next_epoch(self.store)
        self.client = decoupled_lib.RemoteSubAgent(
            self._url, self.epoch, on_failure=config.on_sub_failure,
            timeout=config.request_timeout_s, status_every=config.status_every_s,
            secret_env=config.secret_env,
        )  # fmt: skip
        self.published = 0
        print(f"{stage.name}: main trainer, epoch {self.epoch}, store {config.store}", flush=True)
        self._wait(
            self.client.healthy, poll=0.5,
            status=lambda w: f"main: waiting for the sub-agent to start ({w:.0f} s)",
        )  # fmt: skip

    def _wait(self, predicate, status, poll: float = 0.1) -> None:
        try:
            decoupled_lib.wait_for(
                predicate, timeout=self.config.wait_timeout_s, every=self.config.status_every_s,
                status=status, poll=poll,
            )  # fmt: skip
        except decoupled_lib.WaitTimeoutError as e:
            raise TrainError(f"stage {self.stage.name!r}: {e}") from None

    def _url(self) -> str | None:
        if self.config.sub_url:
            return self.config.sub_url
        return (self.store.get(keys.SUB_PROGRESS) or {}).get("url")

    def before_step(self, step: int, seed: int) -> float:
        """Waits for the sub trainer when lockstep asks it; returns the seconds waited."""
        t0 = time.perf_counter()
        lag = self.config.max_sub_lag
        if lag is not None and step - lag > 0:
            need = step - lag

            def applied():
                return (self.store.get(keys.SUB_PROGRESS) or {}).get("applied_steps", 0) >= need

            self._wait(
                applied,
                status=lambda w: f"main: step {step} waits for the sub trainer to apply {need}"
                f" steps ({w:.0f} s)",
            )  # fmt: skip
        self.client.begin_step(step, seed)
        return time.perf_counter() - t0

    def publish(self, step: int, trajs, terms, main_rewards) -> dict[str, float]:
        new = decoupled_lib.publish_step(
            self.store, step, self.epoch, step, trajs, terms, main_rewards,
            self.stage.num_generations,
        )  # fmt: skip
        self.published = step + 1
        self.progress(done=False)
        sub = self.store.get(keys.SUB_PROGRESS) or {}
        return {
            "decoupled/published_new": float(new),
            "decoupled/delegate_failures": float(sum(t.tool_failures for t in trajs)),
            "decoupled/sub_lag_steps": float(step + 1 - sub.get("applied_steps", 0)),
            "decoupled/sub_version": float(sub.get("version", 0)),
        }

    def progress(self, done: bool) -> None:
        self.store.put(keys.MAIN_PROGRESS, {
            "published_steps": self.published, "epoch": self.epoch, "time": time.time(),
            "delegate_failures": self.client.failures, "done": done,
        })  # fmt: skip


def run_sub(run: runtime.Run, stage, model: DecoderLM) -> DecoderLM:
    """Decoupled M-GRPO's sub process: serves the sub-agent and trains it on each published
    main step, in order, from its own logged sub-trajectories (`medjax.training.decoupled`).
    """
    config, task, tok = stage.decoupled, run.task, run.tokenizer
    store = claimed_store(config, "sub", runtime.run_id(run.run_dir))
    stage_dir = os.path.join(run.run_dir, stage.name)
    log = store_lib.FileStore(os.path.join(stage_dir, "sub_trajectories"))
    total = stage.steps * stage.num_iterations * stage.num_minibatches
    tx = (stage.sub_optimizer or stage.optimizer)(total_steps=total)
    method = stage.method
    loss_fn = method.loss_fn(stage, task.temperature)
    policy = runtime.Policy(run, model, tx, loss_fn, stage.num_microbatches, task.temperature)
    ckpt, writer = runtime.stage_outputs(run, stage, PROGRESS_KEYS)
    (policy.state,), start, meta = runtime.restore(ckpt, (policy.state,), writer, stage.name)
    applied = list(meta.get("applied", []))
    counts = {k: int(meta.get(k, 0)) for k in ("dropped_stale", "missing")}
    writer.start(start)

    def serving():
        return nnx.merge(policy.graphdef, runtime.params_copy(policy.model()))

    def make_agent(m, seed):
        return task.sub_agent(run.env, JaxPolicyBackend(m, tok, seed=seed))

    server = decoupled_lib.SubAgentServer(
        make_agent,
        log,
        host=config.host,
        port=config.port,
        batch_window=config.batch_window_s,
        secret_env=config.secret_env,
    )
    server.set_policy(serving(), start)

    def progress(applied_steps: int, status: str) -> None:
        # The sub policy's version is its number of updates: the steps it has applied.
        store.put(keys.SUB_PROGRESS, {
            "applied_steps": applied_steps, "version": applied_steps, "url": server.url,
            "time": time.time(), "status": status, **counts,
        })  # fmt: skip

    server.start()
    progress(start, "serving")
    print(
        f"{stage.name}: sub-agent serving {server.url}; trainer at step {start}"
        f" ({len(applied)} rollout statistics applied)",
        flush=True,
    )
    bad = runtime.BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    base_key = jax.random.PRNGKey(run.seed)
    last_good = start or None

    def waiting(step):
        def status(waited):
            main = store.get(keys.MAIN_PROGRESS) or {}
            age = time.time() - main["time"] if main else float("nan")
            return (
                f"sub: waiting for main step {step}'s statistics ({waited:.0f} s); main has"
                f" published {main.get('published_steps', 0)} steps, last {age:.0f} s ago"
            )

        return status

    try:
        for step in range(start, stage.steps):
            run.write_config()
            t0 = time.perf_counter()
            record = decoupled_lib.wait_for(
                lambda s=step: store.get(decoupled_lib.step_key(s)),
                timeout=config.wait_timeout_s, every=config.status_every_s, status=waiting(step),
            )  # fmt: skip
            t_wait = time.perf_counter() - t0
            got = decoupled_lib.gather_step(record, log, step, config.staleness_window)
            batch, stats = method.sub_rows(
                stage, got.subs, got.owner, got.correct, record["num_rollouts"], step, base_key,
                pad_id=tok.pad_token_id, shaping=task.reward,
            )  # fmt: skip
            update_metrics, t_scoring, t_update = runtime.score_and_update(
                run, stage, [(policy, batch)], None, bad, step, last_good
            )
            store.put(decoupled_lib.applied_key(step), got.applied)
            applied.extend(r["key"] for r in record["rollouts"])
            counts["dropped_stale"] += got.dropped_stale
            counts["missing"] += got.missing
            if got.missing:
                print(
                    f"sub: step {step}: {got.missing} sub-trajectories not in the log", flush=True
                )
            scalars = {
                **stats, **update_metrics,
                "decoupled/dropped_stale": float(got.dropped_stale),
                "decoupled/missing": float(got.missing),
                "decoupled/main_epoch": float(record["epoch"]),
                "decoupled/record_age_s": time.time() - record["time"],
                "decoupled/server_batches": float(server.batches),
                "time/wait_main_s": t_wait, "time/scoring_s": t_scoring,
                "time/update_s": t_update, "time/step_s": time.perf_counter() - t0,
            }  # fmt: skip
            writer.write(step + 1, scalars)
            if ckpt.should_save(step + 1, step + 1 == stage.steps):
                ckpt.save(step + 1, (policy.state,), {
                    "step": step + 1, "data_step": step + 1, "applied": applied, **counts,
                })  # fmt: skip
                last_good = step + 1
            server.set_policy(serving(), step + 1)
            progress(step + 1, "training")
    except decoupled_lib.WaitTimeoutError as e:
        raise TrainError(f"stage {stage.name!r}: {e}") from None
    finally:
        ckpt.close()
        writer.close()
    progress(stage.steps, "done")
    server.close()
    return policy.model()
