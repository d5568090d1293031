"""A store in a folder that every process sees (a local or network file system).

Each key is a file `<root>/<key>.json` holding `{"sha256": ..., "value": ...}`: the value's
canonical JSON and its checksum, so a torn or edited record is rejected with an error that
names the file instead of being read as data. Writes go to a temporary file in the same
folder and are then renamed over the target (readers see the old or the new record, never
part of one); `put(if_absent=True)` creates the target with a hard link, which fails if it
exists, so exactly one of several racing writers wins; `compare_and_set` holds an
exclusive `fcntl` lock on `<root>/.locks/<key>.lock` around its read and write, so keys
that several writers update should be written through `compare_and_set` only.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

from medjax.store.base import Store, StoreCorruptError, check_key

SUFFIX = ".json"


def _encode(value: dict[str, Any]) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"store: values are JSON objects (dict), got {type(value).__name__}.")
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps({"sha256": digest, "value": value}, sort_keys=True, allow_nan=False)


class FileStore(Store):
    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = pathlib.Path(root)
        if not create and not self.root.is_dir():
            raise FileNotFoundError(f"store folder {self.root} does not exist")
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        return self.root / (check_key(key) + SUFFIX)

    def _write_temp(self, path: pathlib.Path, value) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_encode(value))
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, value)
        try:
            if not if_absent:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _read(self, path: pathlib.Path) -> dict[str, Any] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            value = record["value"]
            expected = _encode(value)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"store: {path}: not a store record ({e}).") from None
        if json.loads(expected)["sha256"] != record.get("sha256"):
            raise StoreCorruptError(f"store: {path}: checksum mismatch: the record was altered.")
        return value

    def get(self, key: str) -> dict[str, Any] | None:
        return self._read(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        keys = []
        for path in self.root.rglob("*" + SUFFIX):
            rel = path.relative_to(self.root).as_posix()
            if rel.startswith(".") or "/." in rel:
                continue  # Temporary files and locks.
            key = rel[: -len(SUFFIX)]
            if key.startswith(prefix):
                keys.append(key)
        return sorted(keys)

    def compare_and_set(self, key, expected, value) -> bool:
        path = self._path(key)
        lock = self.root / ".locks" / (key + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if self._read(path) != expected:
                    return False
                os.replace(self._write_temp(path, value), path)
                return True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
