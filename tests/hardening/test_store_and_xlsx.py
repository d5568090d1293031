"""Hardening of the file store and the MedDialogRubrics .xlsx reader (issue 19).

File store: a record with invalid UTF-8 or a non-finite number is rejected with a one-line
`StoreCorruptError` naming the file and the fault, and the file is left as it is; NaN and
infinity are refused at write time, naming the key and field, without leaving a file behind;
key parts starting with "." (the store's own names) are refused by every backend; temporary
files of killed writers are removed when the store is opened, a live writer's never.
Reader: a repeated required column, an empty diagnosis and an empty must-ask cell each raise
a one-line error naming the file, sheet, row and column.
"""

import itertools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from medjax import store as store_lib
from medjax.datasets import meddialog_xlsx
from medjax.store import files


def _tree(root, *, locks=True):
    """Every file under `root` (lock files too, or not), relative, with its bytes."""
    root = pathlib.Path(root)
    tree = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return {k: v for k, v in tree.items() if locks or not k.startswith(".locks/")}


_namespaces = itertools.count()


def _url(backend, tmp_path, request):
    if backend == "redis":
        return f"{request.getfixturevalue('redis_server')}?namespace=h{next(_namespaces)}"
    return "memory://" if backend == "memory" else f"file://{tmp_path}"


def _corrupt_error(store, key):
    with pytest.raises(store_lib.StoreCorruptError) as err:
        store.get(key)
    message = str(err.value)
    assert "\n" not in message
    return message


# Corrupt records.


def test_invalid_utf8_record_names_file_and_byte_and_is_kept(tmp_path):
    s = files.FileStore(tmp_path)
    s.put("r/1", {"reward": 1.0})
    path = tmp_path / "r" / "1.json"
    raw = b'{"sha256": "00", "value": {"note": "caf\xe9"}}'  # Latin-1, not UTF-8.
    path.write_bytes(raw)
    at = raw.index(b"\xe9")
    before = _tree(tmp_path)
    message = _corrupt_error(s, "r/1")
    assert message == f"store: {path}: not a store record: invalid UTF-8 at byte {at}."
    with pytest.raises(store_lib.StoreCorruptError, match=f"invalid UTF-8 at byte {at}"):
        s.compare_and_set("r/1", {"reward": 1.0}, {"reward": 2.0})
    assert _tree(tmp_path, locks=False) == before  # Nothing deleted or rewritten.
    assert s.list() == ["r/1"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_number_in_record_names_file_and_is_kept(tmp_path, token):
    s = files.FileStore(tmp_path)
    s.put("r/1", {"reward": 1.0})
    path = tmp_path / "r" / "1.json"
    path.write_text('{"sha256": "00", "value": {"reward": TOKEN}}'.replace("TOKEN", token))
    before = _tree(tmp_path)
    message = _corrupt_error(s, "r/1")
    assert message == (
        f"store: {path}: not a store record: non-finite number {token}"
        " (JSON has no NaN or Infinity)."
    )
    with pytest.raises(store_lib.StoreCorruptError, match="non-finite"):
        s.compare_and_set("r/1", None, {"reward": 2.0})
    assert _tree(tmp_path, locks=False) == before


def test_other_malformed_records_are_store_corrupt_errors(tmp_path):
    s = files.FileStore(tmp_path)
    path = tmp_path / "k.json"
    for text, fault in [
        ("[1, 2]", "list indices"),
        ('{"sha256": "00", "value": [1]}', "the value is a list, not an object"),
        ('{"value": {"a": 1}}', "checksum mismatch"),
        ('{"sha256": "00", "value": {"a": ' + "9" * 5000 + "}}", "limit"),
    ]:
        path.write_text(text)
        assert fault in _corrupt_error(s, "k")
        assert path.read_text() == text


# Non-finite numbers at write time.


@pytest.mark.parametrize("backend", ["memory", "file", "redis"])
def test_non_finite_numbers_are_refused_at_write_time(backend, tmp_path, request):
    s = store_lib.open_store(_url(backend, tmp_path, request))
    s.put("r/1", {"reward": 1.0})
    for bad in [float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ValueError):
            s.put("r/1", {"scores": [1.0, {"x": bad}]})
        with pytest.raises(ValueError):
            s.compare_and_set("r/1", {"reward": 1.0}, {"reward": bad})
        with pytest.raises(ValueError):
            s.put("r/2", {"reward": bad}, if_absent=True)
    assert s.get("r/1") == {"reward": 1.0}
    assert s.list() == ["r/1"]


def test_file_store_names_the_key_and_field_and_leaves_no_file(tmp_path):
    s = files.FileStore(tmp_path)
    with pytest.raises(ValueError) as err:
        s.put("a/b", {"scores": [1.0, {"x": float("nan")}]})
    assert str(err.value) == (
        "store: key 'a/b': non-finite number at ['scores'][1]['x'] = nan;"
        " store finite numbers only."
    )
    with pytest.raises(ValueError, match=r"key 'c': non-finite number at \['r'\] = -inf"):
        s.compare_and_set("c", None, {"r": -float("inf")})
    with pytest.raises(TypeError, match=r"key 'd': Object of type bytes is not JSON"):
        s.put("d", {"r": b"x"})
    # Encoding fails before any temporary file exists (it used to leak one per refusal).
    assert _tree(tmp_path) == {}


# Keys with parts starting with ".".


@pytest.mark.parametrize("backend", ["memory", "file", "redis"])
@pytest.mark.parametrize("key", [".hidden", "a/.b", ".tmp-1-abc", ".locks/x", "a/.."])
def test_dot_parts_are_refused_by_every_backend(backend, key, tmp_path, request):
    s = store_lib.open_store(_url(backend, tmp_path, request))
    with pytest.raises(store_lib.InvalidKeyError, match=f"invalid key {key!r}.*starting with '.'"):
        s.put(key, {"v": 1})
    with pytest.raises(store_lib.InvalidKeyError):
        s.compare_and_set(key, None, {"v": 1})
    assert s.list() == []
    assert s.put("a/b.c", {"v": 1}) and s.list() == ["a/b.c"]  # A "." inside a part is fine.


def test_list_shows_exactly_the_keys(tmp_path):
    s = files.FileStore(tmp_path)
    s.put("a/b", {})
    s.compare_and_set("x.json/y", None, {})  # A folder "x.json" is not a record "x".
    (tmp_path / "a" / "notes (1).json").write_text("{}")  # Not a key: a stray file.
    (tmp_path / "a" / "README").write_text("")
    with s._temp(s._path("a/c"), b"{}"):  # A writer's temporary file, mid-write.
        assert s.list() == ["a/b", "x.json/y"]
        assert s.list("a/") == ["a/b"]
        assert s.list("x") == ["x.json/y"]
        assert s.list("x.json/") == ["x.json/y"]
    assert s.list("nothing/") == []


def test_folders_named_like_a_record_or_lock_file_take_a_mark(tmp_path):
    """The layout that keeps `a`, `a.json/b` and `a.lock/c` apart: a folder part ending in
    the suffix of the files beside it gets a "~", which no key part holds."""
    s = files.FileStore(tmp_path)
    assert s.compare_and_set("a", None, {"v": 1})
    assert s.put("a.json/b", {"v": 2})
    assert s.compare_and_set("a.lock/c", None, {"v": 3})
    assert sorted(_tree(tmp_path)) == [
        ".locks/a.lock", ".locks/a.lock~/c.lock", "a.json", "a.json~/b.json", "a.lock/c.json",
    ]  # fmt: skip
    # Files where no key's record is: a folder named like a record without its mark (a
    # store written before the mark), a marked folder whose name ends otherwise.
    record = (tmp_path / "a.json").read_bytes()
    for stray in ("x.json/y.json", "z~/w.json", "a.lock~/d.json"):
        (tmp_path / stray).parent.mkdir(exist_ok=True)
        (tmp_path / stray).write_bytes(record)
    assert s.list() == ["a", "a.json/b", "a.lock/c"]
    assert s.list("x.json/") == [] and s.get("x.json/y") is None


# Temporary files of dead writers.

_WRITER = """
import sys, time
from medjax.store.files import FileStore
s = FileStore(sys.argv[1])
with s._temp(s._path("k"), b'{"torn') as tmp:
    print(tmp, flush=True)
    time.sleep(60)
"""


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_stale_temps_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    s = files.FileStore(tmp_path)
    s.put("k", {"v": 1})
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        live = writer.stdout.readline().strip()
        assert os.path.basename(live).startswith(f".tmp-{writer.pid}-")
        _age(live, 2 * files.FileStore.stale_temp_age)
        # Old but locked: its writer lives (say it stalled), so it stays.
        assert files.FileStore(tmp_path).remove_stale_temps() == []
        assert os.path.exists(live)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
    assert os.path.exists(live)  # A killed writer cleans nothing up.

    # Fabricated leftovers: an old-style name, one with a dead pid; and a young one.
    legacy = tmp_path / ".tmp-abcd1234.json"
    dead = tmp_path / f".tmp-{writer.pid}-zzzzzzzz"
    young = tmp_path / ".tmp-1-young"
    for path in (legacy, dead, young):
        path.write_text("{")
    _age(legacy, 2 * files.FileStore.stale_temp_age)
    _age(dead, 2 * files.FileStore.stale_temp_age)

    files.FileStore(tmp_path)  # Opening the store cleans up.
    assert not os.path.exists(live) and not legacy.exists() and not dead.exists()
    assert young.exists()  # Could be a writer between creating and locking it.
    assert sorted(_tree(tmp_path)) == [".tmp-1-young", "k.json"]
    assert files.FileStore(tmp_path).get("k") == {"v": 1}


def test_writers_leave_no_temp_and_cleaning_spares_records(tmp_path):
    s = files.FileStore(tmp_path)
    s.put("a/b", {"v": 1})
    assert not s.put("a/b", {"v": 2}, if_absent=True)
    assert s.compare_and_set("a/b", {"v": 1}, {"v": 3})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            _age(path, 2 * files.FileStore.stale_temp_age)
    assert s.remove_stale_temps() == []
    assert sorted(_tree(tmp_path)) == [".locks/a/b.lock", "a/b.json"]
    assert s.get("a/b") == {"v": 3}


# The MedDialogRubrics reader.

HEADER = ["编号", "主诉", "病历", "诊断", "科室", "问诊要点"]


def _row(n, diagnosis="急性上呼吸道感染", must_ask="1.询问发热持续时间 2.询问有无咳嗽"):
    return [n, "发热3天", "患者男，25岁。", diagnosis, "呼吸内科", must_ask]  # noqa: RUF001


def _xlsx(path, header, rows):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "病例"
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def _xlsx_error(path):
    with pytest.raises(ValueError) as err:
        meddialog_xlsx.load_xlsx(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_xlsx_duplicated_header(tmp_path):
    path = _xlsx(tmp_path / "dup.xlsx", [*HEADER, "诊断"], [[*_row(1), "另一个诊断"]])
    assert _xlsx_error(path) == (
        f"meddialog_xlsx: {str(path)!r} (sheet '病例') row 1: column 诊断 (diagnosis)"
        " appears 2 times (columns D, G); keep one."
    )
    # A repeated column the reader ignores is harmless.
    path = _xlsx(tmp_path / "ok.xlsx", [*HEADER, "备注", "备注"], [[*_row(1), "a", "b"]])
    assert [r["diagnosis"] for r in meddialog_xlsx.load_xlsx(path)] == ["急性上呼吸道感染"]


@pytest.mark.parametrize("diagnosis", [None, "", "  \u3000"])
def test_xlsx_empty_diagnosis(tmp_path, diagnosis):
    path = _xlsx(tmp_path / "diag.xlsx", HEADER, [_row(1), _row(2, diagnosis=diagnosis)])
    assert _xlsx_error(path) == (
        f"meddialog_xlsx: {str(path)!r} (sheet '病例') row 3, column D (诊断, diagnosis):"
        " no diagnosis in ''; every case needs one."
    )


@pytest.mark.parametrize(("cell", "shown"), [(None, "''"), ("1.；\n2、", "'1.；\\n2、'")])  # noqa: RUF001
def test_xlsx_empty_must_ask(tmp_path, cell, shown):
    path = _xlsx(tmp_path / "ask.xlsx", HEADER, [_row(1), [None] * 6, _row(3, must_ask=cell)])
    assert _xlsx_error(path) == (
        f"meddialog_xlsx: {str(path)!r} (sheet '病例') row 4, column F"
        f" (问诊要点, must-ask points): no must-ask points in {shown}; every case needs one."
    )
