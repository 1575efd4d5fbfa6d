"""The seam between the decoding engine and a model implementation.

A backend owns the model's KV cache for one sequence (batch 1). The engine only ever asks it
to (1) prefill a prompt, (2) score a draft tree on top of the cache, and (3) keep the KV
entries of the accepted path. Everything else (drafting, acceptance, streaming) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..tree import Draft


class Backend(ABC):
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_length: int  # context limit in tokens (prompt + generated)

    @abstractmethod
    def reset(self) -> None:
        """Forget the cached sequence."""

    @property
    @abstractmethod
    def cache_len(self) -> int:
        """Number of committed tokens whose KV is in the cache."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append ``ids`` ([L] int64) to the cache; return the logits [V] after the last one
        (or [L, V] for every position with ``all_logits``)."""

    @abstractmethod
    def verify(self, draft: Draft) -> torch.Tensor:
        """Score every node of ``draft`` with tree attention over the cache; logits [n, V].

        The draft's KV is appended provisionally; ``commit`` must follow before the next call.
        """

    @abstractmethod
    def commit(self, path: torch.Tensor, n_keep: int) -> None:
        """Keep the KV of draft nodes ``path[:n_keep]`` (root first), drop the rest of the draft."""
