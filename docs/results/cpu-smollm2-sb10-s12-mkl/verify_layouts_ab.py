"""Twelfth session, issue 6: oneDNN vs MKL packed layouts, interleaved in one process. Written
against commit 98d6055 (the backend packing with oneDNN); run it at that commit:
    python verify_layouts_ab.py CACHE_LEN 4,8,16,32,64 onednn,mkl32,mkl64
"""
import torch, time, numpy as np, sys
import torch.nn.functional as F
torch.set_num_threads(2)
from freespec import models
from freespec.backends import make_backend
from freespec.cost import calibration_template
from freespec.tree import Draft, TreeShape
from freespec.backends import native
model, tok = models.load("smollm2-135m", progress=False)
be = make_backend(model)
gen=torch.Generator().manual_seed(0)
CL=int(sys.argv[1])
be.reset(); be.prefill(torch.randint(0,49152,(CL,),generator=gen))
sizes=[int(s) for s in sys.argv[2].split(',')]
cfgs=sys.argv[3].split(',')  # e.g. onednn,mkl32,mkl64
def mk(n):
    tm=calibration_template(n-1); sh=TreeShape.from_parents(tm.parents(),'cpu')
    return Draft(torch.randint(0,49152,(n,),generator=gen), sh)
drafts={n:mk(n) for n in sizes}
fns={'onednn':native._packed_linear}
for c in cfgs:
    if c.startswith('mkl'):
        BH=int(c[3:]); mp={}
        for L in be._layers:
            for t,p in zip((L.wqkv,L.wo,L.wgu,L.wd), L.packed):
                mp[id(p)]=(torch.ops.mkl._mkl_reorder_linear_weight(t, BH), t)
        mp[id(be._head_packed)]=(torch.ops.mkl._mkl_reorder_linear_weight(be._head, BH), be._head)
        fns[c]=(lambda mp: (lambda x,w,b: torch.ops.mkl._mkl_linear(x, mp[id(w)][0], mp[id(w)][1], b, x.shape[0])))(mp)
    if c=='plain': fns[c]=lambda x,w,b: None
R={k:{n:[] for n in sizes} for k in cfgs}
for rnd in range(6):
    order=cfgs if rnd%2==0 else cfgs[::-1]
    for name in order:
        if name=='plain': native.PACK_MIN_ROWS=10**6
        else: native.PACK_MIN_ROWS=int(__import__('os').environ.get('PMR','4')); native._packed_linear=fns[name]
        for n,d in drafts.items():
            for i in range(5):
                t=time.perf_counter(); lg=be.verify(d); lg.max(-1); dt=time.perf_counter()-t; be.commit(torch.arange(n),0)
                if i>=2: R[name][n].append(dt)
for n in sizes:
    base=np.median(R[cfgs[0]][n])
    print('cache %d rows %2d '%(CL,n)+' '.join('%s %.1f (%.3f)'%(k,np.median(R[k][n])*1e3,np.median(R[k][n])/base) for k in cfgs))
