"""Tree sizing by a cost model: expected accepted tokens per second.

A speculative step that verifies ``n`` draft nodes (plus the root) costs ``latency(n + 1)``
and emits ``1 + sum(p_i)`` tokens on average, where ``p_i`` is the probability that node
``i`` ends up on the accepted path. Among the parent-closed node sets of each size the best
is the ``k`` most probable nodes (a child is never more probable than its parent), so the
choice is one pass over ``k = 0 .. K``:

    k* = argmax_k (1 + p_(1) + ... + p_(k)) / latency(k + 1)

``k = 0`` is plain decoding: where verification is expensive and acceptance low,
speculation switches itself off.

``latency`` is measured, not assumed: :func:`calibrate` times a verification step (the
target's forward over ``n`` new tokens, the greedy walk and the top-k every tree drafter
reads) for a range of ``n`` at two cache lengths, on this device, for this model, dtype and
backend, and :func:`load_or_calibrate` keeps the curve on disk
(``$FREESPEC_HOME/calibration``). ``freespec calibrate`` redoes it on request.

Acceptance estimates come from the drafters: per template node for Token Recycling
(:class:`NodeStats`), and a calibration of the drafter's own probability estimates for
retrieval and draft-model trees (:class:`ScoreCalibrator`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

FORMAT = "freespec-latency-1"
# Speculation must beat plain decoding by this predicted margin before it is switched on:
# estimates are noisy, and losing to plain decoding is the one thing a user would not accept.
MARGIN = 0.03


# --------------------------------------------------------------------------- latency
# LatencyModel.curve: cache lengths this close share one curve (taken at their middle). Across 256
# tokens of cache a step's cost moves by a few percent (an H100, Qwen2.5-Coder-1.5B bf16: ~7% near 256
# tokens, ~5% near 2,048), alike at every tree size: the ratios that choose a tree move by <0.1%;
# at 32 the engine built a new curve every ~9 steps, and the drafters checked it (measured in an
# eager run on the CPU: ~9 us a step of the automatic tree's host time, ~70 us each).
CACHE_STEP = 256


@dataclass
class LatencyModel:
    """Seconds per verification step by tree size (nodes, root included) and cache length.

    ``bucketed``: the backend pads a tree to the next measured size (CUDA graph buckets), so
    the cost of ``n`` nodes is the cost of that size; otherwise it is interpolated linearly.
    Across cache lengths it is linear (attention grows with the cache), extrapolated
    beyond the measured lengths.
    """

    sizes: list[int]
    cache_lens: list[int]
    seconds: list[list[float]]  # [cache length][size]
    bucketed: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.sizes or self.sizes[0] != 1 or sorted(set(self.sizes)) != list(self.sizes):
            raise ValueError("latency sizes must be increasing and start at 1 (plain decoding)")
        if len(self.seconds) != len(self.cache_lens) or any(len(r) != len(self.sizes) for r in self.seconds):
            raise ValueError("latency table does not match its sizes and cache lengths")
        self._cache: dict[float, np.ndarray] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def curve(self, cache_len: int = 0) -> np.ndarray:
        """``c[n]`` = seconds for a step of ``n`` nodes, ``n = 1 .. max_size`` (``c[0]`` unused).

        The cache length is taken to the middle of its ``CACHE_STEP`` tokens (the engine asks at
        every step, and the cache grows by a few tokens a step: one curve serves many)."""
        L = float(max(0, int(cache_len)) // CACHE_STEP * CACHE_STEP + CACHE_STEP // 2)
        c = self._cache.get(L)
        if c is not None:
            return c
        n = np.arange(1, self.max_size + 1)
        if self.bucketed:  # each size costs its bucket's time
            idx = np.searchsorted(np.asarray(self.sizes), n, side="left")
            rows = [np.asarray(r)[idx] for r in self.seconds]
        else:
            rows = [np.interp(n, self.sizes, r) for r in self.seconds]
        if len(rows) == 1:
            row = rows[0]
        else:
            ls = self.cache_lens
            i = 0 if L <= ls[0] else min(len(ls) - 2, int(np.searchsorted(ls, L)) - 1)
            w = (L - ls[i]) / (ls[i + 1] - ls[i])
            row = rows[i] + w * (rows[i + 1] - rows[i])
        # a floor keeps extrapolation sane (never below 10% of the measured plain step)
        floor = 0.1 * min(r[0] for r in self.seconds)
        c = np.concatenate(([np.inf], np.maximum(row, floor)))
        if len(self._cache) >= 512:  # (512 steps of cache: 131,072 tokens)
            self._cache.clear()
        self._cache[L] = c
        return c

    def __call__(self, n: int, cache_len: int = 0) -> float:
        n = int(n)
        if not 1 <= n <= self.max_size:
            raise ValueError(f"no latency for {n} nodes (measured 1..{self.max_size})")
        return float(self.curve(cache_len)[n])

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "sizes": list(self.sizes),
            "cache_lens": list(self.cache_lens),
            "seconds": [[float(x) for x in r] for r in self.seconds],
            "bucketed": self.bucketed,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a freespec latency calibration")
        return cls([int(s) for s in d["sizes"]], [int(x) for x in d["cache_lens"]],
                   [[float(x) for x in r] for r in d["seconds"]], bool(d.get("bucketed")), dict(d.get("meta") or {}))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyModel":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        """A readable table (ms) for the CLI."""
        head = "nodes  " + "  ".join(f"L={L:<6d}" for L in self.cache_lens)
        lines = [head]
        for j, n in enumerate(self.sizes):
            lines.append(f"{n:5d}  " + "  ".join(f"{self.seconds[i][j] * 1e3:8.2f}" for i in range(len(self.cache_lens))))
        return "\n".join(lines)


# --------------------------------------------------------------------------- choice
def choose_size(probs: Sequence[float] | np.ndarray, curve: np.ndarray, max_nodes: int | None = None,
                margin: float = MARGIN) -> int:
    """How many of the nodes to draft (0 = plain decoding).

    ``probs``: acceptance probabilities of candidate nodes, sorted high to low, parents
    before children (so every prefix is a tree); ``curve``: :meth:`LatencyModel.curve`.
    (One pass in plain Python: host trees run it at every step, on a few dozen nodes, and on a
    CPU right after a forward numpy's per-call cost dominated: ~100 us a step for this and the
    ordering, against ~15 us for the same calls in a loop.)
    """
    k_max = min(len(probs), len(curve) - 2)
    if max_nodes is not None:
        k_max = min(k_max, int(max_nodes))
    if k_max <= 0:
        return 0
    c = curve.tolist() if isinstance(curve, np.ndarray) else curve
    p = probs.tolist() if isinstance(probs, np.ndarray) else probs
    plain = 1.0 / c[1]
    best, k, gain = plain, 0, 1.0
    for i in range(k_max):
        gain += min(max(p[i], 0.0), 1.0)
        rate = gain / c[i + 2]
        if rate > best:  # (the first of equal rates, as argmax)
            best, k = rate, i + 1
    if k > 0 and best < plain * (1.0 + margin):
        return 0
    return k


def order_nodes(scores: Sequence[float], parents: Sequence[int]) -> np.ndarray:
    """Node indices (root excluded) by score, high to low; every node after its parent.

    Scores that do not decrease along paths make the plain sort parent-closed; ties keep
    index order (parents have lower indices).
    """
    s = np.asarray(scores, dtype=np.float64)[1:]
    return np.argsort(-s, kind="stable") + 1


# --------------------------------------------------------------------------- acceptance
class NodeStats:
    """Online acceptance of each node of a fixed template, given that its parent was accepted.

    Counts live on the drafter's device and are updated without a host sync; a smoothed
    estimate per node (a Beta prior centred on ``prior``, ``strength`` pseudo-observations)
    is read back only when the tree is re-chosen. Old evidence decays (``decay`` per step),
    so the estimate follows the text being generated.
    """

    def __init__(self, prior: Sequence[float], parents: Sequence[int], device, strength: float = 4.0,
                 decay: float = 0.998):
        n = len(prior)
        if len(parents) != n:
            raise ValueError("one parent per node")
        self.device = torch.device(device)
        self.prior = np.clip(np.asarray(prior, dtype=np.float64), 1e-4, 1.0)
        self.parents = np.asarray(parents, dtype=np.int64)
        self.strength = float(strength)
        self.decay = float(decay)
        self.tries = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.hits = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._pending = 0  # steps whose decay is not applied yet
        # nodes by depth (parents precede children): path_probs multiplies level by level
        depth = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            depth[i] = depth[self.parents[i]] + 1
        self._levels = [np.flatnonzero(depth == d) for d in range(1, int(depth.max(initial=0)) + 1)]

    def update(self, tried: torch.Tensor, hit: torch.Tensor) -> None:
        """``tried``/``hit``: [n] bool: the node's parent was accepted / the node was."""
        self.count(tried, hit)
        self.tick()

    def count(self, tried: torch.Tensor, hit: torch.Tensor) -> None:
        """The device half of ``update`` (graph-capturable)."""
        self.tries += tried
        self.hits += hit

    def tick(self, steps: int = 1) -> None:
        """The host half of ``update``: ``steps`` more steps whose decay is pending."""
        self._pending += steps

    def fold_decay(self) -> None:
        """Apply the pending decay to the counts (on the device)."""
        if self._pending:
            f = self.decay**self._pending
            self.tries.mul_(f)
            self.hits.mul_(f)
            self._pending = 0

    def conditional(self, counts: np.ndarray | None = None) -> np.ndarray:
        """Estimated P(node accepted | parent accepted); reads the counts back (one small copy),
        or takes them as read by the caller (``counts``: [tries, hits], after ``fold_decay``)."""
        if counts is None:
            self.fold_decay()
            counts = torch.stack((self.tries, self.hits)).double().cpu().numpy()
        t, h = counts
        m = self.strength
        return (h + m * self.prior) / (t + m)

    def path_probs(self, counts: np.ndarray | None = None) -> np.ndarray:
        """P(node accepted) = product of conditionals from the root; index 0 (the root) = 1."""
        p = self.conditional(counts)
        p[0] = 1.0
        for nodes in self._levels:  # a level's parents are all final before it
            p[nodes] *= p[self.parents[nodes]]
        return p

    def state_dict(self) -> dict:
        self.conditional()  # fold the pending decay in
        return {"tries": self.tries.cpu(), "hits": self.hits.cpu()}

    def load_state_dict(self, d: dict) -> None:
        t, h = d["tries"], d["hits"]
        if t.shape != self.tries.shape or h.shape != self.hits.shape:
            raise ValueError(f"acceptance statistics for {t.shape[0]} nodes, this template has {self.tries.shape[0]}")
        self.tries.copy_(t.to(self.device))
        self.hits.copy_(h.to(self.device))
        self._pending = 0

    def reset(self) -> None:
        self.tries.zero_()
        self.hits.zero_()
        self._pending = 0


class ScoreCalibrator:
    """Maps a drafter's own probability estimates to observed acceptance rates.

    Retrieval counts and draft-model probabilities are over-confident (a continuation seen
    once has "probability 1"). Estimates are binned; each bin's rate is smoothed toward its
    centre and the map made non-decreasing, so a child never outranks its parent. Updates
    (one per step) are gathered and folded in every ``batch`` of them: a step's update is a few
    small array operations (~20 us of a GPU step's host time), and a map up to ``batch - 1``
    steps old sizes trees as well.
    """

    def __init__(self, bins: int = 20, strength: float = 8.0, decay: float = 0.999, batch: int = 8):
        self.bins = int(bins)
        self.strength = float(strength)
        self.decay = float(decay)
        self.batch = int(batch)
        self.n = np.zeros(self.bins)
        self.hits = np.zeros(self.bins)
        self.centres = (np.arange(self.bins) + 0.5) / self.bins
        self._map = self.centres.copy()
        self.map_list = self._map.tolist()  # (the map as Python floats, for bin_list's bins)
        self._pending: list[tuple[np.ndarray, object]] = []  # (bins, accepted) not folded in yet

    def bin(self, scores) -> np.ndarray:
        """Each score's bin (for :meth:`rates` and ``update(bins=...)``)."""
        s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        return np.minimum((s * self.bins).astype(np.int64), self.bins - 1)

    def bin_list(self, scores) -> list[int]:
        """:meth:`bin` for a few scores, in Python (no numpy call); index ``map_list`` with it."""
        top = self.bins - 1
        return [min(int(s * self.bins), top) if s > 0.0 else 0 for s in scores]

    def rates(self, bins: np.ndarray) -> np.ndarray:
        """The calibrated acceptance rate of each bin in ``bins``."""
        return self._map[bins]

    def __call__(self, scores) -> np.ndarray:
        return self.rates(self.bin(scores))

    def update(self, scores, accepted, bins: np.ndarray | None = None) -> None:
        """One step's observations: the nodes' scores and whether each was accepted
        (``bins``: the scores' bins, if the caller has them already)."""
        self._pending.append((self.bin(scores) if bins is None else bins, accepted))
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Fold the gathered steps in (each decays the evidence before it once)."""
        pend, self._pending = self._pending, []
        if not pend:
            return
        k = len(pend)
        f = self.decay ** k
        # step i of k decays by decay**(k - 1 - i) before the map is rebuilt
        w = np.concatenate([np.full(len(b), self.decay ** (k - 1 - i)) for i, (b, _) in enumerate(pend)])
        b = np.concatenate([b for b, _ in pend])
        a = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in pend])
        self.n = self.n * f + np.bincount(b, weights=w, minlength=self.bins)
        self.hits = self.hits * f + np.bincount(b, weights=w * a, minlength=self.bins)
        w = self.n + self.strength
        self._map = isotonic((self.hits + self.strength * self.centres) / w, w)
        self.map_list = self._map.tolist()


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares (pool adjacent
    violators): a run of values out of order becomes their weighted mean.

    A running maximum instead lifts every bin above a sparse one to that bin's value: on the
    H100 a few retrieval nodes in bins 0.70-0.95, still near their prior centres, lifted the
    0.95-1.0 bin (10,000 nodes, 40% accepted) to 0.84, and hybrid attached retrieval trees
    for twice the tokens they brought."""
    vals: list[float] = []
    wts: list[float] = []
    counts: list[int] = []
    for v, x in zip(np.asarray(y, dtype=np.float64).tolist(), np.asarray(w, dtype=np.float64).tolist()):
        c = 1
        while vals and vals[-1] > v:  # pool with the block before while out of order
            pv, px, pc = vals.pop(), wts.pop(), counts.pop()
            v = (pv * px + v * x) / (px + x)
            x += px
            c += pc
        vals.append(v)
        wts.append(x)
        counts.append(c)
    return np.repeat(vals, counts)


def accepted_nodes(tokens: Sequence[int], parents: Sequence[int], emitted: Sequence[int]) -> np.ndarray:
    """Which nodes of a host tree lie on the path the target took (``emitted``: the step's tokens).

    The tokens the target emits after a prefix do not depend on what was drafted (greedy, and
    sampling with position-tied noise), so this holds for nodes that were never verified too.
    """
    return path_outcome(tokens, parents, emitted)[0]


def path_outcome(tokens: Sequence[int], parents: Sequence[int], emitted: Sequence[int]) -> tuple[np.ndarray, bool]:
    """``accepted_nodes``, and whether that is every node's final outcome: False while a node
    hangs below the last emitted token's node (it needs the target's next token)."""
    n = len(tokens)
    m = len(emitted)
    ok = [False] * n
    ok[0] = True
    final = True
    depth = [0] * n  # (only read for nodes whose parent is on the path)
    for i in range(1, n):
        p = parents[i]
        if ok[p]:
            d = depth[i] = depth[p] + 1
            if d > m:
                final = False
            else:
                ok[i] = tokens[i] == emitted[d - 1]
    return np.array(ok, dtype=bool), final


# --------------------------------------------------------------------------- calibration
# What a calibration times (part of the cache key: a curve measured another way is stale).
# 2: trees shaped like real ones; whole device steps where the backend runs them.
# 3: sizes interleaved (one step of each per round), 15 rounds on CUDA.
# 4: 40 rounds on CUDA (CUDA_ROUNDS).
# 5: the greedy choice from the top-k pass on a CPU, as the engine takes it.
CALIBRATION_METHOD = 5
# Timed rounds per size on CUDA. The choice between the 64-, 96- and 128-node steps of an H100
# rests on 3-4% differences; 15 rounds put them 1-1.5% off now and then (a 96/64 ratio of 1.045
# in one run where steps measured 1.03-1.036, and 1.029-1.030 in two others), enough to move
# the choice (docs/benchmarks.md, ninth session).
CUDA_ROUNDS = 40
DEFAULT_SIZES_CPU = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def calibration_key(model, backend) -> dict:
    """What a latency curve depends on: model, dtype, device, backend (and its weight layout),
    threads, torch."""
    cfg = model.config
    dims = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads",
                                              "intermediate_size", "vocab_size")}
    return {
        "model": str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "")),
        "dims": dims,
        "dtype": str(backend.dtype if hasattr(backend, "dtype") else model.dtype),
        "device": _device_name(backend.device),
        "backend": type(backend).__name__ + ("+graphs" if getattr(backend, "graphs", False) else "")
        + (f"+packed:{getattr(backend, 'pack_kind', None)}:{getattr(backend, 'pack_min_rows', None)}"
           if getattr(backend, "packed", False) else ""),
        "torch": torch.__version__,
        "method": CALIBRATION_METHOD,
    }


def calibration_path(key: dict, home: Path | None = None) -> Path:
    if home is None:
        from .models import home_dir

        home = home_dir()
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(home) / "calibration" / f"{h}.json"


def _sizes_for(backend) -> tuple[list[int], bool]:
    max_tree = int(getattr(backend, "max_tree", 256))
    if getattr(backend, "graphs", False) or getattr(backend, "bucketed", False):
        from .backends.native import TREE_BUCKETS

        return [b for b in TREE_BUCKETS if b <= max_tree] or [1], True
    return [s for s in DEFAULT_SIZES_CPU if s <= max_tree], False


def calibration_template(n: int):
    """A template of ``n`` draft nodes shaped like the trees drafters verify: Token Recycling's
    ``tr160`` cut to its ``n`` likeliest nodes (depth <= 7), beyond that a bushy tree of at most
    64 nodes a level. (A chain of ``n`` nodes would time a walk and a KV compaction ``n`` deep,
    which no real tree has: on an H100 chains put the 96-node bucket 7% above the 64-node one,
    these trees 0-5%.)"""
    from .tree import build_template, get_template

    base = get_template("tr160")
    if n <= base.size:
        return base.subtree(n, name=f"tr160[{n}]")
    widths, prev, left = [], 1, n
    while left > 0:
        w = min(left, 8 * prev, 64)
        widths.append(w)
        left -= w
        prev = w
    return build_template(f"bushy{n}", widths)


@torch.inference_mode()
def calibrate(backend, sizes: Sequence[int] | None = None, cache_lens: Sequence[int] | None = None,
              repeats: int | None = None, stop_ratio: float = 6.0,
              progress: Callable[[str], None] | None = None) -> LatencyModel:
    """Time a speculative step for each tree size at a few cache lengths (median of ``repeats``
    rounds: ``CUDA_ROUNDS`` on CUDA, 5 elsewhere).

    A step here is what every speculative step pays whatever the drafter: the forward over
    the tree, the greedy walk, keeping the accepted path's KV, and the top-k of all logits that
    Token Recycling's update computes. Where the backend runs whole steps on the device
    (``captures_steps``: CUDA graphs), that is what is timed, with a Token Recycling tree of
    each size, exactly as the engine runs it; elsewhere verify, walk, top-k and commit.

    The sizes are timed in rounds, one step of each size per round, so that a drift of the
    machine (clocks, another process) hits every size alike: the choice between two sizes rests
    on their ratio, a few percent on a GPU. A first round warms up (and captures graphs); sizes
    whose step there exceeds ``stop_ratio`` times the plain step are not measured (no
    acceptance could pay them): the curve ends there. The backend's cache is left empty.
    """
    from .drafters.base import DraftContext
    from .drafters.recycling import TokenRecycling
    from .tree import Draft, TreeShape
    from .verify import greedy_verify, top_k_ids

    dev = backend.device
    auto_sizes, bucketed = _sizes_for(backend)
    sizes = sorted({int(s) for s in (sizes or auto_sizes)} | {1})
    max_len = int(backend.max_length)
    # a short context cannot hold a long cache and a large tree: measure trees up to half of it
    sizes = [s for s in sizes if s <= max(1, max_len // 2)]
    if cache_lens is None:
        cache_lens = (256, 2048) if dev.type == "cuda" else (256, 1024)
    rounds = int(repeats or (CUDA_ROUNDS if dev.type == "cuda" else 5))
    whole = bool(getattr(backend, "captures_steps", False))
    # whole steps keep what they accept (random drafts: about one token a step) within a round
    grow = 4 * len(sizes) if whole else 0
    cache_lens = sorted({max(1, min(int(L), max_len - sizes[-1] - 1 - grow)) for L in cache_lens})
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    vocab = int(backend.vocab_size)
    owners: set = set()

    def make_step(n: int):
        tmpl = calibration_template(n - 1)
        if whole and n > 1:
            tr = TokenRecycling(vocab, template=tmpl, device=dev)
            owners.add(tr.step_owner)
            ctx = DraftContext(tokens=[0], root=None, prompt_len=1, budget=max_len, latency=None)

            def step(tr=tr, ctx=ctx):
                host = backend.step(tr.device_step(ctx)).tolist()  # the one sync
                backend.advance(host[0] + 1)

            return step
        shape = TreeShape.from_parents(tmpl.parents(), dev)
        draft = Draft(torch.randint(0, vocab, (n,), generator=gen).to(dev), shape)

        def step(draft=draft):
            logits = backend.verify(draft)
            top = top_k_ids(logits, 8)  # what Token Recycling's update reads (and, on a CPU, the greedy choice)
            v = greedy_verify(draft, logits, top)
            v.n_accepted.item()
            backend.commit(v.path, 0)  # keep nothing: the cache stays at L

        return step

    def start(prompt):  # every round starts from a cache of L
        backend.reset()
        backend.prefill(prompt)
        if whole:
            backend.set_root(torch.randint(0, vocab, (1,), generator=gen).to(dev))

    table: list[list[float]] = []
    measured = sizes
    for L in cache_lens:
        prompt = torch.randint(0, vocab, (L,), generator=gen).to(dev)
        steps = [make_step(n) for n in measured]
        times: list[list[float]] = [[] for _ in measured]
        for r in range(rounds + 1):  # round 0: warm-up (and graph capture where there are graphs)
            if r == 0 or whole:
                start(prompt)
            for j, step in enumerate(steps):
                sync()
                t = time.perf_counter()
                step()
                if r > 0:
                    times[j].append(time.perf_counter() - t)
            if r == 1 and not table:  # larger trees than one this slow cannot pay: not measured
                cut = next((j for j in range(1, len(steps)) if times[j][0] > stop_ratio * times[0][0]), None)
                if cut is not None:
                    steps, times, measured = steps[: cut + 1], times[: cut + 1], measured[: cut + 1]
        row = [float(np.median(ts)) for ts in times]
        if progress:
            for n, t in zip(measured, row):
                progress(f"  cache {L:5d}  nodes {n:4d}  {t * 1e3:8.2f} ms")
        # A tree never costs less than a smaller one: a size measured slower than a bigger one
        # was disturbed (another process, a descheduled thread), so cap it by the bigger one's.
        row = np.minimum.accumulate(np.asarray(row)[::-1])[::-1].tolist()
        table.append(row)
    backend.reset()
    drop = getattr(backend, "drop_steps", None)
    if drop is not None:  # the calibration's captured steps are never replayed again
        drop(owners)
    k = min(len(r) for r in table)
    return LatencyModel(list(measured[:k]), list(cache_lens), [r[:k] for r in table], bucketed)


def load_or_calibrate(model, backend, force: bool = False, home: Path | None = None,
                      progress: Callable[[str], None] | None = None, repeats: int | None = None) -> LatencyModel:
    """The cached curve for (model, device, dtype, backend), measuring it if missing or ``force``
    (``repeats``: timed rounds per size, see :func:`calibrate`)."""
    key = calibration_key(model, backend)
    path = calibration_path(key, home)
    if not force and path.exists():
        try:
            lm = LatencyModel.load(path)
            if lm.meta.get("key") == key:
                return lm
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            pass  # unreadable or stale: measure again
    if progress:
        progress(f"calibrating verification latency on {key['device']} (once; cached in {path})")
    t = time.perf_counter()
    lm = calibrate(backend, repeats=repeats, progress=progress)
    lm.meta = {"key": key, "seconds_taken": round(time.perf_counter() - t, 2),
               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        lm.save(path)
    except OSError as e:  # a read-only home still gets a working (uncached) curve
        if progress:
            progress(f"could not cache the calibration ({e})")
    return lm
