"""Model implementations behind one interface (``base.Backend``)."""

from __future__ import annotations

from .base import Backend
from .hf import HFBackend


def make_backend(model, prefer: str = "auto") -> Backend:
    """``hf``: the HF model's own forward; ``native``: freespec's static-cache forward (CUDA graphs
    on GPU); ``auto``: native where it supports the model and runs on CUDA, else HF."""
    if prefer not in ("auto", "hf", "native"):
        raise ValueError(f"unknown backend {prefer!r}; use auto, hf or native")
    if prefer == "hf":
        return HFBackend(model)
    try:
        from . import native
    except ImportError:  # pragma: no cover - the module ships with the package
        native = None
    if native is None:
        if prefer == "native":
            raise ValueError("the native backend is not available in this build")
        return HFBackend(model)
    return native.make_backend(model, prefer=prefer)


__all__ = ["Backend", "HFBackend", "make_backend"]
