"""The TRL side of rl_step_bench: GRPO steps of TRL's `GRPOTrainer` on CPU (PyTorch eager).

Runs in its own virtualenv (TRL pulls packages that stay out of medjax's environment):

    python -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 trl   # the CPU build of torch
    benchmarks/.venv-trl/bin/python benchmarks/peers/trl_grpo_step.py --steps 4

rl_step_bench.py starts it as a subprocess and reads the one JSON line it prints last.
Nothing is downloaded: the model is a randomly initialised Qwen2ForCausalLM built from a
config, the tokenizer a word-level one over the ids ("w<id>" is token <id>), and every prompt
is `--prompt-length` random words, i.e. exactly that many tokens.

Per step (`--steps` in all, the first one a warm-up that the caller drops):
  total_s     on_step_begin -> on_step_end: generation, rewards and advantages, loss
              forward + backward, gradient clipping, optimizer step.
  generate_s  the policy's `generate` call (the method is wrapped on the trainer's model).
  reward_s    the rest of `_generate_and_score_completions`: tokenising, decoding,
              reward, advantages (no old or reference log-probs: num_iterations=1, beta=0).
  update_s    total_s - generate_s - reward_s.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def qwen2_config(vocab: int) -> transformers.Qwen2Config:
    """The rl_step_bench model (Qwen2 keeps biases on q, k and v)."""
    return transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )


def word_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """Whitespace-split words "w<id>" -> id, no special tokens added, left padding."""
    words = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    words.update({f"w{i}": i for i in range(len(words), vocab)})
    backend = Tokenizer(WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # Joins the words back with spaces.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def even_id_fraction(completions, completion_ids, **_):
    """The benchmark's trivial reward: the fraction of a completion's ids that are even.

    About 0.5 +- 0.04 for 128 near-uniform tokens, so rewards differ within every group and
    the advantages are not all zero. medjax computes the same number from its token ids.
    """
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


class StepClock(transformers.TrainerCallback):
    def __init__(self):
        self.begin, self.end = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(time.perf_counter())


def word_tokens(tokenizer) -> list[str]:
    """The vocabulary's " word" tokens (byte-level "Ġ" + lowercase letters): a prompt made
    of them encodes back to exactly those tokens, so prompts have exactly prompt_length ids.
    rl_step_bench.py draws medjax's prompts from the same pool."""
    vocab = tokenizer.get_vocab()
    return sorted(t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower())


def build_trainer(args, workdir: str, clock: StepClock, phases: dict):
    torch.manual_seed(args.seed)
    model_dir = os.path.join(workdir, "model")
    rng = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.prompts * args.steps, args.prompt_length)
    if args.gguf:  # A real checkpoint: transformers' own GGUF loading, float32.
        folder, name = os.path.split(args.gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tokenizer.padding_side = "left"
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        # A plain model with the dequantised weights: transformers neither saves nor trains
        # a model that is flagged as loaded from a quantised GGUF file.
        config = loaded.config
        del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        pool = word_tokens(tokenizer)
        picks = torch.randint(0, len(pool), shape, generator=rng)
        prompts = ["".join(pool[i] for i in row.tolist()).replace("Ġ", " ") for row in picks]
    else:
        model = transformers.Qwen2ForCausalLM(qwen2_config(args.vocab))
        model.generation_config.pad_token_id = PAD_ID
        model.generation_config.eos_token_id = EOS_ID
        tokenizer = word_tokenizer(args.vocab)
        ids = torch.randint(3, args.vocab, shape, generator=rng)
        prompts = [" ".join(f"w{t}" for t in row.tolist()) for row in ids]
    num_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dataset = Dataset.from_dict({"prompt": prompts})

    config = trl.GRPOConfig(
        output_dir=os.path.join(workdir, "out"),
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        num_generations=args.group,
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_iterations=1,
        beta=0.0,
        max_completion_length=args.new_tokens,
        # EOS is suppressed until the budget: every completion has exactly new_tokens.
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=1e-5,
        max_steps=args.steps,
        gradient_checkpointing=args.gradient_checkpointing,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )

    class TimedGRPOTrainer(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            phases["generate_and_score"].append(time.perf_counter() - start)
            return out

    trainer = TimedGRPOTrainer(
        model=model_dir,
        reward_funcs=even_id_fraction,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    policy = trainer.model
    assert policy.device.type == "cpu", policy.device
    generate = policy.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        phases["generate"].append(time.perf_counter() - start)
        phases["completion_tokens"].append(int(out.shape[1] - kw["input_ids"].shape[1]))
        return out

    policy.generate = timed_generate  # An instance attribute: only this model is timed.
    return trainer, config, num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps, the first a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", help="a GGUF checkpoint (model and tokenizer) to train")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="GRPOConfig turns it on by default; off does the same work as medjax",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    phases = {"generate": [], "generate_and_score": [], "completion_tokens": []}
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="trl_grpo_step_") as workdir:
        trainer, config, num_params = build_trainer(args, workdir, clock, phases)
        setup_s = time.perf_counter() - start
        trainer.train()

    n = args.steps
    for name, values in [("step", clock.end), *phases.items()]:
        if len(values) != n:
            raise RuntimeError(f"expected {n} {name} records, got {len(values)}: {values}")
    steps = []
    for i in range(n):
        total = clock.end[i] - clock.begin[i]
        gen, gen_and_score = phases["generate"][i], phases["generate_and_score"][i]
        steps.append(
            {
                "total_s": total,
                "generate_s": gen,
                "reward_s": gen_and_score - gen,
                "update_s": total - gen_and_score,
                "completion_tokens": phases["completion_tokens"][i],
            }
        )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    timed = [s["total_s"] for s in steps[1:]]
    result = {
        "peer": "trl",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "params": num_params,
            "torch_threads": torch.get_num_threads(),
            "gradient_checkpointing": config.gradient_checkpointing,
            "loss_type": config.loss_type,
            "scale_rewards": config.scale_rewards,
            "optimizer": str(config.optim),
            "max_grad_norm": config.max_grad_norm,
            "weight_decay": config.weight_decay,
            "lr_scheduler": str(config.lr_scheduler_type),
        },
        "setup_s": setup_s,
        "steps": steps,  # steps[0] is the warm-up.
        "median_total_s": statistics.median(timed) if timed else None,
        "mean_completion_length": [h.get("completions/mean_length") for h in logs],
        "reward_std": [h.get("reward_std") for h in logs],
        "wall_s": time.perf_counter() - start,
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
