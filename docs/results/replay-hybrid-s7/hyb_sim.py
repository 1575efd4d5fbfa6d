# Scratch analysis (seventh session): run from the repository root as
#   python docs/results/replay-hybrid-s7/hyb_sim.py REC.pt RESULTS.json
# REC.pt: a `python -m freespec.bench.replay record` recording; RESULTS.json: a bench run whose
# latency_curve is used (h100-q15-bf16-sb10-s6a here).
"""Replay hybrid's device-step choices on a recorded run: tokens per step and modelled speed."""
import sys, json, collections
import numpy as np, torch
from freespec.drafters.hybrid import HybridDrafter
from freespec.drafters.base import DraftContext
from freespec.cost import LatencyModel, accepted_nodes
from freespec.bench.replay import Base
rec = torch.load(sys.argv[1], weights_only=False)
lc = json.load(open(sys.argv[2]))['latency_curve']
lat = LatencyModel(lc['sizes'], lc['cache_lens'], lc['seconds'], bucketed=True)
HOST = 0.35e-3      # host overhead the engine adds
LOAD = 0.06e-3      # host cost of an attached tree's load on the GPU host
V = 151936
base = Base()
D = int(base.depth.max())
bdepth = base.depth

def depth_of(parents):
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return np.array(d)

def sim(template, tweak=None, label=None):
    d = HybridDrafter(V, template=template, device="cpu")
    if tweak: tweak(d)
    tr = d.tr
    mask80 = base.mask("tr80")
    rec_plan = {}
    orig_plan_step = tr.plan_step
    def plan_step(P):
        if P and tr._plan_key is not None and P == len(tr._plan_key):
            rec_plan['nodes'] = np.array((0,) + tr._plan_key)
        elif P:
            rec_plan['nodes'] = np.concatenate(([0], np.sort(tr._ranked[1][:P])))
        else:
            rec_plan['nodes'] = np.array([0])
        return orig_plan_step(P)
    tr.plan_step = plan_step
    orig_asm = d._assemble
    def asm(t, m, tree):
        rec_plan['tree'] = tree; rec_plan['m'] = m
        rec_plan['n'] = (t.shape.size if t is not None else 1) + m
        return orig_asm(t, m, tree)
    d._assemble = asm
    stats_att = []; calib = collections.defaultdict(lambda: [0, 0, 0.0]); bydep = collections.defaultdict(lambda: [0, 0, 0.0]); tok = tim = 0.0; steps = 0; sizes = collections.Counter(); att = 0
    bycat = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rec["runs"]:
        out = r["tokens"]; pos0 = r["steps"][0][0]; plen = pos0 - 1
        d.begin(out[:plen])
        st = r["steps"]
        for j, (pos, btoks) in enumerate(st):
            nxt = st[j + 1][0] if j + 1 < len(st) else len(out)
            if pos + D > len(out):
                break
            rec_plan.clear()
            curve = lat.curve(pos) + HOST
            d._load_cost = LOAD
            ctx = DraftContext(tokens=out[:pos], root=None, prompt_len=plen, budget=4000, latency=curve)
            ds = d.device_step(ctx)
            h = accepted_nodes(btoks.tolist(), base.parents, out[pos:pos + D])
            nodes = rec_plan.get('nodes', np.nonzero(mask80)[0] if template != "auto" else np.array([0]))
            acc = int((h[nodes] * bdepth[nodes]).max())
            tree = rec_plan.get('tree')
            if tree is not None:
                ok = accepted_nodes(tree.tokens, tree.parents, out[pos:pos + 40])
                racc = int((ok * depth_of(tree.parents)).max())
                pred = float(d.sizer.cal.rates(d.sizer.cal.bin(tree.scores[1:])).sum())
                stats_att.append((pred, racc, max(acc, racc) - acc, acc))
                acc = max(acc, racc)
                att += 1
            n = rec_plan['n']
            sizes[n] += 1
            t = lat.curve(pos)[min(n, len(curve) - 1)] + HOST + (LOAD if tree is not None else 0)
            tok += acc + 1; tim += t; steps += 1
            bycat[r["category"]][0] += acc + 1; bycat[r["category"]][1] += t
            if tr.auto:
                tr._seen.copy_(torch.from_numpy(btoks.astype(np.int32)))
            lt = d.sizer._last
            if lt is not None and lt.size > 1:
                okk = accepted_nodes(lt.tokens, lt.parents, out[pos:pos + 40])[1:]
                bb = d.sizer._bins
                mp = d.sizer.cal._map[bb]
                dd = depth_of(lt.parents)[1:]
                for b_, o_, m_, de in zip(bb, okk, mp, dd):
                    calib[b_][0] += 1; calib[b_][1] += o_; calib[b_][2] += m_
                    bydep[min(de, 12)][0] += 1; bydep[min(de, 12)][1] += o_; bydep[min(de, 12)][2] += m_
            if ds.done is not None:
                ds.done(out[pos:nxt])
        d.end(out)
    print(f"{label or template:24s} steps {steps} tok/step {tok/steps:.3f} ms/step {tim/steps*1e3:.3f} rate {tok/tim/1e3:.4f} tok/ms attached {att/steps:.2f} "
          f"sizes {sorted(sizes.items(), key=lambda x:-x[1])[:6]}", flush=True)
    for b_ in sorted(calib): print(f"     bin {b_:2d} n={calib[b_][0]:6d} real {calib[b_][1]/calib[b_][0]:.3f} map {calib[b_][2]/calib[b_][0]:.3f}")
    for b_ in sorted(bydep): print(f"     depth {b_:2d} n={bydep[b_][0]:6d} real {bydep[b_][1]/bydep[b_][0]:.3f} map {bydep[b_][2]/bydep[b_][0]:.3f}")
    if stats_att:
        x = np.array(stats_att)
        print("   attached: mean predicted %.3f, retrieval alone %.3f, extra over TR %.3f, TR %.3f" % tuple(x.mean(0)))
        for lo, hi in ((0, .5), (.5, 1), (1, 2), (2, 4), (4, 100)):
            s_ = (x[:, 0] >= lo) & (x[:, 0] < hi)
            if s_.any(): print(f"     pred [{lo},{hi}) n={s_.sum()} pred {x[s_,0].mean():.3f} alone {x[s_,1].mean():.3f} extra {x[s_,2].mean():.3f}")
    return {c: v[0] / v[1] for c, v in bycat.items()}, tok / tim

if __name__ == "__main__":
    a, ra = sim("tr80")
    b, rb = sim("auto")
    for c in (a or []): print(f"  {c:16s} auto/tr80 {b[c]/a[c]:.3f}")
