"""Suffix decoding (SuffixDecoding, arXiv 2411.04975): frequency trees from everything seen.

Two stores are searched each step: the current request (prompt + output so far, indexed as it
grows) and a process-wide store of earlier requests (prompts and outputs), bounded in tokens
with the oldest requests evicted first.

Structure. A store keeps its sequences in one token buffer (sequences separated by a
sentinel) and an index from n-gram hashes (for a few lengths, ``key_lengths``) to the
positions where they ended. Matching the context's suffix is: look up the longest indexed
n-gram of the context, then extend each hit backwards to its exact match length (up to
``max_match``). The hits whose match is at least ``m`` are exactly the occurrences stored at
the depth-``m`` node of a suffix trie over the same text, and the continuations after them
are that node's subtree: so the draft is built as from a bounded-depth suffix tree, with
O(N) memory (a suffix trie of depth D costs O(N * D) nodes) and eviction that is a cut of
the buffer's front plus an occasional rebuild of the index.

Drafting (as SuffixDecoding): from the matched occurrences grow a tree best-first by the
empirical probability of each continuation (count(child) / count(node), multiplied along the
path), children below ``min_prob`` never taken, at most ``alpha * match_len + offset`` nodes
(the adaptive speculation length: longer matches earn bigger drafts), within ``max_nodes``
and the engine's budget. Several match lengths are tried (the longest few) and the tree with
the highest expected accepted length (the sum of its node probabilities) wins.
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from typing import Sequence

import torch

from .base import DraftContext, Drafter
from .lookup import Retrieval
from .merge import HostTree
from .sizing import SizedRetrieval, TreeSizer

SEP = -1  # between sequences in a store's buffer; never a token, so matches stop at it


class SuffixIndex:
    """Token sequences with an n-gram position index.

    ``add(tokens)`` stores a finished sequence (evicting the oldest ones while more than
    ``max_tokens`` are stored); ``sync(tokens)`` grows one open sequence in place (the
    current request). Positions are absolute (they survive eviction); ``base`` is the
    absolute position of ``buf[0]``.
    """

    def __init__(self, max_tokens: int | None = None, key_lengths: Sequence[int] = (1, 2, 4, 8)):
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.key_lengths = tuple(sorted({int(n) for n in key_lengths}))
        if not self.key_lengths or self.key_lengths[0] < 1:
            raise ValueError("key_lengths must be positive n-gram sizes")
        self.clear()

    def clear(self) -> None:
        self.buf: list[int] = []
        self.base = 0
        # The index: entry e holds position _pos[e]; _prev[e] is the previous entry of the same
        # n-gram (-1: none); _head maps an n-gram's hash to its latest entry. Flat arrays and an
        # int -> int dict rather than a list of positions per n-gram: the cyclic garbage collector
        # tracks every list (a full store held ~0.6M), and each of its full collections then took
        # ~0.12 s on this CPU (~0.4 s in a GPU run), a stall in whichever step triggered it; it
        # skips a dict of ints altogether.
        self._head: dict[int, int] = {}
        self._pos = array("q")
        self._prev = array("q")
        self.seqs: deque[tuple[int, int]] = deque()  # (start, end) absolute, end exclusive (before SEP)
        self._n_tokens = 0
        self._done = 0  # absolute positions < _done are indexed

    @property
    def entries(self) -> int:
        """Positions held by the index (dead ones included until a rebuild)."""
        return len(self._pos)

    # ------------------------------------------------------------------ size
    @property
    def n_tokens(self) -> int:
        """Tokens stored (sentinels excluded)."""
        return self._n_tokens

    @property
    def n_sequences(self) -> int:
        return len(self.seqs)

    # ------------------------------------------------------------------ insert
    def _index_upto(self, stop: int) -> None:
        """Index the n-grams ending at absolute positions [_done, stop)."""
        buf, base, keys = self.buf, self.base, self.key_lengths
        head, pos, prev = self._head, self._pos, self._prev
        for p in range(max(self._done, base), stop):
            i = p - base
            if buf[i] == SEP:
                continue
            for n in keys:
                if n > i + 1:
                    break
                gram = tuple(buf[i - n + 1 : i + 1])
                if SEP in gram:
                    break
                h = hash(gram)
                prev.append(head.get(h, -1))
                head[h] = len(pos)
                pos.append(p)
        self._done = max(self._done, stop)

    def add(self, tokens: Sequence[int]) -> None:
        """Store a finished sequence; evict the oldest ones to stay within ``max_tokens``."""
        tokens = [int(t) for t in tokens]
        if self.max_tokens is not None and len(tokens) > self.max_tokens:
            tokens = tokens[-self.max_tokens :]
        if not tokens:
            return
        if self.max_tokens is not None:
            while self.seqs and self.n_tokens + len(tokens) > self.max_tokens:
                self._evict_oldest()
        start = self.base + len(self.buf)
        self.buf.extend(tokens)
        self.buf.append(SEP)
        self.seqs.append((start, start + len(tokens)))
        self._n_tokens += len(tokens)
        # the last token has no continuation: nothing to index at it
        self._index_upto(start + len(tokens) - 1)
        self._done = start + len(tokens) + 1

    def _evict_oldest(self) -> None:
        s, e = self.seqs.popleft()
        self._n_tokens -= e - s
        cut = e + 1 - self.base  # drop through the sentinel
        del self.buf[:cut]
        self.base += cut
        live = len(self.buf)
        if self.entries > 2 * max(live, 1) * len(self.key_lengths):
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop the dead positions: re-index what the buffer still holds."""
        self._head = {}
        self._pos = array("q")
        self._prev = array("q")
        self._done = self.base
        for s, e in self.seqs:
            self._done = s
            self._index_upto(e - 1)
        self._done = self.base + len(self.buf)

    def sync(self, tokens: list[int]) -> None:
        """Make this (single, open) sequence equal ``tokens``: index what is new.

        Positions are indexed once their successor exists, so the context's own end never
        matches itself.
        """
        if len(tokens) < len(self.buf) or (self.buf and tokens[len(self.buf) - 1] != self.buf[-1]) or self.base:
            self.clear()
        self.buf.extend(tokens[len(self.buf):])
        self.seqs = deque([(0, len(self.buf))])
        self._n_tokens = len(self.buf)
        self._index_upto(len(self.buf) - 1)

    # ------------------------------------------------------------------ match
    def hits(self, context: Sequence[int], n: int, limit: int) -> list[int]:
        """Absolute end positions of the n-gram ``context[-n:]``, most recent first (at most ``limit``)."""
        e = self._head.get(hash(tuple(context[-n:])), -1)
        out = []
        base, done, pos, prev = self.base, self._done, self._pos, self._prev
        while e >= 0:
            p = pos[e]
            if p < base:
                break  # evicted (entries of one n-gram run from newest to oldest)
            if p < done:
                out.append(p)
                if len(out) >= limit:
                    break
            e = prev[e]
        return out

    def match_len(self, p: int, context: Sequence[int], max_match: int) -> int:
        """How many tokens before (and at) absolute position ``p`` equal the end of ``context``."""
        buf, i, L = self.buf, p - self.base, len(context)
        m = 0
        top = min(max_match, L, i + 1)
        while m < top and buf[i - m] == context[L - 1 - m]:
            m += 1
        return m

    def occurrences(self, context: Sequence[int], max_match: int, limit: int, levels: int = 2, min_len: int = 1):
        """``[(match_len, next_index)]`` for the longest indexed n-grams of the context that
        occur: hits from the longest such key length and the next ``levels - 1`` shorter ones,
        each extended to its exact match length. ``next_index`` indexes ``buf``. ``min_len``:
        only matches this long are wanted, so key lengths below the longest one within it are
        not searched (a match of ``min_len`` is a hit of that one)."""
        found: dict[int, int] = {}
        got = 0
        floor = max((n for n in self.key_lengths if n <= min_len), default=1)
        for n in reversed(self.key_lengths):
            if n > len(context) or n < floor:
                continue
            hs = self.hits(context, n, limit)
            if not hs:
                continue
            for p in hs:
                if p not in found:
                    m = self.match_len(p, context, max_match)
                    if m > 0:
                        found[p] = m
            got += 1
            if got >= levels:
                break
        return [(m, p - self.base + 1) for p, m in found.items()]

    def memory_entries(self) -> int:
        """Buffer slots plus index entries: what the memory bound is about."""
        return len(self.buf) + self.entries + len(self._head)


def build_tree(
    root: int,
    cursors: list[tuple[list[int], int, int]],
    max_nodes: int,
    max_depth: int,
    min_prob: float,
) -> tuple[HostTree, float]:
    """Best-first frequency tree over the continuations at ``cursors`` ((buffer, next index,
    period)). A cursor that runs off its buffer's end with a period ``d > 0`` continues ``d``
    tokens back (the current request: a match overlapping the context's end repeats).

    A node's probability is the share of its parent's occurrences that continue with its
    token, times the parent's probability. Returns the tree and the sum of its probabilities
    (the expected number of accepted tokens if the estimates hold).
    """
    tokens, parents, scores = [root], [-1], [1.0]
    heap: list = []
    tick = 0

    def push(node: int, curs: list[tuple[list[int], int, int]], prob: float, depth: int) -> None:
        nonlocal tick
        if depth >= max_depth or not curs:
            return
        groups: dict[int, list[tuple[list[int], int, int]]] = {}
        for buf, i, d in curs:
            if i >= len(buf):
                if not d:
                    continue
                i -= d * ((i - len(buf)) // d + 1)
            t = buf[i]
            if t != SEP:
                g = groups.get(t)
                if g is None:
                    groups[t] = [(buf, i + 1, d)]
                else:
                    g.append((buf, i + 1, d))
        total = len(curs)
        for t, g in groups.items():
            p = prob * len(g) / total
            if p >= min_prob:
                tick += 1
                heapq.heappush(heap, (-p, tick, node, t, g, depth + 1))

    push(0, cursors, 1.0, 0)
    score = 0.0
    while heap and len(tokens) - 1 < max_nodes:
        negp, _, par, t, g, d = heapq.heappop(heap)
        idx = len(tokens)
        tokens.append(t)
        parents.append(par)
        scores.append(-negp)
        score -= negp
        push(idx, g, -negp, d)
    return HostTree(tokens, parents, scores), score


class SuffixDrafter(SizedRetrieval, Drafter):
    """Suffix decoding over the current request and a bounded store of earlier requests.

    Knobs:
      max_nodes (32): most draft nodes (the engine's budget caps it too).
      max_depth (32): deepest draft node.
      alpha (2.0), offset (0.0): a match of length m drafts at most ``alpha * m + offset``
        nodes (SuffixDecoding's adaptive speculation length).
      min_prob (0.1): children whose estimated probability (product along the path) is lower
        are not drafted.
      min_match (1): shortest suffix match that drafts anything.
      max_match (32): how far back a match is extended.
      max_candidates (64): most recent occurrences examined per store and key length.
      levels (3): match lengths tried (the longest few); the best-scoring tree wins.
      store_tokens (200000): tokens kept in the process-wide store of earlier requests
        (prompts and outputs; oldest requests evicted first); 0 turns the store off.
      store (None): a ``SuffixIndex`` to share between drafters (default: one per drafter,
        which lives as long as the drafter: one per model per process in CLI and server).
      key_lengths ((1, 2, 4, 8)): n-gram sizes indexed.
      auto_size (True): cut each tree to the size the cost model says pays (the engine's
        latency curve and the node probabilities, calibrated online against what the target
        accepts); it may draft nothing. False: draft the whole tree.
    """

    name = "suffix"

    def __init__(
        self,
        vocab_size: int | None = None,
        device: torch.device | str = "cpu",
        max_nodes: int = 32,
        max_depth: int = 32,
        alpha: float = 2.0,
        offset: float = 0.0,
        min_prob: float = 0.1,
        min_match: int = 1,
        max_match: int = 32,
        max_candidates: int = 64,
        levels: int = 3,
        store_tokens: int = 200_000,
        store: SuffixIndex | None = None,
        key_lengths: Sequence[int] = (1, 2, 4, 8),
        auto_size: bool = True,
    ):
        self.vocab_size = vocab_size
        self.auto_size = bool(auto_size)
        self.sizer = TreeSizer()
        self.device = torch.device(device)
        self.max_nodes = int(max_nodes)
        self.max_depth = int(max_depth)
        self.alpha = float(alpha)
        self.offset = float(offset)
        self.min_prob = float(min_prob)
        self.min_match = max(1, int(min_match))
        self.max_match = int(max_match)
        self.max_candidates = int(max_candidates)
        self.levels = max(1, int(levels))
        self.key_lengths = tuple(key_lengths)
        if store is not None:
            self._store: SuffixIndex | None = store
        elif store_tokens and int(store_tokens) > 0:
            self._store = SuffixIndex(int(store_tokens), self.key_lengths)
        else:
            self._store = None
        self._finished: list[list[int]] = []  # requests ended, not yet in the store
        self.current = SuffixIndex(None, self.key_lengths)
        self.last: Retrieval | None = None  # the last retrieval (for inspection)

    @property
    def store(self) -> SuffixIndex | None:
        """The store of earlier requests (every ended request in it)."""
        self._file_finished()
        return self._store

    def _file_finished(self) -> None:
        done, self._finished = self._finished, []
        if self._store is not None:
            for t in done:
                self._store.add(t)

    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        """Index the last request's tokens into the store and this prompt into the current
        request's index. The engine calls this with the prefill launched: on a GPU the indexing
        (~1 us a token and key length on the host) runs while the device computes, not in the
        first step or at the last request's end."""
        self.sizer.end()  # the last request's trees still waiting for tokens
        self._file_finished()
        self.current.clear()
        self.current.sync(list(prompt))

    def end(self, tokens: list[int]) -> None:
        self._finished.append(list(tokens))  # into the store at the next request's begin
        self.current.clear()

    def reset(self) -> None:
        """Forget the earlier requests too."""
        self.current.clear()
        self._finished = []
        if self._store is not None:
            self._store.clear()

    # ------------------------------------------------------------------ drafting
    def retrieve(self, ctx: DraftContext, max_nodes: int | None = None, min_match: int | None = None) -> Retrieval | None:
        """The best tree from the suffix matches of ``ctx.tokens`` (None: no match);
        ``min_match``: shortest match to draft from, if longer than the drafter's own (a caller
        that discards shorter matches saves their search and trees)."""
        limit = min(self.max_nodes if max_nodes is None else max_nodes, ctx.budget)
        if limit < 1:
            return None
        least = max(self.min_match, int(min_match or 0))
        tokens = ctx.tokens
        self.current.sync(tokens)
        context = tokens[-self.max_match :]
        occ: list[tuple[int, list[int], int, int]] = []
        L = len(tokens)
        if self._finished:  # (a caller that did not begin a request)
            self._file_finished()
        for st in (self.current, self._store):
            if st is None or not st.buf:
                continue
            buf, cur = st.buf, st is self.current
            for m, i in st.occurrences(context, self.max_match, self.max_candidates, levels=2, min_len=least):
                occ.append((m, buf, i, L - i if cur else 0))  # period: L - 1 - (end position)
        if not occ:
            self.last = None
            return None
        lengths = sorted({o[0] for o in occ if o[0] >= least}, reverse=True)[: self.levels]
        best: Retrieval | None = None
        root = tokens[-1]
        for m in lengths:
            n = min(limit, int(self.alpha * m + self.offset))
            if n < 1:
                continue
            cursors = [(buf, i, d) for mm, buf, i, d in occ if mm >= m]
            tree, score = build_tree(root, cursors, n, self.max_depth, self.min_prob)
            if tree.size > 1 and (best is None or score > best.score):
                best = Retrieval(tree, score, m)
        self.last = best
        return best

