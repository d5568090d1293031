"""Fused LM head + log-softmax: per-token log p(target) and entropy without [N, V] logits.

RL post-training scores every completion token under the policy (and the reference policy)
as log p(y_t) = z[y_t] - logsumexp(z) with z = h_t W / temperature. Materialising z for
N = 8192 tokens and a 151,936-word vocabulary takes 5 GB in float32 before any gradient;
`fused_logprob` streams W in vocab blocks instead and keeps only per-row statistics, the
online-softmax recurrence of Milakov & Gimelshein (2018) as used by Cut Cross-Entropy
(Wijmans et al., ICLR 2025) and Liger's fused linear cross-entropy:

  m = max_j z_j,  l = sum_j exp(z_j - m),  s = sum_j exp(z_j - m) (z_j - m),  t = z[y]
  log p(y) = (t - m) - log l,  entropy = log l - s / l,  lse = m + log l.

Keeping s relative to the running max makes both outputs sums of same-signed terms:
t <= m and l >= 1 give log p <= 0, and s <= 0 gives entropy >= 0, for any logit scale
(verl issue #2656: a fused kernel returned log-probs of up to +123, and training collapsed).

The gradient is a `jax.custom_vjp` that recomputes each logits tile from the saved per-row
lse and entropy: with p = softmax(z),

  dz = g_logp (onehot(y) - p) - g_ent p (log p + entropy),   since z - E_p[z] = log p + H,

then d hidden = (dz / T) W^T and d W = hidden^T (dz / T), block by block. The backward is
written out, never `jax.vjp` of the forward kernel (Levanter PR #3045). Recomputing the
logits makes forward plus backward 8 N D V flops against the 6 N D V of a materialising
implementation, in exchange for O(N * block_v) memory instead of O(N * V).

Implementations (`impl=`):
  "reference"  plain jnp on materialised logits; the test oracle.
  "xla"        `lax.scan` over vocab chunks of `block_v` columns, forward and backward;
               peak memory ~ N * block_v. What CPU runs use.
  "pallas"     Pallas kernels: forward grid (N / block_n, V / block_v) with the vocab as the
               sequential reduction axis; backward as a d hidden kernel (reduce over V) and a
               d W kernel (reduce over N). Interpret mode and compiler parameters follow
               the platform the program is lowered for: interpret mode on CPU (where the
               tests check the numerics), Mosaic on TPU. They compile for TPU
               (tests/kernels/test_tpu_lowering.py, ahead of time, with libtpu), but have
               never run on a TPU, nor been lowered or run for a GPU.
  "auto"       "xla" on every backend for now: the Pallas kernels have never run on a TPU
               or GPU.

Dimension letters: N tokens (rows of hidden states, e.g. the gathered completion positions),
D model dim, V vocab.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from medjax.kernels import platforms

IMPLS = ("auto", "reference", "xla", "pallas")
# Default tiles. xla: chunks of 512 to 4096 columns ran within 5% of each other on the 2-core
# CPU (N = 2048 and 8192, D = 896, V = 151,936); 1024 was never slower and needs the least
# memory. Pallas: power-of-two starting points (TPU wants the last block dim divisible by
# 128), not tuned on any accelerator; halved where a large D would overflow VMEM.
DEFAULT_BLOCK_V = {"xla": 1024, "pallas": 512}
DEFAULT_BLOCK_N = 256
# Default Pallas tiles shrink until `_vmem_bytes` fits this. The estimate is conservative:
# tiles it put at 13.9 MiB compiled for v4, v5e, v5p and v6e, whose default scoped VMEM
# limit is 16 MiB (all of a v4 core's VMEM); ones at 16.6 MiB failed on v4 and v5p.
_VMEM_BUDGET = 12 * 2**20

# dot_general dimension numbers: a @ b^T and a^T @ b.
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def fused_logprob(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    block_n: int | None = None,
    block_v: int | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-token log p(target) (and entropy) of softmax(hidden @ lm_head / temperature).

    Never materialises the [N, V] logits (except with impl="reference"). Differentiable in
    `hidden` and `lm_head` with a streaming custom VJP that takes per-token cotangents for
    both outputs, so a loss may weight tokens by advantages, clipped ratios and masks: a
    row whose cotangents are zero contributes exactly zero to both gradients. For tied
    embeddings pass `embedding.T`; the gradient flows back through the transpose.

    Args:
      hidden: [N, D] float array (bf16, f32 or f64) of final hidden states, already
        normed; only the rows that need a log-prob (gather completion positions first).
      lm_head: [D, V] float array, the output projection (`embedding.T` when tied).
      targets: [N] int array of token ids in [0, V). Ids outside that range give
        meaningless values (no logit is picked); mask such rows in the loss instead.
      temperature: positive Python float dividing the logits. Must equal the sampler's
        temperature, or the log-probs of the policy that sampled ("old" log-probs) and
        the ones trained on describe different distributions.
      return_entropy: also return the entropy of each row's distribution.
      block_n: rows per tile (pallas only; the xla scan takes all N rows at once).
        Defaults to 256, halved (after block_v) while the kernels' VMEM estimate exceeds
        12 MiB, which happens for large D.
      block_v: vocab columns per tile or chunk. Defaults to 1024 (xla) or 512 (pallas,
        halved down to 128 while the VMEM estimate exceeds 12 MiB). Peak memory of the
        xla path is about 3 * N * block_v accumulator-dtype words.
      impl: "auto", "reference", "xla" or "pallas" (see the module docstring).
      interpret: run Pallas kernels in interpret mode. None means on CPU only, decided by
        the platform the program is lowered for (so an ahead-of-time compile for TPU on a
        CPU host gets the Mosaic kernels), not by `jax.default_backend()`.

    Returns:
      logp: [N] log p(targets), float32 (float64 for float64 inputs), always <= 0, not
        reduced. With `return_entropy`, (logp, entropy): entropy [N] in [0, log V], same
        dtype.

    Raises:
      ValueError: on ranks or shapes that do not fit [N, D] x [D, V] -> [N], a
        non-integer `targets`, a non-positive temperature or block size, or an unknown
        `impl`.
    """
    _check_inputs(hidden, lm_head, targets, temperature, "fused_logprob")
    if impl not in IMPLS:
        raise ValueError(f"fused_logprob: `impl` must be one of {list(IMPLS)}, got {impl!r}.")
    if impl == "auto":
        # The Pallas kernels have run in interpret mode only (and compiled for TPU, never run
        # there); until a GPU/TPU run checks them, the chunked XLA path is the one known
        # correct on every backend.
        impl = "xla"
    if impl == "reference":
        return reference_fused_logprob(
            hidden, lm_head, targets, temperature=temperature, return_entropy=return_entropy
        )
    if impl == "xla" and block_v is None:
        block_v = DEFAULT_BLOCK_V["xla"]
    for name, value in (("block_n", block_n), ("block_v", block_v)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fused_logprob: `{name}` must be a positive int, got {value!r}.")
    config = _Config(
        impl=impl,
        temperature=float(temperature),
        with_entropy=bool(return_entropy),
        block_n=block_n,
        block_v=block_v,
        interpret=None if interpret is None else bool(interpret),
    )
    return _fused(hidden, lm_head, targets, config)


def reference_fused_logprob(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`fused_logprob` on materialised [N, V] logits; differentiable by plain autodiff.

    Args:
      hidden: [N, D] float array.
      lm_head: [D, V] float array.
      targets: [N] int array of token ids in [0, V).
      temperature: positive float dividing the logits.
      return_entropy: also return the per-row entropy.

    Returns:
      [N] log p(targets), or ([N] log-probs, [N] entropies); float32 (float64 for float64
      inputs), not reduced.
    """
    _check_inputs(hidden, lm_head, targets, temperature, "reference_fused_logprob")
    logits_NxV = jnp.dot(hidden, lm_head, preferred_element_type=_acc_dtype(hidden, lm_head))
    logp_NxV = jax.nn.log_softmax(logits_NxV / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_NxV, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if not return_entropy:
        return logp
    # -sum p log p is a sum of non-negative terms, so it cannot round below zero.
    return logp, -jnp.sum(jnp.exp(logp_NxV) * logp_NxV, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) options of one fused call."""

    impl: str
    temperature: float
    with_entropy: bool
    block_n: int | None  # None: Pallas default, fitted to VMEM.
    block_v: int | None
    interpret: bool | None  # None: interpret mode on CPU only, chosen at lowering.


def _check_inputs(hidden, lm_head, targets, temperature, fn):
    if hidden.ndim != 2 or lm_head.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            f"{fn}: expected hidden [N, D], lm_head [D, V] and targets [N], got shapes"
            f" {tuple(hidden.shape)}, {tuple(lm_head.shape)} and {tuple(targets.shape)}."
        )
    if hidden.shape[1] != lm_head.shape[0]:
        raise ValueError(
            f"{fn}: hidden [N, D] has shape {tuple(hidden.shape)} but lm_head [D, V] has"
            f" shape {tuple(lm_head.shape)}; their D must match."
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{fn}: targets [N] has shape {tuple(targets.shape)} but hidden [N, D] has shape"
            f" {tuple(hidden.shape)}; their N must match."
        )
    if lm_head.shape[1] == 0:
        raise ValueError(f"{fn}: lm_head has shape {tuple(lm_head.shape)}, an empty vocab.")
    for name, x in (("hidden", hidden), ("lm_head", lm_head)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{fn}: `{name}` must be a float array, got {x.dtype}.")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"{fn}: `targets` must be an int array, got {targets.dtype}.")
    if not temperature > 0:
        raise ValueError(f"{fn}: `temperature` must be positive, got {temperature!r}.")


def _acc_dtype(hidden, lm_head):
    """float32 accumulation, or float64 when an input already is."""
    return jnp.promote_types(jnp.float32, jnp.result_type(hidden.dtype, lm_head.dtype))


# ---------------------------------------------------------------------------------------
# Tile math shared by the xla scan and the Pallas kernels. Row statistics are [rows, 1].


def _tile(h_NxD, w_DxV, y_Nx1, col0, first_col, vocab, temperature, acc):
    """Logits of one tile whose first column is `col0`, and its masks.

    Columns below `first_col` (already counted by an earlier, overlapping tile) and at or
    beyond `vocab` (the ragged last tile) are invalid.
    """
    z_NxV = jnp.dot(h_NxD, w_DxV, preferred_element_type=acc) / temperature
    cols_1xV = col0 + lax.broadcasted_iota(jnp.int32, (1, w_DxV.shape[1]), 1)
    valid_1xV = (cols_1xV >= first_col) & (cols_1xV < vocab)
    hit_NxV = valid_1xV & (cols_1xV == y_Nx1)
    return z_NxV, valid_1xV, hit_NxV


def _init_stats(rows, acc):
    zeros = jnp.zeros((rows, 1), acc)
    return jnp.full((rows, 1), -jnp.inf, acc), zeros, zeros, zeros


def _update_stats(stats, z_NxV, valid_1xV, hit_NxV, with_entropy):
    """Folds one tile into the running (m, l, s, t) of every row (module docstring)."""
    m, sum_e, sum_ed, z_y = stats
    # Masked columns become -inf: exp() of them is 0, and they cannot win the max. Every
    # tile has a valid column, so m_new is finite after the first tile.
    z_NxV = jnp.where(valid_1xV, z_NxV, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z_NxV, axis=1, keepdims=True))
    d_NxV = z_NxV - m_new
    e_NxV = jnp.exp(d_NxV)
    alpha = jnp.exp(m - m_new)
    new_sum_e = alpha * sum_e + jnp.sum(e_NxV, axis=1, keepdims=True)
    if with_entropy:
        # Moving the max from m to m_new shifts each earlier (z - m) by (m - m_new). Before
        # the first tile sum_e = 0 and m = -inf, where that product would be nan.
        shift = jnp.where(sum_e > 0, (m - m_new) * sum_e, 0.0)
        tile_ed = jnp.sum(jnp.where(valid_1xV, e_NxV * d_NxV, 0.0), axis=1, keepdims=True)
        sum_ed = alpha * (sum_ed + shift) + tile_ed
    # Exactly one tile holds the target, so the sum is exact: z_y is bitwise a z that took
    # part in the max, and z_y <= m.
    z_y = z_y + jnp.sum(jnp.where(hit_NxV, z_NxV, 0.0), axis=1, keepdims=True)
    return m_new, new_sum_e, sum_ed, z_y


def _finish(m, sum_e, sum_ed, z_y):
    """[rows, 1] statistics (m, l, s, t) -> [rows] (logp, entropy, lse)."""
    log_l = jnp.log(sum_e)
    logp = (z_y - m) - log_l
    entropy = log_l - sum_ed / sum_e
    return logp[:, 0], entropy[:, 0], (m + log_l)[:, 0]


def _tile_dz(z_NxV, valid_1xV, hit_NxV, lse, entropy, g_logp, g_ent, config):
    """d loss / d (hidden @ lm_head) on one tile: the softmax Jacobian, divided by T."""
    logp_NxV = jnp.where(valid_1xV, z_NxV - lse, -jnp.inf)
    p_NxV = jnp.exp(logp_NxV)
    dz_NxV = g_logp * (hit_NxV.astype(p_NxV.dtype) - p_NxV)
    if config.with_entropy:
        # d H / d z_j = -p_j (z_j - E_p z) = -p_j (log p_j + H); where() keeps 0 * -inf out.
        dz_NxV = dz_NxV - g_ent * jnp.where(valid_1xV, p_NxV * (logp_NxV + entropy), 0.0)
    return dz_NxV / config.temperature


# ---------------------------------------------------------------------------------------
# The custom VJP, shared by the "xla" and "pallas" implementations.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden, lm_head, targets, config):
    return _fused_fwd(hidden, lm_head, targets, config)[0]


def _fused_fwd(hidden, lm_head, targets, config):
    forward = _xla_forward if config.impl == "xla" else _pallas_forward
    logp, entropy, lse = forward(hidden, lm_head, targets, config)
    out = (logp, entropy) if config.with_entropy else logp
    return out, (hidden, lm_head, targets, lse, entropy)


def _fused_bwd(config, residuals, cotangents):
    hidden, lm_head, targets, lse, entropy = residuals
    if config.with_entropy:
        g_logp, g_ent = cotangents
    else:
        g_logp, g_ent = cotangents, jnp.zeros_like(cotangents)
    backward = _xla_backward if config.impl == "xla" else _pallas_backward
    rows = (lse, entropy, g_logp, g_ent)
    d_hidden, d_lm_head = backward(hidden, lm_head, targets, rows, config)
    # Token ids get no gradient (None stands for a zero / float0 cotangent).
    return d_hidden.astype(hidden.dtype), d_lm_head.astype(lm_head.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------------
# "xla": lax.scan over vocab chunks.


def _xla_chunk(lm_head, j, block_v):
    """Chunk j of lm_head's columns. The last chunk slides back to end at V rather than
    running past it, so lm_head is never copied into a padded buffer; the columns it
    shares with chunk j-1 are masked by `first_col`."""
    first_col = j * block_v
    col0 = jnp.minimum(first_col, lm_head.shape[1] - block_v)
    return lax.dynamic_slice_in_dim(lm_head, col0, block_v, axis=1), col0, first_col


def _xla_forward(hidden, lm_head, targets, config):
    vocab = lm_head.shape[1]
    block_v = min(config.block_v, vocab)
    acc = _acc_dtype(hidden, lm_head)
    y_Nx1 = targets[:, None].astype(jnp.int32)

    def step(stats, j):
        w_DxV, col0, first_col = _xla_chunk(lm_head, j, block_v)
        z, valid, hit = _tile(hidden, w_DxV, y_Nx1, col0, first_col, vocab, config.temperature, acc)
        return _update_stats(stats, z, valid, hit, config.with_entropy), None

    num_chunks = pl.cdiv(vocab, block_v)
    stats, _ = lax.scan(step, _init_stats(hidden.shape[0], acc), jnp.arange(num_chunks))
    return _finish(*stats)


def _xla_backward(hidden, lm_head, targets, rows, config):
    vocab = lm_head.shape[1]
    block_v = min(config.block_v, vocab)
    acc = _acc_dtype(hidden, lm_head)
    y_Nx1 = targets[:, None].astype(jnp.int32)
    lse, entropy, g_logp, g_ent = (r[:, None].astype(acc) for r in rows)
    # The matmuls take dz in the inputs' dtype (bf16 for bf16 inputs, as Liger and CCE do)
    # and accumulate in `acc`.
    mm_dtype = jnp.result_type(hidden.dtype, lm_head.dtype)

    def step(carry, j):
        d_hidden, d_lm_head = carry
        w_DxV, col0, first_col = _xla_chunk(lm_head, j, block_v)
        # All columns of the sliding last chunk are real vocab entries, and a column's
        # gradient depends only on the row statistics, so d lm_head takes the whole chunk
        # and overwrites the overlap with the same values: a plain in-place
        # dynamic_update_slice of the [D, V] carry (reading the old slice back made XLA
        # copy the carry every step, and stacking chunks costs another [D, V] buffer).
        # d hidden sums over columns, so there the overlap is masked out.
        z, valid, hit = _tile(hidden, w_DxV, y_Nx1, col0, col0, vocab, config.temperature, acc)
        dz_NxV = _tile_dz(z, valid, hit, lse, entropy, g_logp, g_ent, config).astype(mm_dtype)
        fresh_1xV = col0 + lax.broadcasted_iota(jnp.int32, valid.shape, 1) >= first_col
        w_fresh = jnp.where(fresh_1xV, w_DxV, jnp.zeros_like(w_DxV))
        d_hidden = d_hidden + lax.dot_general(dz_NxV, w_fresh, _NT, preferred_element_type=acc)
        d_w = lax.dot_general(hidden, dz_NxV, _TN, preferred_element_type=acc)
        d_lm_head = lax.dynamic_update_slice_in_dim(d_lm_head, d_w, col0, axis=1)
        return (d_hidden, d_lm_head), None

    init = (jnp.zeros(hidden.shape, acc), jnp.zeros(lm_head.shape, acc))
    num_chunks = pl.cdiv(vocab, block_v)
    (d_hidden, d_lm_head), _ = lax.scan(step, init, jnp.arange(num_chunks))
    return d_hidden, d_lm_head


# ---------------------------------------------------------------------------------------
# "pallas": a forward kernel and two backward kernels. Row statistics travel as [N, 1]
# arrays in (block_n, 1) blocks: 2-D blocks whose last dim spans the array, which TPU
# accepts, where 1-D (block_n,) blocks are not portable.


def _vmem_bytes(block_n, block_v, dim, itemsize):
    """Upper estimate of the VMEM the largest kernel (d lm_head) holds in one grid step: the
    double-buffered hidden and lm_head blocks and float32 [D, block] output block, seven
    [block_n, 1] row blocks (padded to 128 lanes) and about six float32 logits tiles."""
    blocks = 2 * (block_n + block_v) * dim * itemsize + 2 * max(block_n, block_v) * dim * 4
    return blocks + 2 * 7 * block_n * 128 * 4 + 6 * block_n * block_v * 4


def _pallas_tiles(rows, dim, vocab, itemsize, config):
    """Power-of-two tiles no larger than the (padded) problem: (block_n, block_v). Tiles not
    given shrink from the defaults, block_v first, until `_vmem_bytes` fits the budget; the
    whole of D sits in every block, so a 7B model's D = 3584 needs smaller tiles."""
    block_n = min(config.block_n or DEFAULT_BLOCK_N, max(8, pl.next_power_of_2(rows)))
    block_v = min(config.block_v or DEFAULT_BLOCK_V["pallas"], max(128, pl.next_power_of_2(vocab)))
    while _vmem_bytes(block_n, block_v, dim, itemsize) > _VMEM_BUDGET:
        if config.block_v is None and block_v > 128:
            block_v //= 2
        elif config.block_n is None and block_n > 8:
            block_n //= 2
        else:
            break
    return block_n, block_v


def _itemsize(hidden, lm_head):
    return max(hidden.dtype.itemsize, lm_head.dtype.itemsize)


def _pad_rows(x, multiple):
    """Pads dim 0 with zeros to a multiple of `multiple`. Zero rows have zero cotangents, so
    they contribute nothing to either gradient."""
    pad = -x.shape[0] % multiple
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _compiler_params(platform, semantics):
    """Marks the reduction grid axis as sequential on the platforms that ask for it."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(
            dimension_semantics=tuple("arbitrary" if s == "seq" else "parallel" for s in semantics)
        )
    if platform == "cuda":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return plgpu.CompilerParams(
            dimension_semantics=tuple("sequential" if s == "seq" else "parallel" for s in semantics)
        )
    return None


def _call(kernel, out_shape, grid, in_specs, out_specs, semantics, config, name):
    """`pl.pallas_call` in the interpret mode and with the compiler parameters of the
    platform the program is lowered for (`platforms.by_platform`)."""

    def make(interpret, platform):
        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=interpret,
            compiler_params=None if interpret else _compiler_params(platform, semantics),
            name=name,
        )

    return platforms.by_platform(make, config.interpret)


def _forward_kernel(h_ref, w_ref, y_ref, m_ref, l_ref, s_ref, t_ref, *, vocab, config):
    j = pl.program_id(1)
    block_v = w_ref.shape[1]
    out_refs = (m_ref, l_ref, s_ref, t_ref)

    @pl.when(j == 0)
    def _init():
        for ref, x in zip(out_refs, _init_stats(m_ref.shape[0], m_ref.dtype), strict=True):
            ref[...] = x

    # Interpret mode fills the out-of-bounds part of the ragged last W block with nan;
    # _update_stats masks those columns.
    z, valid, hit = _tile(
        h_ref[...], w_ref[...], y_ref[...], j * block_v, 0, vocab, config.temperature, m_ref.dtype
    )
    stats = tuple(ref[...] for ref in out_refs)
    for ref, x in zip(
        out_refs, _update_stats(stats, z, valid, hit, config.with_entropy), strict=True
    ):
        ref[...] = x


def _pallas_forward(hidden, lm_head, targets, config):
    (rows, dim), vocab = hidden.shape, lm_head.shape[1]
    acc = _acc_dtype(hidden, lm_head)
    if rows == 0:  # A grid over zero row blocks cannot be expressed.
        return (jnp.zeros((0,), acc),) * 3
    block_n, block_v = _pallas_tiles(rows, dim, vocab, _itemsize(hidden, lm_head), config)
    hidden_p = _pad_rows(hidden, block_n)
    y_p = _pad_rows(targets[:, None].astype(jnp.int32), block_n)
    row = pl.BlockSpec((block_n, 1), lambda i, j: (i, 0))
    stats = _call(
        functools.partial(_forward_kernel, vocab=vocab, config=config),
        out_shape=[jax.ShapeDtypeStruct((hidden_p.shape[0], 1), acc)] * 4,
        grid=(hidden_p.shape[0] // block_n, pl.cdiv(vocab, block_v)),
        in_specs=[
            pl.BlockSpec((block_n, dim), lambda i, j: (i, 0)),
            pl.BlockSpec((dim, block_v), lambda i, j: (0, j)),
            row,
        ],
        out_specs=[row] * 4,
        semantics=("par", "seq"),
        config=config,
        name="fused_logprob_forward",
    )(hidden_p, lm_head, y_p)
    return tuple(x[:rows] for x in _finish(*stats))


def _dh_kernel(h_ref, w_ref, y_ref, lse_ref, ent_ref, gl_ref, ge_ref, dh_ref, *, vocab, config):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_ref[...] = jnp.zeros(dh_ref.shape, dh_ref.dtype)

    w_DxV = w_ref[...]
    z, valid, hit = _tile(
        h_ref[...],
        w_DxV,
        y_ref[...],
        j * w_DxV.shape[1],
        0,
        vocab,
        config.temperature,
        dh_ref.dtype,
    )
    rows = (lse_ref[...], ent_ref[...], gl_ref[...], ge_ref[...])
    dz_NxV = _tile_dz(z, valid, hit, *rows, config).astype(w_DxV.dtype)
    # dz is 0 on masked columns, but the nan padding of a ragged W block would turn 0 * nan
    # into nan; zero those columns of W too.
    w_DxV = jnp.where(valid, w_DxV, jnp.zeros_like(w_DxV))
    dh_ref[...] += lax.dot_general(dz_NxV, w_DxV, _NT, preferred_element_type=dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, y_ref, lse_ref, ent_ref, gl_ref, ge_ref, dw_ref, *, vocab, config):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_ref[...] = jnp.zeros(dw_ref.shape, dw_ref.dtype)

    h_NxD = h_ref[...]
    block_v = w_ref.shape[1]
    z, valid, hit = _tile(
        h_NxD, w_ref[...], y_ref[...], j * block_v, 0, vocab, config.temperature, dw_ref.dtype
    )
    rows = (lse_ref[...], ent_ref[...], gl_ref[...], ge_ref[...])
    dz_NxV = _tile_dz(z, valid, hit, *rows, config).astype(h_NxD.dtype)
    # Columns past V land outside dW and are dropped on write; padded rows have h = 0.
    dw_ref[...] += lax.dot_general(h_NxD, dz_NxV, _TN, preferred_element_type=dw_ref.dtype)


def _pallas_backward(hidden, lm_head, targets, rows, config):
    (num_rows, dim), vocab = hidden.shape, lm_head.shape[1]
    acc = _acc_dtype(hidden, lm_head)
    if num_rows == 0:
        return jnp.zeros(hidden.shape, acc), jnp.zeros(lm_head.shape, acc)
    block_n, block_v = _pallas_tiles(num_rows, dim, vocab, _itemsize(hidden, lm_head), config)
    hidden_p = _pad_rows(hidden, block_n)
    y_p = _pad_rows(targets[:, None].astype(jnp.int32), block_n)
    # Padded rows get zero cotangents, hence dz = 0 there.
    rows_p = [_pad_rows(r[:, None].astype(acc), block_n) for r in rows]
    n_blocks, v_blocks = hidden_p.shape[0] // block_n, pl.cdiv(vocab, block_v)
    args = (hidden_p, lm_head, y_p, *rows_p)

    # d hidden: grid (i over N, j over V), reduce over j.
    row = pl.BlockSpec((block_n, 1), lambda i, j: (i, 0))
    d_hidden = _call(
        functools.partial(_dh_kernel, vocab=vocab, config=config),
        out_shape=jax.ShapeDtypeStruct(hidden_p.shape, acc),
        grid=(n_blocks, v_blocks),
        in_specs=[
            pl.BlockSpec((block_n, dim), lambda i, j: (i, 0)),
            pl.BlockSpec((dim, block_v), lambda i, j: (0, j)),
            *[row] * 5,
        ],
        out_specs=pl.BlockSpec((block_n, dim), lambda i, j: (i, 0)),
        semantics=("par", "seq"),
        config=config,
        name="fused_logprob_d_hidden",
    )(*args)

    # d lm_head: grid (j over V, i over N), reduce over i.
    row = pl.BlockSpec((block_n, 1), lambda j, i: (i, 0))
    d_lm_head = _call(
        functools.partial(_dw_kernel, vocab=vocab, config=config),
        out_shape=jax.ShapeDtypeStruct(lm_head.shape, acc),
        grid=(v_blocks, n_blocks),
        in_specs=[
            pl.BlockSpec((block_n, dim), lambda j, i: (i, 0)),
            pl.BlockSpec((dim, block_v), lambda j, i: (0, j)),
            *[row] * 5,
        ],
        out_specs=pl.BlockSpec((dim, block_v), lambda j, i: (0, j)),
        semantics=("par", "seq"),
        config=config,
        name="fused_logprob_d_lm_head",
    )(*args)
    return d_hidden[:num_rows], d_lm_head
