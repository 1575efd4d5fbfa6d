"""Drafters: each proposes draft trees behind the interface in ``base``."""

from __future__ import annotations

from .base import DraftContext, Drafter
from .recycling import TokenRecycling

DRAFTERS = {"none": None, "recycling": TokenRecycling}


def make_drafter(name: str | None, *, vocab_size: int, device, template=None, **kw) -> Drafter | None:
    """A drafter by name; ``none`` (or None) gives plain decoding."""
    if name in (None, "none", "plain"):
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; known: {', '.join(DRAFTERS)}")
    cls = DRAFTERS[name]
    if template is not None:
        kw["template"] = template
    return cls(vocab_size=vocab_size, device=device, **kw)


__all__ = ["DraftContext", "Drafter", "TokenRecycling", "make_drafter", "DRAFTERS"]
