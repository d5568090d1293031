"""A small shared store for decoupled trainers that exchange statistics, never tensors.

    store = store_lib.open_store("file:///shared/run1")     # or "memory://"
    store.put("rollouts/q1/0", {"reward": 1.0}, if_absent=True)   # idempotent
    store.get("rollouts/q1/0"); store.list("rollouts/q1/")
    store.wait("rollouts/q2/0", timeout=30.0)                # blocks until it exists
    store.compare_and_set("cursor", {"n": 3}, {"n": 4})      # atomic update
    store.acquire_lease("sub-trainer", owner="host-1", ttl=30.0)

Values are JSON objects. Keys are "/"-separated names of [A-Za-z0-9_.-] parts. Backends:
`MemoryStore` (one process), `FileStore` (a folder both hosts see) and `RedisStore`
(`medjax.store.redis_store`, the `[redis]` extra).
"""

from medjax.store.base import InvalidKeyError, Store, StoreCorruptError, check_key
from medjax.store.files import FileStore
from medjax.store.memory import MemoryStore


def open_store(url: str, *, create: bool = True) -> Store:
    """`memory://`, `file://PATH` (or a bare path), or
    `redis://HOST:PORT[/DB][?namespace=NAME]` (password from $MEDJAX_REDIS_PASSWORD).
    `create=False`: a file store's folder must exist already."""
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("redis://"):
        from urllib.parse import parse_qs, urlparse

        from medjax.store.redis_store import RedisStore

        parsed = urlparse(url)
        namespace = parse_qs(parsed.query).get("namespace", ["default"])[0]
        db = int(parsed.path.strip("/") or 0)
        return RedisStore(
            parsed.hostname or "127.0.0.1", parsed.port or 6379, db, namespace=namespace
        )
    if url.startswith("file://"):
        return FileStore(url[len("file://") :], create=create)
    if url.startswith("gs://"):
        raise ValueError(
            f"open_store: {url!r}: object stores cannot give the atomic if_absent and"
            " compare-and-set this store promises (GCS has them only as generation"
            " preconditions, which etils.epath does not expose); use redis://HOST:PORT, or"
            " file:// on a file system both hosts mount."
        )
    if "://" in url:
        raise ValueError(
            f"open_store: unknown store {url!r}; use memory://, file://PATH or redis://HOST:PORT."
        )
    return FileStore(url, create=create)


__all__ = [
    "FileStore",
    "InvalidKeyError",
    "MemoryStore",
    "Store",
    "StoreCorruptError",
    "check_key",
    "open_store",
]
