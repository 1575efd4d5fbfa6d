"""Host-side draft trees: build, merge by common prefix, cap, and lay on the device.

Retrieval drafters (lookup, suffix) and the tree-combining drafters (hybrid, fused) build
their trees on the host as plain lists; ``to_draft`` turns one into a ``Draft`` on the
model's device. Shapes of recurring trees (chains above all) are cached, so a step costs one
small host->device copy of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch

from ..tree import Draft, TreeShape


@dataclass
class HostTree:
    """A draft tree on the host. Node 0 is the root; ``parents[i] < i`` (topological order).

    ``scores[i]`` is a priority (a probability estimate where the drafter has one): when a
    tree is cut down, the highest-scoring nodes stay. Scores never grow along a path
    (``merge_trees`` enforces it), so the kept nodes are closed under parents.
    """

    tokens: list[int]
    parents: list[int]
    scores: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.scores:
            # no estimate: earlier nodes first
            self.scores = [1.0] + [1.0 - i * 1e-6 for i in range(1, len(self.tokens))]
        if not (len(self.tokens) == len(self.parents) == len(self.scores)):
            raise ValueError("a host tree needs one parent and one score per token")

    @property
    def size(self) -> int:
        """Nodes including the root."""
        return len(self.tokens)

    @staticmethod
    def chain(root: int, tokens: Sequence[int], scores: Sequence[float] | None = None) -> "HostTree":
        n = len(tokens)
        sc = [1.0] + (list(scores) if scores is not None else [1.0 - i * 1e-6 for i in range(1, n + 1)])
        return HostTree([int(root)] + [int(t) for t in tokens], list(range(-1, n)), sc)

    def depth(self) -> list[int]:
        d = [0] * len(self.parents)
        for i in range(1, len(d)):
            d[i] = d[self.parents[i]] + 1
        return d

    def paths(self) -> list[tuple[int, ...]]:
        """Token path from the root (excluded) to every node (for tests and debugging)."""
        out: list[tuple[int, ...]] = [()]
        for i in range(1, len(self.tokens)):
            out.append(out[self.parents[i]] + (self.tokens[i],))
        return out


def merge_trees(trees: Sequence[HostTree], max_nodes: int | None = None) -> HostTree:
    """Union of the trees' token paths from a shared root, common prefixes stored once.

    The root token is the first tree's (every tree is rooted at the same committed token).
    A merged node's score is the highest score any tree gives that path, capped by its
    parent's score. With ``max_nodes`` (draft nodes, root excluded) the highest-scoring nodes
    are kept (ties: earlier trees, earlier nodes first); the result is closed under parents
    and in topological order.
    """
    trees = [t for t in trees if t is not None]
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    tokens = [trees[0].tokens[0]]
    parents = [-1]
    scores = [float("inf")]
    child: dict[tuple[int, int], int] = {}
    for t in trees:
        where = [0] * t.size  # this tree's node -> merged node
        tt, tp, ts = t.tokens, t.parents, t.scores
        for i in range(1, t.size):
            p = where[tp[i]]
            key = (p, tt[i])
            j = child.get(key)
            s = min(float(ts[i]), scores[p])
            if j is None:
                j = len(tokens)
                child[key] = j
                tokens.append(tt[i])
                parents.append(p)
                scores.append(s)
            elif s > scores[j]:
                scores[j] = s  # children keep <= parent: a raise here never exceeds the parent
            where[i] = j
    scores[0] = 1.0 if len(scores) == 1 else max(1.0, max(scores[1:]))
    n = len(tokens) - 1
    if max_nodes is not None and n > max_nodes:
        order = sorted(range(1, n + 1), key=lambda i: (-scores[i], i))
        keep = sorted(order[: max(0, int(max_nodes))])
        return _subset(HostTree(tokens, parents, scores), keep)
    return HostTree(tokens, parents, scores)


def _subset(tree: HostTree, keep: list[int]) -> HostTree:
    """The root and the nodes ``keep`` (ascending, closed under parents), renumbered."""
    new = {0: 0}
    tokens, parents, scores = [tree.tokens[0]], [-1], [tree.scores[0]]
    for i in keep:
        p = tree.parents[i]
        if p not in new:  # not closed: skip the orphan (cannot happen with monotone scores)
            continue
        new[i] = len(tokens)
        tokens.append(tree.tokens[i])
        parents.append(new[p])
        scores.append(tree.scores[i])
    return HostTree(tokens, parents, scores)


def prune(tree: HostTree, keep_child) -> HostTree:
    """Drop every subtree whose top node fails ``keep_child(node_index)``."""
    alive = [True] * tree.size
    keep = []
    for i in range(1, tree.size):
        alive[i] = alive[tree.parents[i]] and bool(keep_child(i))
        if alive[i]:
            keep.append(i)
    return _subset(tree, keep)


def cap(tree: HostTree, max_nodes: int) -> HostTree:
    """The ``max_nodes`` best nodes (root excluded) of one tree."""
    if tree.size - 1 <= max_nodes:
        return tree
    return merge_trees([tree], max_nodes)


@lru_cache(maxsize=2048)
def shape_for(parents: tuple[int, ...], device: str) -> TreeShape:
    """A cached ``TreeShape`` (trees recur: chains of each length above all)."""
    return TreeShape.from_parents(parents, device)


def to_draft(tree: HostTree, device: torch.device | str) -> Draft:
    device = torch.device(device)
    shape = shape_for(tuple(tree.parents), str(device))
    tokens = torch.tensor(tree.tokens, dtype=torch.long, device=device)
    return Draft(tokens, shape)


def from_draft(draft: Draft, scores: Sequence[float] | None = None) -> HostTree:
    """A device draft as a host tree (one device->host copy)."""
    return HostTree(draft.tokens.tolist(), list(draft.shape.parents_list), list(scores) if scores else [])
