"""Host work of whole device steps, replayed offline on the CPU.

On a GPU a device step (``Backend.step``) is one CUDA graph replay, and what the host adds to
each step is Python on the critical path: the drafter's ``device_step`` (retrieval, the plan
and the pair choice, loading an attached tree) before the launch, and ``DeviceStep.done``
(learning) after the step's one sync; ``done``'s deferred part runs while the next step
computes. Greedy output does not depend on the draft, so a recorded output
(``python -m freespec.bench.replay record``) can be decoded again without the model: each step's
tree is filled on the CPU from the recording's Token Recycling matrix, walked against the
recorded tokens, and the accepted ones (plus the bonus token) handed back as the step's result.
That times the host work a step of several drafters over the very same text, with the latency
curve of the GPU they would run on (``latency_curve`` of a bench result, or a calibration file),
on a machine without one.

Not replayed: the matrix update from the step's logits (the matrix stays as recorded, warm), and
the device work itself. The tokens a step are the drafters' own on this text; its timings are
this CPU's, so compare methods with one another, in one run.

    python -m freespec.bench.replay record --per-category 3 --out rec.pt
    python -m freespec.bench.hostreplay rec.pt --curve results.json --methods hybrid:tr80,hybrid
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
from pathlib import Path
import torch

from ..cost import CACHE_STEP, LatencyModel, accepted_nodes
from ..drafters import DraftContext, make_drafter
from .methods import BenchError, parse_method

# The H100 machine's host work a step besides the drafter's (the engine's loop), added to the
# curve as the engine adds its measured host overhead.
HOST_S = 0.35e-3


def _drafter(method: str, vocab_size: int, matrix: torch.Tensor | None, fixed: str | None):
    spec = parse_method(method)
    if spec.kind != "engine" or spec.base == "plain":
        raise BenchError(f"method {method!r}: the host replay takes drafters with device steps (recycling, hybrid)")
    d = make_drafter(spec.base, vocab_size=vocab_size, device="cpu", template=spec.template or "auto")
    if not hasattr(d, "device_step"):
        raise BenchError(f"method {method!r}: the {spec.base} drafter has no device steps")
    tr = getattr(d, "tr", d)
    if fixed is not None:
        tr.fixed = fixed
    if matrix is not None:
        if tuple(matrix.shape) != tuple(tr.matrix.shape):
            raise BenchError(f"the recording's matrix is {tuple(matrix.shape)}, the drafter's {tuple(tr.matrix.shape)}")
        tr.matrix.copy_(matrix)
    return d


def replay_host(recording: dict, latency: LatencyModel, method: str, fixed: str | None = "tr80",
                host_s: float = HOST_S, max_length: int = 4096) -> dict:
    """Decode ``recording`` again with ``method``'s device steps; host seconds and tokens a step.

    ``fixed``: the GPU's fixed tree (Token Recycling's anchor on a stepped curve; None: this
    CPU's default, which has no anchor)."""
    runs = recording["runs"]
    if not runs or any("prompt_len" not in r for r in runs):
        raise BenchError("the recording has no prompt lengths: record it again (python -m freespec.bench.replay record)")
    vocab = int(recording["matrix"].shape[0]) if "matrix" in recording else int(max(max(r["tokens"]) for r in runs)) + 1
    d = _drafter(method, vocab, recording.get("matrix"), fixed)
    clock = time.perf_counter
    draft = done = window = 0.0
    steps = tokens = 0
    sizes: collections.Counter = collections.Counter()
    curves: dict[int, object] = {}
    gc.collect()
    for run in runs:
        n_prompt = int(run["prompt_len"])
        prompt, out = run["tokens"][:n_prompt], run["tokens"][n_prompt:]
        if not out:
            continue
        d.begin(list(prompt))
        seq = list(prompt) + [out[0]]
        pos, later = 1, None
        while pos < len(out):
            cache = len(seq) - 1
            curve = curves.get(cache // CACHE_STEP)
            if curve is None:
                curve = curves[cache // CACHE_STEP] = latency.curve(cache) + host_s
            ctx = DraftContext(tokens=seq, root=None, prompt_len=n_prompt, budget=max_length - cache - 1, latency=curve)
            t0 = clock()
            ds = d.device_step(ctx)
            t1 = clock()
            if later is not None:  # (on a GPU: while the step computes)
                later()
            t2 = clock()
            if ds is None:  # a plain step (the engine takes it on the host)
                n, size = 0, 0
            else:
                drafted = ds.fill(torch.tensor([seq[-1]])).tolist()
                ok = accepted_nodes(drafted, ds.shape.parents.tolist(), out[pos:])
                # (the deepest node on the path: a padded layout repeats its last node)
                n, size = int(ds.shape.depth[torch.from_numpy(ok)].max()), ds.shape.size - 1
            new = out[pos : pos + n + 1]
            t3 = clock()
            later = ds.done(new) if ds is not None and ds.done is not None else None
            t4 = clock()
            draft += t1 - t0
            window += t2 - t1
            done += t4 - t3
            steps += 1
            tokens += len(new)
            sizes[size] += 1
            seq.extend(new)
            pos += len(new)
        if later is not None:
            later()
        d.end(seq)
    if steps == 0:
        raise BenchError("the recording has no steps to replay")
    return {
        "method": method,
        "steps": steps,
        "tokens_per_step": tokens / steps,
        "draft_us": draft / steps * 1e6,
        "done_us": done / steps * 1e6,
        "window_us": window / steps * 1e6,
        "draft_nodes": dict(sizes.most_common()),
    }


def _latency(path: str) -> LatencyModel:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise BenchError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # (not text, or not JSON)
        raise BenchError(f"{path}: not a JSON bench result or calibration ({e})") from None
    if isinstance(d, dict) and "latency_curve" in d:  # a bench result
        d = d["latency_curve"]
    if d is None:
        raise BenchError(f"{path}: no latency curve in it (a bench result of an automatic tree, or a calibration)")
    try:
        return LatencyModel.from_dict(d)
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{path}: not a latency curve ({e})") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freespec.bench.hostreplay", description=__doc__.split("\n\n")[0])
    ap.add_argument("recording", help="a recording of python -m freespec.bench.replay record")
    ap.add_argument("--curve", required=True, help="a bench result (its latency_curve) or a calibration file")
    ap.add_argument("--methods", default="hybrid:tr80,hybrid")
    ap.add_argument("--fixed", default="tr80", help="the GPU's fixed tree (its anchor step); 'none': this CPU's")
    ap.add_argument("--reps", type=int, default=3, help="runs per method, interleaved; timings are the fastest")
    a = ap.parse_args(argv)
    try:
        rec = torch.load(a.recording, weights_only=False)
        lat = _latency(a.curve)
        fixed = None if a.fixed == "none" else a.fixed
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        best: dict[str, dict] = {}
        for _ in range(max(1, a.reps)):
            for m in methods:
                r = replay_host(rec, lat, m, fixed=fixed)
                b = best.get(m)
                if b is None or r["draft_us"] + r["done_us"] < b["draft_us"] + b["done_us"]:
                    best[m] = r
    except (BenchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| method | steps | tokens a step | drafting us | after the step us | deferred us | draft nodes (most steps) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for m in methods:
        r = best[m]
        top = ", ".join(f"{k}: {v}" for k, v in list(r["draft_nodes"].items())[:3])
        print(f"| {m} | {r['steps']} | {r['tokens_per_step']:.3f} | {r['draft_us']:.1f} | {r['done_us']:.1f} | "
              f"{r['window_us']:.1f} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
