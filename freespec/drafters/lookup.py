"""Prompt lookup: draft what followed the last time the current suffix appeared.

The request's tokens (prompt + output so far) are indexed incrementally: a dict from each
n-gram (``min_ngram <= n <= max_ngram``) to the positions where it ended, appended as tokens
arrive. A step looks up the last ``n`` tokens for ``n`` from ``max_ngram`` down, takes the
most recent earlier occurrence and drafts the tokens that followed it as a chain. Cost per
step: O(new tokens * n-gram sizes) to index, O(draft) to draft; never a scan of the history.

A match that runs into the end of the context (``... a b c a b c`` matching ``a b c`` three
tokens back) continues periodically: what followed the earlier occurrence includes the
tokens being drafted, so the draft repeats the period (a loop is drafted in full).
"""

from __future__ import annotations

import torch

from .base import DraftContext, Drafter
from .merge import HostTree, merge_trees
from .sizing import SizedRetrieval, TreeSizer


class Retrieval:
    """A retrieval drafter's answer: a host tree, its expected accepted length, its match length."""

    __slots__ = ("tree", "score", "match_len")

    def __init__(self, tree: HostTree, score: float, match_len: int):
        self.tree = tree
        self.score = score
        self.match_len = match_len

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Retrieval(nodes={self.tree.size - 1}, score={self.score:.2f}, match_len={self.match_len})"


class PromptLookup(SizedRetrieval, Drafter):
    """Prompt lookup decoding over the prompt and the output so far.

    Knobs:
      max_ngram (3): longest suffix looked up; shorter ones are tried when it has no match.
      min_ngram (1): shortest suffix that may match (2 avoids drafting on a single token).
      num_pred (10): most tokens drafted after a match (the chain length).
      branches (1): distinct continuations drafted as branches of one tree (most recent match
        first, then shorter n-grams); they share common prefixes.
      max_nodes (None): cap on draft nodes (default ``branches * num_pred``); the engine's
        budget caps it too.
      auto_size (True): cut each draft by the cost model (the engine's measured latency curve
        and the node scores calibrated online against what the target accepted), possibly to
        nothing (a plain step); False drafts the whole chain every time.
    """

    name = "lookup"

    def __init__(
        self,
        vocab_size: int | None = None,
        device: torch.device | str = "cpu",
        max_ngram: int = 3,
        min_ngram: int = 1,
        num_pred: int = 10,
        branches: int = 1,
        max_nodes: int | None = None,
        auto_size: bool = True,
    ):
        if not 1 <= int(min_ngram) <= int(max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if int(num_pred) < 1 or int(branches) < 1:
            raise ValueError("num_pred and branches must be >= 1")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        self.num_pred = int(num_pred)
        self.branches = int(branches)
        self.max_nodes = int(max_nodes) if max_nodes is not None else self.branches * self.num_pred
        self.auto_size = bool(auto_size)
        self.sizer = TreeSizer()
        self.begin([])

    # ------------------------------------------------------------------ index
    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        self.sizer.end()  # the last request's trees still waiting for tokens
        self._toks: list[int] = []
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._done = 0  # positions < _done are indexed (a position is indexed once its successor exists)

    def _sync(self, tokens: list[int]) -> None:
        toks = self._toks
        if len(tokens) < len(toks) or (toks and tokens[len(toks) - 1] != toks[-1]):
            self.begin([])  # a different sequence than the one indexed: start over
            toks = self._toks
        toks.extend(tokens[len(toks):])
        index, lo, hi = self._index, self.min_ngram, self.max_ngram
        for i in range(self._done, len(toks) - 1):
            for n in range(lo, min(hi, i + 1) + 1):
                key = tuple(toks[i - n + 1 : i + 1])
                lst = index.get(key)
                if lst is None:
                    index[key] = [i]
                else:
                    lst.append(i)
        self._done = max(self._done, len(toks) - 1)

    def continuations(self, tokens: list[int], want: int | None = None) -> tuple[list[list[int]], int]:
        """Up to ``want`` distinct continuations of the current suffix (most recent, longest
        n-gram first) and the n-gram length of the first match (0: none)."""
        self._sync(tokens)
        want = self.branches if want is None else want
        toks, L = self._toks, len(self._toks)
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        first_n = 0
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            lst = self._index.get(tuple(toks[L - n :]))
            if not lst:
                continue
            first_n = first_n or n
            # scan a bounded number of recent occurrences: O(draft), never O(history)
            for p in reversed(lst[-4 * want :]):
                cont = toks[p + 1 : p + 1 + self.num_pred]
                if len(cont) < self.num_pred:
                    # the match overlaps the end: what follows repeats with period L-1-p
                    d = L - 1 - p
                    while len(cont) < self.num_pred:
                        cont.append(cont[len(cont) - d])
                key = tuple(cont)
                if cont and key not in seen:
                    seen.add(key)
                    found.append(cont)
                    if len(found) >= want:
                        return found, first_n
        return found, first_n

    # ------------------------------------------------------------------ drafting
    def retrieve(self, ctx: DraftContext, max_nodes: int | None = None, min_match: int | None = None) -> Retrieval | None:
        """Prompt-lookup chains as a tree (None: no match, or one shorter than ``min_match``)."""
        limit = min(self.max_nodes if max_nodes is None else max_nodes, ctx.budget)
        if limit < 1:
            return None
        conts, n = self.continuations(ctx.tokens)
        if not conts or n < int(min_match or 0):
            return None
        root = ctx.tokens[-1]
        # a score per node that falls with depth, faster after a short match: an ordering
        # for cuts, and what the cost model's calibration maps to acceptance rates
        q = 1.0 - 1.0 / (n + 2)
        trees = [HostTree.chain(root, c[:limit], [q ** (d + 1) for d in range(len(c[:limit]))]) for c in conts]
        tree = trees[0] if len(trees) == 1 else merge_trees(trees, limit)
        return Retrieval(tree, float(len(conts[0][:limit])), n)


    def end(self, tokens: list[int]) -> None:
        self.begin([])
