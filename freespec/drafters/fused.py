"""Fused: the draft model's tree and a retrieval tree in one (RASD, arXiv 2503.03434).

Per step the draft model expands its tree (``DraftModelDrafter``) and the retrieval drafter
(suffix decoding by default) finds its tree. Retrieval branches whose first token the draft
model finds unlikely (probability below ``prune_prob`` and outside its ``prune_topk``) are
pruned; the rest are merged into the draft model's tree by common prefix, so a retrieved
continuation that starts like one of the draft model's guesses extends it instead of
doubling it. A retrieval node's priority is its own probability estimate times the draft
model's probability of its branch's first token; when the merged tree is over the node
budget the lowest-priority nodes go.
"""

from __future__ import annotations

import torch

from .base import DraftContext, Drafter
from .draft_model import DraftModelDrafter, DraftModelError
from .hybrid import RETRIEVERS
from .merge import HostTree, merge_trees, prune, to_draft


class FusedDrafter(Drafter):
    """Draft-model tree + retrieval tree, pruned by draft probability (needs ``draft_model=``).

    Knobs:
      draft_model: an HF causal LM sharing the target's tokenizer (``--draft-model``).
      depth (5), width (4), topk (None), max_nodes (16), min_prob (0.0): the draft model's
        tree (see DraftModelDrafter).
      retrieval ('suffix'): 'suffix' or 'lookup'.
      retrieval_kw ({}): the retrieval drafter's knobs (e.g. {'max_nodes': 16}).
      min_match (2): shortest suffix match whose retrieval tree is considered.
      prune_prob (0.05), prune_topk (4): a retrieval branch stays if the draft model gives
        its first token at least ``prune_prob`` or ranks it among its ``prune_topk`` best.
      total_nodes (None): cap on merged draft nodes (default: ``max_nodes`` plus the
        retrieval drafter's ``max_nodes``); the engine's budget caps it too.
      retriever (None): a prebuilt retrieval drafter (to share its store).
    """

    name = "fused"
    needs_draft_model = True

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str = "cpu",
        draft_model=None,
        depth: int = 5,
        width: int = 4,
        topk: int | None = None,
        max_nodes: int = 16,
        min_prob: float = 0.0,
        retrieval: str = "suffix",
        retrieval_kw: dict | None = None,
        min_match: int = 2,
        prune_prob: float = 0.05,
        prune_topk: int = 4,
        total_nodes: int | None = None,
        retriever: Drafter | None = None,
    ):
        if draft_model is None:
            raise DraftModelError(f"the {self.name} drafter needs a draft model: pass --draft-model NAME")
        self.dm = DraftModelDrafter(vocab_size, device, draft_model=draft_model, depth=depth, width=width,
                                    topk=topk, max_nodes=max_nodes, min_prob=min_prob)
        if retriever is None:
            if retrieval not in RETRIEVERS:
                raise ValueError(f"unknown retrieval {retrieval!r}; use one of {', '.join(RETRIEVERS)}")
            retriever = RETRIEVERS[retrieval](vocab_size=vocab_size, device=device, **(retrieval_kw or {}))
        self.retriever = retriever
        self.min_match = int(min_match)
        self.prune_prob = float(prune_prob)
        self.prune_topk = int(prune_topk)
        r_nodes = int(getattr(retriever, "max_nodes", 16) or 16)
        self.total_nodes = int(total_nodes) if total_nodes is not None else self.dm.max_nodes + r_nodes
        self.device = torch.device(device)
        self.pruned = 0  # retrieval branches pruned so far
        self.kept = 0  # retrieval branches merged so far

    @property
    def cache_len(self) -> int:
        return self.dm.cache_len

    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        self.dm.begin(prompt)
        self.retriever.begin(prompt)

    def fuse(self, ctx: DraftContext) -> HostTree | None:
        limit = min(self.total_nodes, ctx.budget)
        if limit < 1:
            return None
        tree = self.dm.expand(ctx)
        r = self.retriever.retrieve(ctx)
        if r is None or r.match_len < self.min_match:
            return tree
        rt = r.tree
        if tree is None:
            return rt if rt.size - 1 <= limit else merge_trees([rt], limit)
        # the draft model's opinion of each retrieval branch's first token (one host copy)
        first = [i for i in range(1, rt.size) if rt.parents[i] == 0]
        lp = self.dm.root_logp
        C = lp.shape[0]
        toks = torch.tensor([min(rt.tokens[i], C - 1) for i in first], dtype=torch.long, device=lp.device)
        parts = [lp[toks].exp()]
        if self.prune_topk > 0:
            parts.append(lp.topk(min(self.prune_topk, C)).indices.to(lp.dtype))
        host = torch.cat(parts).tolist()
        q1 = {i: (host[j] if rt.tokens[i] < C else 0.0) for j, i in enumerate(first)}
        top = {int(t) for t in host[len(first):]}
        keep = {i for i in first if q1[i] >= self.prune_prob or rt.tokens[i] in top}
        self.pruned += len(first) - len(keep)
        self.kept += len(keep)
        if not keep:
            return tree
        # a node's branch is its depth-1 ancestor
        branch = [0] * rt.size
        for i in range(1, rt.size):
            branch[i] = i if rt.parents[i] == 0 else branch[rt.parents[i]]
        scored = HostTree(rt.tokens, rt.parents, [1.0] + [rt.scores[i] * q1[branch[i]] for i in range(1, rt.size)])
        kept = prune(scored, lambda i: branch[i] in keep)
        return merge_trees([tree, kept], limit)

    def propose(self, ctx: DraftContext):
        tree = self.fuse(ctx)
        return None if tree is None else to_draft(tree, ctx.root.device)

    def observe(self, draft, logits: torch.Tensor, accepted: list[int]) -> None:
        self.dm.observe(draft, logits, accepted)
        self.retriever.observe(draft, logits, accepted)

    def end(self, tokens: list[int]) -> None:
        self.dm.end(tokens)
        self.retriever.end(tokens)
