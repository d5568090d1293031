"""Both Pallas kernels, and splash attention for the plain causal path, compile for a TPU
v5e through the real TPU compiler (Mosaic), ahead of time on this CPU host: forward and
backward, bf16 and f32, at the shapes of the trainer's models. Nothing runs; the numerics
are checked in interpret mode by test_logprob.py, test_prefix_attention.py and
test_attention.py.

Needs libtpu (the TPU compiler), which the test extras install; skipped without it.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "libtpu", reason="libtpu (the TPU compiler) is not installed; the test extras install it"
)

from jax.experimental import topologies

# libtpu takes a machine-wide lock file when it loads (in the `tpu` fixture below, not at jax
# start-up): without this a second pytest-xdist worker fails to load it ("Internal error when
# accessing libtpu multi-process lockfile"). No TPU is used, so there is nothing to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from medjax import partitioning
from medjax.kernels import attention, logprob
from medjax.kernels import prefix_attention as pa

LOGPROB_KERNELS = {"fused_logprob_forward", "fused_logprob_d_hidden", "fused_logprob_d_lm_head"}
ATTENTION_KERNELS = {"grouped_attention_forward", "grouped_attention_dq", "grouped_attention_dkv"}


@pytest.fixture(scope="module")
def v5e_2x2():
    """The four chips of a v5e 2x2 slice, described without a TPU."""
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5e:2x2",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return topology.devices


@pytest.fixture(scope="module")
def tpu(v5e_2x2):
    """One chip of a v5e 2x2 slice."""
    return v5e_2x2[0]


def _on(device, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def _mosaic_kernels(fn, *args):
    """Compiles fn(*args) for the devices of `args`; the names of its Mosaic kernels."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return set(re.findall(r"%(\w+?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo))


def _logprob_value_and_grad(**kwargs):
    def loss(hidden, lm_head, targets):
        logp, entropy = logprob.fused_logprob(
            hidden, lm_head, targets, return_entropy=True, impl="pallas", **kwargs
        )
        return jnp.sum(logp) + jnp.sum(entropy)

    return jax.value_and_grad(loss, argnums=(0, 1))


def _attention_value_and_grad(**kwargs):
    def loss(q, k, v, segment_ids):
        out = pa.grouped_attention(q, k, v, segment_ids, impl="pallas", **kwargs)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


# (rows N, model dim D, vocab V, dtype): N = 1000 is ragged against the row tile; V = 151,936
# against every vocab tile; D = 1536 (f32) and 3584 need tiles smaller than the defaults.
LOGPROB_CASES = {
    "smollm2_135m_bf16": (1000, 576, 49_152, jnp.bfloat16),
    "smollm2_135m_f32": (1000, 576, 49_152, jnp.float32),
    "qwen2.5_1.5b_bf16": (2048, 1536, 151_936, jnp.bfloat16),
    "qwen2.5_1.5b_f32": (2048, 1536, 151_936, jnp.float32),
    "qwen2.5_7b_bf16": (1000, 3584, 152_064, jnp.bfloat16),
    "qwen2.5_7b_f32": (1000, 3584, 152_064, jnp.float32),
}


@pytest.mark.parametrize("case", LOGPROB_CASES)
def test_fused_logprob_compiles_for_tpu(tpu, case):
    """The forward and both backward kernels lower through Mosaic and fit the scoped VMEM.

    Catches: compiler parameters and interpret mode picked by `jax.default_backend()` ("cpu"
    on this host, so the TPU program got the interpret-mode HLO and no Mosaic kernel);
    block shapes that break Mosaic's (8, 128) rule; default tiles whose double-buffered
    [D, block] blocks overflow the 16 MiB scoped VMEM for large D (the d lm_head kernel
    needed 28 MiB at 256 x 512 tiles for D = 3584 in f32, more than 16 MiB for D = 1536).
    """
    n, d, v, dtype = LOGPROB_CASES[case]
    args = (_on(tpu, (n, d), dtype), _on(tpu, (d, v), dtype), _on(tpu, (n,), jnp.int32))
    assert _mosaic_kernels(_logprob_value_and_grad(), *args) == LOGPROB_KERNELS


# (batch B, packed length L, heads H, kv heads N, head dim K, dtype), as the model calls
# grouped_attention: q [B, L, H, K], k and v [B, L, N, K], segment_ids [B, L]. L = 16,384 is
# the research configs' context.
ATTENTION_CASES = {
    "smollm2_135m_bf16": (2, 2048, 9, 3, 64, jnp.bfloat16),
    "smollm2_135m_f32": (4, 1024, 9, 3, 64, jnp.float32),
    "qwen2.5_7b_bf16": (1, 2048, 28, 4, 128, jnp.bfloat16),
    "qwen2.5_7b_f32_l16384": (1, 16_384, 28, 4, 128, jnp.float32),
    "h12_n2_f32": (2, 2048, 12, 2, 128, jnp.float32),
    "h12_n2_bf16": (2, 2048, 12, 2, 128, jnp.bfloat16),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_grouped_attention_compiles_for_tpu(tpu, case):
    """The forward, dq and dk/dv kernels lower through Mosaic, GQA and head dim 64 included.

    Catches: block shapes that break Mosaic's (8, 128) rule (the [B, L] segment ids in
    (squeezed, L) blocks, G = H / N heads as the second-minor block dim of [B, L, H, K]);
    reshapes and 1-D vectors Mosaic cannot lay out; floor division in an index map (its
    `sign` asks the CPU default device for a TPU generation); whole-length K, V or Q blocks
    that overflow the 16 MiB scoped VMEM at long L (the dq kernel at L = 8192 in f32);
    interpret mode picked by `jax.default_backend()`.
    """
    b, length, h, n, k, dtype = ATTENTION_CASES[case]
    args = (
        _on(tpu, (b, length, h, k), dtype),
        _on(tpu, (b, length, n, k), dtype),
        _on(tpu, (b, length, n, k), dtype),
        _on(tpu, (b, length), jnp.int32),
    )
    assert _mosaic_kernels(_attention_value_and_grad(), *args) == ATTENTION_KERNELS


def test_explicit_interpret_is_honoured_for_tpu(tpu):
    """interpret=True compiles the interpret-mode HLO for TPU too, with no Mosaic kernel.

    Catches: the lowering platform overriding an explicit `interpret`.
    """
    logprob_args = (
        _on(tpu, (16, 128), jnp.float32),
        _on(tpu, (128, 256), jnp.float32),
        _on(tpu, (16,), jnp.int32),
    )
    assert not _mosaic_kernels(_logprob_value_and_grad(interpret=True), *logprob_args)
    attention_args = (
        _on(tpu, (1, 128, 2, 128), jnp.float32),
        _on(tpu, (1, 128, 1, 128), jnp.float32),
        _on(tpu, (1, 128, 1, 128), jnp.float32),
        _on(tpu, (1, 128), jnp.int32),
    )
    assert not _mosaic_kernels(_attention_value_and_grad(interpret=True), *attention_args)


SPLASH_KERNELS = {
    "splash_mha_fwd_segmented_residuals",
    "splash_mha_dq_segmented_no_residuals",
    "splash_mha_dkv_segmented_no_residuals",
}
# (batch B, length T, heads H, kv heads N, head dim K, dtype, mesh (data, fsdp, tensor)) as
# the model's plain causal attention takes them: T = 2,048 is the RL update's prompt plus
# completion; 1,000 is ragged against splash's blocks.
CAUSAL_CASES = {
    "smollm2_135m_bf16_one_chip": (2, 1000, 9, 3, 64, jnp.bfloat16, None),
    "qwen2.5_1.5b_bf16_fsdp4": (8, 2048, 12, 2, 128, jnp.bfloat16, (1, 4, 1)),
    "qwen2.5_7b_bf16_fsdp2_tensor2": (4, 2048, 28, 4, 128, jnp.bfloat16, (1, 2, 2)),
    "llama3.1_8b_f32_data2_fsdp2": (4, 1024, 32, 8, 128, jnp.float32, (2, 2, 1)),
}


@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_causal_attention_auto_is_splash_on_tpu(v5e_2x2, case):
    """`causal_attention(impl="auto")`, forward and backward, compiles for a v5e to splash
    attention's three Mosaic kernels, per shard (shard_map) under a mesh of the slice's
    four chips.

    Catches: the platform choice made by `jax.default_backend()` ("cpu" here: the TPU program
    would get the XLA path); splash called on sharded arrays without a shard_map (Mosaic
    kernels cannot be partitioned); a kernel built inside the trace (leaked tracers);
    lengths that are not a multiple of splash's blocks.
    """
    b, length, h, n, k, dtype, mesh_shape = CAUSAL_CASES[case]
    if mesh_shape is None:
        mesh, rows = None, jax.sharding.SingleDeviceSharding(v5e_2x2[0])
    else:
        mesh = jax.sharding.Mesh(np.array(v5e_2x2).reshape(mesh_shape), partitioning.MESH_AXES)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    shapes = [(b, length, h, k), (b, length, n, k), (b, length, n, k), (b, length)]
    args = [jax.ShapeDtypeStruct(s, dtype if len(s) == 4 else bool, sharding=rows) for s in shapes]

    def loss(q, k, v, valid):
        with partitioning.activations_on(mesh):
            out = attention.causal_attention(q, k, v, valid, impl="auto")
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    assert _mosaic_kernels(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args) == SPLASH_KERNELS
