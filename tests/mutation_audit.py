"""A mutation audit of the RL step's glue: each mutant is one small, plausible bug; the tests
named with it must fail on it. Not collected by pytest; run it by hand after changing the
trainer (about 12 minutes on 2 cores):

    python tests/mutation_audit.py                 # every mutant
    python tests/mutation_audit.py "top-p" "GRAO"  # those whose name contains a word

Each mutant is applied to a copy of the working tree (tracked and untracked files, in a
temporary folder; `PYTHONPATH` makes the copy's `medjax` the one imported), the named tests
run there, and the copy's file is put back. It prints CAUGHT or MISSED per (mutant, test)
and exits 1 if any was missed.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = "tests/unit/test_rows.py::"
TRAINING = "tests/unit/test_training.py::"
SAMPLING = "tests/unit/test_sampling.py::"
LEARNS = "tests/integration/test_learning_direction.py::test_rl_raises_the_rewarded_mass"
TRL = "tests/golden/test_trl_grpo_oracle.py"
MESH = "tests/integration/test_train.py::test_resume_on_another_mesh_shape"

# (name, file, text, replacement, tests that must fail). `text` occurs once in `file`.
MUTANTS = [
    ("grpo_batch: advantages negated", "medjax/training/rl.py",
     'batch["advantages"] = adv\n', 'batch["advantages"] = -adv\n',
     [ROWS + "test_grpo_rows_by_hand", LEARNS + "[grpo]"]),
    ("GRPO.rows: advantage_scale / advantage_ddof not passed on",
     "medjax/training/algorithms/grpo.py",
     "scale=stage.advantage_scale, ddof=stage.advantage_ddof,", "",
     [ROWS + "test_grpo_rows_by_hand"]),
    ("score_episodes: each episode scored against records[i % P]", "medjax/training/rl.py",
     "records[i // num_generations], reward)", "records[i % len(records)], reward)",
     [ROWS + "test_grpo_rows_pair_each_group_with_its_own_question"]),
    ("GRPO.loss_fn: kl_beta not passed to the loss", "medjax/training/algorithms/grpo.py",
     "loss = functools.partial(loss, beta=stage.kl_beta)", "loss = loss",
     [ROWS + "test_grpo_kl_beta_reaches_the_loss"]),
    ("score_and_update: reference scored with the policy's parameters",
     "medjax/training/runtime.py",
     '                    reference, job_batch["input_ids"]',
     '                    job_policy.state.params, job_batch["input_ids"]',
     [TRAINING + "test_score_and_update_scores_the_reference_with_the_reference_parameters"]),
    ("score_and_update: old log-probs left as sampled", "medjax/training/runtime.py",
     "            if stage.num_iterations > 1:\n", "            if stage.num_iterations > 99:\n",
     [TRAINING + "test_score_and_update_scores_old_logps_with_the_pre_update_policy"]),
    ("train step: the non-finite guard checks the loss only", "medjax/training/steps.py",
     "ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)", "ok = jnp.isfinite(loss)",
     [TRAINING + "test_the_non_finite_guard_skips_the_update"]),
    ("top-p: the token that crosses top_p dropped", "medjax/sampling.py",
     "keep_sorted = before < top_p", "keep_sorted = jnp.cumsum(probs, axis=-1) < top_p",
     [SAMPLING + "test_top_p_by_hand"]),
    ("top-k: off by one at the k-th value", "medjax/sampling.py",
     "logits_BxV < kth,", "logits_BxV <= kth,", [SAMPLING + "test_top_k_by_hand"]),
    ("grao_batch: the samples' and the reference's rewards negated", "medjax/training/rl.py",
     'batch["ref_rewards"] = np.array([r for _, _, r in references], np.float32)\n',
     'batch["ref_rewards"] = -np.array([r for _, _, r in references], np.float32)\n'
     '    batch["rewards"] = -batch["rewards"]\n',
     [ROWS + "test_grao_rows_by_hand", LEARNS + "[grao]"]),
    ("grao_batch: the samples' rewards negated", "medjax/training/rl.py",
     'batch["rewards"] = np.asarray(rewards, np.float32)',
     'batch["rewards"] = -np.asarray(rewards, np.float32)',
     [ROWS + "test_grao_rows_by_hand", LEARNS + "[grao-samples-only]"]),
    ("GRAO.rows: references of questions 0..P-1, not the step's",
     "medjax/training/algorithms/grao.py",
     "for i in rollouts.picked:", "for i in range(len(rollouts.picked)):",
     [ROWS + "test_grao_rows_by_hand"]),
    ("grao_loss_fn: the reference's rewards negated", "medjax/training/steps.py",
     'reference_logps, batch["ref_loss_mask"], batch["ref_rewards"],',
     'reference_logps, batch["ref_loss_mask"], -batch["ref_rewards"],',
     [ROWS + "test_grao_loss_on_the_rows_equals_the_paper_equation"]),
    ("mgrpo_main_batch: main advantages negated", "medjax/training/rl.py",
     'batch["advantages"] = main_adv', 'batch["advantages"] = -main_adv',
     [ROWS + "test_mgrpo_rows_with_one_shared_model_by_hand", LEARNS + "[mgrpo-two-models]"]),
    ("mgrpo_sub_batch: sub advantages negated", "medjax/training/rl.py",
     'batch["advantages"] = np.where(index >= 0, sub_adv, 0.0)',
     'batch["advantages"] = np.where(index >= 0, -sub_adv, 0.0)',
     [ROWS + "test_mgrpo_rows_with_two_models_by_hand", LEARNS + "[mgrpo-two-models]"]),
    ("MGRPO.rows (shared model): every advantage negated", "medjax/training/algorithms/mgrpo.py",
     "return base.StepRows({k: np.concatenate([b[k] for b in both]) for k in main}, stats)",
     "rows = {k: np.concatenate([b[k] for b in both]) for k in main}\n"
     '            rows["advantages"] = -rows["advantages"]\n'
     "            return base.StepRows(rows, stats)",
     [LEARNS + "[mgrpo-shared]"]),
    ("MGRPO.rows (shared model): sub rows before main rows", "medjax/training/algorithms/mgrpo.py",
     "both = [_widen(main, width, pad_id), _widen(subs, width, pad_id)]",
     "both = [_widen(subs, width, pad_id), _widen(main, width, pad_id)]",
     [ROWS + "test_mgrpo_rows_with_one_shared_model_by_hand"]),
    ("sft_loss_fn: loss negated", "medjax/training/steps.py",
     'return losses.sft_loss(logps, batch["loss_mask"])',
     'value, m = losses.sft_loss(logps, batch["loss_mask"])\n'
     '    return -value, dict(m, loss_numerator=-m["loss_numerator"])',
     ["tests/integration/test_learning_direction.py::test_sft_raises_the_experts_first_token"]),
    ("SFT resume: optimizer state reset", "medjax/training/sft_loop.py",
     "    state, start, _ = runtime.restore(ckpt, state, writer, stage.name)\n",
     "    state, start, _ = runtime.restore(ckpt, state, writer, stage.name)\n"
     "    state = state._replace(opt_state=tx.init(state.params)) if start else state\n",
     [MESH]),
    ("SFT resume: the data stream restarted", "medjax/training/sft_loop.py",
     "for i in stream[step]]", "for i in stream[step - start]]", [MESH]),
    ("grpo_loss: the delta cap dropped", "medjax/losses/grpo.py",
     "unclipped = ratio if delta is None else jnp.minimum(ratio, delta)", "unclipped = ratio",
     [TRL]),
    ("grpo_loss: GSPO's mean log-ratio over the padded width", "medjax/losses/grpo.py",
     "log_w = log_ratio.sum(-1, keepdims=True) / seq_len[:, None]",
     "log_w = log_ratio.sum(-1, keepdims=True) / log_ratio.shape[-1]",
     [TRL]),
    ("MiniLM: texts embedded in reverse order", "medjax/knowledge/retrieval.py",
     "            list(texts), batch_size=self.batch_size,",
     "            list(texts)[::-1], batch_size=self.batch_size,",
     ["tests/unit/test_retrieval.py::test_dense_index_minilm"]),
]  # fmt: skip


def copy_tree(into: pathlib.Path) -> None:
    """The working tree's tracked and untracked (not ignored) files."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source, target = ROOT / name, into / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def main(words: list[str]) -> int:
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp)
        copy_tree(copy)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        for name, path, text, replacement, tests in MUTANTS:
            if words and not any(w in name for w in words):
                continue
            original = (copy / path).read_text()
            if original.count(text) != 1:
                raise SystemExit(f"{name}: the text to replace occurs {original.count(text)} times")
            (copy / path).write_text(original.replace(text, replacement))
            for test in tests:
                t0 = time.time()
                out = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p",
                     "no:cacheprovider", test],
                    cwd=copy, env=env, capture_output=True, text=True,
                )  # fmt: skip
                caught = out.returncode == 1  # Tests failed (not a collection error: 2+).
                missed += not caught
                verdict = "CAUGHT" if caught else f"MISSED (pytest exit {out.returncode})"
                print(f"{verdict}  {name}  <-  {test}  ({time.time() - t0:.0f} s)", flush=True)
                why = [line for line in out.stdout.splitlines() if line.startswith("E   ")]
                if caught and why:
                    print(f"        {why[0][4:].strip()[:160]}", flush=True)
            (copy / path).write_text(original)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
