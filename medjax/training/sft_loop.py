"""An SFTStage's loop: batches of the expert's chats, one optimizer step each, held-out
evaluations on `heldout_every`, checkpoints and automatic resume."""

import functools
import time

import jax
from flax import nnx

from medjax.models.transformer import DecoderLM
from medjax.training import algorithms, data, evaluation, runtime, steps


def run_sft(run: runtime.Run, stage, model: DecoderLM) -> DecoderLM:
    """Trains `model` for `stage.steps` steps (resuming the stage's latest checkpoint);
    returns the trained policy."""
    method = algorithms.SFT()
    tx = stage.optimizer(total_steps=stage.steps)
    graphdef, state = steps.create_state(model, tx, run.seed, run.mesh)
    rows = method.chats(run, stage)
    stream = data.IndexStream(len(rows), stage.batch_size, run.seed)
    step_fn = steps.make_train_step(
        graphdef, tx, method.loss_fn(stage), num_microbatches=stage.num_microbatches,
        state_shardings=steps.shardings_of(state),
    )  # fmt: skip
    ckpt, writer = runtime.stage_outputs(run, stage, ("loss", "grad_norm", "tokens_per_s"))
    state, start, _ = runtime.restore(ckpt, state, writer, stage.name)
    writer.start(start)
    bad = runtime.BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    pad_id = run.tokenizer.pad_token_id
    last_good = start or None
    for step in range(start, stage.steps):
        run.write_config()
        t0 = time.perf_counter()
        batch = method.rows(stage, ([rows[i] for i in stream[step]], pad_id))
        if not batch.policy["loss_mask"].any():
            # A zero gradient would still move the weights (decay, momentum) and the stage
            # would export a policy that learnt nothing; `validate.sft_budget` refuses the
            # chats that cause this before a run starts.
            raise runtime.TrainError(
                f"SFTStage {stage.name!r}: step {step + 1}: no assistant token within"
                f" max_length {stage.max_length} in the batch's {len(stream[step])} chats;"
                " stopped instead of training on nothing."
            )
        state, m = step_fn(state, run.put(batch.policy))
        m = jax.device_get(m)
        elapsed = time.perf_counter() - t0
        scalars = {
            "loss": m["loss"], "grad_norm": m["grad_norm"], "update_skipped": m["update_skipped"],
            "num_tokens": m["num_tokens"], "tokens_per_s": batch.stats["tokens"] / elapsed,
            "time/update_s": elapsed, "compile/train_step": step_fn._cache_size(),
        }  # fmt: skip
        final = step + 1 == stage.steps
        scalars.update(
            evaluation.heldout(
                run, stage, step + 1, functools.partial(nnx.merge, graphdef, *state.weights())
            )
        )
        writer.write(step + 1, scalars)
        bad.update(float(m["update_skipped"]), step + 1, last_good)
        if ckpt.should_save(step + 1, final):
            ckpt.save(step + 1, state, {"step": step + 1, "data_step": step + 1})
            last_good = step + 1
    ckpt.close()
    writer.close()
    return nnx.merge(graphdef, *state.weights())
