"""Cost-model sizing for drafters that build host trees (retrieval, merged, draft-model trees).

Their node scores are the drafter's own probability estimates; ``TreeSizer`` maps them to
observed acceptance rates (``cost.ScoreCalibrator``, learnt from every step's emitted tokens)
and cuts a tree to the node count that maximises expected tokens per second
(``cost.choose_size``), or to nothing at all (a plain step).
"""

from __future__ import annotations

import numpy as np

from ..cost import ScoreCalibrator, accepted_nodes, choose_size, order_nodes
from .merge import HostTree, _subset, to_draft


def size_tree(tree: HostTree, curve: np.ndarray, budget: int) -> HostTree | None:
    """The best-paying cut of ``tree`` by its scores (acceptance probabilities); None = no draft."""
    if tree.size <= 1:
        return None
    order = order_nodes(tree.scores, tree.parents)
    scores = np.asarray(tree.scores, dtype=np.float64)[order]
    k = choose_size(scores, curve, max_nodes=budget)
    if k == 0:
        return None
    if k >= tree.size - 1:
        return tree
    return _subset(tree, sorted(int(i) for i in order[:k]))


class TreeSizer:
    """Calibrated scores for one drafter's trees, learnt online."""

    def __init__(self):
        self.cal = ScoreCalibrator()
        self._last: HostTree | None = None  # the raw tree of this step, to learn from
        self._bins: np.ndarray | None = None  # its scores' calibration bins

    def calibrated(self, tree: HostTree) -> HostTree:
        """The same tree with scores mapped to estimated acceptance probabilities."""
        s = self.scores(tree)
        return HostTree(tree.tokens, tree.parents, [1.0, *s.tolist()])

    def scores(self, tree: HostTree) -> np.ndarray:
        """Estimated acceptance probabilities of ``tree``'s nodes 1.. (learnt from, like
        :meth:`calibrated`)."""
        self._last = tree
        if tree.size <= 1:
            self._bins = None
            return np.zeros(0)
        self._bins = self.cal.bin(tree.scores[1:])
        return self.cal.rates(self._bins)

    def cut(self, tree: HostTree, ctx) -> HostTree | None:
        """``tree`` cut to what pays at ``ctx``'s latency curve (None: a plain step); the tree
        as it is when there is no curve."""
        if ctx.latency is None:
            return tree
        return size_tree(self.calibrated(tree), ctx.latency, ctx.budget)

    def learn(self, accepted: list[int]) -> None:
        """Which of the last tree's nodes the target took (drafted or cut) -> calibration."""
        t, self._last = self._last, None
        if t is None or t.size <= 1:
            return
        ok = accepted_nodes(t.tokens, t.parents, accepted)
        self.cal.update(t.scores[1:], ok[1:], bins=self._bins)


class SizedRetrieval:
    """Drafter methods for retrieval drafters (``retrieve(ctx)``, ``auto_size``, ``sizer``):
    propose the retrieved tree cut by the cost model, and learn from what was accepted."""

    auto_size: bool
    sizer: TreeSizer

    @property
    def wants_latency(self) -> bool:
        return self.auto_size

    def propose(self, ctx):
        r = self.retrieve(ctx)
        if r is None:
            return None
        tree = self.sizer.cut(r.tree, ctx) if self.auto_size else r.tree
        return None if tree is None else to_draft(tree, ctx.root.device)

    def observe(self, draft, logits, accepted: list[int]) -> None:
        self.sizer.learn(accepted)
