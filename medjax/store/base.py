"""The store interface and what every backend shares: key rules, leases, waiting."""

import abc
import re
import time
from typing import Any

_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


class InvalidKeyError(ValueError):
    """A key that is not "/"-separated parts of [A-Za-z0-9_.-], none starting with "."."""


class StoreCorruptError(ValueError):
    """A stored record that fails its checksum or does not parse; names the record."""


def check_key(key: str, *, prefix: bool = False) -> str:
    """`key` if valid; a prefix may be empty or end in "/".

    A part may not start with "." (which also rules out "." and ".."): the file store keeps
    its temporary and lock files under such names, so no key can collide with them or be
    hidden among them, and every backend takes the same keys.
    """
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    parts = body.split("/")
    if not all(_PART.match(p) and not p.startswith(".") for p in parts):
        raise InvalidKeyError(
            f"store: invalid key {key!r}: use '/'-separated parts of letters, digits, '_', '.'"
            " and '-', none empty or starting with '.' (names the file store keeps for itself)."
        )
    return key


class Store(abc.ABC):
    """put / get / list / compare_and_set / wait, and leases built on compare_and_set."""

    poll_interval = 0.05

    @abc.abstractmethod
    def put(self, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        """Stores `value`; with `if_absent` only when the key is new (atomic). Returns
        whether this call wrote it."""

    @abc.abstractmethod
    def get(self, key: str) -> dict[str, Any] | None:
        """The value, or None."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, sorted."""

    @abc.abstractmethod
    def compare_and_set(
        self, key: str, expected: dict[str, Any] | None, value: dict[str, Any]
    ) -> bool:
        """Writes `value` only if the current value equals `expected` (None: absent)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Removes the key (no error when absent)."""

    def wait(self, key: str, timeout: float) -> dict[str, Any] | None:
        """Blocks until `key` exists and returns its value, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.get(key)
            if value is not None or time.monotonic() >= deadline:
                return value
            time.sleep(min(self.poll_interval, max(deadline - time.monotonic(), 0.0)))

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Takes (or renews, for the same owner) the lease `leases/<name>` for `ttl` s; False
        while another owner holds an unexpired one."""
        key = f"leases/{name}"
        while True:
            current = self.get(key)
            now = time.time()
            if current is not None and current["owner"] != owner and current["expires"] > now:
                return False
            if self.compare_and_set(key, current, {"owner": owner, "expires": now + ttl}):
                return True

    def release_lease(self, name: str, owner: str) -> None:
        key = f"leases/{name}"
        current = self.get(key)
        if current is not None and current["owner"] == owner:
            self.compare_and_set(key, current, {"owner": owner, "expires": 0.0})
