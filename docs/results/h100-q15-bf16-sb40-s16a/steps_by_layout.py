"""Per category and method: the share of steps by layout (plan size P, attached layout m), their tokens
and their device time (CUDA events around the step's graph replay), from a run's steps.json.gz
(written by steps_wrapper.py) and its results.json.gz:  python steps_by_layout.py RESULTS_DIR"""
import json, gzip, sys, collections, statistics as S
rd = sys.argv[1]
rows = json.load(gzip.open(f"{rd}/steps.json.gz"))
res = json.load(gzip.open(f"{rd}/results.json.gz"))
recs = {m: [r for r in res["records"] if r["method"] == m] for m in ("hybrid:tr80", "hybrid")}
names = {0: "hybrid:tr80", 1: "hybrid"}
cat_of = {}
for r in rows:
    if r[0] == "B":
        _, d, p, L = r
        if p == 0: continue
        rec = recs[names[d]][p - 1]
        assert rec["prompt_tokens"] == L, (rec["prompt_tokens"], L)
        cat_of[(d, p)] = rec["category"]
agg = collections.defaultdict(list)
for r in rows:
    if r[0] == "B": continue
    d, p, P, m, n, ru, nt, ms = r
    c = cat_of.get((d, p))
    if c is None: continue
    for cc in (c, "all"):
        agg[(cc, d, P, m)].append((nt, ms, n))
cats = sorted({k[0] for k in agg})
for c in cats:
    print("==", c)
    for d in (0, 1):
        tot = sum(len(v) for k, v in agg.items() if k[0] == c and k[1] == d)
        for k in sorted(k for k in agg if k[0] == c and k[1] == d):
            v = agg[k]; ms = [x[1] for x in v if x[1] is not None]
            print(f"  {names[d]:12s} P={k[2]:3d} m={k[3]:2d} frac {len(v)/tot:.3f} n {len(v):5d} tok {S.mean(x[0] for x in v):.3f} tree {S.mean(x[2] for x in v):5.1f} ms med {S.median(ms):.3f} mean {S.mean(ms):.3f}")
