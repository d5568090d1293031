"""A store in a folder that every process sees (a local or network file system).

Each key is a file `<root>/<key>.json` holding `{"sha256": ..., "value": ...}`: the value's
canonical JSON and its checksum, so a torn or edited record is rejected with an error that
names the file instead of being read as data (the file is left as it is). Writes go to a
temporary file `.tmp-<pid>-<random>` in the same folder and are then renamed over the target
(readers see the old or the new record, never part of one); `put(if_absent=True)` creates the
target with a hard link, which fails if it exists, so exactly one of several racing writers
wins; `compare_and_set` holds an exclusive `fcntl` lock on `<root>/.locks/<key>.lock` around
its read and write, so keys that several writers update should be written through
`compare_and_set` only. Names starting with "." are the store's own: keys never have such
parts (`check_key`), so no key can collide with a temporary or lock file.

A folder named like a record would hold the keys under `a.json/` in the file of the key
`a`: a key's folder part that ends in ".json" is written with a "~" after it
(`a.json/b` is `<root>/a.json~/b.json`), and a lock folder part that ends in ".lock" alike
(`.locks/a.lock~/b.lock`). No key part holds "~", so the file store takes exactly the keys
the other backends take, each in a file of its own. (A store written before this rule kept
such a key, `a.json/b`, in the folder `a.json`; that record is no longer found.)

A writer holds an exclusive `flock` on its temporary file until the file is renamed or
removed; opening the store removes the temporary files that no process holds locked and that
are older than `FileStore.stale_temp_age` (what writers that were killed left behind).
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from medjax.store.base import InvalidKeyError, Store, StoreCorruptError, check_key

SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
LOCKS = ".locks"
LOCK_SUFFIX = ".lock"
# Marks a folder whose key part ends in the suffix of the files beside it; `check_key` keeps
# it out of every key part.
FOLDER_MARK = "~"


class _NonFiniteError(ValueError):
    pass


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _non_finite_field(value: Any, where: str = "") -> str | None:
    """The path (`['a'][0]`) of the first NaN or infinity in `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'the value'} = {value}"
    if isinstance(value, dict | list | tuple):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            found = _non_finite_field(v, f"{where}[{k!r}]")
            if found:
                return found
    return None


def _encode(key: str, value: dict[str, Any]) -> bytes:
    """The record file's bytes; refuses what JSON cannot hold, naming the key and field."""
    if not isinstance(value, dict):
        raise TypeError(
            f"store: key {key!r}: values are JSON objects (dict), got {type(value).__name__}."
        )
    try:
        canonical = _canonical(value)
    except ValueError as e:  # allow_nan=False: JSON has no NaN or Infinity.
        field = _non_finite_field(value)
        what = f"non-finite number at {field}" if field else str(e)
        raise ValueError(f"store: key {key!r}: {what}; store finite numbers only.") from None
    except TypeError as e:
        raise TypeError(f"store: key {key!r}: {e}.") from None
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps({"sha256": digest, "value": value}, sort_keys=True).encode()


def _refuse_constant(token: str):
    raise _NonFiniteError(f"non-finite number {token}")


def _finite_float(token: str) -> float:
    number = float(token)
    if not math.isfinite(number):  # "1e999" parses to inf.
        raise _NonFiniteError(f"non-finite number {token}")
    return number


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except InvalidKeyError:
        return False  # A stray file, or one of the store's own.
    return True


def _folder(part: str, suffix: str) -> str:
    """The folder name of a key part among files named `<part><suffix>`."""
    return part + FOLDER_MARK if part.endswith(suffix) else part


def _relative(key: str, suffix: str) -> str:
    """The file of `key` relative to its tree: `a.json/b` -> `a.json~/b.json`."""
    *folders, name = check_key(key).split("/")
    return "/".join([*(_folder(f, suffix) for f in folders), name + suffix])


def _key_of(relative: str) -> str | None:
    """The key whose record is the file `relative` (the inverse of `_relative`), or None
    for a file that is no key's (a stray, or a folder without its mark)."""
    *folders, name = relative.split("/")
    if not name.endswith(SUFFIX):
        return None
    parts = [f[: -len(FOLDER_MARK)] if f.endswith(SUFFIX + FOLDER_MARK) else f for f in folders]
    key = "/".join([*parts, name[: -len(SUFFIX)]])
    if not _is_key(key) or _relative(key, SUFFIX) != relative:
        return None
    return key


def _remove_if_stale(path: str, min_age: float) -> bool:
    """Removes the temporary file `path` if no process holds its lock and it is older than
    `min_age` s; True if removed. Never raises."""
    try:
        fd = os.open(path, os.O_RDWR)  # Writable: NFS turns flock into a write lock.
    except OSError:
        return False  # Renamed by its writer meanwhile, or not ours to touch.
    try:
        info = os.fstat(fd)
        # The age covers the moment between a writer creating the file and locking it.
        if time.time() - info.st_mtime < min_age:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # A live writer holds it.
        now = os.stat(path)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class FileStore(Store):
    # Seconds a temporary file must be unlocked and untouched before opening the store
    # removes it; writers lock theirs microseconds after creating them.
    stale_temp_age = 600.0

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = pathlib.Path(root)
        if not create and not self.root.is_dir():
            raise FileNotFoundError(f"store folder {self.root} does not exist")
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temps()

    def _path(self, key: str) -> pathlib.Path:
        return self.root / _relative(key, SUFFIX)

    def _lock_path(self, key: str) -> pathlib.Path:
        return self.root / LOCKS / _relative(key, LOCK_SUFFIX)

    def _walk(self, top: pathlib.Path) -> Iterator[tuple[pathlib.Path, list[str]]]:
        """(folder, file names) under `top`, skipping folders of the store's own (".")."""
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            yield pathlib.Path(folder), files

    def remove_stale_temps(self) -> list[pathlib.Path]:
        """Removes the temporary files of writers that died (see the module docstring).

        A writer holds an exclusive lock on its temporary file from just after creating it
        until it renames or removes it, and the system drops the lock when the writer dies,
        however it died; so a file that nobody holds locked and that is older than
        `stale_temp_age` s is a dead writer's. (On a file system that does not share locks
        between hosts, only that age protects a stalled writer on another host.) Returns the
        paths removed.
        """
        removed = []
        for folder, names in self._walk(self.root):
            for name in names:
                path = folder / name
                if name.startswith(TEMP_PREFIX) and _remove_if_stale(path, self.stale_temp_age):
                    removed.append(path)
        if removed:
            logging.info("store: removed %d temporary file(s) of dead writers.", len(removed))
        return removed

    @contextlib.contextmanager
    def _temp(self, path: pathlib.Path, data: bytes) -> Iterator[str]:
        """A locked temporary file holding `data` beside `path`, removed on exit unless
        renamed away."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # Tells `remove_stale_temps` that the writer lives.
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fsync(fd)
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # Before closing: an unlocked temporary file is a dead writer's.
            os.close(fd)

    def put(self, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        path, data = self._path(key), _encode(key, value)
        with self._temp(path, data) as tmp:
            if not if_absent:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False

    def _read(self, path: pathlib.Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StoreCorruptError(
                f"store: {path}: not a store record: invalid UTF-8 at byte {e.start}."
            ) from None
        try:
            record = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
            value = record["value"]
            if not isinstance(value, dict):
                raise TypeError(f"the value is a {type(value).__name__}, not an object")
            canonical = _canonical(value)
        except _NonFiniteError as e:
            raise StoreCorruptError(
                f"store: {path}: not a store record: {e} (JSON has no NaN or Infinity)."
            ) from None
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise StoreCorruptError(f"store: {path}: not a store record ({e}).") from None
        if hashlib.sha256(canonical.encode()).hexdigest() != record.get("sha256"):
            raise StoreCorruptError(f"store: {path}: checksum mismatch: the record was altered.")
        return value

    def get(self, key: str) -> dict[str, Any] | None:
        return self._read(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        top = prefix.rpartition("/")[0]  # The folder every key under `prefix` is in.
        top = "/".join(_folder(f, SUFFIX) for f in top.split("/")) if top else ""
        keys = []
        for folder, names in self._walk(self.root / top):
            for name in names:
                key = _key_of((folder / name).relative_to(self.root).as_posix())
                if key is not None and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def compare_and_set(self, key, expected, value) -> bool:
        path, data = self._path(key), _encode(key, value)
        lock = self._lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if self._read(path) != expected:
                    return False
                with self._temp(path, data) as tmp:
                    os.replace(tmp, path)
                return True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
