# bench with the hybrid drafters' own counters printed at exit (which steps the anchor's rule chose)
import sys, atexit
import freespec.drafters.hybrid as H
made = []
orig = H.HybridDrafter.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    made.append(self)
H.HybridDrafter.__init__ = init
def dump():
    for d in made:
        print("HYBRID", d.tr.template.name, "auto" if d.tr.auto else "", "ruled", d.ruled, "used", d.used,
              "sizes", dict(sorted(d.tr.chosen_sizes.items())), "load_ms", round(d._load_cost * 1e3, 4), flush=True)
atexit.register(dump)
from freespec.cli import main
sys.exit(main(sys.argv[1:]))
