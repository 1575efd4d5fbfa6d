"""Acceptance rules: which path of a draft tree the target model agrees with.

Both rules share one walk: given the token the target emits after every node (its argmax
under greedy decoding, a sample from its distribution under sampling), a node is accepted
when its token equals the target's token after its parent and its parent is accepted. The
deepest accepted node wins; the target's token there is the bonus token.

Sampling stays exact for deterministic drafts: drawing a sample at every node up front is
the same as drawing lazily along the walk, because the samples are independent and the walk
only looks at the nodes it visits. Sibling duplicates are ignored (the first one counts),
so the walk never chooses between equal children by how far they happen to go.

All of it is a handful of tensor ops on the model's device, no per-node Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .tree import Draft


class SamplingError(ValueError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if not (isinstance(k, int) and k >= 0):
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(m, (int, float)) and 0 <= m < 1):
            raise SamplingError(f"min_p must be in [0, 1), got {m!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            procs.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p > 0:
            procs.append(MinPLogitsWarper(float(self.min_p)))
        return procs


@dataclass(frozen=True)
class Verdict:
    """Device tensors; ``emitted[:n_accepted + 1]`` are the new tokens (draft tokens, then bonus)."""

    n_accepted: torch.Tensor  # 0-d int64: accepted draft tokens (depth of the chosen node)
    path: torch.Tensor  # [max_depth + 1] node indices, root first
    emitted: torch.Tensor  # [max_depth + 1] tokens


def walk(draft: Draft, target: torch.Tensor, dedupe: bool = False) -> Verdict:
    """Longest path whose tokens match ``target`` (the token emitted after each node)."""
    shape, tok = draft.shape, draft.tokens
    par = shape.parents
    ok = torch.ones_like(tok, dtype=torch.bool)
    ok[1:] = tok[1:] == target[par[1:]]
    if dedupe and draft.size > 2:
        n = draft.size
        same = (par[:, None] == par[None, :]) & (tok[:, None] == tok[None, :])
        earlier = torch.ones(n, n, dtype=torch.bool, device=tok.device).tril(-1)
        ok &= ~(same & earlier).any(1)
    accepted = ~(shape.ancestors & ~ok[None, :]).any(1)
    score = torch.where(accepted, shape.depth, -1)
    # index_select with a [1] index, never t[0-d tensor]: PyTorch reads a 0-d index back to the
    # host (.item()), a hidden sync per step that also breaks CUDA graph capture
    best = score.argmax().view(1)
    depth = shape.depth.index_select(0, best)
    path = shape.paths.index_select(0, best).view(-1)
    emitted = tok[path].roll(-1)  # tokens along the path, shifted: emitted[j] = token at depth j+1
    emitted = emitted.scatter(0, depth, target.index_select(0, best))
    return Verdict(n_accepted=depth.view(()), path=path, emitted=emitted)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice of each row: ``argmax(-1)``, first index among equal maxima, as
    ``max(-1).indices`` (documented to return the first maximal index too). Measured on a
    2-core Xeon, [8, 49152] fp32: argmax 246 us, max 86 us."""
    return logits.max(-1).indices


CHUNK = 128  # top_k_ids: vocabulary slice per first-pass maximum


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest logits of each row [n, V], largest first: ``topk`` in two
    cheap passes. The k slices of ``CHUNK`` logits with the largest maxima hold a top-k set
    (were a top-k logit x in another slice, the k slices ahead of it would hold k maxima >= x,
    and x would not be in the top k), so one max per slice, a top-k over the slice maxima, and
    a top-k over the k gathered slices find it. Measured on an H100, [96, 151936] bf16:
    ``topk`` alone 157 us, a radix select over the whole row. Ties may come out in another
    order than ``topk``'s (which orders them arbitrarily too)."""
    n, V = logits.shape
    C = CHUNK
    full = V // C
    if full < 4 * k:  # a small vocabulary: one pass is cheap
        return logits.topk(k, dim=-1).indices
    main = logits[:, : full * C].view(n, full, C)
    slices = main.amax(-1).topk(k, dim=-1).indices  # [n, k]
    cand = main.gather(1, slices[:, :, None].expand(n, k, C)).view(n, k * C)
    if full * C < V:  # the short last slice always competes
        cand = torch.cat((cand, logits[:, full * C :]), dim=1)
    j = cand.topk(k, dim=-1).indices  # [n, k] positions in cand
    inside = j < k * C
    ids = slices.gather(1, (j // C).clamp(max=k - 1)) * C + j % C
    return torch.where(inside, ids, j - k * C + full * C)


def greedy_from_top(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``greedy_tokens(logits)`` given ``ids``, the top-k (k >= 2, largest first) of each row:
    the first id wherever the row's maximum is strictly above its runner-up; ``max`` over the
    rows otherwise (a tie, where argmax's first-index rule decides, or a NaN). Reads one value
    per row back to the host: for CPU logits."""
    top = logits.gather(1, ids[:, :2])
    if bool((top[:, 0] > top[:, 1]).all()):
        return ids[:, 0]
    return greedy_tokens(logits)


def greedy_verify(draft: Draft, logits: torch.Tensor, top: torch.Tensor | None = None) -> Verdict:
    """The greedy verdict. ``top``: the top-k ids (k >= 2) of the rows, where the caller has
    them anyway (a drafter reads them after the step, ``Drafter.reads_top_k``): for CPU logits
    the choice comes from them (``greedy_from_top``), saving a pass over the logits (the first
    pass after a forward runs 2-3x slower than a repeat on a 2-core Xeon: the greedy max alone
    took 150-250 us a step)."""
    if top is not None and logits.device.type == "cpu":
        return walk(draft, greedy_from_top(logits, top))
    return walk(draft, greedy_tokens(logits))


class PositionNoise:
    """Gumbel noise tied to output positions: the token sampled for output position ``j`` is
    ``argmax(processed_logits + G[j])``, with the rows ``G[j]`` drawn once, in position order,
    from the request's seeded generator.

    A categorical sample by the Gumbel-max rule is exact, so every tree node samples from the
    target distribution; and since the noise depends on the position alone, never on which
    drafts were proposed, a seeded run emits the same tokens as plain sampling with that seed.
    """

    def __init__(self, vocab_size: int, device: torch.device, generator: torch.Generator, window: int = 256):
        self.vocab_size = vocab_size
        self.generator = generator
        self.window = window
        self.rows = torch.empty(window, vocab_size, dtype=torch.float32, device=device)
        self.filled = 0  # positions [0, filled) have been drawn

    def take(self, positions: torch.Tensor, last: int) -> torch.Tensor:
        """Rows for ``positions`` ([n] device tensor, all within [last - window + 1, last])."""
        while self.filled <= last:
            j = self.filled % self.window
            u = torch.rand(self.vocab_size, generator=self.generator, device=self.rows.device)
            self.rows[j] = -torch.log(-torch.log(u.clamp_(min=1e-20)))
            self.filled += 1
        return self.rows[positions % self.window]


def sample_tokens(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> torch.Tensor:
    """One sample per row of ``logits`` [n, V] from the processed target distribution
    (Gumbel-max with the given noise rows [n, V])."""
    scores = params.processors()(None, logits.float())
    return (scores + noise).argmax(-1)


def sample_verify(draft: Draft, logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> Verdict:
    return walk(draft, sample_tokens(logits, params, noise), dedupe=True)
