# where auto's stalls come from: long calls of a few host functions, garbage collections and CUDA
# graph captures, per bench method (light: a few wrapped calls a step)
import sys, time, collections, json, os, atexit, gc
import freespec.bench.methods as BM
import freespec.drafters.hybrid as H, freespec.drafters.recycling as R, freespec.tree as TT
import freespec.backends.native as N
cur = ["?"]
active = []
spikes = collections.defaultdict(list)
tot = collections.defaultdict(collections.Counter)
orig_run = BM.EngineMethod.run
def run(self, *a, **k):
    cur[0] = self.name
    return orig_run(self, *a, **k)
BM.EngineMethod.run = run
gstart = [0.0]
def gccb(phase, info):
    if phase == "start":
        gstart[0] = time.perf_counter()
        return
    dt = time.perf_counter() - gstart[0]
    m = cur[0]; g = info["generation"]
    tot[m][f"gc{g}_n"] += 1; tot[m][f"gc{g}_ms"] += dt * 1e3
    if dt > 2e-3:
        spikes[m].append(("gc%d" % g, round(dt * 1e3, 2), "/".join(active)))
gc.callbacks.append(gccb)
def wrap(cls, name, limit=2e-3):
    orig = getattr(cls, name)
    label = f"{cls.__name__}.{name}"
    def w(*a, **k):
        active.append(label)
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            dt = time.perf_counter() - t
            active.pop()
            m = cur[0]
            tot[m][label + "_n"] += 1; tot[m][label + "_ms"] += dt * 1e3
            if dt > limit:
                spikes[m].append((label, round(dt * 1e3, 2), "/".join(active)))
    setattr(cls, name, w)
for cls, name in ((H.HybridDrafter, "device_step"), (H.HybridDrafter, "begin"), (H.HybridDrafter, "_learn"),
                  (H.HybridDrafter, "end"), (N.NativeBackend if hasattr(N, "NativeBackend") else None, "_record"),
                  (N.NativeBackend, "_capture"), (TT.AttachBuffer, "__init__"), (R.TokenRecycling, "_read_stats_later"), (R.TokenRecycling, "_plan_step")):
    if cls is not None and hasattr(cls, name):
        wrap(cls, name, limit=0.0 if name in ("_record", "__init__", "_capture") else 2e-3)
def dump():
    out = {m: {"totals": {k: round(v, 2) for k, v in sorted(tot[m].items())}, "spikes": spikes[m]} for m in set(tot) | set(spikes)}
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "hprof2.json"), "w"), indent=1)
    for m, d in out.items():
        print(m, d["totals"])
        c = collections.Counter(s[0] for s in d["spikes"])
        print("  spikes", dict(c), "ms", round(sum(s[1] for s in d["spikes"]), 1))
atexit.register(dump)
from freespec.cli import main
sys.exit(main(sys.argv[1:]))
