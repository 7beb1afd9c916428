"""Dominators of a DAG, and the nodes every path from its entry to its exit must pass.

The graph is given in topological order as predecessor lists over ``0..n-1``. Because it is
acyclic one sweep in that order settles every immediate dominator (Cooper, Harvey and Kennedy,
"A Simple, Fast Dominance Algorithm", 2001, with the DAG shortcut).
"""
from __future__ import annotations

from typing import Sequence


def immediate_dominators(predecessors: Sequence[Sequence[int]]) -> list[int]:
    """``idom[v]`` for every vertex; vertex 0 is the single entry and its own dominator.

    Every other vertex must have at least one predecessor, and predecessors must come first.
    """
    idom = [0] * len(predecessors)
    for vertex in range(1, len(predecessors)):
        preds = predecessors[vertex]
        if not preds:
            raise ValueError(f"vertex {vertex} is not reachable from the entry")
        dominator = preds[0]
        for other in preds[1:]:
            dominator = _common_dominator(idom, dominator, other)
        idom[vertex] = dominator
    return idom


def _common_dominator(idom: list[int], a: int, b: int) -> int:
    # In topological numbering a dominator always has the smaller number.
    while a != b:
        while a > b:
            a = idom[a]
        while b > a:
            b = idom[b]
    return a


def articulation_vertices(predecessors: Sequence[Sequence[int]]) -> list[int]:
    """Vertices on every path from the entry (0) to the exit (the last vertex), in order.

    These are the exit's dominators; in a DAG where every vertex lies on some entry-exit path they
    also post-dominate the entry, so the vertices between two of them form a single-entry,
    single-exit region.
    """
    idom = immediate_dominators(predecessors)
    chain, vertex = [], len(predecessors) - 1
    while vertex != 0:
        vertex = idom[vertex]
        chain.append(vertex)
    return [v for v in reversed(chain) if v != 0]
