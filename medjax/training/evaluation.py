"""Held-out evaluation: before and after each stage (`eval/<point>.json`), during a stage
(`heldout/<key>` metrics every `heldout_every` steps), the expert's held-out NLL, and the
run's results table (`results.md`, `results.json`) with reward plots.
"""

import json
import os
import time

import jax
from etils import epath
from flax import nnx

from medjax import multihost, paths
from medjax.llm import JaxPolicyBackend
from medjax.training import data, metrics, steps
from medjax.training.runtime import Run


def evaluate_policy(
    task, env, model, tokenizer, records, *, seed: int = 0, sub_model=None,
    hierarchical: bool = False,
) -> dict:  # fmt: skip
    """Greedy episodes of the task's agent on `records` (`task.evaluate`); `hierarchical`:
    M-GRPO's main agent over its sub-agent (`sub_model`, default `model`).

    Over several processes each runs every episode on its own copy of the policy
    (`multihost.local_copy`): greedy episodes of the same weights are the same on every
    process, so the results need no gathering."""
    backend = JaxPolicyBackend(multihost.local_copy(model), tokenizer, seed=seed)
    if not hierarchical:
        return task.evaluate(env, backend, records)
    sub = backend
    if sub_model is not None:
        sub = JaxPolicyBackend(multihost.local_copy(sub_model), tokenizer, seed=seed)
    return task.evaluate(env, backend, records, sub_backend=sub, hierarchical=True)


def heldout(
    run: Run, stage, step: int, model_fn, sub_fn=None, hierarchical: bool = False
) -> dict[str, float]:
    """`heldout/<key>` of a greedy held-out evaluation on `stage.heldout_every` steps
    (`hierarchical`: M-GRPO's main agent over the sub-agent)."""
    every = stage.heldout_every
    if not every or (step % every and step != stage.steps):
        return {}
    result = evaluate_policy(
        run.task, run.env, model_fn(), run.tokenizer, run.data.eval_records, seed=run.seed,
        sub_model=None if sub_fn is None else sub_fn(),
        hierarchical=hierarchical,
    )  # fmt: skip
    return {f"heldout/{k}": float(result[k]) for k in run.task.result_keys if k in result}


def evaluate_point(
    run: Run, point: str, model, evaluate: bool, sub_model=None, hierarchical: bool = False
) -> dict | None:
    """The evaluation at `point` ("before", "after_<stage>"): loaded from eval/<point>.json
    when a previous run wrote it, else run and written there."""
    if not evaluate:
        return None
    path = os.path.join(run.run_dir, "eval", f"{point}.json")
    if multihost.agree(paths.exists(path)):
        return json.loads(paths.read_text(path))
    count = len(run.data.eval_records)
    print(f"eval {point}: {count} held-out records, greedy (a line per turn)", flush=True)
    t0 = time.perf_counter()
    result = evaluate_policy(
        run.task, run.env, model, run.tokenizer, run.data.eval_records, seed=run.seed,
        sub_model=sub_model, hierarchical=hierarchical,
    )  # fmt: skip
    result["expert_nll"] = expert_nll(run, model)
    result["time_s"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        paths.write_text(path, json.dumps(result, indent=1))
    shown = ", ".join(f"{k} {result[k]:.4g}" for k in run.task.result_keys)
    print(f"eval {point}: {shown} ({count} held-out records, {result['time_s']:.0f} s)", flush=True)
    return result


def expert_nll(run: Run, model) -> float:
    """Token-mean NLL of the scripted expert's chats on the held-out questions (assistant
    tokens only, observations cut as in rollouts): how well the policy imitates the expert
    on questions it never trained on."""
    if run.heldout_rows is None:
        chats = run.task.expert_chats(run.env, run.data.eval_records)
        run.heldout_rows = [
            data.chat_ids(
                run.tokenizer, messages, max_observation_chars=run.task.max_observation_chars
            )
            for messages in chats
        ]
    rows = run.heldout_rows
    width = data.bucket(max(len(ids) for ids, _ in rows))
    batch = data.pad_rows(rows, width, pad_id=run.tokenizer.pad_token_id)
    graphdef, params = nnx.split(model, nnx.Param)
    logps = multihost.host_array(
        steps.make_score_fn(graphdef, mesh=run.mesh)(
            params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
    )
    mask = batch["loss_mask"] > 0
    return float(-(logps * mask).sum() / mask.sum())


POINTS = (
    "`before`: the policy the run starts from; `after_<stage>`: the policy at the end of that"
    " stage (each stage starts from the previous one's policy)"
)


def write_results(run_dir: str, results: dict[str, dict], rl_stages, keys) -> dict:
    """results.md and results.json: the table of evaluation points with what each column
    measures (`keys`: column -> meaning, the task's `result_keys`), and the reward plots of
    the RL stages named in `rl_stages`."""
    table = {p: {k: r[k] for k in keys} for p, r in results.items()}
    lines = ["| point | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for point, row in table.items():
        lines.append(f"| {point} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    plots = []
    for stage in rl_stages:
        path = plot_rewards(run_dir, stage)
        if path:
            plots.append(os.path.basename(path))
    text = "# Results\n\nHeld-out evaluation (greedy, one episode per question):\n\n"
    text += "\n".join(lines) + "\n"
    text += f"\nColumns:\n\n- point: {POINTS}.\n"
    text += "".join(f"- {k}: {keys[k]}.\n" for k in keys)
    text += "".join(f"\n![reward per step]({p})\n" for p in plots)
    paths.write_text(os.path.join(run_dir, "results.md"), text)
    paths.write_text(os.path.join(run_dir, "results.json"), json.dumps(table, indent=1))
    print("\n" + "\n".join(lines), flush=True)
    return table


def plot_rewards(run_dir: str, stage: str) -> str | None:
    """<stage>_reward_per_step.png from an RL stage's metrics (None: it logged no rewards)."""
    records = metrics.read_jsonl(os.path.join(run_dir, stage, "metrics.jsonl"))
    points = [(r["step"], r["reward/mean"]) for r in records if "reward/mean" in r]
    if not points:
        return None
    # A Figure of its own, not pyplot's: no global backend switched under a notebook.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean training reward")
    ax.set_title(f"{stage}: reward per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, f"{stage}_reward_per_step.png")
    with epath.Path(path).open("wb") as f:  # savefig names no remote filesystem: a file object.
        fig.savefig(f, format="png", dpi=120)
    return path
