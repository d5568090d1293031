"""Plain causal self-attention (no packed groups) through the platform's library kernel.

Every training forward that is not a packed group (SFT chats, whole multi-turn episodes,
the RL update's scoring) attends causally over its own row. `causal_attention` picks the
implementation by the platform the program is lowered for (the devices its arrays are on,
not `jax.default_backend()`, so an ahead-of-time compile for TPU on a CPU host gets the
TPU kernel):

* TPU: splash attention, the block-sparse flash kernels (forward, dq and dkv) of
  `jax.experimental.pallas.ops.tpu.splash_attention`. Under a mesh it runs per shard in a
  `shard_map`: rows over the batch's mesh axes, heads over "tensor" (Mosaic kernels cannot be
  partitioned by the compiler).
* GPU: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention, for bf16 and f16 (cuDNN has no f32 flash attention) and right-padded rows.
* CPU, and every case a kernel does not cover: XLA, query chunks of 128 against the keys up
  to the chunk's end (`prefix_attention.grouped_attention(impl="xla")` with one segment).

`impl` names one implementation instead: "xla"; "splash" (on CPU in Pallas interpret mode,
which is how the tests check it against "xla"); "cudnn" (needs a GPU).

Dimension letters: B batch, T length, H query heads, N kv heads, K head dim.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from medjax import partitioning
from medjax.kernels import prefix_attention

IMPLS = ("auto", "xla", "splash", "cudnn")

# Which implementation runs where, for `check_platform`'s messages and the docs.
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "splash": ("tpu", "cpu"), "cudnn": ("gpu",)}

_TILE = 128  # Splash's rows are padded to a multiple of this.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_platform(impl: str, platform: str) -> None:
    """Raises ValueError, in one line, when `impl` cannot run on `platform` ("cpu", "gpu",
    "tpu"; "cuda" and "rocm" count as "gpu")."""
    if impl not in IMPLS:
        raise ValueError(f"attention must be one of {list(IMPLS)}, got {impl!r}.")
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if impl != "auto" and platform not in PLATFORMS[impl]:
        raise ValueError(
            f"attention={impl!r} runs on {' or '.join(PLATFORMS[impl])}, not on this run's"
            f" {platform} devices; use attention='auto'."
        )


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, impl: str = "auto"
) -> jax.Array:
    """Causal GQA self-attention over the real tokens of each row.

    Query i sees key j iff j <= i and `valid[j]`; a row where `valid` is False gives 0. With
    positions that increase along each row's real tokens (the model's defaults, left or
    right padding) this is the model's position-based causal mask.

    Args:
      q: [B, T, H, K] queries (RoPE applied); k, v: [B, T, N, K], H a multiple of N.
      valid: [B, T] bool, True on real tokens.
      impl: "auto" (by platform, see the module docstring), "xla", "splash" or "cudnn".

    Returns:
      [B, T, H, K] in q's dtype; scores and softmax in float32 (cuDNN: its own accumulation).
    """
    if impl not in IMPLS:
        raise ValueError(f"causal_attention: `impl` must be one of {list(IMPLS)}, got {impl!r}.")
    valid = jnp.asarray(valid, bool)
    xla = functools.partial(_xla, q, k, v, valid)
    if impl == "xla":
        return xla()
    if impl == "cudnn":
        return _cudnn(q, k, v, valid)
    splash = _splash_or_none(q, k, v, valid, strict=impl == "splash")
    if impl == "splash":
        return lax.platform_dependent(tpu=splash(False), default=splash(True))
    branches = {"default": xla}
    if splash is not None:
        branches["tpu"] = splash(False)
    if _has_gpu() and q.dtype in _CUDNN_DTYPES:
        # Only when this process has a GPU: tracing the cuDNN call elsewhere raises.
        branches["cuda"] = lambda: _cudnn(q, k, v, valid)
    return lax.platform_dependent(**branches)


def _xla(q, k, v, valid):
    segment_ids = jnp.where(valid, 0, -1)
    return prefix_attention.grouped_attention(q, k, v, segment_ids, impl="xla", block_q=_TILE)


@functools.cache
def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _cudnn(q, k, v, valid):
    """cuDNN's flash attention with lengths, for right-padded rows; a batch with a row that is
    not right-padded (real tokens first) takes the XLA path instead, decided at run time."""
    if q.dtype not in _CUDNN_DTYPES:
        raise ValueError(
            f"attention='cudnn' needs bfloat16 or float16 activations (cuDNN has no float32"
            f" flash attention), got {q.dtype}; use attention='auto'."
        )
    lengths = valid.sum(axis=1, dtype=jnp.int32)
    right_padded = jnp.all(valid == (jnp.arange(valid.shape[1])[None] < lengths[:, None]))

    def cudnn():
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn",
        )  # fmt: skip
        return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)

    return lax.cond(right_padded, cudnn, lambda: _xla(q, k, v, valid))


@functools.cache
def _splash_kernel(length: int, heads: int, block: int, interpret: bool):
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    # The mask's block tables are constants, made once, outside any trace that asks for them.
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )


def _splash_or_none(q, k, v, valid, *, strict: bool):
    """`interpret -> (() -> output)` running splash attention, per shard under the current
    mesh; None where the shapes do not split over the mesh (strict: ValueError)."""
    b, t, h, kd = q.shape
    n = k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    # The layouts the model's logical-axis rules give, as the rest of the model is sharded.
    q_spec = partitioning.logical_to_spec(("batch", "heads", None, None))
    kv_spec = partitioning.logical_to_spec(("batch", "kv_heads", None, None))
    rows_spec = partitioning.logical_to_spec(("batch", None))

    def shards(entry) -> int:
        names = () if mesh.empty or entry is None else (entry,) if isinstance(entry, str) else entry
        return math.prod(mesh.shape[a] for a in names)

    if b % shards(q_spec[0]) or h % shards(q_spec[1]) or n % shards(kv_spec[1]):
        if strict:
            raise ValueError(
                f"attention='splash': batch {b} over {shards(q_spec[0])} row shards, or heads"
                f" {h}/{n} over {shards(q_spec[1])}/{shards(kv_spec[1])}, does not divide"
                " evenly."
            )
        return None
    padded = -(-t // _TILE) * _TILE
    block = next(s for s in (512, 256, 128) if padded % s == 0)
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    # Splash takes [heads, T, K] per row and does not scale the scores.
    q_BxHxTxK = jnp.pad(q * jnp.asarray(kd**-0.5, q.dtype), pad).transpose(0, 2, 1, 3)
    k_BxNxTxK, v_BxNxTxK = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v))
    # Real tokens are segment 1, padding 0: a real query sees real keys only, and every
    # padding query sees at least itself (splash needs no row without a key).
    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - t)))

    def make(interpret: bool):
        def local(q, k, v, segments):
            kernel = _splash_kernel(padded, q.shape[1], block, interpret)

            def row(q, k, v, s):
                return kernel(q, k, v, splash_kernel.SegmentIds(q=s, kv=s))

            return jax.vmap(row)(q, k, v, segments)

        def run():
            fn = local
            if not mesh.empty:
                fn = jax.shard_map(
                    local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows_spec),
                    out_specs=q_spec, check_vma=False,
                )  # fmt: skip
            out = fn(q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, segments)
            out = out.transpose(0, 2, 1, 3)[:, :t]
            return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)

        return run

    return make
