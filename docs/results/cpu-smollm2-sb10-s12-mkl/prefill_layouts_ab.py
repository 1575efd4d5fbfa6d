"""Twelfth session, issue 6: oneDNN vs MKL packed layouts, interleaved in one process. Written
against commit 98d6055 (the backend packing with oneDNN); run it at that commit:
    python prefill_layouts_ab.py 512   (MKL laid out for 512 rows)
"""
import torch, time, numpy as np, sys
import torch.nn.functional as F
torch.set_num_threads(2)
from freespec import models
from freespec.backends import make_backend
from freespec.backends import native
model, tok = models.load("smollm2-135m", progress=False)
be = make_backend(model)
gen=torch.Generator().manual_seed(0)
BH=int(sys.argv[1]); native.PACK_MIN_ROWS=4
mp={}
for L in be._layers:
    for t,p in zip((L.wqkv,L.wo,L.wgu,L.wd), L.packed):
        mp[id(p)]=(torch.ops.mkl._mkl_reorder_linear_weight(t, BH), t)
mp[id(be._head_packed)]=(torch.ops.mkl._mkl_reorder_linear_weight(be._head, BH), be._head)
onednn=native._packed_linear
def mkl_linear(x, w, b):
    pw, ow = mp[id(w)]
    return torch.ops.mkl._mkl_linear(x, pw, ow, b, x.shape[0])
def plainlin(x,w,b):
    return F.linear(x, mp[id(w)][1], b)
ids={L:torch.randint(0,49152,(L,),generator=gen) for L in (40,100,300,750)}
R={k:{L:[] for L in ids} for k in ('onednn','mkl','plain')}
for rnd in range(6):
    for name,fn in (('onednn',onednn),('mkl',mkl_linear),('plain',plainlin)):
        native._packed_linear=fn
        for L,x in ids.items():
            be.reset(); t=time.perf_counter(); be.prefill(x); R[name][L].append(time.perf_counter()-t)
for L in ids:
    print('prefill %d tokens: '%L + ' '.join('%s %.1f ms'%(k,np.median(R[k][L][1:])*1e3) for k in R))
