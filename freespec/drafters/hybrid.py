"""Hybrid: retrieval (suffix decoding or prompt lookup) together with Token Recycling.

Two ways to combine them (``mode``):

* ``switch``: the retrieval tree when its match is strong (match length >= ``min_match``
  and expected accepted length >= ``min_score``), Token Recycling's tree otherwise.
* ``merge``: both trees in one, merged by common prefix (``merge_trees``): a retrieval chain
  whose first tokens agree with Token Recycling's best guesses extends that branch instead
  of doubling it. Weak matches are left out as in ``switch``. Merging reads Token
  Recycling's tokens back to the host (one small device->host copy per step on a GPU).

Either way, Token Recycling's matrix is updated from every verified tree (its tokens and
their logits), whichever drafter built it.

With ``template="auto"`` (the default) and the engine's latency curve, merging is sized by
the cost model instead of thresholds: retrieval scores are calibrated online to acceptance
rates, and so are Token Recycling's node scores, apart for steps with and without a retrieval
tree (where retrieval finds nothing, its nodes are taken far less often than on average); the
merged tree is cut to the node count that maximises expected tokens per second (or to nothing).

Whole steps on the device (``device_step``, the native backend with CUDA graphs): Token
Recycling's tree is filled on the device and the retrieval tree, built on the host, is hung
under the root beside it (``tree.AttachBuffer``: its tokens and structure are copied into
buffers that the captured step reads), so the step stays one graph replay and one sync.
Merging by common prefix would need Token Recycling's tokens on the host (a second sync), so
here the two trees sit side by side; a retrieval node that repeats a Token Recycling node
costs one verified token, nothing else. Weak matches (below ``min_match`` / ``min_score``) are
left out; a stronger tree is cut by the cost model as above (without a latency curve: kept
whole) and padded to 8 or 32 nodes, the larger where both pay for the same bucket. A pair
(plan, attached tree) whose step costs more than Token Recycling's anchor step (see
``TokenRecycling.anchor``) must be predicted ``ANCHOR_MARGIN`` faster; the plan cut by a
layout (``CUT_FOR``: 87 + 8 and 63 + 32 in an H100's 96-node step) is weighed too, so a
retrieval tree need not pay for the next step. Where the plan holds its anchor and the nodes a
retrieval tree would displace are worth little, the pair choice reduces to a rule (a strong tree
in the smallest layout that holds it, beside the plan cut by that layout), taken without
weighing (``HybridDrafter._anchor_rule``).
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from operator import ge, mul

import numpy as np
import torch

from ..backends.base import DeviceStep
from ..cost import order_nodes
from ..tree import AttachBuffer, TreeShape, TreeTemplate, rank_prior
from .base import DraftContext, Drafter
from .lookup import PromptLookup, Retrieval
from .merge import HostTree, _subset, merge_trees, to_draft
from .recycling import _SERIALS, ANCHOR_MARGIN, AUTO, RECHOOSE, TokenRecycling
from .sizing import TreeSizer, size_tree
from .suffix import SuffixDrafter

MODES = ("switch", "merge")
RETRIEVERS = {"suffix": SuffixDrafter, "lookup": PromptLookup}
ATTACH_SLOTS = (8, 32)  # retrieval-tree sizes a captured step is laid out for (padded up to)
# Most nodes of a step with an attached tree (root included): a bigger step would be a new
# forward size, i.e. a compile and graph captures mid-run (seconds), for a few more nodes.
ATTACH_LIMIT = 128
# Where Token Recycling's plan fills its anchor step (see TokenRecycling.anchor; an H100: 95 nodes
# in the 96-node step), a retrieval tree beside it would pay for the next step (128 nodes). The
# pair choice also weighs the plan cut by each of these layouts, with that layout attached (87 + 8,
# 63 + 32: the same 96-node step); a cut plan is never taken alone.
CUT_FOR = (8, 32)
# The pair choice re-reads the engine's latency curve when it has moved this much (see _view).
CURVE_DRIFT = 0.02
# The anchor's pair choice becomes a rule (see HybridDrafter._anchor_rule) where the plan nodes
# each layout displaces (the smallest: plus the time of loading a tree) are worth at most this
# fraction of the least a strong tree promises (min_score). (Replaying recorded steps with an
# H100's curve, at 71 table builds: 0.013-0.057 tokens for 87 + 8 against 95 alone, load
# included, and 0.024-0.153 for 63 + 32 against 87 + 8.)
RULE_DISPLACED = 0.35
_CHAIN = [-1, *range(ATTACH_LIMIT)]  # a chain's parents (sliced to its size)


class HybridDrafter(Drafter):
    """Token Recycling plus retrieval, switched or merged per step.

    Knobs:
      mode ('merge'): 'switch' (one tree or the other) or 'merge' (one tree holding both).
      retrieval ('suffix'): 'suffix' (current request + earlier requests) or 'lookup'
        (prompt lookup over the current request).
      min_match (2): shortest suffix match whose retrieval tree is used.
      min_score (1.0): least expected accepted length (sum of the retrieval tree's node
        probabilities; a lookup chain counts its length) for the retrieval tree to be used.
      max_nodes (None): cap on merged draft nodes (default: Token Recycling's template size
        plus the retrieval tree's ``max_nodes``); the engine's budget caps it too.
      retrieval_kw ({}): knobs of the retrieval drafter (see SuffixDrafter / PromptLookup),
        e.g. {'max_nodes': 16, 'store_tokens': 100000}.
      template ('auto'), k (8), seed_from_prompt (False): Token Recycling's knobs; 'auto'
        sizes the merged tree by the cost model (min_match/min_score then do not apply).
      retriever (None): a prebuilt retrieval drafter (to share its store); overrides
        ``retrieval`` and ``retrieval_kw``.
    """

    name = "hybrid"

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str = "cpu",
        template: str | int | TreeTemplate = AUTO,
        k: int = 8,
        seed_from_prompt: bool = False,
        mode: str = "merge",
        retrieval: str = "suffix",
        min_match: int = 2,
        min_score: float = 1.0,
        max_nodes: int | None = None,
        retrieval_kw: dict | None = None,
        retriever: Drafter | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown hybrid mode {mode!r}; use one of {', '.join(MODES)}")
        if retriever is None:
            if retrieval not in RETRIEVERS:
                raise ValueError(f"unknown retrieval {retrieval!r}; use one of {', '.join(RETRIEVERS)}")
            retriever = RETRIEVERS[retrieval](vocab_size=vocab_size, device=device, **(retrieval_kw or {}))
        if not hasattr(retriever, "retrieve"):
            raise TypeError("the retriever must have a retrieve(ctx) method (SuffixDrafter, PromptLookup)")
        self.tr = TokenRecycling(vocab_size=vocab_size, template=template, k=k, device=device,
                                 seed_from_prompt=seed_from_prompt)
        self.retriever = retriever
        self.mode = mode
        self.min_match = int(min_match)
        self.min_score = float(min_score)
        self.max_nodes = None if max_nodes is None else int(max_nodes)
        self.device = torch.device(device)
        self.used = {"recycling": 0, "retrieval": 0, "merged": 0, "attached": 0, "none": 0}  # steps per source
        self.ruled = 0  # device steps whose pair the anchor's rule chose (see _anchor_rule)
        self.sizer = TreeSizer()
        # Token Recycling's node scores on host steps with / without a retrieval tree
        self.tr_sizers = (TreeSizer(), TreeSizer())
        self._set_scores()
        self._serial = next(_SERIALS)  # names this drafter's captured steps (never reused, unlike id())
        self._root_shape = TreeShape.from_parents([-1], self.device)
        # host seconds to load an attached tree (moving average): a cost the latency curve,
        # which times device steps, does not hold (measured on an H100 host: ~0.15 ms, ~5% of
        # a step, so an attached tree must promise that much more to be worth it)
        self._load_cost = 0.0
        self._steps: dict = {}  # device steps by (Token Recycling's step key, layout)
        # the last latency curve, the one the pair choice reads (see _view), its entries as
        # floats, the cost of Token Recycling's anchor step and that step (None: no anchor)
        self._curve: tuple = (None, None, [], None, None)  # see _view
        self.cut_for: tuple[int, ...] = CUT_FOR
        self._table: tuple = (None, None, None, [], None)  # (curve, choice, sizes, rows, rule): see _pair_table
        self._misses: tuple = (None, {})  # (choice, {plan size: miss by depth}): see _miss
        self._ctx: DraftContext | None = None  # the last sized device step's context (see _prepare)
        # (the engine's curve, Token Recycling's choice, pair table, smallest plan, rule) at the last step
        self._last: tuple = (None, None, [], 0, None)

    # ------------------------------------------------------------------ Token Recycling's face
    @property
    def template(self) -> TreeTemplate:
        return self.tr.template

    def set_template(self, template) -> None:
        self.tr.set_template(template)
        self._set_scores()

    def _set_scores(self) -> None:
        # merge priority of Token Recycling's nodes: the template's rank prior
        t = self.tr.template
        self._tr_scores = [1.0] + [rank_prior(p) for p in t.paths]

    @property
    def matrix(self) -> torch.Tensor:
        return self.tr.matrix

    def save(self, path) -> None:
        self.tr.save(path)

    def load(self, path) -> None:
        self.tr.load(path)

    def reset(self) -> None:
        self.tr.reset()
        if hasattr(self.retriever, "reset"):
            self.retriever.reset()

    @property
    def wants_prompt_logits(self) -> bool:  # type: ignore[override]
        return self.tr.wants_prompt_logits

    @property
    def auto(self) -> bool:
        return self.tr.auto

    @property
    def reads_top_k(self) -> int:  # type: ignore[override]
        return self.tr.k

    @property
    def wants_latency(self) -> bool:  # type: ignore[override]
        return self.tr.auto

    # ------------------------------------------------------------------ interface
    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        self.sizer.end()  # the last request's trees still waiting for tokens
        for t in self.tr_sizers:
            t.end()
        self.tr.begin(prompt, prompt_logits)
        self.retriever.begin(prompt)

    def strong(self, r: Retrieval | None) -> bool:
        return r is not None and r.match_len >= self.min_match and r.score >= self.min_score

    def propose(self, ctx: DraftContext):
        if self.tr.auto and ctx.latency is not None:
            return self._propose_sized(ctx)
        r = self.retriever.retrieve(ctx)
        good = self.strong(r)
        if self.mode == "switch":
            if good:
                self.used["retrieval"] += 1
                return to_draft(r.tree, ctx.root.device)
            d = self.tr.propose(ctx)
            if d is None and r is not None:  # no room for the template: a weak retrieval beats nothing
                self.used["retrieval"] += 1
                return to_draft(r.tree, ctx.root.device)
            self.used["recycling" if d is not None else "none"] += 1
            return d
        d = self.tr.propose(ctx)
        if not good:
            self.used["recycling" if d is not None else "none"] += 1
            return d
        if d is None:
            self.used["retrieval"] += 1
            return to_draft(r.tree, ctx.root.device)
        tr_tree = HostTree(d.tokens.tolist(), list(d.shape.parents_list), list(self._tr_scores))
        limit = ctx.budget
        if self.max_nodes is not None:
            limit = min(limit, self.max_nodes)
        # retrieval first: its chain keeps its order, Token Recycling fills the rest
        merged = merge_trees([r.tree, tr_tree], limit)
        self.used["merged"] += 1
        return to_draft(merged, ctx.root.device)

    def _propose_sized(self, ctx: DraftContext):
        d = self.tr.propose(ctx)  # Token Recycling's own choice (and this step's base tree)
        r = self.retriever.retrieve(ctx)
        limit = ctx.budget if self.max_nodes is None else min(ctx.budget, self.max_nodes)
        cand = self.tr.candidates()
        if cand is None:  # no ranking yet: Token Recycling's own choice
            self.used["recycling" if d is not None else "none"] += 1
            return d
        # Token Recycling's scores are calibrated apart for steps with and without a retrieval
        # tree: its estimates are learnt over all steps, and where retrieval finds nothing its
        # nodes are accepted far less often (SmolLM2 on the CPU, 26 Spec-Bench prompts: its
        # 2-node plan took 0.05 tokens a step there, where its estimates promised 0.39)
        cand = self.tr_sizers[r is None].calibrated(cand)
        if r is None:
            tree = size_tree(cand, ctx.latency, limit)
            self.used["recycling" if tree is not None else "none"] += 1
            return None if tree is None else to_draft(tree, ctx.root.device)
        tree = size_tree(merge_trees([self.sizer.calibrated(r.tree), cand]), ctx.latency, limit)
        if tree is None:
            self.used["none"] += 1
            return None
        self.used["merged"] += 1
        return to_draft(tree, ctx.root.device)

    # ------------------------------------------------------------------ whole steps on the device
    def device_step(self, ctx: DraftContext) -> DeviceStep:
        """This step for ``Backend.step``: Token Recycling's device step with the retrieval tree
        attached under the root when it pays (see the module docstring); never None (a step
        with nothing to draft is a one-token step, on the device too)."""
        if self.tr.auto and ctx.latency is not None:
            return self._device_step_sized(ctx)
        tr = self.tr.device_step(ctx)
        if tr is None and self.tr.auto and self.tr.template.size > 0:
            self.tr.filled()  # a plain step fills the base tree all the same (see fill_plain)
        base = tr.shape if tr is not None else self._root_shape
        room = min(ctx.budget - (base.size - 1), ATTACH_LIMIT - base.size)
        slots = [m for m in ATTACH_SLOTS if m <= room]  # the layouts that fit (padding included)
        r = self.retriever.retrieve(ctx, min_match=self.min_match) if slots else None
        tree = None
        if r is not None and self.strong(r):
            tree = r.tree
            if tree.size - 1 > slots[-1]:
                keep = order_nodes(tree.scores, tree.parents)[: slots[-1]]
                tree = _subset(tree, sorted(int(i) for i in keep))
        m = 0 if tree is None else next(m for m in slots if m >= tree.size - 1)
        return self._assemble(tr, m, tree)

    def _device_step_sized(self, ctx: DraftContext) -> DeviceStep:
        """The automatic tree: Token Recycling's plan size and the retrieval layout chosen
        together, by expected tokens per second over the pairs (plan P, layout m): P from
        ``TokenRecycling.plan_options`` (its own choice, or a larger size that ends a step of
        the latency curve), m from ATTACH_SLOTS (a layout costs its padded size, so the best m
        retrieval nodes by calibrated score fill it), or no attachment. On a bucketed curve a
        plan alone may fill the bucket that the plan plus an attached tree would pay."""
        tr = self.tr
        self._ctx = ctx
        last = self._last
        if last[0] is ctx.latency and last[1] is tr._gain and tr._since < RECHOOSE and ctx.budget >= ATTACH_LIMIT:
            rows, low, rule = last[2], last[3], last[4]  # (the engine's curve as at the last step: see _view, _options)
        else:
            sizes, rows = self._options(ctx, self._view(ctx))
            low = min(sizes)
            rule = self._table[4] if ctx.budget >= ATTACH_LIMIT else None
            self._last = (ctx.latency, tr._gain, rows, low, rule)
        r = self.retriever.retrieve(ctx, min_match=self.min_match) if ctx.budget - low >= ATTACH_SLOTS[0] else None
        if r is not None and not self.strong(r):
            # a weak match (below min_match / min_score) is not weighed: replaying the H100's
            # steps, trees whose calibrated nodes summed to under 1 token brought 0.05-0.14
            # tokens beyond the plan's path, and weighing and learning from them cost more host
            # time a step than that (the pair choice ran at every step, not at 40% of them)
            r = None
        if rule is not None:
            return self._ruled_step(rule, r)
        s_o = None
        if r is not None and r.tree.size > 1:
            # (Python lists: a tree has at most a few dozen nodes, and numpy's per-call cost
            # on the GPU machine's host exceeded the work)
            sl = self.sizer.scores(r.tree)  # calibrated; the sizer learns from this tree at done()
            n = len(sl)
            par = r.tree.parents
            if all(map(ge, sl, islice(sl, 1, None))):  # best first already (a chain, mostly)
                order, s_o = range(n), sl
                d_o = range(n) if par == _CHAIN[: n + 1] else [d - 1 for d in islice(r.tree.depth(), 1, None)]
            else:
                order = sorted(range(n), key=sl.__getitem__, reverse=True)  # stable: parents first
                dep = r.tree.depth()
                s_o = [sl[i] for i in order]
                d_o = [dep[i + 1] - 1 for i in order]  # depth - 1, best first
        best, pick = -1.0, (rows[0][0], 0, rows[0][4])
        load = self._load_cost
        for P, g, rate, miss, layouts in rows:
            if rate > best:
                best, pick = rate, (P, 0, layouts)
            if s_o is None:
                continue
            room = ctx.budget - P
            # expected extra tokens of the best m retrieval nodes: a node gains where Token
            # Recycling's plan stops short of its depth, taken as independent of the plan.
            # Replaying the H100's recorded steps (docs/results/replay-hybrid-s7), trees whose
            # calibrated nodes summed to 0.25 / 0.7 / 1.4 / 2.9 tokens brought 0.05 / 0.14 /
            # 0.66 / 1.3 beyond the plan's path; independence gives 0.08 / 0.28 / 0.87 / 2.2
            # (the plain sum, as before, counted a retrieval chain repeating the plan's best
            # branch in full)
            a, k = 0.0, 0
            for m, c, h in layouts:  # (ascending: the sum over the best m grows as m does)
                if m > room:
                    break
                if k < n:
                    a += sum(map(mul, s_o[k:m], map(miss.__getitem__, d_o[k:m])))
                    k = m
                rate = (g + a) / (c + load) / h
                if rate > best:
                    best, pick = rate, (P, m, layouts)
        P, m, layouts = pick
        base = tr.plan_step(P)
        if base is None and tr.template.size > 0:
            tr.filled()  # a plain step fills the base tree all the same (see fill_plain)
        tree = None
        if m:
            tree = r.tree
            if tree.size - 1 > m:
                tree = _subset(tree, sorted(i + 1 for i in order[:m]))
            # the largest layout that costs what the smallest that fits costs (on a bucketed
            # curve the step is padded to its bucket anyway): fewer layouts per plan, so fewer
            # CUDA graph captures per KV extent (63 + 8 and 63 + 32 nodes both pay for 96)
            cost = next(c for x, c, _ in layouts if x >= tree.size - 1)
            m = max(x for x, c, _ in layouts if tree.size - 1 <= x <= ctx.budget - P and c <= cost)
        return self._assemble(base, m, tree)

    def _ruled_step(self, rule: tuple[int, list[tuple[int, int]]], r) -> DeviceStep:
        """The anchor's pair choice where the pair table reduces it to a rule (see _anchor_rule):
        no strong retrieval tree, the anchor plan alone; else the smallest layout that holds
        the tree (its best nodes by score if none does), beside the plan cut by that layout."""
        anchor, layouts = rule
        tr = self.tr
        self.ruled += 1
        if r is None or r.tree.size <= 1:
            return self._assemble(tr.plan_step(anchor), 0, None)
        tree = r.tree
        n = tree.size - 1
        for m, P in layouts:
            if n <= m:
                break
        else:
            keep = order_nodes(tree.scores, tree.parents)[:m]
            tree = _subset(tree, sorted(int(i) for i in keep))
        return self._assemble(tr.plan_step(P), m, tree)

    def _anchor_rule(self, rows: list[tuple], sizes: list[int]) -> tuple | None:
        """(anchor, [(layout m, the plan cut by it)...]) where the pair choice reduces to a rule
        (see _ruled_step), else None.

        That is where Token Recycling's own choice is its anchor (``TokenRecycling.anchor``:
        on an H100, tr80's 96-node step, 95 nodes) and each layout of CUT_FOR rides in the
        anchor's step beside the plan cut by it (87 + 8, 63 + 32). There a retrieval tree stays
        in the anchor's step: pairs that cost more (95 + 8 or 95 + 32 nodes in the 128-node
        step) are left out, as they need ANCHOR_MARGIN in the pair choice, and on an H100 such
        steps ran slower than the anchor's for their extra tokens (docs/benchmarks.md, ninth
        session). Within the anchor's step the choice is one of gains alone: the retrieval
        tree's best nodes against the plan's lowest-ranked ones they displace (plus the host
        time of loading the tree, for the smallest layout). Where each layout displaces at
        most RULE_DISPLACED of the least a strong tree promises (``min_score``), a strong tree
        goes in the smallest layout that holds it. Replaying recorded steps with an H100's curve
        (2,764 and 1,490 steps) the pair choice took the rule's pair at every step; on the H100
        it attached trees at about as many steps as hybrid:tr80, which attaches every strong one.
        The rule skips the calibration of the tree's scores, the pair loop and the calibration's
        learning after the step: host time on the critical path of every step."""
        anchor, cost = self._curve[4], self._curve[3]
        cuts = sorted(self.cut_for)
        if anchor is None or not cuts or not sizes or sizes[0] != anchor:
            return None
        by = {row[0]: row for row in rows}
        rule = [(m, anchor - m) for m in cuts]
        if anchor not in by or any(P not in by or (m, cost, 1.0) not in by[P][4] for m, P in rule):
            return None  # (m nodes beside the cut plan: the anchor's step)
        rate = by[anchor][2]
        if any(P != anchor and alone > rate for P, _, alone, _, _ in rows):
            return None  # (a plan alone predicted faster than the anchor's: not Token Recycling's choice)
        g = by[anchor][1]
        load = g * self._load_cost / cost  # (tokens' worth of the host time of a load)
        for m, P in rule:
            if g - by[P][1] + load > RULE_DISPLACED * self.min_score:
                return None
            g, load = by[P][1], 0.0  # (a larger layout displaces more of the plan than the smaller)
        return anchor, rule

    def _options(self, ctx: DraftContext, curve) -> tuple[list[int], list[tuple]]:
        """Token Recycling's plan sizes and the pair table over them (see _pair_table), as at
        the last step unless something they rest on has moved."""
        tr = self.tr
        last = self._table
        if last[0] is curve and last[1] is tr._gain and tr._since < RECHOOSE and ctx.budget >= ATTACH_LIMIT:
            return last[2], last[3]
        sizes = tr.plan_options(ctx, min(ctx.budget, ATTACH_LIMIT - 1 - ATTACH_SLOTS[-1]), curve=curve) \
            if tr.template.size > 0 else [0]
        return sizes, self._pair_table(curve, sizes)

    def _prepare(self) -> None:
        """After a new choice of Token Recycling's plan (deferred: while the next step runs on
        the device), the next step's plan options, pair table and plans, from the last step's
        context: host work the next step's choice would otherwise do between steps (in a local
        replay of device steps, ~4 us a step of ~55, spent at one step in RECHOOSE). A context
        that has moved since (a refreshed curve, a budget under ATTACH_LIMIT) rebuilds the
        table there as before."""
        ctx, curve = self._ctx, self._curve[1]
        if ctx is None or curve is None:
            return
        sizes, rows = self._options(ctx, curve)
        self.tr.prepare(row[0] for row in rows)

    def _view(self, ctx: DraftContext) -> np.ndarray:
        """The latency curve the pair choice reads: the engine's, refreshed when it has moved
        by CURVE_DRIFT at the plain step or the largest attached step since the last refresh.
        (The engine's curve is a new array every CACHE_STEP tokens of cache; the anchor, the plan
        options and the pair table are rebuilt on a refresh, ~45 us of host time, where a
        cache grown by a few dozen tokens moves every step's cost alike.)"""
        curve = ctx.latency
        view = self._curve
        if curve is view[0]:
            return view[1]
        eff = view[1]
        big = min(ATTACH_LIMIT, len(curve) - 1)
        if (eff is not None and len(eff) == len(curve) and ctx.budget >= len(curve)
                and abs(curve[1] - eff[1]) <= CURVE_DRIFT * eff[1] and abs(curve[big] - eff[big]) <= CURVE_DRIFT * eff[big]):
            self._curve = (curve,) + view[1:]
            return eff
        tr = self.tr
        a = tr.anchor(curve, ctx.budget) if tr.template.size > 0 else None
        # (Python floats: the pair table reads a dozen entries)
        self._curve = (curve, curve, curve.tolist(), None if a is None else float(curve[a + 1]), a)
        return curve

    def _pair_table(self, curve, sizes: list[int]) -> list[tuple]:
        """Per plan size P of ``sizes``: (P, expected tokens of the plan alone, its rate, the
        plan's miss by depth (``plan_miss``), [(layout m, step cost, handicap)] for the layouts
        that fit ATTACH_LIMIT); kept until the curve, Token Recycling's choice or the sizes
        change (every few steps at most), so a step's pair choice is a few multiplications."""
        tr = self.tr
        got = self._table
        if got[0] is curve and got[1] is tr._gain and got[2] is sizes:
            return got[3]
        cv, cap, anchor = self._curve[2:]
        last = len(cv) - 1

        def handicap(cost):
            # a pair whose step costs more than Token Recycling's anchor step must be predicted
            # ANCHOR_MARGIN faster (as Token Recycling's own choice): on an H100, 95 + 32 nodes
            # (the 128-node step) ran in ~45% of hybrid's steps for 1.5% more tokens than
            # hybrid:tr80, and hybrid ran 2-4% slower
            return 1.0 + ANCHOR_MARGIN if cap is not None and cost > cap else 1.0
        rows = []
        cuts = [] if anchor is None else [anchor - m for m in self.cut_for if 0 < anchor - m and anchor - m not in sizes]
        for P in sizes + cuts:
            g = tr.plan_gain(P) if P > 0 else 1.0
            c = cv[min(P + 1, last)]
            layouts = []
            for m in ATTACH_SLOTS:
                if P + 1 + m > ATTACH_LIMIT:
                    break
                cm = cv[min(P + 1 + m, last)]
                layouts.append((m, cm, handicap(cm)))
            alone = g / c / handicap(c) if P in sizes else -1.0  # (a cut plan comes with a retrieval tree)
            rows.append((P, g, alone, self._miss(P), layouts))
        self._table = (curve, tr._gain, sizes, rows, self._anchor_rule(rows, sizes))
        return rows

    def _miss(self, P: int) -> list[float]:
        """Token Recycling's ``plan_miss(P)``, then 1.0 to the deepest an attached tree can
        reach; kept until its next choice (the pair table is rebuilt at every new curve)."""
        got = self._misses
        if got[0] is not self.tr._gain:
            got = self._misses = (self.tr._gain, {})
        m = got[1].get(P)
        if m is None:
            m = got[1][P] = (self.tr.plan_miss(P) if P > 0 else []) + [1.0] * (ATTACH_SLOTS[-1] + 1)
        return m

    def _assemble(self, tr: DeviceStep | None, m: int, tree: HostTree | None) -> DeviceStep:
        """The step: Token Recycling's (``tr``; None: the root alone) with ``tree`` loaded into
        a layout of ``m`` attached nodes (none if 0)."""
        base = tr.shape if tr is not None else self._root_shape
        if tree is None:
            self.used["recycling" if tr is not None else "none"] += 1
            key = (tr.key if tr is not None else None, 0)
            ds = self._steps.get(key)
            if ds is None:
                if tr is None:
                    ds = DeviceStep(("hybrid-plain", self._serial), base, self._plain_fill(), self._observe_update,
                                    done=self._learn)
                else:
                    ds = dataclasses.replace(tr, done=self._learn)
                ds = self._keep(key, ds)
            return ds
        key = (tr.key if tr is not None else None, m)
        got = self._steps.get(key)
        if got is None:
            buf = AttachBuffer(base, m, self.device)
            head = tr.fill if tr is not None else self._plain_fill()
            observe = tr.observe if tr is not None else self._observe_update

            def fill(root, head=head, extra=buf.tokens):
                return torch.cat((head(root), extra))

            ds = DeviceStep(("hybrid", self._serial, next(_SERIALS)), buf.shape, fill, observe, done=self._learn)
            got = self._keep(key, (buf, ds))
        buf, ds = got
        t = time.perf_counter()
        version, parents = self.tr.laid_plan(base) if tr is not None else (0, base.parents_list)
        buf.load(tree.tokens[1:], [p - 1 for p in tree.parents[1:]], base_version=version, base_parents=parents)
        self._load_cost += 0.1 * (time.perf_counter() - t - self._load_cost)
        self.used["attached" if tr is not None else "retrieval"] += 1
        return ds

    def _keep(self, key, value):
        if len(self._steps) >= 256:  # plans come and go; new buffers get new step keys
            self._steps.clear()
        self._steps[key] = value
        return value

    def _plain_fill(self):
        """The fill of a step without Token Recycling's tree: the root alone (after filling
        Token Recycling's base tree, with the automatic tree, whose statistics keep learning)."""
        return self.tr.fill_plain if self.tr.auto and self.tr.template.size > 0 else _root_only

    def _observe_update(self, tokens, logits, verdict) -> None:
        self.tr.update(tokens, logits)

    def _learn(self, emitted: list[int]):
        # (every step: learning from one in 4 made the map's memory 4x longer in steps, and on
        # the H100 hybrid fell from 2.79x to 2.33x, the calibration of one category lingering
        # into the next)
        a = self.tr.learn(emitted, defer=True, then=self._prepare if self._ctx is not None else None)
        b = self.sizer.learn(emitted, defer=True)
        if a is None or b is None:
            return a or b
        return lambda: (a(), b())

    def observe(self, draft, logits: torch.Tensor, accepted: list[int], top: torch.Tensor | None = None) -> None:
        # every verified node's logits refresh its token's row, whoever drafted it
        self.tr.update(draft.tokens, logits, top)
        self.tr.learn(accepted)
        self.sizer.learn(accepted)
        for t in self.tr_sizers:
            t.learn(accepted)
        self.retriever.observe(draft, logits, accepted)

    def end(self, tokens: list[int]) -> None:
        self.retriever.end(tokens)


def _root_only(root: torch.Tensor) -> torch.Tensor:
    return root.view(1)
