"""HF eager backend: any ``transformers`` causal LM with a ``DynamicCache``.

Tree attention goes through the model's own attention via a float additive 4-D mask
(eager with a bool 4-D mask is silently wrong; sdpa takes either).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..tree import Draft
from .base import Backend


class HFBackend(Backend):
    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_length = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        if getattr(cfg, "sliding_window", None) and any(
            t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or [])
        ):
            # A sliding-window cache drops old entries, which tree pruning cannot undo;
            # keep the decode inside the window.
            self.max_length = min(self.max_length, int(cfg.sliding_window))
        self._cache: DynamicCache | None = None
        self._len = 0
        self._pending = 0

    def reset(self) -> None:
        self._cache = DynamicCache(config=self.model.config)
        self._len = 0
        self._pending = 0

    @property
    def cache_len(self) -> int:
        return self._len

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        if self._cache is None:
            self.reset()
        ids = ids.to(self.device).view(1, -1)
        n = ids.shape[1]
        pos = torch.arange(self._len, self._len + n, device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        self._len += n
        return out.logits[0] if all_logits else out.logits[0, -1]

    @torch.inference_mode()
    def verify(self, draft: Draft) -> torch.Tensor:
        shape = draft.shape.to(self.device)
        mask = shape.attention_bias(self._len, self.dtype)
        out = self.model(
            input_ids=draft.tokens.view(1, -1),
            position_ids=shape.position_ids(self._len),
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._pending = shape.size
        return out.logits[0]

    @torch.inference_mode()
    def commit(self, path: torch.Tensor, n_keep: int) -> None:
        base, n = self._len, self._pending
        src = path[:n_keep].to(self.device) + base
        for layer in self._cache.layers:
            # Move the accepted entries into place (a no-op copy for a chain), then cut the rest.
            layer.keys[:, :, base : base + n_keep] = layer.keys.index_select(2, src)
            layer.values[:, :, base : base + n_keep] = layer.values.index_select(2, src)
            if n > n_keep:
                layer.crop(n_keep - n)
        self._len = base + n_keep
        self._pending = 0
