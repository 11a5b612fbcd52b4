"""Which branch rule should search follow, and which nodes should its path show? Each branch rule patched into
featuretree.find.branch_reach (with every node shown: min_lift 0, as they were measured), or the default rule with
search's min_lift set (liftX), on the tuning half of the WordNet query nouns (docs/EVAL.md, "Which branch rule?"
and "Passing over nodes not about the query"); the held-out half only once a choice is made.

    python benchmarks/search_rules.py base,sum,mean,disc0.8 60             # rules, number of tuning queries
    python benchmarks/search_rules.py lift0,lift0.5,lift1,lift2 60         # min_lift floors
    python benchmarks/search_rules.py lift0,lift0.5,lift1 150 held-out     # after choosing: the held-out half
"""
import importlib
import sys
import time

import networkx as nx

from featuretree.corpus import load_corpus
from featuretree.eval import search_quality, search_queries
from featuretree.export import load

F = importlib.import_module("featuretree.find")  # the module (featuretree.find the attribute is the function)

base = F.branch_reach
search = F.search

def make(rule, gamma=0.8):
    def reach_fn(tree, scores):
        g = tree.graph
        ok = set(F.answering(list(g.nodes), scores))
        reach = {}
        for n in reversed(list(nx.topological_sort(g))):
            if n in ok:
                own = float(scores.at[n, "score"])
                below = [reach[c] for c in g.successors(n) if c in reach]
                if rule == "own":
                    reach[n] = own
                elif rule == "sum":
                    reach[n] = own + max([0.0, *below])
                elif rule == "disc":
                    reach[n] = max([own, *(gamma * b for b in below)])
                elif rule == "mean":  # best mean score of a path down from n (value, length)
                    best = (own, 1)
                    for c in g.successors(n):
                        if c in reach:
                            tot, ln = reach[c]
                            cand = (own + tot, ln + 1)
                            if cand[0] / cand[1] > best[0] / best[1]:
                                best = cand
                    reach[n] = best
        if rule == "mean":
            return {n: tot / length for n, (tot, length) in reach.items()}
        return reach
    return reach_fn

tree = load(sys.argv[4] if len(sys.argv) > 4 else "runs/default")
corpus = load_corpus("wordnet")
split = sys.argv[3] if len(sys.argv) > 3 else "tuning"
queries = search_queries(corpus, split=split, n=int(sys.argv[2]) if len(sys.argv) > 2 else 60, seed=0)
cols = ["precision", "recall", "f1", "coherent", "path_coherent", "domain_coherent", "depth"]
for name in sys.argv[1].split(","):
    floor = float(name[4:]) if name.startswith("lift") else 0.0
    F.search = lambda *a, _floor=floor, **k: search(*a, **{**k, "min_lift": _floor})  # eval imports it per call
    if name == "base" or name.startswith("lift"):
        F.branch_reach = base
    elif name.startswith("disc"):
        F.branch_reach = make("disc", float(name[4:]))
    else:
        F.branch_reach = make(name)
    t = time.time()
    df = search_quality(tree, corpus, queries, level="concept", refine=False, seed=0, progress=False)
    m = df[cols].mean()
    print(name, split, f"{time.time() - t:.0f}s", " ".join(f"{c} {m[c]:.3f}" for c in cols), flush=True)

