"""Cost-model sizing for drafters that build host trees (retrieval, merged, draft-model trees).

Their node scores are the drafter's own probability estimates; ``TreeSizer`` maps them to
observed acceptance rates (``cost.ScoreCalibrator``, learnt from every step's emitted tokens)
and cuts a tree to the node count that maximises expected tokens per second
(``cost.choose_size``), or to nothing at all (a plain step).
"""

from __future__ import annotations

import functools

import numpy as np

from ..cost import ScoreCalibrator, choose_size, path_outcome
from .merge import HostTree, _subset, to_draft


def size_tree(tree: HostTree, curve: np.ndarray, budget: int) -> HostTree | None:
    """The best-paying cut of ``tree`` by its scores (acceptance probabilities); None = no draft."""
    if tree.size <= 1:
        return None
    sc = tree.scores
    # order_nodes' rule (score high to low, ties in index order) on Python lists: a tree has a
    # few dozen nodes, and numpy's per-call cost exceeded the work (see choose_size)
    order = sorted(range(1, tree.size), key=sc.__getitem__, reverse=True)
    k = choose_size([sc[i] for i in order], curve, max_nodes=budget)
    if k == 0:
        return None
    if k >= tree.size - 1:
        return tree
    return _subset(tree, sorted(order[:k]))


class TreeSizer:
    """Calibrated scores for one drafter's trees, learnt online.

    A tree is learnt from once its nodes' outcomes are known: a step's tokens end at its bonus
    token, and a node on that path with children below it (a retrieval chain left out of the
    step, or longer than what the step accepted) waits for the next steps' tokens (greedy
    output does not depend on the draft). Learnt at once, those nodes counted as rejected: on
    the H100 the 0.95-1.0 bin, accepted 40% of the time, was learnt as 18%.
    """

    def __init__(self):
        self.cal = ScoreCalibrator()
        self._last: HostTree | None = None  # the raw tree of this step, to learn from
        self._bins: np.ndarray | None = None  # its scores' calibration bins
        self._held: list[tuple[HostTree, np.ndarray, list[int]]] = []  # (tree, bins, tokens since)

    def calibrated(self, tree: HostTree) -> HostTree:
        """The same tree with scores mapped to estimated acceptance probabilities."""
        return HostTree(tree.tokens, tree.parents, [1.0, *self.scores(tree)])

    def scores(self, tree: HostTree) -> list[float]:
        """Estimated acceptance probabilities of ``tree``'s nodes 1.. (learnt from, like
        :meth:`calibrated`). (Python lists: a tree is a few dozen nodes at most, where numpy's
        per-call cost exceeds the work; this runs at every step.)"""
        self._last = tree
        if tree.size <= 1:
            self._bins = None
            return []
        self._bins = bins = self.cal.bin_list(tree.scores[1:])
        rate = self.cal.map_list
        return [rate[b] for b in bins]

    def cut(self, tree: HostTree, ctx) -> HostTree | None:
        """``tree`` cut to what pays at ``ctx``'s latency curve (None: a plain step); the tree
        as it is when there is no curve."""
        if ctx.latency is None:
            return tree
        return size_tree(self.calibrated(tree), ctx.latency, ctx.budget)

    def learn(self, accepted: list[int], defer: bool = False):
        """This step's tokens: which nodes the target took (drafted or cut) -> calibration, for
        the last tree and the earlier ones still waiting for tokens. ``defer``: return that
        work as a callable instead, to run while the next step runs on the device (the next
        tree's scores then come from a map one step older); deferred calls must keep their
        order."""
        t, bins, self._last = self._last, self._bins, None
        if not self._held and (t is None or t.size <= 1):
            return None
        if defer:
            return functools.partial(self._learn_step, t, bins, accepted)
        self._learn_step(t, bins, accepted)
        return None

    def _learn_step(self, t: HostTree | None, bins, accepted: list[int]) -> None:
        if self._held:
            held, self._held = self._held, []
            for h in held:
                h[2].extend(accepted)
                self._learn(*h)
        if t is not None and t.size > 1:
            self._learn(t, bins, list(accepted))

    def _learn(self, tree: HostTree, bins: np.ndarray, tokens: list[int], force: bool = False) -> None:
        ok, final = path_outcome(tree.tokens, tree.parents, tokens)
        if final or force:
            self.cal.update(tree.scores[1:], ok[1:], bins=bins)
        else:
            self._held.append((tree, bins, tokens))

    def end(self) -> None:
        """The request ended: the trees still waiting learn from the tokens there were (no
        more come: what was not reached was not accepted)."""
        self._last = None
        held, self._held = self._held, []
        for h in held:
            self._learn(*h, force=True)


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
