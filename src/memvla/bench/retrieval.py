"""``memvla bench retrieval``: the experience store's query latency and memory by size
(with ``--success``: what a store does for a policy, :mod:`memvla.bench.retrieval_success`).

Stores of ``--sizes`` items (unit embeddings of the default embedder's width, clustered
by episode of 50 items as a store is; 8 × 3 action chunks) are built and queried one
query at a time (a robot asks for one chunk; the queries are perturbed stored items), for
each index: ``exact`` (faiss's flat inner-product index; the exact top-k), ``hnsw``
(faiss's graph index, approximate; its recall@k against the exact top-k is reported) and
``torch`` (the exact fallback without faiss). Printed per size and index: build seconds,
median and p99 query latency, the store's bytes (items + index).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HELP = "experience store: query latency, memory and recall at 1e3 … 1e6 items"


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="store sizes (comma-separated)")
    parser.add_argument("--indexes", default="exact,hnsw,torch")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per store")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query (5)")
    parser.add_argument("--seed", type=int, default=0)
    from .retrieval_success import add_arguments as success_arguments

    success_arguments(parser)


def _store(n: int, dim: int, index: str, rng: np.random.Generator):
    import torch

    from ..retrieval import ExperienceStore

    store = ExperienceStore({"name": "bench", "dim": dim}, 8, 3,
                            "exact" if index == "torch" else index)
    # clustered as a store is: the items of one episode (50) near each other
    centres = rng.standard_normal((n // 50 + 1, dim), dtype=np.float32)
    emb = centres[np.arange(n) // 50] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store.add(torch.from_numpy(emb), torch.zeros(n, 8, 3), torch.ones(n, dtype=torch.bool),
              torch.arange(n) // 50)
    return store


def measure(n: int, dim: int, index: str, args) -> dict:
    import faiss
    import torch

    from ..retrieval import store as store_module

    rng = np.random.default_rng(args.seed)
    store = _store(n, dim, index, rng)
    # queries near stored items (a robot revisiting what it has seen)
    near = store.embeddings[torch.randint(0, n, (args.queries,))]
    queries = torch.nn.functional.normalize(near + 0.3 * torch.randn_like(near) / dim ** 0.5,
                                            dim=-1)  # noise of norm ≈ 0.3
    fallback = store_module._faiss
    if index == "torch":
        store_module._faiss = lambda: None
    try:
        start = time.perf_counter()
        store.search(queries[:1], args.k)  # builds the index
        build = time.perf_counter() - start
        ms = []
        for q in queries:
            t0 = time.perf_counter()
            idx, _ = store.search(q[None], args.k)
            ms.append((time.perf_counter() - t0) * 1000)
        got = store.search(queries, args.k)[0]
    finally:
        store_module._faiss = fallback
    exact = (queries @ store.embeddings.T).topk(args.k, dim=1).indices
    recall = float(np.mean([len(set(a) & set(b)) / args.k
                            for a, b in zip(got.tolist(), exact.tolist(), strict=True)]))
    items = sum(t.numel() * t.element_size()
                for t in (store.embeddings, store.actions, store.success, store.episode))
    index_bytes = 0 if store._index is None else len(faiss.serialize_index(store._index))
    return {"size": n, "index": index, "build_s": build, "query_ms_p50": float(np.median(ms)),
            "query_ms_p99": float(np.percentile(ms, 99)), "recall_at_k": recall,
            "store_mb": (items + index_bytes) / 2**20}


def run(args) -> int:
    from ..retrieval import ObservationEmbedder
    from .timing import format_table

    if args.success:
        from .retrieval_success import render, run_success

        results = run_success(args)
        print(render(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0

    dim = ObservationEmbedder().dim
    rows, out = [], []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for index in (i.strip() for i in args.indexes.split(",") if i.strip()):
            r = measure(n, dim, index, args)
            out.append(r)
            rows.append([f"{n:,}", index, f"{r['build_s']:.2f}", f"{r['query_ms_p50']:.3f}",
                         f"{r['query_ms_p99']:.3f}", f"{r['recall_at_k']:.3f}",
                         f"{r['store_mb']:.1f}"])
            print(rows[-1], flush=True)
    print(format_table(["items", "index", "build s", "query ms p50", "p99",
                        f"recall@{args.k}", "store MB"], rows))
    print(f"{dim}-d unit embeddings, one query at a time, k = {args.k}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dim": dim, "k": args.k, "results": out},
                                              indent=2))
    return 0
