"""Values derived from tensors, kept while those tensors are unchanged.

A bank's projected keys/values, a reader's folded weights and a memoised
fused read are each recomputed only when a tensor they came from changed: in
place (its version counter), or replaced (its storage). The check is a tuple
of builtins: it runs once per reading layer per decode token, where every
Python object it touches is cold (docs/design.md, "The decode hot path").
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

_VERSION = operator.attrgetter("_version")


def stamp(sources: Sequence[Tensor], key: tuple = ()) -> Optional[tuple]:
    """What `sources` are now (versions and storages) and `key`; None when a
    source is an inference tensor (made under torch.inference_mode: it has no
    version counter, so nothing derived from it can be trusted later)."""
    try:
        return (*key, *map(_VERSION, sources), *map(Tensor.data_ptr, sources))
    except RuntimeError:
        return None


class Versioned:
    """A value and the stamp of the tensors (and key) it was derived from."""
    __slots__ = ("value", "sources", "stamp")

    def __init__(self, value: Any, sources: Sequence[Tensor], key: tuple = ()):
        self.value, self.sources = value, tuple(sources)
        self.stamp = stamp(self.sources, key)

    def fresh(self, key: tuple = ()) -> bool:
        """Whether its own sources and `key` are as when it was made."""
        now = stamp(self.sources, key)
        return now is not None and now == self.stamp


def cached(entry: Optional[Versioned], sources: Sequence[Tensor], build: Callable[[], Any],
           key: tuple = ()) -> Versioned:
    """`entry` if it was derived from these very `sources` as they are now
    (and `key`), else a new Versioned(build(), sources, key)."""
    if entry is not None and entry.stamp is not None and entry.stamp == stamp(sources, key):
        return entry
    return Versioned(build(), sources, key)
