"""Prints the GRPO-family, GRAO and M-GRPO losses of one small made-up batch.

    python -m medjax.losses.demo

Two prompts with G=4 completions of up to 6 tokens each; log-probs are fixed numbers so the
output is the same on every machine (up to float32 rounding).
"""

import jax.numpy as jnp
import numpy as np

from medjax import losses

NUM_GENERATIONS = 4


def make_batch() -> dict[str, np.ndarray]:
    """A fixed [8, 6] batch: current, old and reference log-probs, a mask and rewards."""
    lengths = np.array([6, 4, 5, 3, 6, 6, 2, 5])
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)
    base = -np.linspace(0.3, 2.4, 48, dtype=np.float32).reshape(8, 6)
    wiggle = 0.3 * np.sin(np.arange(48, dtype=np.float32)).reshape(8, 6)
    return {
        "logps": base + wiggle,
        "old": base,
        "ref": base - 0.05,
        "mask": mask,
        "rewards": np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0], np.float32),
        "ref_logps": -np.linspace(0.2, 1.0, 10, dtype=np.float32).reshape(2, 5),
        "ref_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32),
        "ref_rewards": np.array([1.0, 1.0], np.float32),
    }


def main() -> None:
    b = make_batch()
    print("rewards (2 prompts x G=4):", b["rewards"].tolist())
    for scale in ("group", "batch", "none"):
        adv = losses.group_advantages(b["rewards"], NUM_GENERATIONS, scale=scale)
        print(f"  advantages, scale={scale:5s}:", _fmt(adv, 4))
    adv = losses.group_advantages(b["rewards"], NUM_GENERATIONS)

    print("\nGRPO family (epsilon 0.2, beta 0.04 with a reference):")
    print(f"  {'variant':28s} {'loss':>10s} {'kl_mean':>9s} {'clip_frac':>9s}")
    variants = {
        "grpo": dict(loss_type="grpo"),
        "bnpo": dict(loss_type="bnpo"),
        "dr_grpo (max_len 8)": dict(loss_type="dr_grpo", max_completion_length=8),
        "dapo (eps_high 0.28)": dict(loss_type="dapo", epsilon_high=0.28),
        "gspo (sequence ratio)": dict(loss_type="grpo", importance_sampling_level="sequence"),
    }
    for name, kwargs in variants.items():
        loss, m = losses.grpo_loss(
            b["logps"], b["old"], adv, b["mask"], ref_per_token_logps=b["ref"], beta=0.04, **kwargs
        )
        kl, clip = float(m["kl_mean"]), float(m["clip_region_fraction"])
        print(f"  {name:28s} {float(loss):10.6f} {kl:9.6f} {clip:9.4f}")

    print("\nGRAO (beta 0.5, lambda 0.6, reference answer in the group):")
    loss, m = losses.grao_loss(
        b["logps"],
        b["mask"],
        b["rewards"],
        b["ref_logps"],
        b["ref_mask"],
        b["ref_rewards"],
        num_generations=NUM_GENERATIONS,
    )
    print(f"  loss {float(loss):.6f}")
    for term in ("exploration_term", "imitation_term", "alignment_term"):
        print(f"  {term:18s} {float(m[term]):10.6f}")

    print("\nM-GRPO (K=4 rollouts per query, target d=2 sub-trajectories per rollout):")
    main_rewards = losses.mgrpo_main_rewards(
        np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32),
        np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32),
    )
    main_adv = losses.mgrpo_main_advantages(main_rewards, 4)
    print("  R_M:", _fmt(main_rewards, 3))
    print("  main advantages:", _fmt(main_adv, 4))
    sub_rollout = np.array([0, 0, 0, 1, 3, 3, 4, 5, 5, 6, 7, 7, 7])
    counts = np.bincount(sub_rollout, minlength=8)
    target = losses.choose_target_count(counts, quantile=0.75)
    align = losses.align_sub_trajectories(
        jnp.asarray(sub_rollout), target, _demo_key(), num_rollouts=8
    )
    print(
        f"  sub-trajectories per rollout {counts.tolist()} -> target d={target};"
        f" {int(align.num_duplicated)} duplicated, {int(align.num_dropped)} dropped,"
        f" empty rollouts {np.flatnonzero(~np.asarray(align.rollout_valid)).tolist()}"
    )
    idx = np.asarray(align.indices)
    valid = np.asarray(align.rollout_valid)
    kept = idx[valid].reshape(-1)
    sub_r = losses.mgrpo_sub_rewards(
        np.ones(kept.size, np.float32),
        np.asarray(main_rewards)[sub_rollout[kept]] >= 1.0,
        expert_reward=np.linspace(0.2, 0.9, kept.size, dtype=np.float32),
    )
    query = np.repeat(np.arange(8)[valid] // 4, target)
    sub_adv = losses.mgrpo_sub_advantages(sub_r, query, num_queries=2)
    print("  R_S:", _fmt(sub_r, 3))
    print("  sub advantages:", _fmt(sub_adv, 4))
    main_loss, _ = losses.mgrpo_policy_loss(b["logps"], b["old"], main_adv, b["mask"])
    print(f"  main-agent policy loss (token ratio) {float(main_loss):.6f}")

    loss, _ = losses.sft_loss(b["ref_logps"], b["ref_mask"])
    print(f"\nSFT on the reference answers: {float(loss):.6f}")


def _fmt(values, digits: int) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in np.asarray(values).tolist()) + "]"


def _demo_key():
    import jax

    return jax.random.key(0)


if __name__ == "__main__":
    main()
