"""A small model with the target's tokenizer drafts a tree (EAGLE-2 style dynamic expansion).

Per step: one draft-model forward for the root (plus any committed tokens the draft cache
lacks), then one forward per depth level over the frontier with tree attention. Each
frontier node proposes its ``topk`` most likely next tokens; of all of them, the ``width``
with the highest cumulative draft probability (product along the path) form the next
level. Finally the ``max_nodes`` nodes with the highest cumulative probability (at least
``min_prob``) make the draft, in topological order. Only one device->host copy per step, at
the end.

The draft model's KV cache (an ``HFBackend`` extended with provisional tree levels) follows
the target: when the target has verified, the accepted nodes that the draft model has
already seen keep their KV, the rest of the tree's KV is dropped, and accepted tokens the
draft model never saw (a leaf, the bonus token) are fed with the next root. At the start of
every ``propose`` the draft cache holds exactly the committed tokens before the root.

The draft probabilities of the last tree are kept (``last_q``: each node's token probability
given its parent; ``last_cum_q``: along the path) for samplers that want them; acceptance
goes through the engine's verifier, so sampling stays exact with these deterministic drafts.
"""

from __future__ import annotations

import math

import torch

from ..backends.hf import HFBackend
from .base import DraftContext, Drafter
from .merge import HostTree, to_draft


class DraftModelError(ValueError):
    pass


class _TreeCache(HFBackend):
    """``HFBackend`` plus ``extend``: score more tree nodes on top of the provisional ones."""

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, attend: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append nodes ``tokens`` [w]; ``attend`` [w, pending + w] says which provisional
        entries (earlier nodes, then these) each may see; committed entries are always seen."""
        w = tokens.shape[0]
        total = self._len + self._pending + w
        mask = torch.zeros(1, 1, w, total, dtype=self.dtype, device=self.device)
        mask[0, 0, :, self._len :].masked_fill_(~attend, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=tokens.view(1, -1),
            position_ids=positions.view(1, -1),
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._pending += w
        return out.logits[0]


def _output_size(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _input_size(model) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)


class DraftModelDrafter(Drafter):
    """A draft model expands a tree by its own probabilities (needs ``draft_model=``).

    Knobs:
      draft_model: an HF causal LM sharing the target's tokenizer (``--draft-model``).
      depth (5): tree depth; the draft model runs once per level (the root's forward, which
        also feeds the tokens accepted last step, included).
      width (4): nodes kept per depth level (by cumulative draft probability).
      topk (None = width): candidate children per frontier node.
      max_nodes (16): most draft nodes (best cumulative probability first); the engine's
        budget caps it too.
      min_prob (0.0): nodes whose cumulative draft probability is lower are dropped.
    """

    name = "draft-model"
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
    ):
        if draft_model is None:
            raise DraftModelError(f"the {self.name} drafter needs a draft model: pass --draft-model NAME")
        if depth < 1 or width < 1 or max_nodes < 1:
            raise ValueError("depth, width and max_nodes must be >= 1")
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.model = draft_model
        self.cache = _TreeCache(draft_model)
        self.ddev = self.cache.device
        draft_vocab = _output_size(draft_model)
        self.common = min(self.vocab_size, draft_vocab)  # draft only tokens both vocabularies have
        if self.common < 2:
            raise DraftModelError(f"the draft model's vocabulary ({draft_vocab}) does not fit the target's")
        self.n_embed = _input_size(draft_model)
        self.depth = int(depth)
        self.width = int(width)
        self.topk = min(int(topk) if topk else self.width, self.common)
        self.max_nodes = int(max_nodes)
        self.min_prob = float(min_prob)
        self.last_q: list[float] | None = None
        self.last_cum_q: list[float] | None = None
        self.root_logp: torch.Tensor | None = None  # [common] draft log-probs after the root, last step
        self._tree = None  # (children dict, fed offset per node) of the last expansion, until committed

    # ------------------------------------------------------------------ cache bookkeeping
    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        self.cache.reset()
        self._tree = None
        if prompt and len(prompt) < self.cache.max_length:
            self.cache.prefill(self._ids(prompt))

    def _ids(self, tokens) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long).to(self.ddev)
        if self.n_embed < self.vocab_size:  # a target-only token: the draft model cannot read it
            ids = ids.clamp(max=self.n_embed - 1)
        return ids

    @property
    def cache_len(self) -> int:
        return self.cache.cache_len

    def _settle(self, accepted: list[int]) -> None:
        """Keep the KV of the accepted nodes the draft model has seen; drop the rest.

        ``accepted``: the tokens committed after the last root (draft tokens, then the bonus).
        """
        if self._tree is None:
            return
        children, fed = self._tree
        self._tree = None
        keep = []
        node = 0
        for t in accepted[:-1]:
            node = children.get((node, t), -1)
            if node < 0 or fed[node] < 0:
                break
            keep.append(fed[node])
        path = torch.tensor(keep, dtype=torch.long, device=self.ddev)
        self.cache.commit(path, len(keep))

    def sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the cache to ``tokens[:-1]`` plus the root ``tokens[-1]`` committed; return the
        root's draft logits. Leaves the cache at ``len(tokens)`` committed tokens."""
        if self._tree is not None:  # observe() was not called: settle from the tokens
            self._settle(list(tokens[self.cache.cache_len :]))
        have = self.cache.cache_len
        if have >= len(tokens):  # the engine went elsewhere: start over
            self.cache.reset()
            have = 0
        return self.cache.prefill(self._ids(tokens[have:]))

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def expand(self, ctx: DraftContext, max_nodes: int | None = None) -> HostTree | None:
        """The draft tree on the host (scores = cumulative draft probabilities)."""
        limit = min(self.max_nodes if max_nodes is None else max_nodes, ctx.budget)
        tokens = ctx.tokens
        L = len(tokens)
        depth = min(self.depth, limit)
        if limit < 1 or L + depth > self.cache.max_length:
            return None
        root_logits = self.sync(tokens)  # the cache now holds tokens[:L]; tree nodes go on top
        dev, C, W, K = self.ddev, self.common, self.width, self.topk
        logp = torch.log_softmax(root_logits[:C].float(), -1)
        self.root_logp = logp
        vals, idx = logp.topk(min(K, C))
        vals, idx = vals[:W], idx[:W]
        # all nodes (root excluded), level by level, on the device
        toks, pars, cums, qs, levels = [idx], [torch.zeros_like(idx)], [vals], [vals], []
        f_tok, f_cum = idx, vals
        f_node = torch.arange(1, idx.shape[0] + 1, device=dev)  # node ids (root = 0)
        n_nodes = idx.shape[0]
        fed_rows = torch.zeros(0, 0, dtype=torch.bool, device=dev)  # ancestor rows among fed nodes
        fed_of_node = torch.full((1 + n_nodes,), -1, dtype=torch.long, device=dev)
        f_parent_fed = torch.full_like(idx, -1)  # fed index of each frontier node's parent (-1: root)
        for d in range(1, depth):
            w = f_tok.shape[0]
            F = fed_rows.shape[0]
            # rows for the new fed nodes: parent's row (or none), plus themselves
            par_rows = torch.zeros(w, F, dtype=torch.bool, device=dev)
            has_par = f_parent_fed >= 0
            if F:
                par_rows[has_par] = fed_rows[f_parent_fed[has_par]]
            rows = torch.cat([par_rows, torch.eye(w, dtype=torch.bool, device=dev)], 1)
            grown = torch.zeros(F + w, F + w, dtype=torch.bool, device=dev)
            grown[:F, :F] = fed_rows
            grown[F:] = rows
            fed_rows = grown
            fed_of_node[f_node] = torch.arange(F, F + w, device=dev)
            pos = torch.full((w,), L - 1 + d, dtype=torch.long, device=dev)
            logits = self.cache.extend(self._clamp(f_tok), rows, pos)
            lp = torch.log_softmax(logits[:, :C].float(), -1)
            v, i = lp.topk(K, dim=-1)  # [w, K]
            cum = (f_cum[:, None] + v).view(-1)
            best, sel = cum.topk(min(W, cum.shape[0]))
            src = sel // K
            f_tok = i.view(-1)[sel]
            q = v.view(-1)[sel]
            f_parent_fed = torch.arange(F, F + w, device=dev)[src]
            parent_node = f_node[src]
            f_cum = best
            f_node = torch.arange(n_nodes + 1, n_nodes + 1 + f_tok.shape[0], device=dev)
            n_nodes += f_tok.shape[0]
            fed_of_node = torch.cat([fed_of_node, torch.full_like(f_tok, -1)])
            toks.append(f_tok)
            pars.append(parent_node)
            cums.append(f_cum)
            qs.append(q)
        # the one device->host copy
        host = torch.stack(
            [torch.cat(toks).double(), torch.cat(pars).double(), torch.cat(cums).double(), torch.cat(qs).double()]
        ).tolist()
        fed = fed_of_node.tolist()
        h_tok, h_par, h_cum, h_q = host
        n = len(h_tok)
        order = sorted(range(n), key=lambda j: (-h_cum[j], j))
        floor = math.log(self.min_prob) if self.min_prob > 0 else float("-inf")
        keep = sorted(j for j in order[:limit] if h_cum[j] >= floor)
        new = {0: 0}
        t_out, p_out, s_out, q_out, fed_out = [tokens[-1]], [-1], [1.0], [1.0], [-1]
        children: dict[tuple[int, int], int] = {}
        for j in keep:
            p = int(h_par[j])
            if p not in new:  # a parent outside the cut (a tie): leave the node out
                continue
            k = len(t_out)
            new[j + 1] = k
            tok = int(h_tok[j])
            t_out.append(tok)
            p_out.append(new[p])
            s_out.append(math.exp(h_cum[j]))
            q_out.append(math.exp(h_q[j]))
            fed_out.append(fed[j + 1])
            children[(new[p], tok)] = k
        if len(t_out) == 1:
            self._tree = ({}, [-1])
            return None
        # nodes cut from the draft keep their provisional KV until _settle drops it
        self._tree = (children, fed_out)
        self.last_q = q_out
        self.last_cum_q = s_out
        return HostTree(t_out, p_out, s_out)

    def _clamp(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.clamp(max=self.n_embed - 1) if self.n_embed < self.vocab_size else ids

    def propose(self, ctx: DraftContext):
        tree = self.expand(ctx)
        return None if tree is None else to_draft(tree, ctx.root.device)

    def observe(self, draft, logits: torch.Tensor, accepted: list[int]) -> None:
        self._settle(accepted)

    def end(self, tokens: list[int]) -> None:
        self._tree = None
