"""Token Recycling (arXiv 2408.08696): the candidates the target computes anyway become drafts.

State: M [vocab, k], M[t] = the top-k tokens the target last predicted after token t. After
each verification pass, every tree token's row is overwritten with the top-k of its logits
(one ``topk`` and one ``index_put`` on the device). Drafting fills a static template by one
gather per level: token(node) = M[token(parent), rank(node)].

Hot start: M lives as long as the drafter (one per model per process in the CLI and server),
across prompts and turns; ``reset``, ``save`` and ``load`` manage it explicitly.

Tree size (``template="auto"``, the default): the matrix fills a large base template every
step; acceptance statistics per base node (``cost.NodeStats``) say how likely each node is,
and the cost model (``cost.choose_size``, fed the engine's measured latency curve) picks the
most probable nodes worth their verification cost -- possibly none (a plain step). How many
to take rests on the realized gain by rank (accepted nodes among the k best-ranked, counted
with the ranking fixed in advance), which the per-node estimates only seed. The
statistics are learnt for every base node whether it was drafted or not: the tokens the
target emits do not depend on the draft, so a node would have been accepted iff its token
path matches them. They are saved with the matrix.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import torch

from ..backends.base import DeviceStep
from ..backends.replay import Replay
from ..cost import NodeStats, choose_size, order_nodes
from ..tree import Draft, TreeShape, TreeTemplate, get_template, rank_prior
from ..verify import top_k_ids
from .base import DraftContext, Drafter
from .merge import HostTree, _subset

AUTO = "auto"
AUTO_BASE = "tr160"  # the node pool the automatic choice picks from
# Steps between two choices of the tree, across requests (a choice at each request's start cost
# short answers ~0.1 ms a step: translation on the H100, ~10 steps a request). A choice reads
# the statistics back and ranks every base node: ~0.5 ms of host time on an H100 machine's
# host, where a step is ~3.3 ms; every 8 steps it cost ~3% of the time.
RECHOOSE = 32
# A new plan must promise this much more speed than the current one. (It was 2%, when every
# new plan was a new CUDA graph capture; plans are now laid into one buffer per size. On the
# H100 the 64- and 96-node buckets differ by ~4%, and at 2% a first choice of 63 nodes held for a
# whole run, where 95 had run 3% faster in another; at 1% the choice still varies run to run.)
HYSTERESIS = 0.01
# On a stepped latency curve (an H100: steps of 64, 96, 128 nodes) the plan stays at the step of
# the device's fixed tree unless another size is predicted this much faster. There the sizes are
# near ties: replaying 2,538 recorded H100 steps, the 63 / 95 / 127 best nodes took 0.988 / 1.014
# / 1.030 of tr80's tokens a step, against steps costing ~1.03x apiece; the predicted rates of
# the three lay within 2% of each other, and errors of 1-2% in the calibrated step ratios (a
# 128/96 ratio of 1.022 measured as 1.03-1.04 in steps) moved the choice. Runs that took 95 nodes
# were 1.01-1.03x tr80, runs that took 63 and 127 0.99x (docs/benchmarks.md, ninth session).
ANCHOR_MARGIN = 0.03
# Acceptance is counted on one step in this many, after the step, from the base tree it filled
# (the count is ~15 small kernels: on an H100 ~0.05 ms a counted step, as device time and host
# launches; as a variant of the captured step it doubled the step's CUDA graph captures).
# Evidence decays per step all the same. 8, not 4: replaying recorded steps (below) chose
# nodes as well from half the counts, at half the cost.
LEARN_EVERY = 8
# Pseudo-observations of the rank prior in each node's estimate. Replaying 4,200 recorded
# steps of the full base tree (SmolLM2-135M, Spec-Bench 65 prompts; which nodes the target
# would have accepted does not depend on what was drafted), the best 80 nodes by estimates
# of strength 4 accepted 1-2% fewer tokens than the published 80-node tree, and the prior's
# own ranking as many: per-node counts are too few to rank nodes better than the prior does
# (hindsight, from all the steps' counts, +1.4%). At 64 the ranking matched the prior's
# (the 95 best: +1.5% over the 80-node tree) and still moves where counts disagree with it.
# 2,538 steps of Qwen2.5-Coder-1.5B bf16 on an H100 replayed the same (`bench.replay`).
PRIOR_STRENGTH = 64.0
# Counted steps at which the realized gain by rank weighs as much as the per-node estimates.
REALIZED_PRIOR = 16.0
_SERIALS = itertools.count()  # unique names for drafters and plans (never reused, unlike id())


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(
        self,
        vocab_size: int,
        template: str | int | TreeTemplate = AUTO,
        k: int = 8,
        device: torch.device | str = "cpu",
        seed_from_prompt: bool = False,
    ):
        self.vocab_size = int(vocab_size)
        self.k = min(int(k), self.vocab_size)
        self.device = torch.device(device)
        self.seed_from_prompt = seed_from_prompt
        # the device's fixed tree: the size taken without a latency curve, and the reference of
        # the anchor on a stepped one (an offline replay of a GPU's steps on the CPU sets tr80)
        self.fixed = default_template(self.device)
        self.matrix = torch.zeros(self.vocab_size, self.k, dtype=torch.int32, device=self.device)
        self.set_template(template)

    # ------------------------------------------------------------------ template
    def set_template(self, template: str | int | TreeTemplate) -> None:
        self.auto = isinstance(template, str) and template.strip() == AUTO
        # a new template is new buffers: new step keys (a captured step reads the buffers it
        # was captured with)
        self._serial = next(_SERIALS)
        t = get_template(AUTO_BASE if self.auto else template)
        levelled = tuple(sorted(t.paths, key=lambda p: (len(p), p)))  # fill() goes level by level
        if levelled != t.paths:
            t = TreeTemplate(t.name, levelled)
        if t.max_rank > self.k:
            raise ValueError(f"template {t.name} uses rank {t.max_rank - 1} but the matrix keeps k={self.k}")
        self.template = t
        self.shape = TreeShape.from_parents(t.parents(), self.device)
        self._node_depth = np.array([0] + [len(p) for p in t.paths])  # (host copy, for plan_reach)
        parents = self.shape.parents
        ranks = torch.tensor(t.ranks(), dtype=torch.long, device=self.device)
        # per level (nodes lie level by level, in order): each node's parent as an index into
        # the level above, and its rank; token(node) = M.view(-1)[token(parent) * k + rank]
        self._levels = []
        above, start = 0, 1  # first node of the level above, of this level
        for width in t.nodes_per_level():
            end = start + width
            self._levels.append((parents[start:end] - above, ranks[start:end]))
            above, start = start, end
        # acceptance per node given its parent; the prior is the rank prior's ratio
        prior = [1.0] + [rank_prior(p) / rank_prior(p[:-1]) for p in t.paths]
        self.stats = NodeStats(prior, t.parents(), self.device, strength=PRIOR_STRENGTH)
        self._parent_idx = parents.clamp(min=0)
        self._depth_m1 = self.shape.depth - 1
        self._depth_idx = self._depth_m1.clamp(min=0)  # where the target's token for each node sits
        self._is_root = self._depth_m1 < 0
        # plans: (shape, base node indices, serial), on the host (see _plan_for)
        self._plans: dict[tuple[int, ...], tuple[TreeShape, torch.Tensor, int]] = {}
        self._plan: tuple[TreeShape, torch.Tensor, int] | None = None  # the chosen subset (None: plain)
        self._dev_plan: tuple | None = None  # (serial, shape, node indices) of a plan on the device (propose)
        self._by_size: dict[int, list] = {}  # device steps: plan buffers by plan size (see _plan_step)
        self._taken: dict[int, DeviceStep] = {}  # device steps plan_step took since the last choice
        self._full_step: DeviceStep | None = None  # device step of a fixed template
        self._since = RECHOOSE  # steps since the last choice
        self._choice = None  # (latency curve, budget) of the last step's plan (see learn)
        self._clock = 0  # steps taken (every LEARN_EVERY-th one counts acceptance)
        self._planned = None  # the DraftContext whose plan device_step chose (see propose)
        self._plan_key: tuple[int, ...] | None = None  # base nodes of the current plan (() = plain)
        self._base: torch.Tensor | None = None  # the last full base tree's tokens (host steps)
        self._ranked: tuple[np.ndarray, np.ndarray] | None = None  # (P per node, nodes by P) at the last choice
        self._top: dict[int, tuple] = {}  # plans of other sizes from the last choice's ranking (plan_step)
        self._cuts: tuple = ((), {})  # (plan key, {size: base nodes}): cuts of the current plan (plan_step)
        self._options: tuple = (None, None, [])  # plan_options' last (curve, (own size, budget), sizes)
        self.chosen_sizes: dict[int, int] = {}  # draft nodes -> steps (for reports)
        # The acceptance count reads fixed buffers (one CUDA graph replay on a GPU): the base
        # tree the step filled (``fill`` writes it) and [n_accepted, emitted...] of the step
        # (copied from the host), cut to the base's depth, all the count looks at.
        dev = self.device
        self._seen = torch.zeros(self.shape.size, dtype=torch.int32, device=dev)
        # a counted step's base tree, held until the target's next D tokens are known (see learn)
        self._held = torch.zeros_like(self._seen)
        self._after: list[int] | None = None  # the tokens emitted since the held step's root
        D = self.shape.max_depth
        self._seen_host = torch.zeros(D + 1, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._seen_np = self._seen_host.numpy()
        self._seen_out = self._seen_host if dev.type == "cpu" else self._seen_host.to(dev)
        self._counter = Replay(self._count_seen, dev)
        # Realized gain by rank: _realized[k] = nodes accepted among the k best-ranked nodes of
        # the last choice's order (ranks fixed before the outcome, so no winner's curse: the
        # per-node estimates overrate the nodes they rank first and underrate the next ones,
        # and the size choice rests on that margin), decayed sums over counted steps.
        n = self.shape.size
        self._rank_of = torch.arange(n, device=dev)  # each base node's rank (root 0)
        self._rank_host = torch.zeros(n, dtype=torch.long, pin_memory=dev.type == "cuda")  # staging for it
        self._realized = torch.zeros(n, dtype=torch.float32, device=dev)
        self._realized_n = torch.zeros(1, dtype=torch.float32, device=dev)
        # the statistics a choice reads (tries, hits, realized gain, its count), read back without
        # a sync on device steps (see _start_read); [choice arguments, read started] meanwhile
        self._stats_dev = torch.zeros(3 * n + 1, dtype=torch.float32, device=dev)
        self._stats_host = self._stats_dev if dev.type == "cpu" else torch.zeros(3 * n + 1, dtype=torch.float32, pin_memory=True)
        self._stats_np = self._stats_host.numpy()
        self._reading: list | None = None
        self._gain: np.ndarray | None = None  # expected accepted nodes of the top k, k = 0..n-1, at the last choice
        self._miss: dict[int, list[float]] = {}  # plan_miss by plan size, at the last choice
        self._cand: tuple | None = None  # candidates(): (ranked, gain, parents, limit, nodes, tree parents, scores)
        self._filled = False  # a base tree was filled this step (its acceptance may be learnt)

    @property
    def reads_top_k(self) -> int:  # type: ignore[override]
        return self.k

    @property
    def wants_latency(self) -> bool:  # type: ignore[override]
        return self.auto

    @property
    def step_owner(self) -> int:
        """The first element of every ``DeviceStep.key`` this drafter makes (see ``drop_steps``)."""
        return self._serial

    def probs(self) -> np.ndarray:
        """Estimated P(accepted) of every base node (root = 1)."""
        return self.stats.path_probs()

    def _read_stats(self) -> np.ndarray:
        """One read back of everything a choice looks at, at once (a sync on a GPU): for choices
        made between host steps; device steps read without a sync (``_start_read``)."""
        return self._gather_stats().double().cpu().numpy()

    def _gather_stats(self) -> torch.Tensor:
        """Everything a choice looks at, in one buffer on the device: [tries, hits, realized gain
        by rank, its count] (the pending decay applied first)."""
        st = self.stats
        st.fold_decay()
        return torch.cat((st.tries, st.hits, self._realized, self._realized_n), out=self._stats_dev)

    def choose(self, curve: np.ndarray | None, budget: int, read: np.ndarray | None = None) -> int:
        """Pick the node subset for the next steps; returns its size (0 = plain decoding).
        ``read``: the statistics as ``_read_stats`` returned them (else read now)."""
        n_base = self.template.size
        self._taken = {}
        if curve is None:  # no latency curve: the device's fixed default, cut from the base
            k = min(get_template(self.fixed).size, n_base, budget)
            order = np.arange(1, k + 1)
        else:
            st = self.stats
            if read is None:
                read = self._read_stats()
            n = len(st.prior)
            p = st.path_probs(read[: 2 * n].reshape(2, n))
            order = order_nodes(p, st.parents)
            self._ranked = (p, order)
            self._top = {}  # plans of other sizes come from this ranking now (plan_step)
            self._miss = {}
            gain = self._blended_gain(p[order], read[2 * n :])
            self._gain = gain
            limit = min(budget, n_base)
            k = choose_size(np.diff(gain), curve, max_nodes=limit)
            rank = self._rank_host.numpy()
            rank[0] = 0
            rank[order] = np.arange(1, n_base + 1)
            self._rank_of.copy_(self._rank_host, non_blocking=True)  # (pinned on a GPU: no wait)

            def rate(m):
                return (1.0 + gain[m]) / curve[m + 1]

            # On a stepped curve: the step of the device's fixed tree, unless another size is
            # predicted clearly faster (see ANCHOR_MARGIN)
            anchor = self.anchor(curve, limit)
            if anchor is not None and k != anchor and rate(k) < rate(anchor) * (1.0 + ANCHOR_MARGIN):
                k = anchor
            # Hysteresis: keep the current plan (its nodes too) unless one of another size is
            # predicted clearly faster (estimates wobble from step to step; a new plan is host work
            # and device copies, and on an H100 re-laying the 95 best nodes every RECHOOSE steps
            # cost ~0.1 ms a step); back to the anchor at once.
            cur = self._plan_key
            if cur is not None and len(cur) <= limit:
                if k == len(cur) or (k != anchor and rate(k) < rate(len(cur)) * (1.0 + HYSTERESIS)):
                    return len(cur)
        if k == 0:
            self._plan, self._plan_key = None, ()
            return 0
        key = tuple(sorted(int(i) for i in order[:k]))
        self._plan_key = key
        self._plan = self._plan_for(key)
        return k

    def anchor(self, curve: np.ndarray, limit: int) -> int | None:
        """Where the latency curve is stepped (CUDA graphs of a few tree sizes): the plan size
        that fills the step holding the device's fixed tree (tr80: 95 nodes in the 96-node step);
        None where the curve rises node by node there (a CPU)."""
        d = min(get_template(self.fixed).size, limit)
        if d <= 0 or d + 2 >= len(curve):
            return None
        a = d
        while a + 1 <= limit and a + 2 < len(curve) and curve[a + 2] <= curve[d + 1]:
            a += 1
        return a if a - d >= 4 else None  # (a tie of a few sizes is measurement, not a step)

    def _plan_for(self, key: tuple[int, ...]):
        """(shape, base node indices, serial) of the plan drafting base nodes ``key``, on the
        host: a plan is built while a step runs on the device (see ``prepare``), where a copy to
        the device would wait for the step; device steps copy it into their buffers when they
        take it (``_plan_step``), host steps through ``_device_plan``."""
        plan = self._plans.get(key)
        if plan is None:
            idx = [0, *key]
            where = {j: i for i, j in enumerate(idx)}
            par = [-1] + [where[int(self.stats.parents[j])] for j in key]
            plan = (TreeShape.from_parents(par), torch.tensor(idx, dtype=torch.long), next(_SERIALS))
            if len(self._plans) > 512:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _blended_gain(self, ranked_p: np.ndarray, realized: np.ndarray) -> np.ndarray:
        """Expected accepted nodes among the k best-ranked, k = 0..n: the per-node estimates'
        running sum, pulled toward the realized counts by rank as they accumulate (weight
        n / (n + REALIZED_PRIOR) for n counted steps). ``realized``: [counts by rank..., n], as
        read back by ``choose``."""
        model = np.concatenate(([0.0], np.cumsum(np.clip(ranked_p, 0.0, 1.0))))
        real, n = realized[:-1], float(realized[-1])
        if n <= 0:
            return model
        w = n / (n + REALIZED_PRIOR)
        real = np.maximum.accumulate(real / n)  # (a sum of non-negative counts: rounding only)
        return w * real + (1.0 - w) * model

    def plan_gain(self, size: int | None = None) -> float:
        """Expected tokens per step from the current plan (or from the ``size`` best-ranked
        nodes): 1 + the expected accepted count at the last choice (1.0 without a cost-model
        plan)."""
        if self._gain is None:
            return 1.0
        if size is None:
            size = len(self._plan_key or ())
        return 1.0 + float(self._gain[min(int(size), len(self._gain) - 1)])

    def plan_reach(self, size: int) -> np.ndarray:
        """[D]: the probability that the ``size`` best-ranked nodes of the last choice accept at
        least d tokens, d = 1..D (the base's depth): the per-node estimates summed by depth (one
        node at most is accepted per depth), scaled to the plan's expected gain (the realized
        gain by rank, :meth:`plan_gain`), as the per-node estimates are too high as
        probabilities. For drafters that add nodes beside this tree (hybrid): a node of theirs
        at depth d gains only where this tree stops short of d."""
        D = int(self._node_depth.max(initial=0))
        if size <= 0 or self._ranked is None or self._gain is None or D == 0:
            return np.zeros(D)
        p, order = self._ranked
        nodes = order[:size]
        r = np.bincount(self._node_depth[nodes], weights=np.clip(p[nodes], 0.0, 1.0), minlength=D + 1)[1:]
        total = r.sum()
        if total > 0:
            r = np.clip(r * (self._gain[min(size, len(self._gain) - 1)] / total), 0.0, 1.0)
        return r

    def plan_miss(self, size: int) -> list[float]:
        """``1 - plan_reach(size)`` as a Python list, for depths 1..D (index d - 1): the
        probability that the plan stops short of depth d; kept per plan size until the next
        choice (a per-step loop over a few dozen nodes reads a list faster than numpy does an
        array)."""
        got = self._miss.get(size)
        if got is None:
            got = self._miss[size] = (1.0 - self.plan_reach(size)).tolist()
        return got

    def plan_options(self, ctx: DraftContext, budget: int | None = None, curve: np.ndarray | None = None) -> list[int]:
        """Plan sizes for a drafter that adds nodes of its own beside this tree and chooses the
        pair (hybrid): this drafter's own choice first (re-chosen every RECHOOSE steps), then
        the larger sizes that fill a step of the latency curve to its end (a bucketed curve:
        where the next node costs more), up to ``budget``: room the other nodes leave empty.
        Never smaller than its own choice: measured on the H100 (hybrid), plans shrunk to make
        room for retrieval nodes (31 + 8 in the 64-node bucket) lost 14% of the accepted
        tokens, as the retrieval nodes mostly repeat Token Recycling's best branch while
        their expected gains were added as if independent. (Hybrid adds cuts of the plan of its
        own, weighed with the plan's reach by depth: ``hybrid.CUT_FOR``.) Take one with
        :meth:`plan_step`; a size below the current plan's is a cut of that plan."""
        budget = ctx.budget if budget is None else min(ctx.budget, budget)
        curve = ctx.latency if curve is None else curve
        own = self._next_plan(ctx, budget, count=False, curve=curve)
        k = 0 if own is None else own[0].size - 1
        if curve is None or self._gain is None:
            return [k]
        c, key, opts = self._options
        if c is curve and key == (k, budget):  # (the engine's curve changes every few steps at most)
            return opts
        opts = [k]
        hi = min(budget, len(self._gain) - 1, len(curve) - 3)
        lo = k + 1
        if hi >= lo:
            seg = curve[lo + 1 : hi + 2]  # the steps of P + 1 nodes, P = lo .. hi
            ends = np.flatnonzero(curve[lo + 2 : hi + 3] > seg) + lo  # P where one more node costs more
            if len(ends) <= 4:  # (more: not a bucketed curve, every node costs more)
                opts += [int(P) for P in ends if P != k]
        self._options = (curve, (k, budget), opts)
        return opts

    def plan_step(self, size: int) -> DeviceStep | None:
        """The device step drafting the ``size`` best-ranked nodes of the last choice (one of
        :meth:`plan_options`); None for 0 (a plain step)."""
        self._since += 1
        self.chosen_sizes[size] = self.chosen_sizes.get(size, 0) + 1
        if size == 0:
            return None
        self._filled = True
        ds = self._taken.get(size)  # (a size's plan, and what its buffer holds, change only with a choice)
        if ds is None:
            ds = self._taken[size] = self._plan_step(self._sized_plan(size))
        return ds

    def prepare(self, sizes) -> None:
        """Build the plans of ``sizes`` (``plan_options``' sizes, or cuts of the current plan)
        now, for :meth:`plan_step` to take: host work, for the window while a step runs on the
        device (a new choice's plans, ~0.1 ms each on the CPU, were built at the next step)."""
        for size in sizes:
            if size > 0:
                self._sized_plan(size)

    def _sized_plan(self, size: int):
        """The plan of the ``size`` best-ranked nodes (a cut of the current plan below its size)."""
        if self._plan_key is not None and size == len(self._plan_key):
            return self._plan
        plan = self._top.get(size)
        if plan is None:
            cur = self._plan_key
            if cur and size < len(cur):
                # a cut of the current plan (its best nodes, by the ranking of the first cut),
                # kept while the plan is: a cut re-ranked at every choice would re-lay its
                # buffer, and the base rows of the trees attached beside it, every RECHOOSE steps
                if self._cuts[0] != cur:
                    self._cuts = (cur, {})
                key = self._cuts[1].get(size)
                if key is None:
                    inside = set(cur)
                    key = self._cuts[1][size] = tuple(sorted([int(i) for i in self._ranked[1] if int(i) in inside][:size]))
            else:
                key = tuple(sorted(int(i) for i in self._ranked[1][:size]))
            plan = self._top[size] = self._plan_for(key)
        return plan

    def laid_plan(self, shape: TreeShape) -> tuple[int, tuple[int, ...]]:
        """(version, structure) of what ``shape`` (a step's tree) holds now: a plan buffer
        rewritten in place with another plan gets a new version, and its ``parents_list`` stays
        the first plan's, so the structure is the plan laid last. For buffers laid out after it
        (``tree.AttachBuffer``)."""
        got = self._by_size.get(shape.size)
        if got is not None and got[0] is shape:
            return got[2], got[4]
        return 0, shape.parents_list

    @property
    def wants_prompt_logits(self) -> bool:  # type: ignore[override]
        return self.seed_from_prompt

    # ------------------------------------------------------------------ drafting
    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        if self._after is not None:  # the last request's held count: its next tokens never come
            self._count_held()
        if prompt_logits is not None:
            ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
            self.matrix[ids] = top_k_ids(prompt_logits, self.k).to(torch.int32)

    def candidates(self, limit: int = 64) -> HostTree | None:
        """The ``limit`` most probable nodes of this step's base tree, scored by P(accepted),
        on the host (one device->host copy): for drafters that merge them with other trees.

        A node's score is the expected gain of its rank in the last choice's order (the
        realized gain by rank, blended with the estimates as for the size choice; made
        non-increasing down the ranking, so a parent scores at least its children): the
        per-node estimates lean on the rank prior and rank nodes well, but as probabilities
        they are as far off as the prior. (SmolLM2 on the CPU, Spec-Bench 5 per category,
        hybrid over suffix decoding alone in the same run: 0.974 scored by the estimates,
        0.992 by rank.)"""
        if self._base is None or self._ranked is None:
            return None
        got = self._cand
        if (got is None or got[0] is not self._ranked or got[1] is not self._gain
                or got[2] is not self.stats.parents or got[3] != limit):
            # the structure and scores change only with the choice (every RECHOOSE steps); a
            # step changes the tokens alone (SmolLM2 on the CPU: 157 -> 26 us a step)
            p, order = self._ranked
            scores = p.copy()
            if self._gain is not None:
                marg = np.minimum.accumulate(np.maximum(np.diff(self._gain), 0.0))
                scores[order[: len(marg)]] = marg
            scores[0] = 1.0
            n = len(scores)
            keep = sorted(int(i) for i in order[:limit])
            sub = _subset(HostTree(list(range(n)), [int(x) for x in self.stats.parents], scores.tolist()), keep)
            got = self._cand = (self._ranked, self._gain, self.stats.parents, limit, sub.tokens, sub.parents, sub.scores)
        tokens = self._base.tolist()
        return HostTree([tokens[i] for i in got[4]], list(got[5]), list(got[6]))

    def fill(self, root: torch.Tensor) -> torch.Tensor:
        """The base template's tokens under ``root``: three small kernels per level (the
        parents' tokens, the flat offsets, the gather), one concatenation at the end (into the
        buffer the acceptance count reads)."""
        flat = self.matrix.view(-1)
        level = root.view(1).to(flat.dtype)
        out = [level]
        for parents, ranks in self._levels:
            level = flat.index_select(0, torch.add(ranks, level.index_select(0, parents), alpha=self.k))
            out.append(level)
        return torch.cat(out, out=self._seen).long()

    def fill_plain(self, root: torch.Tensor) -> torch.Tensor:
        """A plain step's one token (the root) after filling the base tree all the same, so
        that the automatic tree keeps learning while it drafts nothing (device steps; call
        :meth:`filled` when handing it out)."""
        self.fill(root)
        return root.view(1)

    def filled(self) -> None:
        """This step fills the base tree (on the device): ``learn`` may count it."""
        self._filled = True

    def propose(self, ctx: DraftContext) -> Draft | None:
        if self.template.size == 0:
            return None
        tokens = self._base = self.fill(ctx.root)
        self._filled = True
        if not self.auto:
            if ctx.budget < self.template.size:
                return None
            return Draft(tokens, self.shape)
        if self._planned is ctx:  # device_step chose (no plan) for this very step
            self._planned = None
            plan = self._plan
        else:
            plan = self._next_plan(ctx)
        if plan is None:
            return None
        shape, idx = self._device_plan(plan)
        return Draft(tokens.index_select(0, idx), shape)

    def _device_plan(self, plan) -> tuple[TreeShape, torch.Tensor]:
        """A plan's shape and node indices on the drafter's device (kept for the current plan)."""
        if self.device.type == "cpu":
            return plan[0], plan[1]
        got = self._dev_plan
        if got is None or got[0] != plan[2]:
            got = self._dev_plan = (plan[2], plan[0].to(self.device), plan[1].to(self.device))
        return got[1], got[2]

    def _next_plan(self, ctx: DraftContext, budget: int | None = None, count: bool = True, curve=None):
        """The node subset for this step (re-chosen every RECHOOSE steps); None = plain.
        ``count``: this step takes it (else the caller picks with plan_step). ``curve``: the
        latency curve to choose by (default ``ctx.latency``)."""
        budget = ctx.budget if budget is None else budget
        curve = ctx.latency if curve is None else curve
        if self._since >= RECHOOSE or (self._plan is not None and self._plan[0].size - 1 > budget):
            self.choose(curve, budget)
            self._since = 0
        self._choice = None if curve is None else (curve, budget)
        plan = self._plan
        if count:
            self._since += 1
            n = 0 if plan is None else plan[0].size - 1
            self.chosen_sizes[n] = self.chosen_sizes.get(n, 0) + 1
        return plan

    def observe(self, draft: Draft, logits: torch.Tensor, accepted: list[int], top: torch.Tensor | None = None) -> None:
        self.update(draft.tokens, logits, top)
        self.learn(accepted)

    def learn(self, accepted: list[int], defer: bool = False, then=None):
        """Acceptance statistics of every base node from the tokens this step emitted (see
        ``_learn_counts``). ``defer`` (device steps): when the plan is due to be re-chosen, the
        read back of the statistics is returned with the deferred work, to start while the next
        step computes (``_start_read``), and the choice at the step after that, with that step's
        deferred work: ~0.15 ms of host work every RECHOOSE steps (an H100 machine's host: ~3x
        that) and the read's sync off the steps' critical path; the plan it picks drafts from the
        step after. ``then``: a callable to run after such a deferred choice (a caller's own
        preparation for the new plan)."""
        later = self._learn_counts(accepted, defer)
        if not defer or not self.auto:
            return later
        if self._reading is not None and self._reading[1]:
            # the read started in the last window is done: the step since ended with a sync
            args = self._reading[0]
            self._reading = None
            choice = functools.partial(self.choose, *args, read=self._stats_np.astype(np.float64))
            if then is not None:
                choice = _both(choice, then)
            later = choice if later is None else _both(later, choice)
        elif self._since >= RECHOOSE and self._choice is not None and self._reading is None:
            self._since = 0
            self._reading = [self._choice, False]
            later = self._start_read if later is None else _both(later, self._start_read)
        return later

    def _start_read(self) -> None:
        """Start the read back of the statistics for a choice (deferred work, while a step runs
        on the device): into pinned memory, without a wait; ``learn`` hands it to the choice at
        the next step, whose end (the step's one sync) follows the copy. On an H100 machine's
        host a read with a sync between steps cost 55 us alone and ~240 us inside a run (the
        concatenation, the copy and the sync on the critical path, every RECHOOSE steps)."""
        if self._reading is None:  # (dropped by reset / load meanwhile)
            return
        self._gather_stats()
        if self._stats_dev is not self._stats_host:
            self._stats_host.copy_(self._stats_dev, non_blocking=True)
        self._reading[1] = True

    def _learn_counts(self, accepted: list[int], defer: bool = False):
        """Acceptance statistics of every base node from the tokens this step emitted (host
        steps: ``observe``; device steps: ``DeviceStep.done``, with ``defer``).

        A counted step's base tree is held and counted once the target's next D tokens (the
        base's depth) are known, from this step's tokens and the next steps' (greedy, and
        sampling with position-tied noise, emit the same tokens whatever was drafted). Counted
        at once, a node below the step's bonus token could never count as accepted: bigger
        plans, whose gain lies there, looked worse than they are (the realized gain by rank
        is the sum over exactly those nodes). A count still short of D tokens at the next counted
        step or request counts what is known by then.

        ``defer``: return the work that may wait until the next step is running on the device
        (handing a held count its tokens, and counting it: ~15 kernel launches) as a callable,
        or None; a counted step's own work (it snapshots the base tree the step filled, before
        the next step fills it again) is done at once. Called in order, the deferred parts
        leave the statistics as ``learn`` without ``defer`` does."""
        counts = False
        if self._filled and self.auto:
            self._filled = False
            counts = self._learns()
        if not counts:
            after = self._after
            if after is None:
                return None
            after.extend(accepted)  # (the held count's next tokens: only counting it waits)
            if len(after) < len(self._seen_np) - 1:
                return None
            if defer:
                return self._count_held
            self._count_held()
            return None
        self._feed(accepted)
        if not counts:
            return None
        if self._after is not None:  # the last count's tokens came slowly: count what is known
            self._count_held()
        self._held.copy_(self._seen)  # (on the device, before the next step fills _seen again)
        self._after = list(accepted)
        if len(self._after) >= len(self._seen_np) - 1:
            if defer:  # (the next step does not touch _held)
                return self._count_held
            self._count_held()
        return None

    def _feed(self, accepted: list[int]) -> None:
        """The held count's next tokens; counted once it has the base's depth of them."""
        if self._after is not None:
            self._after.extend(accepted)
            if len(self._after) >= len(self._seen_np) - 1:
                self._count_held()

    def _done(self, accepted: list[int]):
        return self.learn(accepted, defer=True)

    def _count_held(self) -> None:
        after, self._after = self._after, None
        h = self._seen_np
        D = len(h) - 1  # the count looks no deeper than the base tree
        m = min(len(after), D)
        h[0] = m - 1
        h[1 : m + 1] = after[:m]
        if self._seen_out is not self._seen_host:  # pinned: asynchronous (the last count is done)
            self._seen_out.copy_(self._seen_host, non_blocking=True)
        self._counter()

    def _count_seen(self) -> None:
        out = self._seen_out
        self._count(self._held, out[1:], out[0])

    def _learns(self) -> bool:
        """Whether this step counts acceptance (one in LEARN_EVERY; host and device steps alike)."""
        learn = self._clock % LEARN_EVERY == 0
        self._clock += 1
        if learn:
            self.stats.tick(LEARN_EVERY)
        return learn

    def _count(self, base: torch.Tensor, emitted: torch.Tensor, n_acc: torch.Tensor) -> None:
        """Tensor code (graph-capturable): ``emitted[:n_acc + 1]`` are the step's tokens."""
        known = self._depth_m1 <= n_acc  # the target's token at this depth is known this step
        match = ((base == emitted[self._depth_idx.minimum(n_acc)]) & known) | self._is_root
        on_path = (self.shape.ancestors <= match[None, :]).all(1)  # every node on the path matches
        tried = on_path[self._parent_idx] & known & ~self._is_root
        self.stats.count(tried, on_path & tried)
        hit = (on_path & ~self._is_root).float()  # would have been accepted, drafted or not
        by_rank = torch.zeros_like(self._realized).scatter_(0, self._rank_of, hit)
        f = self.stats.decay**LEARN_EVERY
        self._realized.mul_(f).add_(by_rank.cumsum(0))
        self._realized_n.mul_(f).add_(1.0)

    # ------------------------------------------------------------------ whole steps on the device
    def device_step(self, ctx: DraftContext, budget: int | None = None) -> DeviceStep | None:
        """This step as tensor code for ``Backend.step`` (one CUDA graph per plan), or None for
        a plain step. The same fill / update / statistics as ``propose`` and ``observe``.
        ``ctx.root`` is not read (it may be None): the backend holds the root on the device.
        ``budget``: most draft nodes, if fewer than ``ctx.budget`` (room for other nodes)."""
        if self.template.size == 0:
            return None
        budget = ctx.budget if budget is None else min(ctx.budget, budget)
        if not self.auto:
            if budget < self.template.size:
                return None
            if self._full_step is None:
                self._full_step = DeviceStep((self._serial, "full", self.template.name), self.shape, self.fill,
                                             self._observe_update)
            return self._full_step
        plan = self._next_plan(ctx, budget)
        if plan is None:
            self._planned = ctx  # a host step follows: propose must not choose again
            return None
        self._filled = True
        return self._plan_step(plan)

    def _plan_step(self, plan) -> DeviceStep:
        """The plan laid into buffers kept per plan size, and the one device step that reads
        them: a captured step reads its tree structure and node indices from the buffers, so
        a new plan of a size seen before is a few device copies, not a new CUDA graph capture
        per KV extent (measured on an H100: the choice moved between plans of one size, and
        every move recaptured). The statistics are counted after the step (``done``), so one
        graph serves steps that count and steps that do not."""
        shape, idx, serial = plan
        n = shape.size
        got = self._by_size.get(n)
        if got is None:
            D = self.shape.max_depth  # the base template's depth bounds every plan's
            dev = self.device
            paths = torch.zeros(n, D + 1, dtype=torch.long, device=dev)
            paths[:, : shape.max_depth + 1].copy_(shape.paths)
            buf = TreeShape(parents=shape.parents.to(dev, copy=True), depth=shape.depth.to(dev, copy=True),
                            ancestors=shape.ancestors.to(dev, copy=True), paths=paths, max_depth=D,
                            parents_list=shape.parents_list)  # (parents_list: the first plan's)
            bidx = idx.to(dev, copy=True)

            def fill(root, bidx=bidx):
                return self.fill(root).index_select(0, bidx)

            ds = DeviceStep((self._serial, "auto", n, next(_SERIALS)), buf, fill, self._observe_update,
                            done=self._done)
            got = self._by_size[n] = [buf, bidx, serial, ds, shape.parents_list]
        buf, bidx, current, ds, _ = got
        if current != serial:  # rewrite in place (host-to-device copies, between steps)
            buf.parents.copy_(shape.parents)
            buf.depth.copy_(shape.depth)
            buf.ancestors.copy_(shape.ancestors)
            buf.paths.zero_()
            buf.paths[:, : shape.max_depth + 1].copy_(shape.paths)
            bidx.copy_(idx)
            got[2] = serial
            got[4] = shape.parents_list
        return ds

    def _observe_update(self, tokens, logits, verdict) -> None:
        self.update(tokens, logits)

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, top: torch.Tensor | None = None) -> None:
        """Overwrite the rows of ``tokens`` with the top-k of their ``logits`` (``top``: those
        ids, already computed)."""
        self.matrix[tokens] = (top_k_ids(logits, self.k) if top is None else top).to(torch.int32)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.matrix.zero_()
        self.stats.reset()
        self._realized.zero_()
        self._realized_n.zero_()
        self._after = None  # a held count belongs to the statistics just cleared
        self._reading = None  # and so does a read under way
        self._since = RECHOOSE

    def save(self, path: str | Path) -> None:
        """The matrix and the acceptance statistics of the base template's nodes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": "freespec-recycling-1", "k": self.k, "matrix": self.matrix.cpu(),
                    "template": self.template.name, "stats": self.stats.state_dict()}, tmp)
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "freespec-recycling-1":
            raise ValueError(f"{path} is not a freespec Token Recycling state file")
        m = state["matrix"]
        if tuple(m.shape) != (self.vocab_size, self.k):
            raise ValueError(
                f"{path} holds a matrix of shape {tuple(m.shape)}, this model needs {(self.vocab_size, self.k)}"
            )
        self.matrix.copy_(m.to(self.device))
        stats = state.get("stats")
        if stats is not None and state.get("template") == self.template.name:
            self.stats.load_state_dict(stats)
        self._after = None  # a held count is of the matrix and statistics replaced
        self._reading = None
        self._since = RECHOOSE


def _both(a, b):
    """One deferred callable running ``a`` then ``b``."""
    return lambda: (a(), b())


def default_template(device: torch.device | str) -> str:
    """The fixed tree used where no latency curve is at hand (``template="auto"`` without one).

    On a GPU a verify pass costs about the same for 1 or 100+ tokens, so the published 80-node
    tree pays (H100, Qwen2.5-Coder-1.5B bf16: 2.11x over plain, tr160 no better). On a 2-core
    CPU the pass is compute-bound and every extra node costs: SmolLM2-135M fp32 gave 0.88x
    (tr4), 0.76x (tr16), 0.75x (tr8), 0.49x (tr80) against plain decoding, so the smallest
    tree is the least bad there (docs/benchmarks.md).
    """
    return "tr80" if torch.device(device).type == "cuda" else "tr4"
