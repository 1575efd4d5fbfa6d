"""Token Recycling (arXiv 2408.08696): the candidates the target computes anyway become drafts.

State: M [vocab, k], M[t] = the top-k tokens the target last predicted after token t. After
each verification pass, every tree token's row is overwritten with the top-k of its logits
(one ``topk`` and one ``index_put`` on the device). Drafting fills a static template by one
gather per level: token(node) = M[token(parent), rank(node)].

Hot start: M lives as long as the drafter (one per model per process in the CLI and server),
across prompts and turns; ``reset``, ``save`` and ``load`` manage it explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tree import Draft, TreeShape, TreeTemplate, get_template
from .base import DraftContext, Drafter


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(
        self,
        vocab_size: int,
        template: str | int | TreeTemplate = "tr80",
        k: int = 8,
        device: torch.device | str = "cpu",
        seed_from_prompt: bool = False,
    ):
        self.vocab_size = int(vocab_size)
        self.k = min(int(k), self.vocab_size)
        self.device = torch.device(device)
        self.seed_from_prompt = seed_from_prompt
        self.matrix = torch.zeros(self.vocab_size, self.k, dtype=torch.int32, device=self.device)
        self.set_template(template)

    # ------------------------------------------------------------------ template
    def set_template(self, template: str | int | TreeTemplate) -> None:
        t = get_template(template)
        if t.max_rank > self.k:
            raise ValueError(f"template {t.name} uses rank {t.max_rank - 1} but the matrix keeps k={self.k}")
        self.template = t
        self.shape = TreeShape.from_parents(t.parents(), self.device)
        parents = self.shape.parents
        ranks = torch.tensor(t.ranks(), dtype=torch.long, device=self.device)
        depth = self.shape.depth
        # one (nodes, flat source offsets) pair per level: M.view(-1)[token(parent) * k + rank]
        self._levels = []
        for d in range(1, self.shape.max_depth + 1):
            nodes = (depth == d).nonzero().view(-1)
            self._levels.append((nodes, parents[nodes], ranks[nodes]))

    @property
    def wants_prompt_logits(self) -> bool:  # type: ignore[override]
        return self.seed_from_prompt

    # ------------------------------------------------------------------ drafting
    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        if prompt_logits is not None:
            ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
            self.matrix[ids] = prompt_logits.topk(self.k, dim=-1).indices.to(torch.int32)

    def propose(self, ctx: DraftContext) -> Draft | None:
        if self.template.size == 0 or ctx.budget < self.template.size:
            return None
        tokens = torch.empty(self.shape.size, dtype=torch.long, device=self.device)
        tokens[:1] = ctx.root
        flat = self.matrix.view(-1)
        for nodes, parents, ranks in self._levels:
            tokens[nodes] = flat[tokens[parents] * self.k + ranks].long()
        return Draft(tokens, self.shape)

    def observe(self, draft: Draft, logits: torch.Tensor, accepted: list[int]) -> None:
        self.update(draft.tokens, logits)

    def update(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Overwrite the rows of ``tokens`` with the top-k of their ``logits``."""
        self.matrix[tokens] = logits.topk(self.k, dim=-1).indices.to(torch.int32)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.matrix.zero_()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": "freespec-recycling-1", "k": self.k, "matrix": self.matrix.cpu()}, tmp)
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


def default_template(device: torch.device | str) -> str:
    """The tree used when none is named.

    On a GPU a verify pass costs about the same for 1 or 100+ tokens, so the published 80-node
    tree pays (H100, Qwen2.5-Coder-1.5B bf16: 2.11x over plain, tr160 no better). On a 2-core
    CPU the pass is compute-bound and every extra node costs: SmolLM2-135M fp32 gave 0.88x
    (tr4), 0.76x (tr16), 0.75x (tr8), 0.49x (tr80) against plain decoding, so the smallest
    tree is the least bad there (docs/benchmarks.md).
    """
    return "tr80" if torch.device(device).type == "cuda" else "tr4"
