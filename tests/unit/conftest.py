"""What several unit test files share."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def _plain_logps(model, input_ids, loss_mask):
    """[B, T] float64 log-probs of the marked tokens from a plain causal forward of the
    right-padded rows (default positions, no segments, no fused log-prob kernel: padding comes
    after every real token, so it changes nothing): log_softmax of the logits at t - 1, taken
    at token t. Independent of `medjax.scoring`, which the trainer scores with."""
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(input_ids)), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    out = np.zeros(input_ids.shape, np.float64)
    rows, cols = np.indices(input_ids[:, 1:].shape)
    out[:, 1:] = logp[rows, cols, input_ids[:, 1:]]
    return out * loss_mask


@pytest.fixture
def plain_logps():
    """`_plain_logps(model, input_ids, loss_mask)`."""
    return _plain_logps
