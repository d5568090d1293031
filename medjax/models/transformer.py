"""A Flax NNX decoder LM for the Llama 3, Qwen2/2.5 and Qwen3 families.

One graph serves training, scoring and sampling: `DecoderLM.__call__` runs a full forward,
and with a `KVCache` it runs a prefill or a decode step that appends to the cache. Module and
parameter names mirror the Hugging Face checkpoints (`layers[i].self_attn.q_proj`, ...), so
loading is a renaming plus a transpose. Parameters carry logical axis names in their
`logical_axes` metadata; `medjax.partitioning` maps them to mesh axes.

Dimension letters: B batch, T new tokens, S cache slots, D model dim, F MLP dim, H query
heads, N KV heads, G = H / N query heads per KV head, K head dim, V vocab.

With `ModelConfig.scan_layers` the L decoder layers are one `DecoderLayer` whose parameters
carry a leading [L] axis (logical axis "layers") and run under `jax.lax.scan`: XLA compiles
one layer, not L. `ModelConfig.remat` rematerialises each layer in the backward pass
(`REMAT_POLICIES`), scanned or not.
"""

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from medjax import partitioning
from medjax.kernels import attention as attention_lib
from medjax.kernels import prefix_attention
from medjax.models.config import (
    ATTENTION_IMPLS,
    LORA_TARGETS,
    REMAT_POLICY_NAMES,
    LoraConfig,
    ModelConfig,
    rope_inverse_frequencies,
)

_policies = jax.checkpoint_policies
# What a layer keeps for its backward pass; the rest is recomputed from the layer's input.
REMAT_POLICIES = {
    "none": None,  # No remat: every intermediate is kept.
    "full": _policies.nothing_saveable,  # Keep only the layer's input.
    # Keep the projections' and MLP's matmul outputs; recompute the rest, attention's O(T^2)
    # scores included (their einsums have batch dimensions).
    "save_dots": _policies.dots_with_no_batch_dims_saveable,
    # The same matmul outputs, moved to host memory until the backward pass needs them.
    "offload_dots": _policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
assert set(REMAT_POLICIES) == set(REMAT_POLICY_NAMES)
assert ATTENTION_IMPLS == attention_lib.IMPLS


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
    if scale is None:  # Norm weights start at one.
        value = jnp.ones(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


_LORA_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout", default=None)


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None):
    """Within it, a model traced with LoRA adapters whose `LoraConfig.dropout` is above 0
    drops their inputs (PEFT's lora_dropout), with masks drawn from `key` folded with the
    layer's index and the module's; outside it (sampling, scoring, evaluation) nothing is
    dropped. The train step enters it with a key per step and microbatch."""
    token = _LORA_DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _LORA_DROPOUT_KEY.reset(token)


def new_lora_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """A new LoRA A [..., in, r]: uniform in +-1/sqrt(in), PEFT's kaiming_uniform(a=sqrt(5))
    of its [r, in] weight."""
    bound = 1.0 / shape[-2] ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoraAdapter(NamedTuple):
    """What a Linear layer needs of a LoraConfig: the config and the layer's index in
    `LORA_TARGETS` (which folds its dropout mask's key)."""

    config: LoraConfig
    index: int


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out], the transpose of a torch Linear weight.

    With `lora` (a `LoraAdapter`), y += scale * (dropout(x) @ lora_a) @ lora_b: lora_a
    [in, r] and lora_b [r, out] are `nnx.LoRAParam`s (a kind of `nnx.Param`, so
    `nnx.split(model, nnx.LoRAParam, ...)` takes the adapters alone). lora_b starts at zero:
    a new adapter leaves y exactly as it was. Dropout acts only inside `lora_dropout`.
    """

    def __init__(self, d_in, d_out, axes, *, bias, dtype, param_dtype, rngs, std=0.02, lora=None):
        self.kernel = _param(rngs, (d_in, d_out), axes, param_dtype, std)
        self.bias = (
            nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=axes[1:]) if bias else None
        )
        self.dtype = dtype
        if lora is None:
            self.lora_a = self.lora_b = None
            return
        rank = lora.config.rank
        a = new_lora_a(rngs.lora(), (d_in, rank), param_dtype)
        self.lora_a = nnx.LoRAParam(a, logical_axes=(axes[0], None))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((rank, d_out), param_dtype), logical_axes=(None, axes[1])
        )
        self.lora_scale = lora.config.scale
        self.lora_dropout = lora.config.dropout
        self.lora_index = lora.index

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = x
            key = _LORA_DROPOUT_KEY.get()
            if key is not None and self.lora_dropout > 0:
                keep = 1.0 - self.lora_dropout
                kept = jax.random.bernoulli(jax.random.fold_in(key, self.lora_index), keep, x.shape)
                h = jnp.where(kept, x / keep, 0).astype(self.dtype)
            low = jnp.dot(h, self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.dot(low, self.lora_b[...].astype(self.dtype))
        return y


def _lora(config: ModelConfig, name: str) -> LoraAdapter | None:
    """The adapter of the linear layer `name` if the config's LoRA targets it, else None."""
    lora = config.lora
    if lora is None or name not in lora.target_modules:
        return None
    return LoraAdapter(lora, LORA_TARGETS.index(name))


class RMSNorm(nnx.Module):
    def __init__(self, dim, axes, *, eps, dtype, param_dtype, rngs):
        self.weight = _param(rngs, (dim,), axes, param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 and cast back before the weight, as the reference models do.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class KVCache(NamedTuple):
    """Keys and values of every layer, preallocated for S slots.

    Attributes:
      k, v: [L, B, N, S, K] cached keys (after RoPE) and values: heads before slots, so a
        decode step reads each head's keys as one contiguous [S, K] block (with slots before
        heads, XLA on CPU copied the whole cache into this order at every step: 329 ms a
        step against 60 ms for SmolLM2 at 16 rows of 896 slots).
      positions: [B, S] int32 position of the token in each slot; -1 for an empty slot or a
        padding token, which no query attends to.
      index: int32 scalar, the next slot to write (shared by all rows).
      lengths: [B] int32 number of real tokens each row holds: the next token's position.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    index: jax.Array
    lengths: jax.Array


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates [B, T, heads, K] by [B, T] positions (half-split layout of HF Llama/Qwen)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        d, k = c.hidden_size, c.head_dim
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        q, kv, bias = c.num_heads * k, c.num_kv_heads * k, c.qkv_bias
        self.q_proj = Linear(d, q, ("embed", "heads"), bias=bias, lora=_lora(c, "q_proj"), **kw)
        self.k_proj = Linear(d, kv, ("embed", "kv_heads"), bias=bias, lora=_lora(c, "k_proj"), **kw)
        self.v_proj = Linear(d, kv, ("embed", "kv_heads"), bias=bias, lora=_lora(c, "v_proj"), **kw)
        self.o_proj = Linear(q, d, ("heads", "embed"), bias=False, lora=_lora(c, "o_proj"), **kw)
        if c.qk_norm:
            self.q_norm = RMSNorm(k, ("head_dim",), eps=c.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(k, ("head_dim",), eps=c.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.config = config

    def __call__(self, x_BxTxD, positions_BxT, inv_freq, cache=None, segment_ids=None, impl="auto"):
        """Attends to x itself: causally over its real tokens (positions >= 0) in index
        order, through the platform's library kernel (`attention_lib.causal_attention` with
        the config's `attention`). Or with `cache` = (k_LxBxNxSxK, v_LxBxNxSxK, layer,
        slot_positions_BxS, index, empty) writes x's keys and values at slot `index` of this
        layer's rows of the stacked cache and attends to every slot whose position is at most
        the query's; with `empty` (a Python bool: nothing was written before) that is x's
        own keys, and the plain causal kernel computes it. The write goes into the stacked
        arrays themselves, so inside the sampler's loop XLA updates the cache in place instead
        of copying every layer's cache each step. With `segment_ids` [B, T] (packed groups,
        no cache) the mask is the shared-prefix one of `prefix_attention.grouped_attention`,
        computed by that kernel (`impl`).

        Returns:
          ([B, T, D] output, the stacked (k, v) cache after the write, or None).
        """
        c = self.config
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x_BxTxD).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x_BxTxD).reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)
        if segment_ids is not None:
            out = prefix_attention.grouped_attention(q, k, v, segment_ids, impl=impl)
            return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), None
        new_cache = None
        if cache is not None:
            k_cache, v_cache, layer, key_pos, index, empty = cache
            at = (layer, 0, 0, index, 0)
            k_new, v_new = (a.transpose(0, 2, 1, 3)[None].astype(k_cache.dtype) for a in (k, v))
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
            new_cache = (k_cache, v_cache)
        if cache is None or empty:
            # x's own keys are all there is to see: the plain causal kernel.
            out = attention_lib.causal_attention(q, k, v, positions_BxT >= 0, impl=c.attention)
        else:
            visible = (key_pos[:, None, :] <= positions_BxT[:, :, None]) & (
                key_pos[:, None, :] >= 0
            )
            out = prefix_attention.masked_attention(
                q,
                k_cache[layer].astype(q.dtype),
                v_cache[layer].astype(q.dtype),
                visible,
                heads_first=True,
            )
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), new_cache


def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) through exp: XLA's CPU logistic goes through a fast tanh approximation
    whose error compounds over depth (SmolLM2-135M's logits against a float64 forward:
    1.26e-4 with jax.nn.silu, 8.2e-5 with this form; PyTorch's, 5.9e-5)."""
    return x / (1 + jnp.exp(-x))


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), lora=_lora(c, "gate_proj"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), lora=_lora(c, "up_proj"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), lora=_lora(c, "down_proj"), **kw)

    def __call__(self, x):
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, ("embed",), **kw)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, ("embed",), **kw)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, cache=None, segment_ids=None, impl="auto"):
        h, new_cache = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, cache, segment_ids, impl
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class DecoderLM(nnx.Module):
    """Decoder-only LM: embedding, L pre-norm blocks (GQA attention + SwiGLU), final norm,
    LM head (tied or not)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed_tokens = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (c.vocab_size, c.hidden_size))).astype(
                c.param_dtype
            ),
            logical_axes=("vocab", "embed"),
        )
        layers = [DecoderLayer(config, rngs=rngs) for _ in range(c.num_layers)]
        self.layers = _stack(layers) if c.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(
            c.hidden_size,
            ("embed",),
            eps=c.rms_norm_eps,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype, 0.02
            )

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """[B, T, D] final hidden states -> [B, T, V] float32 logits."""
        w = self.lm_head_weight().astype(self.config.dtype)
        return jnp.einsum("btd,dv->btv", hidden_BxTxD, w, preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of `max_length` slots per row."""
        c = self.config
        shape = (c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim)
        dtype = c.dtype if dtype is None else dtype
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch_size, max_length), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        attention_impl: str = "auto",
        return_hidden: bool = False,
        cache_is_empty: bool = False,
    ):
        """Forward pass.

        Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right); padding is
            never attended to. Defaults to all ones.
          positions: [B, T] int RoPE positions; defaults to the running count of real tokens
            (continuing from the cache's `lengths` when a cache is given).
          cache: a KVCache to append this chunk to (prefill or decode step); None for a
            plain forward over the whole sequence, causal in index order over the real
            tokens (`positions` then feed RoPE only).
          segment_ids: [B, T] int for packed groups [prompt | c_1 | ... | c_G]: 0 prompt,
            g completion g, -1 padding; completion g then sees the prompt and itself only
            (pass `positions` that restart after the prompt). Not with a cache.
          attention_impl: implementation of the grouped attention ("auto", "xla", "pallas").
          return_hidden: return the final-normed [B, T, D] hidden states instead of logits,
            for the fused log-prob kernel (see `logits` and `lm_head_weight`).
          cache_is_empty: the caller's promise that `cache` holds nothing yet (fresh from
            `init_cache`): the chunk then attends to itself only, through the plain causal
            kernel (splash attention on TPU) instead of a dense mask over every slot.

        Returns:
          [B, T, V] float32 logits (or [B, T, D] hidden states); with a cache, the pair
          (output, updated cache).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"DecoderLM: `input_ids` must be [B, T], got shape {input_ids.shape}.")
        b, t = input_ids.shape
        mask = (
            jnp.ones((b, t), jnp.int32)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.int32)
        )
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        if positions is None:
            positions = start[:, None] + jnp.cumsum(mask, axis=1) - 1
        positions = jnp.where(mask > 0, positions, -1).astype(jnp.int32)
        inv_freq = rope_inverse_frequencies(self.config)
        x = partitioning.constrain_batch(
            self.embed_tokens[...].astype(self.config.dtype)[input_ids]
        )
        if segment_ids is not None and cache is not None:
            raise ValueError(
                "DecoderLM: `segment_ids` (packed groups) cannot be used with a cache."
            )
        if cache is None:
            x, _, _ = self._layers(x, positions, inv_freq, segment_ids, attention_impl)
        else:
            slot_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
            x, k, v = self._layers(
                x,
                positions,
                inv_freq,
                None,
                attention_impl,
                (cache.k, cache.v, slot_pos, cache.index, cache_is_empty),
            )
            cache = KVCache(
                k=k,
                v=v,
                positions=slot_pos,
                index=cache.index + t,
                lengths=cache.lengths + mask.sum(axis=1),
            )
        hidden = self.norm(x)
        out = hidden if return_hidden else self.logits(hidden)
        return out if cache is None else (out, cache)

    def _layers(self, x, positions, inv_freq, segment_ids, impl, cache=None):
        """The decoder layers over x [B, T, D]: a Python loop, or `lax.scan` over the
        stacked layer when `scan_layers`; each layer under `jax.checkpoint` with the
        config's remat policy when training (no cache).

        Args:
          cache: None, or (k, v, slot_positions, index, empty): the stacked [L, B, N, S, K]
            caches each layer writes its rows of, the [B, S] slot positions, the write slot
            and whether the caches held nothing before (a Python bool).

        Returns:
          (x, k, v): the last layer's output and the caches after the writes (None, None
          without a cache).
        """
        c = self.config
        k, v, slot_pos, index, empty = (None,) * 5 if cache is None else cache

        dropout_key = _LORA_DROPOUT_KEY.get()

        def apply(graphdef, params, x, k, v, i):
            layer = nnx.merge(graphdef, params)
            kv_cache = None if k is None else (k, v, i, slot_pos, index, empty)
            # Each layer's adapters draw their own dropout masks.
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            with lora_dropout(key):
                x, kv = layer(x, positions, inv_freq, kv_cache, segment_ids, impl)
            x = partitioning.constrain_batch(x)
            return (x, k, v) if kv is None else (x, *kv)

        if cache is None and c.remat != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[c.remat], static_argnums=(0,))
        if not c.scan_layers:
            for i, layer in enumerate(self.layers):
                x, k, v = apply(*nnx.split(layer), x, k, v, i)
            return x, k, v
        graphdef, params = nnx.split(self.layers)

        def body(carry, layer):
            params, i = layer
            return apply(graphdef, params, *carry, i), None

        (x, k, v), _ = jax.lax.scan(body, (x, k, v), (params, jnp.arange(c.num_layers)))
        return x, k, v


def _stack(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose parameters are the layers' stacked on a leading "layers" axis."""
    graphdef, _ = nnx.split(layers[0])
    state = jax.tree.map(lambda *p: jnp.stack(p), *(nnx.state(layer) for layer in layers))
    for _, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata()["logical_axes"]
        variable.set_metadata(logical_axes=("layers", *axes))
    return nnx.merge(graphdef, state)
