"""What every benchmark records beside its times: the machine and the versions
(`medjax.reproductions.provenance`), and a timer."""

import time

from medjax.reproductions.provenance import machine, versions

__all__ = ["machine", "timed", "versions"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
