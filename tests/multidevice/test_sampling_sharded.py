"""The sampler on meshes of 8 CPU devices: rows data-parallel, parameters FSDP/TP-sharded,
and the same tokens and log-probs as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import models, partitioning, sampling

CONFIG = models.ModelConfig(
    family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=False,
)  # fmt: skip
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
PARAMS = sampling.SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40)


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, (8, 9))
    starts = np.array([0, 3, 5, 1, 2, 0, 8, 4])  # Left padding of each prompt.
    return jnp.asarray(ids), jnp.asarray((np.arange(9)[None] >= starts[:, None]).astype(np.int32))


@pytest.fixture(scope="module")
def reference():
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _prompts()
    return sampling.sample(model, ids, mask, jax.random.key(0), PARAMS, num_samples=2)


@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}x{c}" for a, b, c in MESHES])
def test_sharded_sampling_matches_one_device(reference, shape):
    mesh = partitioning.make_mesh(*shape)
    model = partitioning.shard_module(models.DecoderLM(CONFIG, rngs=nnx.Rngs(0)), mesh)
    kernel = model.layers[0].mlp.gate_proj.kernel.get_value()
    assert len({s.device for s in kernel.addressable_shards}) == 8
    rows = partitioning.batch_sharding(mesh)
    ids, mask = (jax.device_put(x, rows) for x in _prompts())
    out = sampling.sample(model, ids, mask, jax.random.key(0), PARAMS, num_samples=2)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_allclose(out.logps, reference.logps, atol=1e-5)
    np.testing.assert_array_equal(out.lengths, reference.lengths)
    # The rows stay split over the batch axes: each device holds 16 / (data * fsdp) of them.
    data_parallel = shape[0] * shape[1]
    assert {s.data.shape for s in out.tokens.addressable_shards} == {(16 // data_parallel, 10)}
