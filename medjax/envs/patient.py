"""The patient agent of MedDialogRubrics: answers only from its atomic facts, with a
checker and a guidance loop against hallucination.

Concepts are HPO phenotype terms, recognised in text by their names and synonyms (longest
phrase first, `ConceptMatcher`). A statement about a concept is *supported* when the concept
is a present fact or an ancestor of one (a patient with focal seizures has seizures), or is
denied while absent from the present facts (the record is closed-world: what it does not list,
the patient does not have). It is *contradicted* when a present fact is denied or a negated
fact is asserted, and *unsupported* when a finding outside the record is asserted.

- Deterministic mode (`KnowledgePatient`): no model. It matches the doctor's question to its
  facts through the concepts (the asked term, its ancestors or descendants), states the
  matching facts, denies asked-about findings it does not have, answers onset and family
  history questions by keyword, and says `NOT_SURE` otherwise.
- LLM mode (`GuidedPatient`): a `TextBackend` with a prompt that lists only the facts. Every
  reply goes through `check`; an unsupported or contradicted statement triggers a guidance
  message and a regeneration (up to `max_tries`), then the deterministic patient's answer as
  the safe fallback. Every correction is logged in `corrections`.
"""

import dataclasses
import random
import re
from collections.abc import Sequence

from medjax.knowledge.graph import KnowledgeGraph
from medjax.sampling import SamplingParams
from medjax.synthesis.cases import PatientCase, lay_name

NOT_SURE = "I'm not sure about that."
NEGATION_CUES = (
    "no",
    "not",
    "never",
    "don't",
    "dont",
    "haven't",
    "havent",
    "without",
    "nor",
    "denies",
    "didn't",
)
ONSET_WORDS = ("when", "start", "started", "began", "begin", "since", "how long", "onset")
FAMILY_WORDS = ("family", "parent", "parents", "mother", "father", "sibling", "relative", "cousin")
MAX_PHRASE_WORDS = 8
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    """Lower-case words with a plural "s" dropped ("heartbeats" matches "heartbeat")."""
    return [
        w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
        for w in _WORD.findall(text.lower())
    ]


class ConceptMatcher:
    """Finds HPO phenotype terms in text by their names and synonyms (case-insensitive,
    longest match first, whole words)."""

    def __init__(self, graph: KnowledgeGraph, *, min_chars: int = 4):
        self.graph = graph
        self.phrases: dict[tuple[str, ...], str] = {}
        for term in graph.data.terms.values():
            if (
                term.obsolete
                or not graph.is_under(term.id, "HP:0000118")
                or term.id == "HP:0000118"
            ):
                continue
            for text in (term.name, *term.synonyms):
                words = tuple(_words(text))
                if words and len(" ".join(words)) >= min_chars and len(words) <= MAX_PHRASE_WORDS:
                    self.phrases.setdefault(words, term.id)

    def find(self, text: str) -> list[tuple[str, bool]]:
        """(term, negated) for each concept mentioned; negated when a negation cue precedes
        it in the same sentence."""
        out = []
        for sentence in re.split(r"[.!?;\n]+", text.lower()):
            words = _words(sentence)
            i = 0
            while i < len(words):
                for n in range(min(MAX_PHRASE_WORDS, len(words) - i), 0, -1):
                    term = self.phrases.get(tuple(words[i : i + n]))
                    if term is not None:
                        negated = any(w in NEGATION_CUES for w in words[:i])
                        out.append((term, negated))
                        i += n
                        break
                else:
                    i += 1
        return out


@dataclasses.dataclass(frozen=True)
class Check:
    unsupported: tuple[str, ...]
    contradicted: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.unsupported and not self.contradicted


class FactChecker:
    def __init__(self, graph: KnowledgeGraph, matcher: ConceptMatcher | None = None):
        self.graph = graph
        self.matcher = matcher or ConceptMatcher(graph)

    def check(self, case: PatientCase, reply: str) -> Check:
        present = {f.concept for f in case.facts if f.present and f.concept.startswith("HP:")}
        absent = {f.concept for f in case.facts if not f.present}
        supported = set(present)
        for p in present:
            supported |= self.graph.ancestors(p)
        unsupported, contradicted = [], []
        for term, negated in self.matcher.find(reply):
            if negated:
                if term in present:
                    contradicted.append(term)
            elif term in absent:
                contradicted.append(term)
            elif term not in supported:
                unsupported.append(term)
        return Check(tuple(unsupported), tuple(contradicted))


class KnowledgePatient:
    """The deterministic patient (see the module docstring)."""

    def __init__(self, graph: KnowledgeGraph, matcher: ConceptMatcher | None = None):
        self.graph = graph
        self.matcher = matcher or ConceptMatcher(graph)

    def reply(self, case: PatientCase, question: str) -> str:
        lowered = question.lower()
        sentences = []
        for term, _ in self.matcher.find(question):
            related = [
                f for f in case.facts
                if f.concept.startswith("HP:") and (
                    f.concept == term or term in self.graph.ancestors(f.concept)
                    or f.concept in self.graph.ancestors(term)
                )
            ]  # fmt: skip
            if not related:
                sentences.append(f"No, I don't have {lay_name(self.graph, term)}.")
            sentences += [fact.text for fact in related]
        if any(w in lowered for w in ONSET_WORDS):
            sentences += [f.text for f in case.facts if f.concept == "onset"]
        if any(w in lowered for w in FAMILY_WORDS):
            sentences += [f.text for f in case.facts if f.concept == "family_history"]
        sentences = list(dict.fromkeys(s for s in sentences if s))
        return " ".join(sentences) if sentences else NOT_SURE


PATIENT_PROMPT = (
    "You are a patient talking to a doctor. Answer the doctor's question in plain words, using"
    " only these facts about yourself; if the question is about anything else, say you don't"
    " have it or you're not sure.\nFacts:\n{facts}"
)
STRICT_SUFFIX = "\nNever mention any symptom, finding or test result that is not in the facts."
# A patient's replies when the caller gives no SamplingParams.
REPLY_PARAMS = SamplingParams(max_new_tokens=256, temperature=0.7)
GUIDANCE = (
    "Your last answer mentioned {terms}, which your facts do not support. Answer again, using"
    " only your facts."
)


@dataclasses.dataclass
class Correction:
    case_id: str
    question: str
    rejected: str
    unsupported: tuple[str, ...]
    contradicted: tuple[str, ...]


class GuidedPatient:
    """An LLM patient with the checker and the guidance loop.

    Args:
      backend: any TextBackend.
      strict: add the strict-adherence instruction to the prompt.
      guidance: check every reply and regenerate with guidance (else the raw reply).
      max_tries: regenerations before the deterministic fallback.
      batch_size: replies per backend call (None: a round's replies in one call); bounds a
        local model's memory.
    """

    def __init__(
        self, graph: KnowledgeGraph, backend, *, strict: bool = True, guidance: bool = True,
        max_tries: int = 2, params: SamplingParams | None = None,
        checker: FactChecker | None = None, batch_size: int | None = None,
    ):  # fmt: skip
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"GuidedPatient: batch_size must be at least 1, got {batch_size}.")
        self.graph, self.backend = graph, backend
        self.strict, self.guidance, self.max_tries = strict, guidance, max_tries
        self.batch_size = batch_size
        self.params = params or REPLY_PARAMS
        self.checker = checker or FactChecker(graph)
        self.fallback = KnowledgePatient(graph, self.checker.matcher)
        self.corrections: list[Correction] = []
        self.fallbacks = 0

    def prompt(self, case: PatientCase) -> str:
        facts = "\n".join(f"- {f.text}" for f in case.facts)
        return PATIENT_PROMPT.format(facts=facts) + (STRICT_SUFFIX if self.strict else "")

    def reply_batch(self, cases: Sequence[PatientCase], questions: Sequence[str]) -> list[str]:
        """One reply per (case, question), all tries of a round batched in one call."""
        chats = [
            [{"role": "system", "content": self.prompt(c)}, {"role": "user", "content": q}]
            for c, q in zip(cases, questions, strict=True)
        ]
        replies: list[str | None] = [None] * len(cases)
        pending = list(range(len(cases)))
        for _ in range(self.max_tries + 1 if self.guidance else 1):
            if not pending:
                break
            size = self.batch_size or len(pending)
            outs = [
                out
                for start in range(0, len(pending), size)
                for out in self.backend.generate(
                    [chats[i] for i in pending[start : start + size]], self.params
                )
            ]
            still = []
            for i, out in zip(pending, outs, strict=True):
                text = out.text.strip()
                if not self.guidance:
                    replies[i] = text
                    continue
                result = self.checker.check(cases[i], text)
                if result.ok:
                    replies[i] = text
                    continue
                self.corrections.append(
                    Correction(
                        cases[i].case_id,
                        questions[i],
                        text,
                        result.unsupported,
                        result.contradicted,
                    )
                )
                names = ", ".join(
                    self.graph.name(t) for t in result.unsupported + result.contradicted
                )
                chats[i] = chats[i] + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": GUIDANCE.format(terms=names) + f"\n{questions[i]}"},
                ]
                still.append(i)
            pending = still
        for i in pending:  # Out of tries: the knowledge-grounded answer.
            self.fallbacks += 1
            replies[i] = self.fallback.reply(cases[i], questions[i])
        return replies


# -- Measuring the checker and the guidance loop ---------------------------------------------


def ask_about(graph: KnowledgeGraph, case: PatientCase, phenotypes: Sequence[str], rng) -> str:
    """A yes/no question about one of the case's own findings (40%) or any phenotype."""
    own = [f.concept for f in case.facts if f.concept.startswith("HP:")]
    term = rng.choice(own) if own and rng.random() < 0.4 else rng.choice(phenotypes)
    return f"Do you have {graph.name(term).lower()}?"


def outside_finding(graph, matcher, case: PatientCase, phenotypes: Sequence[str], rng) -> str:
    """A finding the record does not support, whose name the matcher reads as itself."""
    present = {f.concept for f in case.facts if f.present and f.concept.startswith("HP:")}
    supported = set(present).union(*(graph.ancestors(p) for p in present))
    absent = {f.concept for f in case.facts if not f.present}
    while True:
        term = rng.choice(phenotypes)
        if term not in supported | absent and matcher.find(graph.name(term)) == [(term, False)]:
            return term


class NoisyPatientBackend:
    """A stand-in LLM patient with a known hallucination rate, to measure checkers and the
    guidance loop: it gives the knowledge-grounded answer and, with probability
    `noise_rate` (halved under the strict instruction), adds one finding outside the record;
    once guided it complies.

    Args:
      cases_by_prompt: the system prompt of each case (without the strict suffix) -> case.
    """

    def __init__(self, graph, matcher, cases_by_prompt, phenotypes, *, noise_rate, seed=0):
        self.graph, self.matcher, self.cases = graph, matcher, cases_by_prompt
        self.phenotypes, self.noise_rate = phenotypes, noise_rate
        self.rng = random.Random(seed)
        self.patient = KnowledgePatient(graph, matcher)
        self.inserted = 0

    def generate(self, conversations, params, *, num_samples=1):
        from medjax.llm.base import Generation

        out = []
        for chat in conversations:
            system = chat[0]["content"]
            case = self.cases[system.removesuffix(STRICT_SUFFIX)]
            question = chat[-1]["content"].split("\n")[-1]
            text = self.patient.reply(case, question)
            rate = self.noise_rate / 2 if system.endswith(STRICT_SUFFIX) else self.noise_rate
            if len(chat) == 2 and self.rng.random() < rate:  # Guided retries comply.
                term = outside_finding(self.graph, self.matcher, case, self.phenotypes, self.rng)
                text += f" I also have {self.graph.name(term).lower()}."
                self.inserted += 1
            out.append(Generation(text))
        return out


def guidance_report(
    graph: KnowledgeGraph,
    cases: Sequence[PatientCase],
    *,
    num_questions: int = 240,
    noise_rate: float = 0.3,
    seed: int = 0,
    backend=None,
    params: SamplingParams | None = None,
    batch_size: int | None = None,
) -> dict:
    """Checker recall / false alarms on inserted findings, and the hallucination rate of the
    paper's three configurations (prompt only, + strict adherence, + guidance) with a
    `NoisyPatientBackend`. Hallucination = share of replies the checker flags; relevance =
    share of replies that are not `NOT_SURE`; consistency = share without contradictions.
    `backend`: measure a real LLM patient (any TextBackend) instead of the stand-in, with
    `params` and `batch_size` as in `GuidedPatient`."""
    matcher = ConceptMatcher(graph)
    checker = FactChecker(graph, matcher)
    grounded = KnowledgePatient(graph, matcher)
    phenotypes = [p for p in graph.phenotypes() if graph.is_under(p, "HP:0000118")]
    rng = random.Random(seed)
    caught = missed = alarms = clean = 0
    for i in range(num_questions):
        case = cases[i % len(cases)]
        reply = grounded.reply(case, ask_about(graph, case, phenotypes, rng))
        if i % 2:
            term = outside_finding(graph, matcher, case, phenotypes, rng)
            flagged = not checker.check(case, f"{reply} I also have {graph.name(term).lower()}.").ok
            caught, missed = caught + flagged, missed + (not flagged)
        else:
            alarms += not checker.check(case, reply).ok
            clean += 1
    report = {
        "checker": {
            "recall": caught / max(caught + missed, 1),
            "false_alarm_rate": alarms / max(clean, 1),
        },
        "noise_rate": noise_rate, "questions": num_questions, "cases": len(cases),
        "configurations": {},
    }  # fmt: skip
    asked = [cases[i % len(cases)] for i in range(num_questions)]
    ask_rng = random.Random(seed + 1)  # One stream: 40% own findings, 60% any phenotype.
    questions = [ask_about(graph, c, phenotypes, ask_rng) for c in asked]
    for name, strict, guidance in (
        ("prompt only", False, False), ("+ strict adherence", True, False),
        ("+ guidance", True, True),
    ):  # fmt: skip
        agent = GuidedPatient(
            graph, None, strict=strict, guidance=guidance, checker=checker, params=params,
            batch_size=batch_size,
        )  # fmt: skip
        agent.backend = backend or NoisyPatientBackend(
            graph, matcher, {agent.prompt(c).removesuffix(STRICT_SUFFIX): c for c in cases},
            phenotypes, noise_rate=noise_rate, seed=seed,
        )  # fmt: skip
        replies = agent.reply_batch(asked, questions)
        checks = [checker.check(c, r) for c, r in zip(asked, replies, strict=True)]
        report["configurations"][name] = {
            "hallucination_rate": sum(not c.ok for c in checks) / len(checks),
            "relevance": sum(r != NOT_SURE for r in replies) / len(replies),
            "consistency": sum(not c.contradicted for c in checks) / len(checks),
            "inserted": getattr(agent.backend, "inserted", None),
            "corrections": len(agent.corrections),
            "fallbacks": agent.fallbacks,
        }  # fmt: skip
    return report
