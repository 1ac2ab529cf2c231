"""Recall/speed sweep over efSearch at 100k: our default HNSW32,SQ8 against hnswlib (same
vectors, same process), to compare queries/s at equal recall. Prints one tuple per setting:
(index, efSearch, recall@10, q/s single, q/s batch of 200).

    python benchmarks/sweep_hnsw.py
"""
import sys, time, json, numpy as np, faiss, hnswlib, torch
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
from benchmarks.search import clustered_vectors, recall, qps_single
from retrieval import index_choice
from retrieval.store import new_index
from retrieval.exact import exact_topk
x,q=clustered_vectors(100000,1152,200); _,truth=exact_topk(q,x,None,10)
out=[]
idx=index_choice.configure(new_index("HNSW32,SQ8",1152)); idx.train(x); idx.add_with_ids(x,np.arange(len(x)))
base=index_choice.inner_index(idx)
for ef in (24,32,48,64,96):
    base.hnsw.efSearch=ef
    _,f=index_choice.search(idx,q,10)
    out.append(("HNSW32,SQ8",ef,recall(f,truth),qps_single(lambda v: index_choice.search(idx,v[None],10),q), round(200/ (lambda t: (index_choice.search(idx,q,10), time.perf_counter()-t)[1])(time.perf_counter()),1)))
    print(out[-1], flush=True)
h=hnswlib.Index(space="ip",dim=1152); h.init_index(max_elements=len(x),M=32,ef_construction=80); h.add_items(x,np.arange(len(x)),num_threads=2)
for ef in (24,32,48,64,96):
    h.set_ef(ef)
    f=h.knn_query(q,10,num_threads=2)[0].astype(np.int64)
    out.append(("hnswlib",ef,recall(f,truth),qps_single(lambda v: h.knn_query(v[None],10,num_threads=1),q), round(200/(lambda t: (h.knn_query(q,10,num_threads=2), time.perf_counter()-t)[1])(time.perf_counter()),1)))
    print(out[-1], flush=True)
