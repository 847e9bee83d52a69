"""Counting kernel launches and host reads per solve (``bench/bench_launches.py``, tests).

Launchers call :func:`launched` once per kernel launch; solver loops and engines call :func:`host_read` where they
read a device value on the host (each such read is a host synchronisation on a GPU). Nothing is counted unless a
:func:`counting` block is active, so the calls cost one list check otherwise. This works under the Triton
interpreter too, where nothing is asynchronous: the counts are what the same code does on a GPU.
Only fastode's own launches are counted (not the PyTorch operators between them).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Counts", "counting", "launched", "host_read"]


@dataclass
class Counts:
    """``launches``: kernel name -> launches; ``host_reads``: what was read -> reads."""

    launches: Counter = field(default_factory=Counter)
    host_reads: Counter = field(default_factory=Counter)

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_host_reads(self) -> int:
        return sum(self.host_reads.values())


_ACTIVE: list = []


def launched(name: str, n: int = 1) -> None:
    """Note ``n`` launches of kernel ``name``."""
    for c in _ACTIVE:
        c.launches[name] += n


def host_read(what: str, n: int = 1) -> None:
    """Note ``n`` host reads (synchronisations) of ``what``."""
    for c in _ACTIVE:
        c.host_reads[what] += n


@contextlib.contextmanager
def counting():
    """``with counting() as c: ...`` counts the launches and host reads inside the block into ``c``."""
    c = Counts()
    _ACTIVE.append(c)
    try:
        yield c
    finally:
        _ACTIVE.remove(c)
