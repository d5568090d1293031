"""Input conventions shared by the losses: float32-or-wider compute dtype, boolean masks,
and trace-time shape checks whose errors name the offending arrays and their shapes."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype losses compute in: float32, or float64 when an input already is."""
    dtype = jnp.float32
    for a in arrays:
        if a is not None and jnp.issubdtype(a.dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, a.dtype)
    return jnp.dtype(dtype)


def as_mask(mask: jax.Array) -> jax.Array:
    """Any 0/1 or boolean array as a boolean mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def require_rank(name: str, x: jax.Array, ranks: int | Sequence[int], fn: str) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if x.ndim not in ranks:
        want = " or ".join(f"rank {r}" for r in ranks)
        raise ValueError(f"{fn}: `{name}` must have {want}, got shape {tuple(x.shape)}.")


def require_shape(name: str, x: jax.Array, shape: Sequence[int], fn: str, like: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: `{name}` has shape {tuple(x.shape)} but `{like}` has shape {tuple(shape)};"
            " they must match."
        )


def require_choice(name: str, value: str, choices: Sequence[str], fn: str) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {list(choices)}, got {value!r}.")
