"""The in-memory store: one process (both agents' trainers in it), thread-safe."""

import json
import threading
from typing import Any

from medjax.store.base import Store, check_key


class MemoryStore(Store):
    def __init__(self):
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
        with self._lock:
            if if_absent and check_key(key) in self._data:
                return False
            self._data[check_key(key)] = text
            return True

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._data.get(check_key(key))
        return None if text is None else json.loads(text)

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))

    def compare_and_set(self, key, expected, value) -> bool:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
        with self._lock:
            current = self._data.get(check_key(key))
            if (None if current is None else json.loads(current)) != expected:
                return False
            self._data[key] = text
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(check_key(key), None)
