"""Drafters: each proposes draft trees behind the interface in ``base``."""

from __future__ import annotations

import inspect

import torch

from .base import DraftContext, Drafter
from .draft_model import DraftModelDrafter, DraftModelError
from .fused import FusedDrafter
from .hybrid import HybridDrafter
from .lookup import PromptLookup
from .merge import HostTree, merge_trees
from .recycling import TokenRecycling
from .suffix import SuffixDrafter, SuffixIndex

DRAFTERS = {
    "none": None,
    "recycling": TokenRecycling,
    "lookup": PromptLookup,
    "suffix": SuffixDrafter,
    "hybrid": HybridDrafter,
    "draft-model": DraftModelDrafter,
    "fused": FusedDrafter,
}


AUTO = "auto"


def default_drafter(device) -> str:
    """The drafter ``--drafter auto`` (the CLI's default) picks for a device, by measurement
    (docs/benchmarks.md, Spec-Bench, greedy, every drafter sized by the cost model):

    * CUDA (H100, Qwen2.5-Coder-1.5B bf16, questions 1-40 and 41-80 of each category): hybrid,
      whose whole step (Token Recycling's tree filled on the device, the suffix-retrieval tree
      attached beside it) runs as one CUDA graph replay: 2.69-2.98x over plain (MAT 3.7-4.1,
      tenth and thirteenth sessions; 0.98-1.00 of hybrid over the fixed tr80 tree), against
      2.35-2.36x for Token Recycling alone with the same automatic tree, and 1.7x for lookup
      (earlier runs).
    * CPU (2 cores, SmolLM2-135M fp32): hybrid (suffix retrieval merged with Token Recycling's
      tree), 1.70-1.72x over plain on 10 questions per category on an AMD EPYC (thirteenth
      session, two runs), against 1.58-1.61x for suffix alone and 1.42x for Token Recycling
      alone in the same runs; 1.49-1.50x on the earlier Xeon.

    The same drafter on both today; the device stays an argument because the answer is a
    measurement per device, not a constant.
    """
    torch.device(device)  # validates the name
    return "hybrid"


def _takes(cls, param: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return True
    return param in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_drafter(name: str | None, *, vocab_size: int, device, template=None, **kw) -> Drafter | None:
    """A drafter by name; ``none`` (or None) gives plain decoding.

    ``template`` goes to drafters that build on a tree template (recycling, hybrid) and is
    ignored by the others. Drafters that need a draft model (``draft-model``, ``fused``) take
    it as ``draft_model=``.
    """
    if name in (None, "none", "plain"):
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; known: {', '.join(DRAFTERS)}")
    cls = DRAFTERS[name]
    if getattr(cls, "needs_draft_model", False) and kw.get("draft_model") is None:
        raise DraftModelError(
            f"the {name!r} drafter needs a draft model sharing the target's tokenizer: pass --draft-model NAME"
        )
    if template is not None and _takes(cls, "template"):
        kw["template"] = template
    return cls(vocab_size=vocab_size, device=device, **kw)


__all__ = [
    "DraftContext",
    "Drafter",
    "TokenRecycling",
    "PromptLookup",
    "SuffixDrafter",
    "SuffixIndex",
    "HybridDrafter",
    "DraftModelDrafter",
    "FusedDrafter",
    "DraftModelError",
    "HostTree",
    "merge_trees",
    "make_drafter",
    "default_drafter",
    "DRAFTERS",
]
