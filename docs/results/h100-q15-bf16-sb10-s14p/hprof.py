# host-time profile of hybrid's device steps inside a real bench run (per method, us a step)
import sys, time, collections, json, os, atexit
import freespec.bench.methods as BM
import freespec.drafters.hybrid as H, freespec.drafters.suffix as S, freespec.drafters.recycling as R
import freespec.tree as TT, freespec.drafters.sizing as Z
cur = ["?"]
acc = collections.defaultdict(collections.Counter)
cnt = collections.defaultdict(collections.Counter)
orig_run = BM.EngineMethod.run
def run(self, *a, **k):
    cur[0] = self.name
    return orig_run(self, *a, **k)
BM.EngineMethod.run = run
def wrap(cls, name, static=False):
    orig = getattr(cls, name)
    label = f"{cls.__name__}.{name}"
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            acc[cur[0]][label] += time.perf_counter() - t
            cnt[cur[0]][label] += 1
    setattr(cls, name, staticmethod(w) if static else w)
for cls, names in ((H.HybridDrafter, ["device_step", "_assemble", "_learn", "_prepare", "_view", "_options", "_pair_table"]),
                   (S.SuffixDrafter, ["retrieve", "end", "begin"]),
                   (R.TokenRecycling, ["plan_step", "_read_stats", "_read_stats_later", "choose", "_plan_step", "_count_held", "prepare"]),
                   (TT.AttachBuffer, ["load", "_set_base_rows", "_structure"]), (Z.TreeSizer, ["scores", "_learn_step"])):
    for n in names:
        if hasattr(cls, n):
            wrap(cls, n)
wrap(TT.TreeShape, "from_parents", static=True)
def dump():
    out = {}
    for m, a in acc.items():
        steps = cnt[m]["HybridDrafter.device_step"] or 1
        out[m] = {"steps": steps, "us_per_step": {k: round(v / steps * 1e6, 2) for k, v in sorted(a.items())},
                  "calls": dict(cnt[m])}
    path = os.path.join(os.environ.get("OUT", "/tmp"), "hprof.json")
    json.dump(out, open(path, "w"), indent=1)
    for m, d in out.items():
        print(m, d["steps"], d["us_per_step"])
atexit.register(dump)
from freespec.cli import main
sys.exit(main(sys.argv[1:]))
