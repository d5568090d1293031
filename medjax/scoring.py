"""Per-token log-probs (and entropies) of completions under a policy, without [T, V] logits.

Two layouts, the same numbers:

* `score_completions`: every row is prompt + completion (TRL's layout: prompts left-padded,
  completions right-padded). Costs G * (P + C) tokens for G completions of a prompt.
* `score_groups`: each prompt is encoded once with its G completions packed behind it,
  [prompt | c_1 | ... | c_G]; completion g attends to the prompt and to itself only, with
  positions restarting after the prompt (Prefix Grouper's layout: `medjax.packing` for the
  layout, `medjax.kernels.prefix_attention` for the mask). Costs P + G * C tokens.

Both end in `medjax.kernels.logprob.fused_logprob`, which never materialises the logits.

Dimension letters: B rows, P prompts, G completions per prompt, Tp prompt length,
C completion length, D model dim, V vocab.
"""

import jax
import jax.numpy as jnp

from medjax import packing
from medjax.kernels import logprob as logprob_lib
from medjax.models.transformer import DecoderLM


def _check(name: str, x: jax.Array, shape: tuple, fn: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: `{name}` has shape {tuple(x.shape)}; expected {tuple(shape)}.")


def _head(model, hidden, targets, mask, temperature, return_entropy, impl):
    """[..., D] hidden states and [...] targets -> [...] log-probs (and entropies), 0 where
    `mask` is 0."""
    lead = targets.shape
    out = logprob_lib.fused_logprob(
        hidden.reshape(-1, hidden.shape[-1]),
        model.lm_head_weight().astype(hidden.dtype),
        targets.reshape(-1),
        temperature=temperature,
        return_entropy=return_entropy,
        impl=impl,
    )
    keep = mask > 0
    outs = out if return_entropy else (out,)
    outs = tuple(jnp.where(keep, o.reshape(lead), 0.0) for o in outs)
    return outs if return_entropy else outs[0]


def score_completions(
    model: DecoderLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logprob_impl: str = "auto",
):
    """Log-probs of each completion token given its prompt and the completion so far.

    Args:
      model: the policy (or reference) model.
      prompt_ids: [B, Tp] int, left-padded (the last column is every prompt's last token).
      prompt_mask: [B, Tp] 1 on real prompt tokens.
      completion_ids: [B, C] int, right-padded.
      completion_mask: [B, C] 1 on real completion tokens.
      temperature: the sampler's temperature (logits are divided by it).
      return_entropy: also return the entropy of each predictive distribution.
      logprob_impl: `fused_logprob` implementation ("auto", "xla", "pallas", "reference").

    Returns:
      [B, C] float32 log p(completion token) (0 where the mask is 0), or the pair with the
      [B, C] entropies.
    """
    fn = "score_completions"
    b, tp = prompt_ids.shape
    c = completion_ids.shape[-1]
    _check("prompt_mask", prompt_mask, (b, tp), fn)
    _check("completion_ids", completion_ids, (b, c), fn)
    _check("completion_mask", completion_mask, (b, c), fn)
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    hidden = model(ids, attention_mask=mask, return_hidden=True)
    # The hidden state at position t predicts token t + 1: the prompt's last one predicts c_0.
    picked = hidden[:, tp - 1 : tp + c - 1]
    return _head(
        model, picked, completion_ids, completion_mask, temperature, return_entropy, logprob_impl
    )


def score_groups(
    model: DecoderLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logprob_impl: str = "auto",
    attention_impl: str = "auto",
):
    """`score_completions` for G completions per prompt, encoding each prompt once.

    Args:
      model: the policy (or reference) model.
      prompt_ids: [P, Tp] int, left-padded; prompt_mask: [P, Tp].
      completion_ids: [P, G, C] int, right-padded; completion_mask: [P, G, C].
      temperature, return_entropy, logprob_impl: as in `score_completions`.
      attention_impl: `grouped_attention` implementation ("auto", "xla", "pallas").

    Returns:
      [P, G, C] float32 log-probs (0 where masked), or the pair with the entropies. Reshape
      to [P * G, C] for the prompt-major rows the losses take.
    """
    fn = "score_groups"
    p, tp = prompt_ids.shape
    if completion_ids.ndim != 3 or completion_ids.shape[0] != p:
        raise ValueError(
            f"{fn}: `completion_ids` has shape {tuple(completion_ids.shape)}; expected"
            f" [P={p}, G, C]."
        )
    _check("prompt_mask", prompt_mask, (p, tp), fn)
    _check("completion_mask", completion_mask, completion_ids.shape, fn)
    c = completion_ids.shape[-1]
    prompt_lens = prompt_mask.sum(axis=1).astype(jnp.int32)
    layout = packing.pack_groups(
        prompt_lens,
        completion_mask.sum(axis=-1).astype(jnp.int32),
        prompt_capacity=tp,
        completion_capacity=c,
    )
    # Left-padded prompts -> real tokens first, as the packed layout reads them.
    shift = (jnp.arange(tp)[None, :] + tp - prompt_lens[:, None]) % tp
    prompt_first = jnp.take_along_axis(prompt_ids, shift, axis=1)
    ids = packing.pack_tokens(prompt_first, completion_ids, layout.source_index)
    return score_packed(
        model, ids, layout.segment_ids, layout.positions, layout.predict_index,
        completion_ids, completion_mask, temperature=temperature,
        return_entropy=return_entropy, logprob_impl=logprob_impl, attention_impl=attention_impl,
    )  # fmt: skip


def score_packed(
    model: DecoderLM,
    packed_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    predict_index: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logprob_impl: str = "auto",
    attention_impl: str = "auto",
):
    """Log-probs of G continuations per row of rows already packed (`medjax.packing`):
    `score_groups` after its layout, and the RL update of episodes that share a prompt
    (`medjax.training.rl.shared_prefix_rows`: each question's G episodes share their
    tokens up to the first one the policy wrote).

    Args:
      model: the policy (or reference) model.
      packed_ids, segment_ids, positions: [P, L] (`packing.pack_groups`'s layout).
      predict_index: [P, G, C] the row position whose output predicts each target.
      targets: [P, G, C] (or [P * G, C]) the continuations' tokens.
      target_mask: like `targets`, 1 on the tokens to score.
      temperature, return_entropy, logprob_impl, attention_impl: as in `score_groups`.

    Returns:
      Log-probs shaped like `targets` (0 where `target_mask` is 0), or the pair with the
      entropies.
    """
    fn = "score_packed"
    p, length = packed_ids.shape
    _check("segment_ids", segment_ids, (p, length), fn)
    _check("positions", positions, (p, length), fn)
    if predict_index.ndim != 3 or predict_index.shape[0] != p:
        raise ValueError(
            f"{fn}: `predict_index` has shape {tuple(predict_index.shape)}; expected [P={p}, G, C]."
        )
    _, g, c = predict_index.shape
    if targets.size != p * g * c or targets.shape[-1] != c:
        raise ValueError(
            f"{fn}: `targets` has shape {tuple(targets.shape)}; expected [P={p}, G={g}, C={c}]"
            f" or [P * G, C]."
        )
    _check("target_mask", target_mask, targets.shape, fn)
    hidden = model(
        packed_ids,
        attention_mask=segment_ids >= 0,
        positions=positions,
        segment_ids=segment_ids,
        attention_impl=attention_impl,
        return_hidden=True,
    )
    picked = packing.gather_packed(hidden, predict_index).reshape(*targets.shape, -1)
    return _head(model, picked, targets, target_mask, temperature, return_entropy, logprob_impl)


def score_sequences(
    model: DecoderLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    target_mask: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logprob_impl: str = "auto",
):
    """Log-probs of the marked tokens of whole sequences (multi-turn episodes, SFT chats).

    Position t holds log p(token t | tokens < t), so the result lines up with the ids and
    with a trajectory's `loss_mask` and sampled `logps` (`medjax.agents.training_batch`).

    Args:
      model: the policy (or reference) model.
      input_ids: [B, T] int, right-padded.
      attention_mask: [B, T] 1 on real tokens.
      target_mask: [B, T] 1 on the tokens to score (never position 0, which has no context).
      temperature, return_entropy, logprob_impl: as in `score_completions`.

    Returns:
      [B, T] float32 log-probs (0 where `target_mask` is 0), or the pair with the entropies.
    """
    fn = "score_sequences"
    b, t = input_ids.shape
    _check("attention_mask", attention_mask, (b, t), fn)
    _check("target_mask", target_mask, (b, t), fn)
    # Plain causal attention: the platform's library kernel (`ModelConfig.attention`).
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)
    # The hidden state at t - 1 predicts token t; position 0 gets a dummy prediction, masked.
    hidden = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
    mask = target_mask * (jnp.arange(t) > 0)[None, :]
    return _head(model, hidden, input_ids, mask, temperature, return_entropy, logprob_impl)
