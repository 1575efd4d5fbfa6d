# host time a call of the drafters' step functions, per bench method (light wrappers)
import sys, time, collections, json, os, atexit, gc
import freespec.bench.methods as BM
import freespec.drafters.hybrid as H, freespec.drafters.recycling as R, freespec.drafters.sizing as Z
import freespec.drafters.suffix as S, freespec.tree as TT, freespec.engine as E
cur = ["?"]
tot = collections.defaultdict(collections.Counter)
orig_run = BM.EngineMethod.run
def run(self, *a, **k):
    cur[0] = self.name
    return orig_run(self, *a, **k)
BM.EngineMethod.run = run
gs = [0.0]
def gccb(phase, info):
    if phase == "start":
        gs[0] = time.perf_counter(); return
    t = tot[cur[0]]; t[f"gc{info['generation']}_n"] += 1; t[f"gc{info['generation']}_us"] += (time.perf_counter() - gs[0]) * 1e6
gc.callbacks.append(gccb)
def wrap(cls, name):
    orig = getattr(cls, name)
    label = f"{cls.__name__}.{name}"
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            c = tot[cur[0]]; c[label + "_n"] += 1; c[label + "_us"] += (time.perf_counter() - t) * 1e6
    setattr(cls, name, w)
for cls, name in ((H.HybridDrafter, "device_step"), (H.HybridDrafter, "_learn"), (H.HybridDrafter, "_ruled_step"),
                  (H.HybridDrafter, "_assemble"), (S.SuffixDrafter, "retrieve"), (R.TokenRecycling, "learn"),
                  (R.TokenRecycling, "_learn_counts"), (R.TokenRecycling, "_read_stats"), (R.TokenRecycling, "_count_held"),
                  (R.TokenRecycling, "plan_step"), (R.TokenRecycling, "device_step"), (R.TokenRecycling, "choose"),
                  (Z.TreeSizer, "learn"), (Z.TreeSizer, "scores"), (TT.AttachBuffer, "load"), (E.Engine, "_step_curve"),
                  (R.TokenRecycling, "laid_plan"), (H.HybridDrafter, "_prepare")):
    wrap(cls, name)
def dump():
    out = {m: {k: round(v, 1) for k, v in sorted(c.items())} for m, c in tot.items()}
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "hp15.json"), "w"), indent=1)
    for m, c in out.items():
        if m not in ("hybrid", "hybrid:tr80"):
            continue
        names = sorted({k[:-3] for k in c if k.endswith("_us")})
        print(m, " ".join(f"{n}={c[n + '_us'] / max(1, c.get(n + '_n', 1)):.1f}us/{int(c.get(n + '_n', 0))}" for n in names))
atexit.register(dump)
from freespec.cli import main
sys.exit(main(sys.argv[1:]))
