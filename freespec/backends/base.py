"""The seam between the decoding engine and a model implementation.

A backend owns the model's KV cache for one sequence (batch 1). The engine only ever asks it
to (1) prefill a prompt, (2) score a draft tree on top of the cache, and (3) keep the KV
entries of the accepted path. Everything else (drafting, acceptance, streaming) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ..tree import Draft, TreeShape


@dataclass(frozen=True)
class DeviceStep:
    """A drafter's part of a step that runs entirely on the device (``Backend.step``).

    ``fill(root)`` -> the draft's tokens [n] from the root token [1]; ``observe(tokens, logits,
    verdict)`` updates the drafter from what the target computed. Both are tensor code with
    static shapes and no host reads, so a backend may capture them, with the target's forward
    and the verifier, in one CUDA graph. ``key`` names the plan: the same key must mean the
    same shape tensors and the same functions, since a captured step is replayed by key (the
    tensors' contents may change between steps: a replay reads them afresh). ``done(emitted)``
    (optional, host code) runs after the step with the tokens it emitted; it may return a
    callable: host work (learning) that the next step's draft does not need, which the engine
    runs once the next step is launched, while the device computes it (or before anything else
    reads the drafter: a host step, the request's end).
    """

    key: Hashable
    shape: TreeShape
    fill: Callable[[torch.Tensor], torch.Tensor]
    observe: Callable[..., None]
    done: Callable[[list[int]], Callable[[], None] | None] | None = None


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

    # Optional: whole greedy steps on the device (the native backend with CUDA graphs).
    captures_steps = False

    def set_root(self, root: torch.Tensor) -> None:  # pragma: no cover - only with captures_steps
        raise NotImplementedError

    def step(self, ds: DeviceStep) -> torch.Tensor:  # pragma: no cover - only with captures_steps
        raise NotImplementedError

    def advance(self, n_keep: int) -> None:  # pragma: no cover - only with captures_steps
        raise NotImplementedError
