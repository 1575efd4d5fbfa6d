"""Small tensor routines replayed as a CUDA graph: one launch instead of one per kernel."""

from __future__ import annotations

from typing import Callable

import torch


class Replay:
    """``fn()``: tensor code over buffers that live as long as this object (it reads and
    writes them in place, returns nothing, reads nothing back to the host).

    On CUDA the first call runs ``fn`` eagerly (the real work, and the warm-up), the second
    captures it and replays the capture, later calls replay it: one launch where ``fn`` is a
    dozen small kernels (on the GPU machine's host each eager launch costs ~5-10 us). Elsewhere
    every call runs ``fn``."""

    def __init__(self, fn: Callable[[], None], device: torch.device | str):
        self.fn = fn
        self.cuda = torch.device(device).type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.calls += 1
        if not self.cuda or self.calls == 1:
            self.fn()
            return
        graph = torch.cuda.CUDAGraph()
        # capturing records the kernels without running them; thread_local: CUDA work on
        # other threads (a server's) does not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.fn()
        self.graph = graph
        graph.replay()
