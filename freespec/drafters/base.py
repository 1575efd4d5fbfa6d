"""The drafter interface: propose a tree; observe what the target computed.

A drafter never decides what is emitted: the verifier does, so any drafter is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tree import Draft


@dataclass
class DraftContext:
    """What a drafter may look at when proposing."""

    tokens: list[int]  # prompt + output so far; tokens[-1] is the root (not yet in the KV cache)
    # [1] int64 on the model's device: tokens[-1], without a host round trip (None only when
    # offered to ``device_step`` right after a device step: the backend holds the root then)
    root: torch.Tensor | None
    prompt_len: int
    budget: int  # most draft nodes (root excluded) the engine can take this step
    # seconds per step by tree size at this cache length (``LatencyModel.curve``), for
    # drafters that size their trees by cost (``wants_latency``); None when not measured
    latency: np.ndarray | None = None


class Drafter:
    name = "none"

    def begin(self, prompt: list[int], prompt_logits: torch.Tensor | None = None) -> None:
        """A new request starts. ``prompt_logits`` ([L, V]) only if ``wants_prompt_logits``."""

    wants_prompt_logits = False
    wants_latency = False  # True: size trees by the engine's latency curve (DraftContext.latency)
    # k > 1: ``observe`` reads the top-k ids of every verified row (``verify.top_k_ids``): on the
    # CPU the engine computes them once, takes its greedy choice from them and hands them over
    # (``observe(..., top=ids)``)
    reads_top_k = 0

    def propose(self, ctx: DraftContext) -> Draft | None:
        """A tree rooted at ``ctx.root`` or None for a plain one-token step."""
        return None

    def observe(self, draft: Draft, logits: torch.Tensor, accepted: list[int]) -> None:
        """``logits`` [n, V] for every node of ``draft``; ``accepted`` = the tokens emitted this step.
        (A drafter with ``reads_top_k`` also takes ``top=``: the rows' top-k ids, or None.)"""

    def end(self, tokens: list[int]) -> None:
        """The request finished with these tokens (prompt + output)."""
