"""The contract every store backend keeps: values round-trip, `if_absent` puts are atomic
and idempotent across processes, compare-and-set is atomic under concurrent writers,
`wait` blocks until a key appears or times out, leases exclude other owners until they
expire, and a corrupted file record is rejected with an error naming it."""

import itertools
import json
import multiprocessing
import threading
import time

import pytest

from medjax import store as store_lib

_namespaces = itertools.count()


@pytest.fixture(params=["memory", "file", "redis"])
def url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "file":
        return f"file://{tmp_path}"
    base = request.getfixturevalue("redis_server")
    return f"{base}?namespace=t{next(_namespaces)}"


@pytest.fixture
def store(url):
    return store_lib.open_store(url)


def test_put_get_list_delete(store):
    assert store.get("a/b") is None
    assert store.put("a/b", {"x": 1, "y": [1.5, "z"]})
    assert store.put("a/c", {"x": 2})
    assert store.put("b", {})
    assert store.get("a/b") == {"x": 1, "y": [1.5, "z"]}
    assert store.list("a/") == ["a/b", "a/c"]
    assert store.list() == ["a/b", "a/c", "b"]
    store.delete("a/b")
    store.delete("a/b")
    assert store.list("a/") == ["a/c"]


@pytest.mark.parametrize("deep_first", [False, True])
def test_a_key_and_the_keys_under_its_file_name_are_distinct(store, deep_first):
    """`a` and `a.json/b` (the file store's record of `a` and a folder of that name), `a`
    and `a.lock/c` (its lock file and a lock folder): every backend keeps them apart,
    whichever is written first."""
    writes = [
        lambda: store.compare_and_set("a", None, {"v": 2}),
        lambda: store.put("a.json/b", {"v": 3}, if_absent=True),
        lambda: store.compare_and_set("a.lock/c", None, {"v": 4}),
        lambda: store.compare_and_set("a.lock", None, {"v": 5}),
    ]
    for write in reversed(writes) if deep_first else writes:
        assert write()
    assert store.get("a") == {"v": 2}
    assert store.get("a.json/b") == {"v": 3}
    assert store.get("a.lock/c") == {"v": 4}
    assert store.get("a.lock") == {"v": 5}
    assert store.compare_and_set("a", {"v": 2}, {"v": 6})
    assert store.compare_and_set("a.lock/c", {"v": 4}, {"v": 7})
    assert store.list() == ["a", "a.json/b", "a.lock", "a.lock/c"]
    assert store.list("a.json/") == ["a.json/b"]
    assert store.list("a.json") == ["a.json/b"]
    assert store.list("a.lock/") == ["a.lock/c"]
    store.delete("a")
    assert store.get("a") is None and store.get("a.json/b") == {"v": 3}
    assert store.list() == ["a.json/b", "a.lock", "a.lock/c"]


def test_if_absent_is_idempotent(store):
    assert store.put("k", {"v": 1}, if_absent=True)
    assert not store.put("k", {"v": 2}, if_absent=True)
    assert store.get("k") == {"v": 1}
    assert store.put("k", {"v": 3})  # A plain put overwrites.
    assert store.get("k") == {"v": 3}


@pytest.mark.parametrize("key", ["", "a//b", "../x", "a/./b", "a b", "/a"])
def test_invalid_keys(store, key):
    with pytest.raises(store_lib.InvalidKeyError):
        store.put(key, {})


def test_compare_and_set_under_threads(store):
    store.put("n", {"n": 0})

    def add(times):
        for _ in range(times):
            while True:
                current = store.get("n")
                if store.compare_and_set("n", current, {"n": current["n"] + 1}):
                    break

    threads = [threading.Thread(target=add, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("n") == {"n": 100}
    assert not store.compare_and_set("n", {"n": 99}, {"n": 0})
    assert store.compare_and_set("new", None, {"n": 1})
    assert not store.compare_and_set("new", None, {"n": 2})


def test_wait_blocks_until_the_key_appears_or_times_out(store):
    start = time.monotonic()
    assert store.wait("late", timeout=0.3) is None
    assert time.monotonic() - start >= 0.3
    threading.Timer(0.2, lambda: store.put("late", {"ok": True})).start()
    start = time.monotonic()
    assert store.wait("late", timeout=5.0) == {"ok": True}
    assert 0.15 <= time.monotonic() - start < 4.0


def test_leases_exclude_other_owners_until_they_expire(store):
    assert store.acquire_lease("sub", "host-a", ttl=0.3)
    assert not store.acquire_lease("sub", "host-b", ttl=0.3)
    assert store.acquire_lease("sub", "host-a", ttl=0.3)  # Renewal (heartbeat).
    time.sleep(0.35)
    assert store.acquire_lease("sub", "host-b", ttl=10.0)
    store.release_lease("sub", "host-a")  # Not the owner: no effect.
    assert not store.acquire_lease("sub", "host-a", ttl=1.0)
    store.release_lease("sub", "host-b")
    assert store.acquire_lease("sub", "host-a", ttl=1.0)


def _race(url, key, worker, results):
    s = store_lib.open_store(url)
    results.put((worker, s.put(key, {"worker": worker}, if_absent=True)))


def _count(url, times):
    s = store_lib.open_store(url)
    for _ in range(times):
        while True:
            current = s.get("n")
            if s.compare_and_set("n", current, {"n": (current or {"n": 0})["n"] + 1}):
                break


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_concurrent_writers_in_several_processes(backend, request, tmp_path):
    if backend == "file":
        url = f"file://{tmp_path}"
    else:
        url = f"{request.getfixturevalue('redis_server')}?namespace=p{next(_namespaces)}"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, "once", w, results)) for w in range(6)]
    procs += [ctx.Process(target=_count, args=(url, 20)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = dict(results.get(timeout=5) for _ in range(6))
    winners = [w for w, won in outcomes.items() if won]
    assert len(winners) == 1
    s = store_lib.open_store(url)
    assert s.get("once") == {"worker": winners[0]}
    assert s.get("n") == {"n": 60}
    # No temporary or lock file shows up as a key.
    assert s.list() == ["n", "once"]


def test_corrupted_file_records_are_rejected(tmp_path):
    s = store_lib.open_store(f"file://{tmp_path}")
    s.put("r/1", {"reward": 1.0})
    path = tmp_path / "r" / "1.json"
    record = json.loads(path.read_text())
    record["value"]["reward"] = 0.0  # Edited without the checksum.
    path.write_text(json.dumps(record))
    with pytest.raises(store_lib.StoreCorruptError, match=r"1\.json.*checksum"):
        s.get("r/1")
    path.write_text('{"sha256": "ab", "val')  # Torn.
    with pytest.raises(store_lib.StoreCorruptError, match=r"1\.json.*not a store record"):
        s.get("r/1")


def test_corrupted_redis_values_are_rejected(redis_server):
    import redis

    s = store_lib.open_store(f"{redis_server}?namespace=corrupt")
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    redis.Redis(port=port).set("medjax:corrupt:r/1", b"{torn")
    with pytest.raises(store_lib.StoreCorruptError, match=r"key 'r/1': not JSON"):
        s.get("r/1")
