"""The train state and the jitted steps: scoring, and a loss's gradient and update.

A loss function here takes `(model, batch)` and returns `(loss, metrics)` with the
`loss_numerator` and `loss_denominator` that every `medjax.losses` function reports. The
update step differentiates the numerator alone and divides by the denominator summed over
microbatches, so accumulating M microbatches gives the full batch's gradient exactly, for
every normalisation (token mean, sequence mean, Dr. GRPO's constant) and every M.

A non-finite loss or gradient leaves parameters and optimizer state untouched
(`update_skipped` is 1 in the metrics); the trainer counts these and stops after too many.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medjax import losses, partitioning, scoring
from medjax.models import transformer

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]

# Folded into TrainState.rng for LoRA dropout's keys, apart from the rollouts' fold_in(rng, s).
DROPOUT_STREAM = 0x10AD
# Metrics that add up across microbatches; the others are averaged.
SUMMED = ("loss_numerator", "loss_denominator", "num_tokens", "num_sequences")


class TrainState(NamedTuple):
    """Everything a checkpoint holds besides the data position.

    Attributes:
      step: int32 scalar, updates attempted so far (skipped ones included).
      params: the trained parameters: the model's `nnx.Param` state, or with LoRA
        (`ModelConfig.lora`) its adapters alone (`nnx.LoRAParam`).
      opt_state: the optax state (of `params` only).
      rng: uint32[2] key; rollouts of step s use `fold_in(rng, s)`.
      frozen: with LoRA, the base weights, which no step changes and no checkpoint holds
        (they are loaded again from where the stage started); else None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    def weights(self) -> tuple:
        """What `nnx.merge(graphdef, *weights)` makes the whole model of."""
        return (self.params,) if self.frozen is None else (self.params, self.frozen)


def split_trainable(model: nnx.Module):
    """(graphdef, trained parameters, frozen ones or None): a LoRA model's adapters and the
    rest of its parameters, else all its parameters and None."""
    config = getattr(model, "config", None)
    if getattr(config, "lora", None) is None:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, params, None
    return nnx.split(model, nnx.LoRAParam, nnx.Param)


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, mesh=None):
    """(graphdef, TrainState) of a model that is already placed (sharded) where it trains.
    A LoRA model (`ModelConfig.lora`) trains its adapters only: the optimizer state is the
    adapters', and the base weights ride along in `TrainState.frozen`."""
    from medjax import partitioning

    graphdef, params, frozen = split_trainable(model)
    step, rng = jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)
    if mesh is None:
        return graphdef, TrainState(step, params, jax.jit(tx.init)(params), rng, frozen)
    opt_state = partitioning.init_optimizer_state(tx, params, mesh)
    step, rng = jax.device_put((step, rng), NamedSharding(mesh, PartitionSpec()))
    return graphdef, TrainState(step, params, opt_state, rng, frozen)


def shardings_of(tree):
    """The shardings of a pytree of arrays (a step's `out_shardings`)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def sft_loss_fn(model: nnx.Module, batch: Batch):
    """Token-mean NLL of the policy's own tokens (`loss_mask`) of whole chats."""
    logps = scoring.score_sequences(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    )
    return losses.sft_loss(logps, batch["loss_mask"])


def policy_loss_fn(loss: Callable, *, temperature: float = 1.0) -> LossFn:
    """A clipped-surrogate loss over whole episodes.

    Args:
      loss: `losses.grpo_loss` or `losses.mgrpo_policy_loss` (partially applied with its
        options): called as `loss(logps, old_logps, advantages, loss_mask, [ref_per_token_logps=])`.
      temperature: the sampling temperature (log-probs are taken at it, as sampled).

    The batch holds `input_ids`, `attention_mask`, `loss_mask` [B, T], `advantages` [B], and
    optionally `old_logps` and `ref_logps` [B, T]; or, repacked by
    `rl.shared_prefix_rows` (`RLStage.grouped_scoring`), each group's episodes as one packed
    row (`rl.PACKED_KEYS`) and [B, C] continuations in place of the [B, T] arrays.
    """

    def fn(model, batch):
        if "packed_ids" in batch:
            logps, entropy = scoring.score_packed(
                model, batch["packed_ids"], batch["packed_segments"], batch["packed_positions"],
                batch["predict_index"], batch["input_ids"], batch["loss_mask"],
                temperature=temperature, return_entropy=True,
            )  # fmt: skip
        else:
            logps, entropy = scoring.score_sequences(
                model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                temperature=temperature, return_entropy=True,
            )  # fmt: skip
        kwargs = {}
        if "ref_logps" in batch:
            kwargs["ref_per_token_logps"] = batch["ref_logps"]
        value, metrics = loss(
            logps, batch.get("old_logps"), batch["advantages"], batch["loss_mask"], **kwargs
        )
        mask = batch["loss_mask"] > 0
        num = jnp.maximum(mask.sum(), 1)
        metrics = dict(metrics)
        metrics["entropy_mean"] = jnp.where(mask, jax.lax.stop_gradient(entropy), 0.0).sum() / num
        return value, metrics

    return fn


def grao_loss_fn(loss: Callable, *, num_generations: int, temperature: float = 1.0) -> LossFn:
    """GRAO over episodes: G sampled episodes and one reference (expert) episode per prompt.

    The batch holds the samples' `input_ids`, `attention_mask`, `loss_mask` [P*G, T] and
    `rewards` [P*G], and the references' `ref_input_ids`, `ref_attention_mask`,
    `ref_loss_mask` [P, Y] and `ref_rewards` [P]. `loss` is `losses.grao_loss` with its options.
    """

    def fn(model, batch):
        sample_logps = scoring.score_sequences(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            temperature=temperature,
        )  # fmt: skip
        reference_logps = scoring.score_sequences(
            model, batch["ref_input_ids"], batch["ref_attention_mask"], batch["ref_loss_mask"],
            temperature=temperature,
        )  # fmt: skip
        return loss(
            sample_logps, batch["loss_mask"], batch["rewards"],
            reference_logps, batch["ref_loss_mask"], batch["ref_rewards"],
            num_generations=num_generations,
        )  # fmt: skip

    return fn


def _split(batch: Batch, num_microbatches: int, mesh=None) -> Batch:
    """[B, ...] arrays -> [M, B / M, ...]: microbatch m holds rows m * B / M onwards (GRAO's
    and M-GRPO's rows keep their groups together). On a mesh, each microbatch's rows are
    spread over the batch's devices: a plain reshape would leave microbatch m on the few
    devices that held its rows, and every device would compute all of its rows."""

    def one(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"train step: a batch array of leading size {x.shape[0]} does not split into"
                f" {num_microbatches} microbatches."
            )
        x = x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, partitioning.microbatch_sharding(mesh, x.ndim))

    return {k: one(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    num_microbatches: int = 1,
    state_shardings=None,
):
    """A jitted `(state, batch) -> (state, metrics)` (`TrainStep`); the state's buffers are
    donated.

    `state_shardings` (`shardings_of(state)`) pins the new state where the old one was, so
    the step compiles once instead of again for the shardings XLA chose for its output.

    Metrics: the loss function's (numerators and counts summed over microbatches, the rest
    averaged), plus `loss`, `grad_norm` and `update_skipped`.
    """

    def numerator(params, frozen, batch, key):
        # Differentiated with respect to `params` only: a LoRA model's base weights get no
        # gradient buffers.
        model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))
        with transformer.lora_dropout(key):  # Drops only with LoraConfig.dropout > 0.
            _, metrics = loss_fn(model, batch)
        return metrics["loss_numerator"], metrics

    grad_fn = jax.grad(numerator, has_aux=True)
    # The state's mesh, which the microbatches are spread over (None: one device).
    mesh = partitioning.mesh_of(state_shardings)

    def step(state: TrainState, frozen, batch: Batch):
        with partitioning.activations_on(mesh):  # Each device computes its rows only.
            new_state, metrics = _step(state._replace(frozen=frozen), batch)
        return new_state._replace(frozen=None), metrics

    def _step(state: TrainState, batch: Batch):
        # LoRA dropout's masks: a key per step and microbatch (rollouts use fold_in(rng, s)).
        key = jax.random.fold_in(jax.random.fold_in(state.rng, DROPOUT_STREAM), state.step)
        if num_microbatches == 1:
            grads, metrics = grad_fn(state.params, state.frozen, batch, key)
        else:
            parts = _split(batch, num_microbatches, mesh)
            first = jax.tree.map(lambda x: x[0], parts)
            # Sums in float32 whatever the parameters' dtype (bfloat16 would round each add).
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, _wide(s.dtype)),
                jax.eval_shape(grad_fn, state.params, state.frozen, first, key),
            )

            def body(carry, part):
                microbatch, m = part
                out = grad_fn(state.params, state.frozen, microbatch, jax.random.fold_in(key, m))
                return jax.tree.map(lambda c, o: c + o.astype(c.dtype), carry, out), None

            parts = (parts, jnp.arange(num_microbatches))
            (grads, metrics), _ = jax.lax.scan(body, zeros, parts)
            metrics = {k: v if k in SUMMED else v / num_microbatches for k, v in metrics.items()}
        denominator = metrics["loss_denominator"]
        loss = metrics["loss_numerator"] / denominator
        grads = jax.tree.map(lambda g: g.astype(_wide(g.dtype)) / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        # The optimizer gets gradients in the parameters' dtype (`optim.master_weights`
        # widens them again for its float32 copy).
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Zero non-finite gradients before the optimizer sees them, then keep the old state.
        safe = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, opt_state = tx.update(safe, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state),
            state.rng, state.frozen,
        )  # fmt: skip
        metrics = dict(
            metrics, loss=loss, grad_norm=grad_norm, update_skipped=1 - ok.astype(jnp.int32)
        )
        return new_state, metrics

    if state_shardings is None:
        return TrainStep(jax.jit(step, donate_argnums=0))
    out = (state_shardings._replace(frozen=None), None)
    return TrainStep(jax.jit(step, donate_argnums=0, out_shardings=out))


class TrainStep:
    """`(state, batch) -> (state, metrics)`, jitted. The state's buffers are donated except
    `TrainState.frozen` (a LoRA model's base weights), which the step neither changes nor
    returns: reference log-probs and samplers keep using those buffers."""

    def __init__(self, jitted):
        self._jitted = jitted

    def __call__(self, state: TrainState, batch: Batch):
        new_state, metrics = self._jitted(state._replace(frozen=None), state.frozen, batch)
        return new_state._replace(frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: Batch):
        return self._jitted.lower(state._replace(frozen=None), state.frozen, batch)

    def _cache_size(self) -> int:
        return self._jitted._cache_size()


def _wide(dtype):
    """float32 for a narrower float (bfloat16 gradients are summed and scaled in float32)."""
    return jnp.promote_types(dtype, jnp.float32)


def make_score_fn(
    graphdef: nnx.GraphDef, *, temperature: float = 1.0, mesh=None, num_microbatches: int = 1
):
    """A jitted `(weights, input_ids, attention_mask, target_mask) -> [B, T] log-probs`, for
    the old and reference log-probs of a rollout batch; on `mesh`, each device scores only
    its rows. `weights` is the model's `nnx.Param` state, or a tuple of states that
    `nnx.merge` puts together (`TrainState.weights()`: a LoRA model's adapters and base).
    With `num_microbatches` M the rows are scored M groups at a time (as the update step
    splits them), so that only B / M rows' activations are alive at once."""

    @jax.jit
    def score(weights, input_ids, attention_mask, target_mask):
        model = nnx.merge(graphdef, *(weights if isinstance(weights, tuple) else (weights,)))

        def rows(part):
            return scoring.score_sequences(
                model, part["input_ids"], part["attention_mask"], part["target_mask"],
                temperature=temperature,
            )  # fmt: skip

        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask
        }  # fmt: skip
        with partitioning.activations_on(mesh):
            if num_microbatches == 1:
                return rows(batch)
            logps = jax.lax.map(rows, _split(batch, num_microbatches, mesh))
            return logps.reshape(input_ids.shape[0], *logps.shape[2:])

    return score
