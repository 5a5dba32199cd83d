"""Walking an autograd graph (private): shared by the engine (:mod:`mtlkit.engine.autodiff`) and :mod:`mtlkit.engine.gramian`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.autograd.graph import Node


def walk(roots: Iterable[Node | None], stop: Callable[[Node], bool]) -> Iterator[Node]:
    """Each autograd node reachable from ``roots`` once (depth first), not entering nodes for which ``stop`` is true."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen or stop(fn):
            continue
        seen.add(id(fn))
        yield fn
        todo.extend(nxt for nxt, _ in fn.next_functions)
