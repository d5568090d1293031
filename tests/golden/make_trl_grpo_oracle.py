"""Write testdata/trl_grpo_loss_seq_delta.npz: GSPO and two-sided (delta) cases from TRL itself.

Runs TRL 1.16.0's own, unmodified `GRPOTrainer._compute_loss` (PyTorch, float64) on a bare
trainer object that carries the attributes the method reads, set from a real `GRPOConfig` as
`GRPOTrainer.__init__` sets them. Only the model call is replaced: the per-token log-prob getter
returns a float64 leaf tensor with requires_grad, so torch.autograd gives d loss / d logps.
Advantages come from the rewards by TRL's own lines (`_generate_and_score_completions`, the
"sum_then_normalize" branch, which is inline there): float32 rewards, as TRL's
`rewards_per_func`, and TRL's `nanstd`.

Needs only torch, trl and numpy (never medjax). Run (2026-12-07) with TRL 1.16.0 and torch
2.13.0+cpu in the venv /tmp/trlvenv, from the repository root:

    /tmp/trlvenv/bin/python tests/golden/make_trl_grpo_oracle.py

It first recomputes the 48 cases of testdata/trl_grpo_loss.npz from their stored inputs, to
check this harness against that file, then writes the new file and prints, per case, how many
unmasked tokens take each branch of the clipped surrogate.
"""

import itertools
import json
import pathlib
import sys
import types
from collections import defaultdict

import numpy as np
import torch
import trl
from accelerate import Accelerator
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

TESTDATA = pathlib.Path(__file__).parent / "testdata"
OUT = TESTDATA / "trl_grpo_loss_seq_delta.npz"
EXISTING = TESTDATA / "trl_grpo_loss.npz"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
EPS_LOW = 0.2
# Ratios closer than this (relative) to a clip bound or delta are resampled, so that float32
# evaluations of the same case take the same branches as TRL's float64 one.
MARGIN = 1e-3


def _trainer(case):
    """A bare GRPOTrainer whose loss attributes are set from a real GRPOConfig, as __init__ does."""
    batch = case["num_generations"] * case["num_prompts"]
    args = GRPOConfig(
        output_dir="/tmp/make_trl_grpo_oracle",
        report_to="none",
        use_cpu=True,
        loss_type=case["loss_type"],
        beta=case["beta"],
        epsilon=case["epsilon_low"],
        epsilon_high=case["epsilon_high"],
        delta=case["delta"],
        importance_sampling_level=case["importance_sampling_level"],
        scale_rewards=case["scale_rewards"],
        num_generations=case["num_generations"],
        per_device_train_batch_size=batch,
        max_completion_length=case["max_completion_length"],
        use_bias_correction_kl=case["use_bias_correction_kl"],
    )
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.args = args
    t.accelerator = Accelerator(cpu=True)  # one process; after GRPOConfig, which resets its state
    t.model = torch.nn.Linear(1, 1)  # only `.training` is read
    t.model.train()
    t.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    t.aux_loss_enabled = False
    t.router_aux_loss_coef = 0.0
    t.scale_rewards = args.scale_rewards
    t.importance_sampling_level = args.importance_sampling_level
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t.max_completion_length = args.max_completion_length
    t.num_generations = args.num_generations
    t.use_vllm = args.use_vllm
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.loss_type = args.loss_type
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.beta = args.beta
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def trl_advantages(rewards, num_generations, scale):
    """TRL 1.16.0 `_generate_and_score_completions`, sum_then_normalize, one reward function."""
    rewards = torch.tensor(rewards, dtype=torch.float32)  # rewards_per_func is float32 in TRL
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages  # float32, as TRL hands it to _compute_loss


def trl_loss(case, logps, old, ref, mask, advantages):
    """TRL's `_compute_loss` on these arrays; returns (loss, d loss / d logps) as float64."""
    trainer = _trainer(case)
    batch, length = logps.shape
    leaf = torch.tensor(logps, dtype=torch.float64, requires_grad=True)

    def get_logps(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == length
        return leaf, torch.zeros_like(leaf.detach()), None

    trainer._get_per_token_logps_and_entropies = types.MethodType(get_logps, trainer)
    completion_mask = torch.tensor(mask, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.ones(batch, 3, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 3, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
        "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64),
        "num_items_in_batch": trainer.accelerator.gather(completion_mask.sum()).sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach().double().numpy(), grad.numpy()


def check_existing():
    """Recompute the existing oracle's cases with this harness; it must reproduce them."""
    old_file = np.load(EXISTING)
    worst = 0.0
    for case in json.loads(str(old_file["cases_json"])):
        arr = {n: old_file[f"{case['key']}/{n}"] for n in ("logps", "old", "ref", "mask")}
        adv = torch.tensor(old_file[f"{case['key']}/advantages"])
        case = dict(case, num_prompts=len(adv) // case["num_generations"])
        case["use_bias_correction_kl"] = False
        loss, grad = trl_loss(case, arr["logps"], arr["old"], arr["ref"], arr["mask"], adv)
        want_loss, want_grad = old_file[f"{case['key']}/loss"], old_file[f"{case['key']}/grad"]
        scale = np.abs(want_grad).max()
        worst = max(
            worst,
            abs(loss - want_loss) / abs(want_loss),
            np.abs(grad - want_grad).max() / scale,
        )
    print(f"existing 48 cases reproduced (use_bias_correction_kl=False): max rel diff {worst:.1e}")
    assert worst < 1e-12, worst


def branch_counts(case, logps, old, mask, advantages):
    """Unmasked tokens per branch of -min(min(r, delta) A, clip(r) A), TRL's ratio r."""
    log_ratio = logps - old
    if case["importance_sampling_level"] == "sequence":
        seq = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
        log_ratio = np.broadcast_to(seq[:, None], logps.shape)
    r = np.exp(log_ratio)
    a = np.broadcast_to(advantages[:, None], logps.shape)
    on = mask > 0
    lo, hi, delta = 1 - case["epsilon_low"], 1 + case["epsilon_high"], case["delta"]
    capped = (r > delta) & (a < 0) if delta is not None else np.zeros_like(on)
    counts = {
        "inside": on & (r >= lo) & (r <= hi) & (a != 0),
        "low_clip": on & (r < lo) & (a < 0),
        "low_unclipped": on & (r < lo) & (a > 0),
        "high_clip": on & (r > hi) & (a > 0),
        "high_unclipped": on & (r > hi) & (a < 0) & ~capped,
        "delta_cap": on & capped,
        "adv_zero": on & (a == 0),
    }
    bounds = [lo, hi] + ([delta] if delta is not None else [])
    gap = min(np.abs(r[on][:, None] / np.array(bounds) - 1).min(), 1.0)
    return {k: int(v.sum()) for k, v in counts.items()}, gap


def make_inputs(case, rng):
    """Random ragged inputs whose ratios reach every branch the case has (resampled until so)."""
    g, p = case["num_generations"], case["num_prompts"]
    b = g * p
    for _ in range(10_000):
        t = int(rng.integers(5, 15))
        lengths = rng.integers(1, t + 1, size=b)
        lengths[rng.integers(b)] = t  # TRL pads to the longest completion
        if case["fully_masked_row"]:
            lengths[(int(np.argmax(lengths)) + 1 + rng.integers(b - 1)) % b] = 0
        mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
        logps = -rng.gamma(1.2, 1.0, size=(b, t))
        # Per-row drift spreads sequence-level ratios over ~[0.4, 2.7]; token noise spreads the
        # token-level ones wider still.
        shift = rng.permutation(np.linspace(-0.9, 1.0, b))
        old = logps - shift[:, None] - rng.normal(0.0, 0.4, size=(b, t))
        ref = logps + rng.normal(0.0, 0.3, size=(b, t))
        rewards = rng.choice(np.arange(5) / 4, size=b)
        advantages = trl_advantages(rewards, g, case["scale_rewards"])
        counts, gap = branch_counts(case, logps, old, mask, advantages.double().numpy())
        needed = ["inside", "low_clip", "high_clip"] + (["delta_cap"] if case["delta"] else [])
        if gap > MARGIN and all(counts[k] > 0 for k in needed):
            return dict(logps=logps, old=old, ref=ref, mask=mask, rewards=rewards), advantages
    raise RuntimeError(f"no inputs reach every branch for {case}")


def cases():
    out = []
    # GSPO without delta: every loss type x beta x epsilon_high.
    for loss_type, beta, eps_high in itertools.product(LOSS_TYPES, (0.0, 0.04), (0.2, 0.28)):
        out.append(dict(loss_type=loss_type, beta=beta, epsilon_high=eps_high, level="sequence"))
    # Two-sided clipping, token and sequence level: loss type x delta x beta.
    for level in ("token", "sequence"):
        for i, (loss_type, delta, beta) in enumerate(
            itertools.product(LOSS_TYPES, (1.5, 2.0), (0.0, 0.04))
        ):
            eps_high = (0.2, 0.28)[(i ^ (i >> 1) ^ (i >> 2)) & 1]  # both with each beta, delta
            out.append(
                dict(
                    loss_type=loss_type, beta=beta, epsilon_high=eps_high, level=level, delta=delta
                )
            )
    groups = ((2, 3), (4, 2), (8, 1), (2, 4), (4, 3), (8, 2))
    result = []
    for i, c in enumerate(out):
        g, p = groups[i % len(groups)]
        result.append(
            {
                "key": f"c{i:03d}",
                "loss_type": c["loss_type"],
                "beta": c["beta"],
                "epsilon_low": EPS_LOW,
                "epsilon_high": c["epsilon_high"],
                "importance_sampling_level": c["level"],
                "delta": c.get("delta"),
                "scale_rewards": SCALES[i % 3],
                "num_generations": g,
                "num_prompts": p,
                "max_completion_length": None,  # set from T below
                "fully_masked_row": i % 2 == 1,
                "use_bias_correction_kl": False,
            }
        )
    return result


def main():
    assert trl.__version__ == "1.16.0" and torch.__version__.startswith("2.13.0"), (
        trl.__version__,
        torch.__version__,
    )
    assert "medjax" not in sys.modules
    check_existing()
    rng = np.random.default_rng(20261207)
    arrays, meta, totals = {}, [], defaultdict(int)
    for case in cases():
        inputs, advantages = make_inputs(case, rng)
        case["max_completion_length"] = inputs["mask"].shape[1] + int(rng.integers(0, 6))
        loss, grad = trl_loss(
            case, inputs["logps"], inputs["old"], inputs["ref"], inputs["mask"], advantages
        )
        adv64 = advantages.double().numpy()
        assert np.isfinite(loss) and np.isfinite(grad).all()
        assert not grad[inputs["mask"] == 0].any()
        key = case["key"]
        for name, value in inputs.items():
            arrays[f"{key}/{name}"] = value
        arrays[f"{key}/advantages"] = adv64
        arrays[f"{key}/loss"] = np.asarray(loss, np.float64)
        arrays[f"{key}/grad"] = grad
        counts, gap = branch_counts(case, inputs["logps"], inputs["old"], inputs["mask"], adv64)
        for k, v in counts.items():
            totals[k] += v
        rows = inputs["mask"].sum(-1).astype(int).tolist()
        print(
            f"{key} {case['importance_sampling_level']:8s} {case['loss_type']:7s}"
            f" beta={case['beta']} eh={case['epsilon_high']} delta={case['delta']}"
            f" {case['scale_rewards']:5s} G={case['num_generations']} lengths={rows}"
            f" loss={float(loss):+.6f} min_gap={gap:.1e}"
        )
        print("      " + " ".join(f"{k}={v}" for k, v in counts.items()))
        meta.append(case)
    print("totals " + " ".join(f"{k}={v}" for k, v in totals.items()))
    np.savez_compressed(OUT, cases_json=np.asarray(json.dumps(meta)), **arrays)
    print(f"wrote {OUT} ({len(meta)} cases)")


if __name__ == "__main__":
    main()
