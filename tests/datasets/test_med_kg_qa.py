"""medjax.datasets: `med_kg_qa/tiny` and `med_kg_qa_trajectories/tiny` built from scratch into
a temporary data dir (no download, no TensorFlow), read back through `as_data_source()` and
grain, and compared with `qa.synthesise` run here.

The HPO cache and the BM25 index go to a temporary `MEDJAX_CACHE` for this module, so the
builds start from nothing, as on a clean clone (about 15 s more than a warm cache), and CI
writes nothing under the home folder.
"""

import dataclasses
import hashlib
import os
import re

import grain
import pytest
import tensorflow_datasets as tfds

from medjax import datasets
from medjax.datasets import med_kg_qa
from medjax.envs import research
from medjax.synthesis import qa

TINY = 150


@pytest.fixture(scope="module", autouse=True)
def cold_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDJAX_CACHE", str(tmp_path_factory.mktemp("medjax_cache")))
        med_kg_qa.knowledge_graph.cache_clear()
        yield
    med_kg_qa.knowledge_graph.cache_clear()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sources(data_dir):
    return datasets.load("med_kg_qa/tiny", split=None, data_dir=data_dir)


@pytest.fixture(scope="module")
def expected():
    """The tiny config's questions, synthesised here: one round, seed 0, mixed anchors."""
    records = qa.synthesise(med_kg_qa.knowledge_graph(), TINY, seed=0, seeds="mixed")
    return {r.id: r for r in records}


def bucket_split(answer_id: str) -> str:
    # The documented rule, written out independently of `med_kg_qa.split_of`.
    h = int(hashlib.sha256(answer_id.encode()).hexdigest()[:16], 16) % 100
    return "train" if h < 80 else "validation" if h < 90 else "test"


def test_splits_hold_every_question_once_and_share_no_answer(data_dir, sources):
    assert set(sources) == {"train", "validation", "test"}
    sizes = {split: len(src) for split, src in sources.items()}
    assert sum(sizes.values()) == TINY and min(sizes.values()) > 0
    info = datasets.builder("med_kg_qa/tiny", data_dir=data_dir).info
    assert {s: info.splits[s].num_examples for s in sizes} == sizes
    answers = {s: {ex["answer_id"].decode() for ex in src} for s, src in sources.items()}
    assert not answers["train"] & answers["validation"]
    assert not answers["train"] & answers["test"]
    assert not answers["validation"] & answers["test"]
    for split, ids in answers.items():
        assert {bucket_split(a) for a in ids} == {split}


def test_records_round_trip(sources, expected):
    seen = []
    for src in sources.values():
        for example in src:
            record = med_kg_qa.to_record(example)
            assert record == dataclasses.asdict(expected[record["id"]])
            seen.append(record["id"])
    assert sorted(seen) == sorted(expected)


def test_grain_batches_a_shuffled_epoch(sources):
    src = sources["train"]

    def fixed(example):
        return {"question": example["question"].decode(), "hops": example["hops"]}

    def epoch(seed):
        ds = grain.MapDataset.source(src).shuffle(seed=seed).map(fixed).batch(16)
        return [ds[i] for i in range(len(ds))]

    batches = epoch(0)
    assert len(batches) == -(-len(src) // 16) and batches[0]["hops"].shape == (16,)
    questions = [q for b in batches for q in b["question"].tolist()]
    assert sorted(questions) == sorted(ex["question"].decode() for ex in src)
    assert all(2 <= h <= 6 for b in batches for h in b["hops"].tolist())
    again = epoch(0)
    assert [b["question"].tolist() for b in again] == [b["question"].tolist() for b in batches]
    assert [q for b in epoch(1) for q in b["question"].tolist()] != questions


def test_load_reuses_a_prepared_dataset(data_dir, sources, tmp_path):
    src = datasets.load("med_kg_qa/tiny", split="validation", data_dir=data_dir, build=False)
    assert [ex["id"] for ex in src] == [ex["id"] for ex in sources["validation"]]
    # Readable without the builder class, from the prepared folder alone.
    folder = datasets.builder("med_kg_qa/tiny", data_dir=data_dir).data_dir
    reopened = tfds.builder_from_directory(folder).as_data_source(split="test")
    assert len(reopened) == len(sources["test"])
    with pytest.raises(FileNotFoundError, match="not prepared"):
        datasets.load("med_kg_qa/tiny", data_dir=str(tmp_path), build=False)


def test_configs_and_bad_names():
    default = datasets.builder("med_kg_qa", data_dir="/nonexistent")
    assert default.builder_config.name == "default"
    assert default.builder_config.num_questions == 20_000
    assert str(default.version) == "1.0.0" and "1.0.0" in default.RELEASE_NOTES
    assert default.info.file_format.value == "array_record"
    with pytest.raises(ValueError, match="no config 'huge'; configs: tiny, lookup, default"):
        datasets.load("med_kg_qa/huge")
    with pytest.raises(ValueError, match="unknown dataset 'med_qa/tiny'; known: med_kg_qa, "):
        datasets.load("med_qa/tiny")


def test_rounds_continue_past_one_pass(monkeypatch):
    """Hand-checked with a stub synthesiser: each round gives at most 3 questions, and the
    first of round r repeats the last of round r - 1."""

    def stub(graph, num, *, seed, **kwargs):
        texts = [f"q{seed * 2 + i}" for i in range(3)][:num]
        for i, text in enumerate(texts):
            answer = {"id": text, "name": text, "aliases": [text], "kind": "disease"}
            yield qa.QARecord(f"kgqa-{seed}-{i:06d}", text, answer, 2, [], {}, "easy", "", [], seed)

    monkeypatch.setattr(med_kg_qa.qa, "synthesise", stub)
    monkeypatch.setattr(med_kg_qa.chains_lib, "ChainSampler", lambda graph: None)
    config = med_kg_qa.QuestionsConfig(name="stub", num_questions=6, seed=5)
    records = med_kg_qa.synthesise_questions(config, graph=object())
    assert [r.question for r in records] == ["q10", "q11", "q12", "q13", "q14", "q15"]
    assert [r.id for r in records] == [
        "kgqa-5-000000", "kgqa-5-000001", "kgqa-5-000002",
        "kgqa-6-000001", "kgqa-6-000002", "kgqa-7-000001",
    ]  # fmt: skip

    monkeypatch.setattr(med_kg_qa.qa, "synthesise", lambda graph, num, *, seed, **kw: iter(()))
    with pytest.raises(RuntimeError, match="seed 5 added no new question"):
        med_kg_qa.synthesise_questions(config, graph=object())


def test_trajectories_answer_train_questions_correctly(data_dir, sources, expected):
    src = datasets.load("med_kg_qa_trajectories/tiny", split=None, data_dir=data_dir)
    assert set(src) == {"train"}
    train_ids = {ex["id"].decode() for ex in sources["train"]}
    trajectories = [med_kg_qa.to_trajectory(ex) for ex in src["train"]]
    # The expert follows the chain through the tools; it solves most questions.
    assert len(train_ids) // 2 < len(trajectories) <= len(train_ids)
    for t in trajectories:
        assert t["id"] in train_ids
        record = expected[t["id"]]
        messages = t["messages"]
        assert messages[0]["role"] == "system" and messages[1] == {
            "role": "user",
            "content": record.question,
        }
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(replies) == t["num_turns"] and messages[-1]["role"] == "assistant"
        assert t["num_tool_calls"] == sum("<tool_call>" in r for r in replies) > 0
        final = re.fullmatch(r".*<answer>(.*)</answer>\s*", replies[-1], re.DOTALL)
        assert final is not None and final.group(1).strip() == t["answer"]
        assert research.exact_match(t["answer"], record.answer["aliases"])
        assert (t["answer_name"], t["hops"]) == (record.answer["name"], record.hops)


def test_lookup_config_splits_its_questions_and_the_expert_answers_every_train_one(data_dir):
    questions = datasets.load("med_kg_qa/lookup", split=None, data_dir=data_dir)
    records = {s: [med_kg_qa.to_record(ex) for ex in questions[s]] for s in questions}
    assert sum(map(len, records.values())) == 300
    for split, rs in records.items():
        assert all(bucket_split(r["answer"]["id"]) == split and r["hops"] == 1 for r in rs)
    src = datasets.load("med_kg_qa_trajectories/lookup", "train", data_dir=data_dir)
    chats = [med_kg_qa.to_trajectory(ex) for ex in src]
    assert len(chats) == len(records["train"])  # The one-call lookups never fail.
    assert all(c["num_tool_calls"] == 1 and c["num_turns"] == 2 for c in chats)


def test_processes_building_one_dataset_together_both_succeed(tmp_path):
    """Two processes that start at once on an empty data folder (decoupled M-GRPO's two
    trainers): one builds, the other waits for it; both read the same data."""
    import subprocess
    import sys

    code = (
        "import sys; from medjax import datasets;"
        " print(len(datasets.load('med_kg_qa/tiny', 'train', sys.argv[1])))"
    )
    env = {**os.environ, "MEDJAX_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "tfds")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1] != "0"


def test_an_unknown_question_family_is_named():
    config = med_kg_qa.QuestionsConfig(name="odd", num_questions=3, family="trees")
    with pytest.raises(
        ValueError, match="med_kg_qa/odd: family must be 'chains' or 'lookup', got 'trees'"
    ):
        med_kg_qa.synthesise_questions(config)
