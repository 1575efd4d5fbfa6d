"""Offline replay of Token Recycling's node choice on recorded steps.

Under greedy decoding the tokens the target emits do not depend on what was drafted, so which
node of a base tree would have been accepted is known from the base tree a step filled and the
tokens that followed. ``record`` runs the engine with the full base template and keeps each
step's base tokens and the output; ``replay`` then scores node-choice policies (fixed
templates, the rank prior's ranking, the online estimates at several prior strengths, the
hindsight ranking from all steps' counts) by the tokens per step each would have accepted on
the very same steps, without running the model again. (The matrix rows a smaller tree would
have refreshed differ; a second-order effect this replay leaves out.)

    python -m freespec.bench.replay record --model smollm2-135m --per-category 4 --out rec.pt
    python -m freespec.bench.replay eval rec.pt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ..cost import NodeStats, accepted_nodes, order_nodes
from ..drafters.recycling import AUTO_BASE, LEARN_EVERY, PRIOR_STRENGTH, RECHOOSE, TokenRecycling
from ..tree import get_template


class _Recorder(TokenRecycling):
    """The base template drafted in full on host steps, each step's tokens kept."""

    def __init__(self, vocab_size: int, device):
        super().__init__(vocab_size, template=AUTO_BASE, device=device)
        self.steps: list[tuple[int, np.ndarray]] = []

    def device_step(self, ctx, budget=None):
        return None  # host steps: propose sees every step

    def propose(self, ctx):
        d = super().propose(ctx)
        if d is not None:
            self.steps.append((len(ctx.tokens), d.tokens.cpu().numpy().astype(np.int32)))
        return d


def record(engine, prompts: list[tuple[str, list[int]]], max_new_tokens: int, log=None) -> dict:
    """Run ``engine`` (its drafter a fresh recorder, kept across prompts like a served model's)
    on ``prompts`` [(category, ids)]; the recording ``replay`` reads."""
    rec = _Recorder(engine.backend.vocab_size, engine.backend.device)
    engine.drafter = rec
    runs = []
    for cat, ids in prompts:
        rec.steps = []
        r = engine.generate(ids, max_new_tokens)
        runs.append({"category": cat, "tokens": list(ids) + list(r.tokens), "prompt_len": len(ids),
                     "steps": rec.steps})
        if log is not None:
            print(f"{cat}: {r.stats.steps} steps, {len(r.tokens)} tokens", file=log, flush=True)
    # (the matrix as the last prompt left it: a warm start for ``hostreplay``)
    return {"format": "freespec-replay-1", "template": AUTO_BASE, "runs": runs, "matrix": rec.matrix.cpu().clone()}


class Base:
    """The base template as the drafter lays it out (nodes level by level), read from a
    drafter built on it: parents, depths and the rank prior of each node given its parent."""

    def __init__(self, name: str = AUTO_BASE):
        tr = TokenRecycling(vocab_size=8, template=name)  # (8: the smallest matrix its ranks fit)
        self.paths = tr.template.paths
        self.parents = tr.stats.parents
        self.prior = tr.stats.prior
        self.depth = tr.shape.depth.numpy()
        self.n = len(self.parents)

    def mask(self, template: str) -> np.ndarray:
        """The nodes of a fixed template (which must lie inside the base)."""
        want = set(get_template(template).paths)
        m = np.array([True] + [p in want for p in self.paths])
        if m.sum() - 1 != len(want):
            raise ValueError(f"template {template} is not inside {AUTO_BASE}")
        return m

    def stats(self, strength: float = PRIOR_STRENGTH, decay: float = 0.998) -> NodeStats:
        return NodeStats(self.prior, self.parents, "cpu", strength=strength, decay=decay)

    def top(self, probs: np.ndarray, k: int) -> np.ndarray:
        m = np.zeros(self.n, dtype=bool)
        m[0] = True
        m[order_nodes(probs, self.parents)[:k]] = True
        return m


def hits(recording: dict, base: Base) -> np.ndarray:
    """[steps, nodes] bool: the node would have been accepted (root: always). Steps whose
    following tokens end before the base's depth are left out (their outcome is unknown)."""
    D = int(base.depth.max())
    rows = []
    for run in recording["runs"]:
        out = run["tokens"]
        for pos, toks in run["steps"]:
            if pos + D <= len(out):
                rows.append(accepted_nodes(toks.tolist(), base.parents, out[pos : pos + D]))
    return np.array(rows, dtype=bool).reshape(-1, base.n)


def tokens_per_step(h: np.ndarray, base: Base, masks: np.ndarray) -> float:
    """Mean tokens per step (bonus token included) drafting ``masks`` ([nodes] or [steps, nodes])."""
    return float(1.0 + (h * masks * base.depth).max(1).mean())


def learned(h: np.ndarray, base: Base, k: int, strength: float = PRIOR_STRENGTH, every: int = LEARN_EVERY,
            rechoose: int = RECHOOSE, decay: float = 0.998) -> np.ndarray:
    """[steps, nodes]: the ``k`` best nodes by the drafter's online estimates (NodeStats, one
    step in ``every`` counted, re-chosen every ``rechoose`` steps), as it would have drafted."""
    st = base.stats(strength, decay)
    tried = torch.from_numpy(h[:, np.maximum(base.parents, 0)] & (base.parents >= 0))
    hit = torch.from_numpy(h) & tried
    out = np.zeros_like(h)
    for s in range(len(h)):
        if s % rechoose == 0:
            m = base.top(st.path_probs(), k)
        out[s] = m
        if s % every == 0:
            st.count(tried[s], hit[s])
            st.tick(every)
    return out


def report(recording: dict, sizes=(63, 80, 95, 127), strengths=(4.0, 16.0, PRIOR_STRENGTH, 256.0)) -> str:
    base = Base(recording.get("template", AUTO_BASE))
    h = hits(recording, base)
    ref = tokens_per_step(h, base, base.mask("tr80"))
    prior = base.stats().path_probs()  # (no counts: the rank prior)
    tried = h[:, np.maximum(base.parents, 0)].sum(0)
    hind = base.stats(strength=1e-3).path_probs(np.stack((tried, h.sum(0))).astype(np.float64))
    lines = [f"{len(h)} steps; tokens per step: tr80 {ref:.3f}, full {AUTO_BASE} "
             f"{tokens_per_step(h, base, np.ones(base.n, bool)):.3f}; others as a ratio to tr80",
             "nodes | prior | " + " | ".join(f"strength {s:g}" for s in strengths) + " | hindsight",
             "---|---|" + "---|" * len(strengths) + "---"]
    for k in sizes:
        row = [tokens_per_step(h, base, base.top(prior, k))]
        row += [tokens_per_step(h, base, learned(h, base, k, strength=s)) for s in strengths]
        row.append(tokens_per_step(h, base, base.top(hind, k)))
        lines.append(f"{k} | " + " | ".join(f"{x / ref:.4f}" for x in row))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freespec.bench.replay", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the model with the full base tree and keep every step")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--dtype", default="fp32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dataset", default="builtin")
    r.add_argument("--per-category", type=int, default=None)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="score node-choice policies on recordings")
    e.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "eval":
        for f in a.files:
            print(f"## {f}\n{report(torch.load(f, weights_only=False))}\n")
        return 0
    from .. import models
    from ..engine import Engine
    from .dataset import load, per_category

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    model, tok = models.load(a.model, dtype=dtype, device=a.device)[:2]
    backend = None
    if torch.device(a.device).type == "cuda":
        from ..backends.native import NativeBackend

        backend = NativeBackend(model)
    eng = Engine(model, tok, drafter=None, backend=backend)
    prompts = [(q.category, eng.encode(q.turns[0], chat=True)) for q in per_category(load(a.dataset), a.per_category)]
    torch.save(record(eng, prompts, a.max_new_tokens, log=sys.stderr), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
