"""Are the nodes search passes over (min_lift) the ones not about the query? The same queries walked with min_lift 0
and 0.5: nodes walked, shown and passed over, and the share of each that is coherent (docs/EVAL.md).

    python benchmarks/search_shown.py held-out 150
"""
import importlib
import sys

from featuretree.corpus import load_corpus
from featuretree.eval import search_quality, search_queries
from featuretree.export import load

F = importlib.import_module("featuretree.find")  # the module (featuretree.find the attribute is the function)
search = F.search


def walk(tree, corpus, queries, floor: float):
    F.search = lambda *a, **k: search(*a, **{**k, "min_lift": floor})  # eval imports it per call
    try:
        return search_quality(tree, corpus, queries, level="concept", refine=False, seed=0, progress=False)
    finally:
        F.search = search


tree = load(sys.argv[3] if len(sys.argv) > 3 else "runs/default")
corpus = load_corpus("wordnet")
split, n = sys.argv[1], int(sys.argv[2])
queries = search_queries(corpus, split=split, n=n, seed=0)
every, shown = walk(tree, corpus, queries, 0.0), walk(tree, corpus, queries, 0.5)
assert (every.end_node == shown.end_node).all()  # the same walk: only what the path shows differs
coh_all, n_all = (every.coherent * every.depth).sum(), every.depth.sum()
coh_kept, n_kept = (shown.coherent * shown.depth).sum(), shown.depth.sum()
print(f"{split} {n}: nodes walked {n_all} coherent {coh_all / n_all:.3f}; shown {n_kept} coherent "
      f"{coh_kept / n_kept:.3f}; passed over {n_all - n_kept} coherent {(coh_all - coh_kept) / max(n_all - n_kept, 1):.3f}")
