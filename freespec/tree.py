"""Draft trees: structure (parents, depth, ancestor mask, root-to-node paths) and templates.

A draft tree has ``n`` nodes; node 0 is the *root*: the last committed token, whose KV is not
in the cache yet. Every other node is a guessed continuation of its parent. Nodes are stored
in topological order (``parents[i] < i``), so one pass over depths builds everything.

Tree attention: node ``i`` attends to the cached prefix and to ``ancestors[i]`` (its
ancestors and itself); its position id is ``prefix_len + depth[i]``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Sequence

import numpy as np
import torch


class TreeError(ValueError):
    pass


def _path_entries(paths: Sequence[tuple[int, ...]], first: int = 0):
    """The entries of root-to-node ``paths`` (node ``first + i``'s path is ``paths[i]``) as
    numpy arrays: (path lengths, the path entries flattened, each entry's row, its depth)."""
    lens = np.fromiter(map(len, paths), dtype=np.int64, count=len(paths))
    flat = np.fromiter(itertools.chain.from_iterable(paths), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(first, first + len(paths)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    return lens, flat, rows, cols


@dataclass(frozen=True, eq=False)
class TreeShape:
    """The structure of a draft tree, independent of its tokens (cached for static templates)."""

    parents: torch.Tensor  # [n] int64, parents[0] == -1
    depth: torch.Tensor  # [n] int64
    ancestors: torch.Tensor  # [n, n] bool: ancestors[i, j] <=> j is i or an ancestor of i
    paths: torch.Tensor  # [n, max_depth + 1] int64: paths[i, d] = ancestor of i at depth d (0 past depth[i])
    max_depth: int
    parents_list: tuple[int, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.parents_list)

    @staticmethod
    def from_parents(parents: Sequence[int], device: torch.device | str = "cpu") -> "TreeShape":
        parents = tuple(int(p) for p in parents)
        n = len(parents)
        if n == 0 or parents[0] != -1:
            raise TreeError("a tree needs a root: parents[0] must be -1")
        # each node's path from the root, on the host in Python tuples (a tree has a few hundred
        # nodes at most; per-level tensor ops on the CPU cost ~10x more: ~0.35 ms for tr160)
        paths = [(0,)] * n
        for i in range(1, n):
            p = parents[i]
            if not 0 <= p < i:
                raise TreeError(f"node {i} has parent {p}: nodes must come after their parent")
            paths[i] = paths[p] + (i,)
        lens, flat, rows, cols = _path_entries(paths)
        depth = lens - 1
        max_depth = int(depth.max())
        # paths[i, d]: the ancestor of i at depth d (0 past depth[i]); ancestors[i, j]: j is on
        # i's path
        path_np = np.zeros((n, max_depth + 1), dtype=np.int64)
        path_np[rows, cols] = flat
        anc = np.zeros((n, n), dtype=np.bool_)
        anc[rows, flat] = True
        device = torch.device(device)
        return TreeShape(
            parents=torch.tensor(parents, dtype=torch.long).to(device),
            depth=torch.from_numpy(depth).to(device),
            ancestors=torch.from_numpy(anc).to(device),
            paths=torch.from_numpy(path_np).to(device),
            max_depth=max_depth,
            parents_list=parents,
        )

    def to(self, device: torch.device | str) -> "TreeShape":
        device = torch.device(device)
        if self.parents.device == device:
            return self
        return TreeShape(
            parents=self.parents.to(device),
            depth=self.depth.to(device),
            ancestors=self.ancestors.to(device),
            paths=self.paths.to(device),
            max_depth=self.max_depth,
            parents_list=self.parents_list,
        )

    def attention_bias(self, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4-D mask [1, 1, n, prefix_len + n]: 0 where a node may attend, dtype-min elsewhere.

        Float, never bool: HF's eager attention silently misreads a boolean 4-D mask.
        """
        n = self.size
        neg = torch.finfo(dtype).min
        bias = torch.zeros(1, 1, n, prefix_len + n, dtype=dtype, device=self.parents.device)
        bias[0, 0, :, prefix_len:].masked_fill_(~self.ancestors, neg)
        return bias

    def position_ids(self, prefix_len: int) -> torch.Tensor:
        return (self.depth + prefix_len).unsqueeze(0)


@dataclass(frozen=True, eq=False)
class Draft:
    """A proposed tree: tokens laid on a shape. ``tokens[0]`` is the root (last committed token)."""

    tokens: torch.Tensor  # [n] int64, on the model's device
    shape: TreeShape

    @property
    def size(self) -> int:
        return self.shape.size


class AttachBuffer:
    """A fixed base tree with up to ``slots`` extra nodes hung under its root, rewritten in
    place every step (:meth:`load`): a CUDA graph captured over ``shape`` and ``tokens``
    replays over whatever tree was loaded last, so retrieval trees, which change shape from
    step to step, ride on a captured step without a capture per shape.

    ``shape``: a TreeShape of ``base.size + slots`` nodes whose tensors are device buffers
    (``parents_list`` and ``max_depth`` describe the placeholder it was built from: read the
    structure from the tensors); ``tokens``: the extra nodes' tokens [slots]. A tree with
    fewer than ``slots`` nodes is padded by repeating its last node (same parent, same token:
    the target computes the same thing there, so nothing downstream can tell the copies apart).
    Loading is two host->device copies (asynchronous from pinned memory on CUDA) of blocks that
    hold the base's rows too: ``base`` may itself be rewritten in place between loads (a plan
    buffer), so a load either names the base's current structure (``base_parents``, with a
    ``base_version`` that changes with it: the host rows are rebuilt when it moves) or copies
    the base's rows from ``base`` on the device after the blocks (four more copies).
    """

    def __init__(self, base: TreeShape, slots: int, device: torch.device | str):
        device = torch.device(device)
        P, m = base.size, int(slots)
        if m < 1:
            raise TreeError("an attach buffer needs at least one slot")
        n = P + m
        self.base_size, self.slots = P, m
        self.max_depth = D = max(base.max_depth, m)
        # placeholder: the base, then a chain of the extra nodes (the deepest a tree of m can be)
        placeholder = TreeShape.from_parents(list(base.parents_list) + [0] + list(range(P, n - 1)))
        pin = device.type == "cuda"
        # one int64 block (parents | depth | paths | tokens) and one bool block (ancestors)
        self._host = torch.zeros(2 * n + n * (D + 1) + m, dtype=torch.long, pin_memory=pin)
        self._host_anc = torch.zeros(n, n, dtype=torch.bool, pin_memory=pin)
        h = self._views(self._host, n, D, m)
        h[0].copy_(placeholder.parents)
        h[1].copy_(placeholder.depth)
        h[2].copy_(placeholder.paths)
        self._host_anc.copy_(placeholder.ancestors)
        self._h = tuple(t.numpy() for t in h)
        self._anc_np = self._host_anc.numpy()
        # (copies on the CPU too: the device buffers are never the host's, as on a GPU)
        self._dev = self._host.to(device, copy=True)
        self._dev_anc = self._host_anc.to(device, copy=True)
        parents, depth, paths, self.tokens = self._views(self._dev, n, D, m)
        self.shape = TreeShape(parents=parents, depth=depth, ancestors=self._dev_anc, paths=paths,
                               max_depth=D, parents_list=placeholder.parents_list)
        self.base = base
        self.loaded = 0  # real nodes in the last load (the rest are copies)
        self._base_version = None  # the base_version the host blocks' base rows were built for
        self._rows: dict[tuple, tuple] = {}  # attached rows by the attached tree's parents (see load)

    @staticmethod
    def _views(block: torch.Tensor, n: int, D: int, m: int):
        a, b, c = n, 2 * n, 2 * n + n * (D + 1)
        return block[:a], block[a:b], block[b:c].view(n, D + 1), block[c : c + m]

    def load(self, tokens: Sequence[int], parents: Sequence[int], base_version=None,
             base_parents: Sequence[int] | None = None) -> None:
        """The extra tree: ``tokens[j]``'s parent is ``parents[j]``, an index into ``tokens``
        (earlier) or -1 for the base's root. 1 to ``slots`` nodes. ``base_parents``: the base's
        current structure (its parents list), with ``base_version``, a value that changes
        whenever the base is rewritten: the host blocks' base rows are rebuilt from it when the
        version moves, and the load is the two block copies. Without ``base_parents`` the
        base's rows are copied from ``base`` on the device at every load."""
        k = len(tokens)
        if not 1 <= k <= self.slots or len(parents) != k:
            raise TreeError(f"an attached tree needs 1 to {self.slots} nodes with one parent each, got {k}")
        P, m = self.base_size, self.slots
        par_np, dep_np, paths_np, tok_np = self._h
        anc = self._anc_np
        key = tuple(parents)
        rows = self._rows.get(key)
        if rows is not None:  # a structure loaded before (retrieval trees repeat: chains mostly)
            par_np[P:], dep_np[P:], paths_np[P:], anc[P:] = rows
        else:
            self._structure(parents, k)
            if len(self._rows) >= 512:
                self._rows.clear()
            self._rows[key] = (par_np[P:].copy(), dep_np[P:].copy(), paths_np[P:].copy(), anc[P:].copy())
        tok_np[:k] = tokens
        tok_np[k:] = tokens[k - 1]
        self.loaded = k
        if base_parents is not None and (base_version is None or base_version != self._base_version):
            self._set_base_rows(base_parents)
            self._base_version = base_version
        self._dev.copy_(self._host, non_blocking=True)
        self._dev_anc.copy_(self._host_anc, non_blocking=True)
        if base_parents is not None:
            return
        # the base's rows from the base itself (the attached rows only ever refer to its root,
        # whose row is the same in every tree)
        b, s = self.base, self.shape
        s.parents[:P].copy_(b.parents)
        s.depth[:P].copy_(b.depth)
        s.paths[:P, : b.paths.shape[1]].copy_(b.paths)
        s.ancestors[:P, :P].copy_(b.ancestors)

    def _structure(self, parents: Sequence[int], k: int) -> None:
        """The host blocks' attached rows (parents, depth, paths, ancestors) for a tree of
        ``k`` nodes with local ``parents``, padded to the slots by copies of the last node."""
        P, m = self.base_size, self.slots
        par_np, dep_np, paths_np, _ = self._h
        # each extra node's path from the root (global indices), built on the host in lists
        gpar, paths = [0] * m, [()] * m
        for j in range(m):
            jj = j if j < k else k - 1  # padding repeats the last node
            p = int(parents[jj])
            if p == -1:
                gpar[j], paths[j] = 0, (0, P + j)
            elif 0 <= p < jj:
                gpar[j], paths[j] = P + p, paths[p] + (P + j,)
            else:
                raise TreeError(f"attached node {jj} has parent {p}: nodes must come after their parent")
        lens, flat, rows, cols = _path_entries(paths, first=P)
        par_np[P:] = gpar
        dep_np[P:] = lens - 1
        paths_np[P:] = 0
        paths_np[rows, cols] = flat
        anc = self._anc_np
        anc[P:] = False
        anc[rows, flat] = True  # a node's ancestors (and itself) are its path

    def _set_base_rows(self, parents: Sequence[int]) -> None:
        """The host blocks' base rows from the base's structure ``parents``."""
        P = self.base_size
        if len(parents) != P:
            raise TreeError(f"the base has {P} nodes, got a structure of {len(parents)}")
        b = TreeShape.from_parents(parents)
        if b.max_depth > self.max_depth:
            raise TreeError(f"a base {b.max_depth} deep does not fit a buffer laid out for depth {self.max_depth}")
        par_np, dep_np, paths_np, _ = self._h
        par_np[:P] = b.parents.numpy()
        dep_np[:P] = b.depth.numpy()
        paths_np[:P] = 0
        paths_np[:P, : b.max_depth + 1] = b.paths.numpy()
        anc = self._anc_np
        anc[:P] = False
        anc[:P, :P] = b.ancestors.numpy()


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class TreeTemplate:
    """A static tree given as rank paths: node (0, 2) is the 3rd candidate after the 1st one.

    Drafters that keep top-k candidate lists per token (Token Recycling) fill a template by
    one gather per level: token(node) = M[token(parent), rank(node)].
    """

    name: str
    paths: tuple[tuple[int, ...], ...]  # without the root, sorted by (depth, path)

    def __post_init__(self):
        seen = {()}
        for p in self.paths:
            if p[:-1] not in seen:
                raise TreeError(f"template {self.name}: node {p} has no parent in the template")
            if p in seen:
                raise TreeError(f"template {self.name}: node {p} appears twice")
            seen.add(p)

    @property
    def size(self) -> int:
        """Number of draft nodes (the root not counted)."""
        return len(self.paths)

    @property
    def max_rank(self) -> int:
        return 1 + max((r for p in self.paths for r in p), default=-1)

    def nodes_per_level(self) -> list[int]:
        out: list[int] = []
        for p in self.paths:
            while len(out) < len(p):
                out.append(0)
            out[len(p) - 1] += 1
        return out

    def parents(self) -> list[int]:
        index = {(): 0}
        parents = [-1]
        for i, p in enumerate(self.paths, start=1):
            parents.append(index[p[:-1]])
            index[p] = i
        return parents

    def ranks(self) -> list[int]:
        return [0] + [p[-1] for p in self.paths]

    def subtree(self, n: int, name: str | None = None) -> "TreeTemplate":
        """The ``n`` most promising nodes, closed under parents (a prior: lower ranks first)."""
        if n >= self.size:
            return self
        order = sorted(self.paths, key=lambda p: (-rank_prior(p), len(p), p))
        keep = set(order[:n])
        return TreeTemplate(name or f"{self.name}[{n}]", tuple(p for p in self.paths if p in keep))


# Rough probability that the rank-r candidate is the target's next token, used only to order
# nodes when a template is cut down or built; acceptance statistics replace it where known.
_RANK_PRIOR = (0.55, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.013, 0.01, 0.008)


def rank_prior(path: tuple[int, ...]) -> float:
    """Prior probability that a template node (a path of candidate ranks) is accepted."""
    p = 1.0
    for r in path:
        p *= _RANK_PRIOR[r] if r < len(_RANK_PRIOR) else 0.005
    return p


def build_template(name: str, per_level: Sequence[int], k: int = 8) -> TreeTemplate:
    """Grow a template level by level, keeping the ``per_level[d]`` highest-prior children."""
    levels: list[list[tuple[int, ...]]] = [[()]]
    for width in per_level:
        cands = [p + (r,) for p in levels[-1] for r in range(k)]
        cands.sort(key=lambda p: (-rank_prior(p), p))
        levels.append(sorted(cands[:width]))
    return TreeTemplate(name, tuple(p for lvl in levels[1:] for p in lvl))


def chain(depth: int) -> TreeTemplate:
    return TreeTemplate(f"chain{depth}", tuple((0,) * d for d in range(1, depth + 1)))


@lru_cache(maxsize=None)
def _builtin() -> dict[str, TreeTemplate]:
    data = json.loads(resources.files("freespec.data").joinpath("trees.json").read_text())
    out = {}
    for name, paths in data.items():
        out[name] = TreeTemplate(name, tuple(tuple(p) for p in paths))
    return out


def template_names() -> list[str]:
    return sorted(_builtin())


def get_template(spec: str | int | TreeTemplate) -> TreeTemplate:
    """A template by name (``tr80``, ``tr16`` ...), by node count (a cut of ``tr80``), or as given."""
    if isinstance(spec, TreeTemplate):
        return spec
    s = str(spec).strip()
    if s.isdigit():
        n = int(s)
        if n < 0:
            raise TreeError("a tree needs at least 0 draft nodes")
        return _builtin()["tr80"].subtree(n, name=f"tr80[{n}]") if n < 80 else _builtin()["tr80"]
    if s.startswith("chain") and s[5:].isdigit():
        return chain(int(s[5:]))
    try:
        return _builtin()[s]
    except KeyError:
        raise TreeError(
            f"unknown tree template {s!r}; known: {', '.join(template_names())}, chainN, or a node count"
        ) from None
