"""Eleventh session: hybrid variants whose latency curve's marginal cost is scaled."""
import sys
import numpy as np
from freespec.drafters import DRAFTERS, hybrid


def scaled(k: float):
    class HybridScaled(hybrid.HybridDrafter):
        name = f"hybrid-m{round(k * 100)}"

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._memo = (None, None)

        def _fix(self, ctx):
            c = ctx.latency
            if c is None:
                return
            src, out = self._memo
            if src is not c:
                out = c.copy()
                out[1:] = c[1] + k * (c[1:] - c[1])
                self._memo = (c, out)
            ctx.latency = out

        def propose(self, ctx):
            self._fix(ctx)
            return super().propose(ctx)

        def device_step(self, ctx):
            self._fix(ctx)
            return super().device_step(ctx)

    return HybridScaled


for k in (0.85, 1.15, 1.3, 1.5):
    cls = scaled(k)
    DRAFTERS[cls.name] = cls
class HybridSeed(hybrid.HybridDrafter):
    name = "hybrid-seed"

    def __init__(self, *a, **kw):
        kw["seed_from_prompt"] = True
        super().__init__(*a, **kw)


DRAFTERS["hybrid-seed"] = HybridSeed
from freespec.cli import main  # noqa: E402
sys.exit(main(sys.argv[1:]))
