"""Optimizers: AdamW with a learning-rate schedule and gradient clipping, and the
precision of what it keeps (f32 master weights of bf16 parameters, bf16 moments).

Gradient accumulation is not an optax wrapper here: the train step splits a batch into
microbatches and sums loss numerators and denominators across them (`medjax.training.steps`),
which gives the full batch's gradient exactly, whatever the loss's normalisation.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(
    learning_rate: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to
    `final_fraction * learning_rate` at `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"learning_rate_schedule: schedule {schedule!r} is not one of {SCHEDULES}."
        )
    if schedule != "constant" and not total_steps:
        raise ValueError(f"learning_rate_schedule: schedule {schedule!r} needs total_steps.")
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        decay_steps = max(total_steps - warmup_steps, 1)
        end = final_fraction * learning_rate
        after = (
            optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
            if schedule == "cosine"
            else optax.linear_schedule(learning_rate, end, decay_steps)
        )
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    learning_rate: float = 1e-5,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    master_dtype: str | None = None,
    moments_dtype: str | None = None,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after global-norm clipping (None: no clipping).

    Args:
      master_dtype: e.g. "float32" for a model in bfloat16 (`train.dtype`): the optimizer
        keeps a master copy of the parameters in this dtype, updates it, and gives the
        model its rounding (`master_weights`). None: it updates the parameters in their own
        dtype, where an update below half a bfloat16 step (2^-9 of the weight) is lost.
      moments_dtype: e.g. "bfloat16": Adam's moments are stored in this dtype and computed
        in the master's (`moments_stored_as`). None: the dtype of the weights updated.
    """
    lr = learning_rate_schedule(
        learning_rate, schedule=schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, final_fraction=final_fraction,
    )  # fmt: skip
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if moments_dtype is not None:
        tx = moments_stored_as(tx, _dtype("moments_dtype", moments_dtype))
    if master_dtype is not None:
        tx = master_weights(tx, _dtype("master_dtype", master_dtype))
    return tx


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(field: str, name: str) -> jnp.dtype:
    if name not in FLOAT_DTYPES:
        raise ValueError(f"make_optimizer: {field} {name!r} is not one of {FLOAT_DTYPES}.")
    return jnp.dtype(name)


def _cast(tree, dtype):
    """Floating arrays of `tree` in `dtype`. Leaves that are not arrays (the placeholders of
    `optax.tree_map_params`, which finds the parameter-shaped parts of a state by calling
    `init` on one) pass unchanged."""

    def one(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


class MasterWeightsState(NamedTuple):
    """`master`: the parameters in the master dtype; `inner`: the wrapped optimizer's state,
    which sees only the master copy."""

    master: Any
    inner: Any


def master_weights(inner: optax.GradientTransformation, dtype=jnp.float32):
    """Mixed precision: `inner` updates a copy of the parameters kept in `dtype`, and the
    parameters become its rounding to their own dtype.

    `inner` gets the gradients cast to `dtype`. The update returned, `master - params` in
    `dtype`, makes `optax.apply_updates` (which adds in the wider dtype, then casts back)
    give the rounded master copy.
    """
    dtype = jnp.dtype(dtype)

    def init(params):
        master = _cast(params, dtype)
        return MasterWeightsState(master, inner.init(master))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("master_weights: update needs the parameters.")
        grads = _cast(updates, dtype)
        steps, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, steps)
        delta = jax.tree.map(lambda m, p: m - p.astype(dtype), master, params)
        return delta, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def moments_stored_as(inner: optax.GradientTransformation, dtype=jnp.bfloat16):
    """`inner`'s parameter-shaped state (Adam's moments) stored in `dtype`: it is cast to the
    parameters' dtype before each update and back after. Counts and schedules are kept as
    they are."""
    dtype = jnp.dtype(dtype)

    def stored(state):
        return optax.tree_map_params(inner, lambda x: _cast(x, dtype), state)

    def init(params):
        return stored(inner.init(params))

    def update(updates, state, params=None):
        wide = jax.tree.leaves(params if params is not None else updates)
        wide_dtype = wide[0].dtype if wide else jnp.float32
        state = optax.tree_map_params(inner, lambda x: _cast(x, wide_dtype), state)
        updates, state = inner.update(updates, state, params)
        return updates, stored(state)

    return optax.GradientTransformation(init, update)
