"""A store on a Redis server (`pip install medjax[redis]`).

Keys live under a namespace (`medjax:<namespace>:<key>`); values are canonical JSON.
`put(if_absent=True)` is `SET NX`; `compare_and_set` is a WATCH / MULTI / EXEC transaction
that retries only when the key changed under it. The password, if any, is read from the
environment variable named by `password_env` when connecting and is never stored on the
object, logged or written anywhere.
"""

import json
import os
from typing import Any

from medjax.store.base import Store, StoreCorruptError, check_key


class RedisStore(Store):
    """Args:
    host, port, db: the server (127.0.0.1 by default).
    namespace: separates runs that share a server.
    password_env: the environment variable holding the password (unset: no password).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        *,
        namespace: str = "default",
        password_env: str = "MEDJAX_REDIS_PASSWORD",
    ):
        import redis

        self._redis = redis
        self._client = redis.Redis(
            host=host, port=port, db=db, password=os.environ.get(password_env) or None,
            socket_timeout=30, decode_responses=True,
        )  # fmt: skip
        self._prefix = f"medjax:{check_key(namespace)}:"
        self.address = f"redis://{host}:{port}/{db}"

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    @staticmethod
    def _dump(value: dict[str, Any]) -> str:
        if not isinstance(value, dict):
            raise TypeError(f"store: values are JSON objects (dict), got {type(value).__name__}.")
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def _load(self, key: str, text: str | None) -> dict[str, Any] | None:
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreCorruptError(f"store: {self.address} key {key!r}: not JSON ({e}).") from None
        if not isinstance(value, dict):
            raise StoreCorruptError(f"store: {self.address} key {key!r}: not a JSON object.")
        return value

    def put(self, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        return bool(self._client.set(self._key(key), self._dump(value), nx=if_absent))

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load(key, self._client.get(self._key(key)))

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        pattern = self._prefix + _escape_glob(prefix) + "*"
        return sorted(k[len(self._prefix) :] for k in self._client.scan_iter(match=pattern))

    def compare_and_set(self, key, expected, value) -> bool:
        name, text = self._key(key), self._dump(value)
        with self._client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    if self._load(key, pipe.get(name)) != expected:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(name, text)
                    pipe.execute()
                    return True
                except self._redis.WatchError:
                    continue  # Changed between the read and the write: read again.

    def delete(self, key: str) -> None:
        self._client.delete(self._key(key))


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
