# bench with per-step records of the hybrid drafters: (drafter, prompt, plan size, layout, tree size,
# ruled, tokens, step device ms by CUDA events around the step's launch); dumped to $STEPS at exit
import sys, atexit, os, json
import torch
import freespec.drafters.hybrid as H
import freespec.backends.native as N
made, steps, cur = [], [], [None]
orig_init = H.HybridDrafter.__init__
def init(self, *a, **k):
    orig_init(self, *a, **k)
    self._dbg = len(made); self._prompt = -1; self._rul = False
    made.append(self)
H.HybridDrafter.__init__ = init
orig_begin = H.HybridDrafter.begin
def begin(self, prompt, *a, **k):
    self._prompt += 1
    steps.append(("B", self._dbg, self._prompt, len(prompt)))
    return orig_begin(self, prompt, *a, **k)
H.HybridDrafter.begin = begin
orig_ruled = H.HybridDrafter._ruled_step
def ruled(self, *a, **k):
    self._rul = True
    return orig_ruled(self, *a, **k)
H.HybridDrafter._ruled_step = ruled
orig_asm = H.HybridDrafter._assemble
def asm(self, tr, m, tree):
    P = 0 if tr is None else tr.shape.size - 1
    n = 0 if tree is None else tree.size - 1
    cur[0] = [self._dbg, self._prompt, P, m, n, int(self._rul), None, None, None]
    self._rul = False
    return orig_asm(self, tr, m, tree)
H.HybridDrafter._assemble = asm
orig_learn = H.HybridDrafter._learn
def learn(self, emitted):
    c = cur[0]
    if c is not None and c[0] == self._dbg:
        c[6] = len(emitted); steps.append(c); cur[0] = None
    return orig_learn(self, emitted)
H.HybridDrafter._learn = learn
orig_step = N.NativeBackend.step
def step(self, ds):
    c = cur[0]
    if c is None or self.device.type != "cuda":
        return orig_step(self, ds)
    e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
    e0.record(); out = orig_step(self, ds); e1.record()
    c[7], c[8] = e0, e1
    return out
N.NativeBackend.step = step
def dump():
    if torch.cuda.is_available(): torch.cuda.synchronize()
    rows = []
    for s in steps:
        if s[0] == "B":
            rows.append(list(s))
        else:
            ms = s[7].elapsed_time(s[8]) if s[7] is not None else None
            rows.append(s[:7] + [ms])
    with open(os.environ.get("STEPS", "steps.json"), "w") as f:
        json.dump(rows, f)
    for d in made:
        print("HYBRID", d.tr.template.name, "auto" if d.tr.auto else "", "ruled", d.ruled, "used", d.used,
              "sizes", dict(sorted(d.tr.chosen_sizes.items())), "load_ms", round(d._load_cost * 1e3, 4),
              "plan", None if d.tr._plan_key is None else (len(d.tr._plan_key), hash(d.tr._plan_key)), flush=True)
atexit.register(dump)
from freespec.cli import main
sys.exit(main(sys.argv[1:]))
