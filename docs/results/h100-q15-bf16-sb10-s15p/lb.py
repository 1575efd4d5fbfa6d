# host time of an attached tree's load on this machine, and of its parts
import time, torch, numpy as np
from freespec.tree import AttachBuffer, TreeShape, get_template
import sys; dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
base = TreeShape.from_parents(get_template("tr80").parents(), dev)
def t(f, n=300):
    for _ in range(10): f()
    dev == "cuda" and torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
        dev == "cuda" and torch.cuda.synchronize()
    return "med %.1f us min %.1f" % (np.median(ts) * 1e6, min(ts) * 1e6)
for m in (8, 32):
    buf = AttachBuffer(base, m, dev)
    chain = list(range(-1, 4)); toks = [5, 6, 7, 8, 9]
    print(m, "load same chain", t(lambda: buf.load(toks, chain, base_version=1, base_parents=base.parents_list)))
    c2 = list(range(-1, 2))
    flip = [0]
    def alt():
        flip[0] ^= 1
        buf.load(toks if flip[0] else toks[:3], chain if flip[0] else c2, base_version=1, base_parents=base.parents_list)
    print(m, "load alternating", t(alt))
    print(m, "copy block", buf._host.numel() * 8, "B", t(lambda: buf._dev.copy_(buf._host, non_blocking=True)))
    print(m, "copy anc", buf._host_anc.numel(), "B", t(lambda: buf._dev_anc.copy_(buf._host_anc, non_blocking=True)))
    tok = buf._h[3]
    print(m, "tokens np", t(lambda: tok.__setitem__(slice(0, 5), toks)))
    sl = buf._host[-m:]; dsl = buf._dev[-m:]
    print(m, "copy tokens only", t(lambda: dsl.copy_(sl, non_blocking=True)))
x = torch.zeros(8, dtype=torch.long, device=dev)
print("tiny kernel (fill_)", t(lambda: x.fill_(1)))
