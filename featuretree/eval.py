"""How true is a tree: a planted-hierarchy generator and parent-edge precision / recall against it.

Planted forest: `n_roots` root directions; each node has `branching` children down to `depth` levels,
whose directions sit at cosine `child_cos` to their parent's. A token fires each root with probability
`p_root`; a firing node fires exactly one of its children with probability `p_child` (per level if a
sequence), and with `p_sibling` a second sibling too (correlated siblings). Every firing
feature adds coefficient * direction, so a parent's direction is present whenever a child fires: the
hard case where a child latent can absorb its parent. Learned latents are matched to true features by
their firing sets (Jaccard), which is reliable where decoder directions are ambiguous (FINDINGS.md).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from featuretree.config import FeatureTreeError, LinkConfig
from featuretree.firing import fire, fire_rungs, gate_of
from featuretree.tree import ROOT, FeatureTree

__all__ = ["compare_rules", "edge_misses", "edge_scores", "find_purity", "jaccard", "label_purity", "link_by_cosine", "match_features",
           "MISS_REASONS", "Planted", "PLANTED_CONFIGS", "planted_hierarchy", "predicted_pairs", "purity_gain", "refine_purity", "rung_firing", "search_quality",
           "search_queries", "SWEEP_GRID", "sweep_thresholds"]

log = logging.getLogger(__name__)


@dataclass
class Planted:
    """A planted hierarchy: activations and the truth that made them.

    acts (n, d_model) float32; directions (n_features, d_model) unit rows; parent[i] is the index of
    feature i's parent (-1 for roots); level[i] its depth (0 = root); active (n, n_features) bool CSR.

    Parameters
    ----------
    acts : Tensor (n, d_model)
        The sampled activations, float32.
    directions : Tensor (n_features, d_model)
        Each true feature's unit direction.
    parent : ndarray (n_features,)
        Index of each feature's parent, -1 for roots.
    level : ndarray (n_features,)
        Depth of each feature (0 = root).
    active : scipy.sparse.csr_matrix (n, n_features)
        Bool: feature j fires on token i.

    Example:
        >>> p = planted_hierarchy(n_roots=2, branching=2, depth=2, d_model=8, n_tokens=50)
        >>> p.parent.tolist(), p.level.tolist(), p.active.shape
        ([-1, -1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], (50, 6))
    """

    acts: torch.Tensor
    directions: torch.Tensor
    parent: np.ndarray
    level: np.ndarray
    active: sp.csr_matrix

    def split(self, n_train: int) -> tuple[Planted, Planted]:
        """The first `n_train` tokens and the rest, as two Planted sharing the truth.

        Example:
            >>> a, b = planted_hierarchy(n_tokens=100).split(80)
            >>> a.acts.shape[0], b.acts.shape[0]
            (80, 20)
        """
        def part(sl):
            return Planted(self.acts[sl], self.directions, self.parent, self.level, self.active[sl])

        return part(slice(0, n_train)), part(slice(n_train, None))

    def ancestors(self, f: int) -> list[int]:
        """True feature f's ancestors, its parent first.

        Example:
            >>> planted_hierarchy(n_roots=1, branching=1, depth=3, n_tokens=10).ancestors(2)
            [1, 0]
        """
        out = []
        while self.parent[f] >= 0:
            f = int(self.parent[f])
            out.append(f)
        return out

    @property
    def edges(self) -> set[tuple[int, int]]:
        """True (parent, child) feature-index pairs.

        Example:
            >>> len(planted_hierarchy(n_roots=2, branching=3, depth=2, n_tokens=10).edges)
            6
        """
        return {(int(p), int(c)) for c, p in enumerate(self.parent) if p >= 0}


def planted_hierarchy(n_roots: int = 12, branching: int = 3, depth: int = 3, *, d_model: int = 64,
                      n_tokens: int = 100_000, p_root: float | None = None, p_child=0.8,
                      child_cos: float = 0.55, coef: tuple[float, float] = (0.5, 1.5), noise: float = 0.01,
                      p_sibling: float = 0.0, zipf: float = 0.0, seed: int = 0) -> Planted:
    """Sample activations from a planted forest of features (see the module docstring).

    `p_child` is one probability for every level or a sequence with one per level below the roots (level 1
    first). `p_sibling` > 0 makes siblings correlated: where a child fires, one other sibling also fires
    with that probability (the co-firing that provokes hedging and absorption in narrow dictionaries).
    `child_cos` as a (low, high) pair draws each child's cosine to its parent uniformly from that range.
    `zipf` > 0 makes firing Zipfian: root r fires with probability proportional to (r + 1) ** -zipf
    (scaled so the mean over roots stays `p_root`, capped at 0.95), and a firing node picks its i-th
    child with weight (i + 1) ** -zipf, so a few features are frequent and many are rare.

    Parameters
    ----------
    n_roots : int
        Root features.
    branching : int
        Children of every feature above the last level.
    depth : int
        Levels, the roots included.
    d_model : int
        Width of the activation vectors.
    n_tokens : int
        Tokens (rows) sampled.
    p_root : float, optional
        Probability that a token fires a given root (default: min(0.5, 2 / n_roots)).
    p_child : float or sequence of float
        Probability that a firing feature fires one of its children (one value, or one per level below
        the roots, level 1 first).
    child_cos : float or (float, float)
        Cosine between a child's direction and its parent's, or the range each child's cosine is drawn from.
    coef : (float, float)
        Range of the uniform coefficient of each firing feature.
    noise : float
        Standard deviation of the Gaussian noise added to every activation.
    p_sibling : float
        Probability that a second, different sibling fires beside the chosen child.
    zipf : float
        Exponent of Zipfian firing of roots and of the choice among siblings (0: uniform).
    seed : int
        Seed of the random generator (directions, firing, coefficients, noise).

    Example:
        >>> p = planted_hierarchy(n_roots=4, branching=2, depth=2, d_model=16, n_tokens=1000)
        >>> p.acts.shape, p.directions.shape, int((p.parent == -1).sum())
        (torch.Size([1000, 16]), torch.Size([12, 16]), 4)
    """
    rng = np.random.default_rng(seed)
    parent, level = [-1] * n_roots, [0] * n_roots
    frontier = list(range(n_roots))
    for lvl in range(1, depth):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                parent.append(p)
                level.append(lvl)
                nxt.append(len(parent) - 1)
        frontier = nxt
    parent_a, level_a = np.array(parent), np.array(level)
    n_feat = len(parent)
    lo, hi = (child_cos, child_cos) if np.isscalar(child_cos) else (float(child_cos[0]), float(child_cos[1]))
    if not -1 < lo <= hi < 1 or zipf < 0:
        raise FeatureTreeError(f"child_cos={child_cos} must be a cosine (or a low <= high pair) in (-1, 1) and "
                               f"zipf={zipf} >= 0")
    dirs = np.zeros((n_feat, d_model))
    for i in range(n_feat):
        v = rng.standard_normal(d_model)
        if parent[i] >= 0:
            pd_ = dirs[parent[i]]
            c = lo if lo == hi else rng.uniform(lo, hi)
            v -= v @ pd_ * pd_
            v = c * pd_ + np.sqrt(1 - c**2) * v / np.linalg.norm(v)
        dirs[i] = v / np.linalg.norm(v)
    children = {i: np.flatnonzero(parent_a == i) for i in range(n_feat)}
    p_root = p_root if p_root is not None else min(0.5, 2.0 / n_roots)
    p_roots = np.full(n_roots, p_root)
    if zipf > 0:
        w = np.arange(1, n_roots + 1, dtype=float) ** -zipf
        p_roots = np.minimum(0.95, w * p_root * n_roots / w.sum())

    p_level = [float(p_child)] * depth if np.isscalar(p_child) else [float(v) for v in p_child]
    if len(p_level) < depth - 1 or not all(0 <= v <= 1 for v in p_level) or not 0 <= p_sibling <= 1:
        raise FeatureTreeError(f"p_child={p_child} needs one probability in [0, 1] per level below the roots "
                               f"({depth - 1}), and p_sibling={p_sibling} must lie in [0, 1]")
    rows, cols = [], []
    for r in range(n_roots):
        on = np.flatnonzero(rng.random(n_tokens) < p_roots[r])
        stack = [(r, on)]
        while stack:
            f, toks = stack.pop()
            rows.append(toks)
            cols.append(np.full(len(toks), f))
            kids = children[f]
            if len(kids) and len(toks):
                go = toks[rng.random(len(toks)) < p_level[level[f]]]
                if zipf > 0:
                    w = np.arange(1, len(kids) + 1, dtype=float) ** -zipf
                    pick = kids[rng.choice(len(kids), len(go), p=w / w.sum())]
                else:
                    pick = kids[rng.integers(0, len(kids), len(go))]
                if p_sibling > 0 and len(kids) > 1:  # a second, different sibling on some of those tokens
                    both = rng.random(len(go)) < p_sibling
                    other = kids[(np.searchsorted(kids, pick[both]) + rng.integers(1, len(kids), both.sum()))
                                 % len(kids)]
                    go, pick = np.concatenate([go, go[both]]), np.concatenate([pick, other])
                for kid in kids:
                    stack.append((kid, np.unique(go[pick == kid])))
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    active = sp.csr_matrix((np.ones(len(rows_a), dtype=bool), (rows_a, cols_a)), shape=(n_tokens, n_feat))
    coefs = sp.csr_matrix((rng.uniform(*coef, len(rows_a)), (rows_a, cols_a)), shape=(n_tokens, n_feat))
    x = coefs @ dirs + noise * rng.standard_normal((n_tokens, d_model))
    return Planted(torch.tensor(x, dtype=torch.float32), torch.tensor(dirs, dtype=torch.float32), parent_a, level_a,
                   active)


def jaccard(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Dense (n_cols_a, n_cols_b) Jaccard similarity of the columns' firing sets.

    Parameters
    ----------
    a, b : scipy.sparse.csr_matrix
        Firing matrices on the same rows (tokens), one column per feature; an entry > 0 counts as firing.

    Example:
        >>> m = sp.csr_matrix(np.array([[1, 1], [1, 0]], dtype=float))
        >>> jaccard(m, m).round(2).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
    """
    a, b = (a > 0).astype(np.float32), (b > 0).astype(np.float32)
    inter = (a.T @ b).toarray()
    na, nb = np.asarray(a.sum(0)).ravel(), np.asarray(b.sum(0)).ravel()
    union = na[:, None] + nb[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_features(tree: FeatureTree, planted: Planted, *, min_jaccard: float = 0.5,
                   fired: dict | None = None) -> dict[str, int]:
    """Map each tree node to the true feature whose firing set it best matches (Jaccard >= min_jaccard).

    Parameters
    ----------
    tree : FeatureTree
        The tree whose nodes to match (its rungs fire on `planted.acts`).
    planted : Planted
        The truth.
    min_jaccard : float
        Least firing-set Jaccard similarity of a match.
    fired : dict, optional
        {rung: firing matrix on planted.acts} already computed (`rung_firing`).

    Example:
        >>> match_features(tree, planted)["w64/3"]  # doctest: +SKIP
        17
    """

    out: dict[str, int] = {}
    fired = fired if fired is not None else rung_firing(tree, planted)
    for rung, sae in tree.saes.items():
        jac = jaccard(fired[rung], planted.active)  # (width, n_true)
        best = jac.argmax(1)
        for j in range(sae.width):
            nid = f"{rung}/{j}"
            if nid in tree.graph and jac[j, best[j]] >= min_jaccard:
                out[nid] = int(best[j])
    return out


def rung_firing(tree: FeatureTree, planted: Planted) -> dict[str, sp.csr_matrix]:
    """{rung: bool firing matrix (n tokens, width)} of every rung of `tree` on `planted.acts`, by the tree's rule.

    Example:
        >>> rung_firing(tree, planted)["w64"].shape  # doctest: +SKIP
        (20000, 64)
    """
    refined = fire_rungs(tree, planted.acts, [r for r in tree.saes if gate_of(tree, r) is not None])
    # ladder rungs measure their thresholds on these tokens; refined rungs fire only under their gate
    return {rung: refined[rung] if rung in refined else fire(sae, planted.acts, tree.graph.graph.get("fire_rel", 0.25))[2]
            for rung, sae in tree.saes.items()}


def predicted_pairs(tree: FeatureTree, m: dict[str, int]) -> set[tuple[int, int]]:
    """(T(p), T(c)) for every tree edge p -> c whose ends match different true features (`m` from match_features).

    Example:
        >>> predicted_pairs(tree, match_features(tree, planted))  # doctest: +SKIP
        {(0, 12), (0, 13), ...}
    """
    return {(m[p], m[c]) for p, c in tree.graph.edges if p in m and c in m and m[p] != m[c]}


def edge_scores(tree: FeatureTree, planted: Planted, *, min_jaccard: float = 0.5,
                fired: dict | None = None) -> dict[str, float]:
    """Parent-edge precision and recall of `tree` against the planted truth, and feature recovery.

    Each tree edge p -> c whose ends match different true features predicts the pair (T(p), T(c));
    precision = share of predicted pairs that are true parent edges; recall = share of true edges,
    among those whose two ends were both recovered, that some tree edge predicts. `recovered` is the
    share of true features matched by at least one node.

    Parameters
    ----------
    tree : FeatureTree
        The tree to score (its rungs fire on `planted.acts`).
    planted : Planted
        The truth: activations, parents and firing sets.
    min_jaccard : float
        A node matches a true feature only if their firing sets have at least this Jaccard similarity.
    fired : dict, optional
        {rung: firing matrix on planted.acts} already computed (`rung_firing`).

    Example:
        >>> edge_scores(tree, planted)["precision"]  # doctest: +SKIP
        0.97
    """
    m = match_features(tree, planted, min_jaccard=min_jaccard, fired=fired)
    truth = planted.edges
    predicted = predicted_pairs(tree, m)
    recovered = set(m.values())
    reachable = {(p, c) for p, c in truth if p in recovered and c in recovered}
    tp = len(predicted & truth)
    to_ancestor = sum(a in planted.ancestors(b) for a, b in predicted)
    return {
        "precision": tp / len(predicted) if predicted else 0.0,
        "precision_ancestor": to_ancestor / len(predicted) if predicted else 0.0,
        "recall": len(predicted & reachable) / len(reachable) if reachable else 0.0,
        "recall_all": tp / len(truth) if truth else 0.0,
        "recovered": len(recovered) / len(planted.parent),
        "n_predicted": len(predicted),
        "n_true": len(truth),
        "n_reachable": len(reachable),
    }


MISS_REASONS = ("found", "parent unrecovered", "child unrecovered", "parent only in wider rungs",
                "parent silent on the child (absorbed)", "no parent (novel)", "parent latent is a blend", "linked to an ancestor", "linked to another feature",
                "linked to a descendant")
"""Why a true edge is or is not in the tree (`edge_misses`), from "found" to the linking's own mistakes."""


def edge_misses(tree: FeatureTree, planted: Planted, *, min_jaccard: float = 0.5, fired: dict | None = None):
    """Each true parent edge and why the tree has it or misses it: one row per edge, reason in MISS_REASONS.

    The reasons separate what the dictionaries lose from what the linking gets wrong:
    "parent unrecovered" / "child unrecovered" (no latent matches that true feature: the rungs never
    resolved it), "parent only in wider rungs" (every latent of the parent sits in a wider rung than every
    latent of the child: a ladder edge cannot point that way), "parent silent on the child (absorbed)" (no
    latent of the parent in the child's rung or narrower fires on min_coverage of the child latent's tokens:
    the child latent absorbed the parent direction, and no co-activation rule can see the edge), then, for
    the child's latent in the narrowest
    rung (walking up through parents that match the same true feature), what its tree parent is:
    "no parent (novel)" (nothing covered it at min_coverage, or a top-rung latent with no within-rung parent), "parent latent is a blend" (the tree parent
    matches no true feature: a hedging or absorbing latent), "linked to an ancestor" (it skipped a level),
    "linked to a descendant", or "linked to another feature" (a sibling or another branch). Rows also say
    whether the true parent was among the child's `other_parents` (`in_other_parents`).

    Parameters
    ----------
    tree : FeatureTree
        The tree to diagnose (its rungs fire on `planted.acts`).
    planted : Planted
        The truth.
    min_jaccard : float
        As in `edge_scores`.
    fired : dict, optional
        {rung: firing matrix on planted.acts} already computed (`rung_firing`).

    Example:
        >>> edge_misses(tree, planted).reason.value_counts()  # doctest: +SKIP
        found                       171
        parent latent is a blend      9
    """
    import pandas as pd

    fired = fired if fired is not None else rung_firing(tree, planted)
    m = match_features(tree, planted, min_jaccard=min_jaccard, fired=fired)
    g = tree.graph
    order = {r: i for i, r in enumerate(g.graph["rungs"])}
    min_cov = g.graph.get("min_coverage", 0.5)

    def col(n):
        d = g.nodes[n]
        return fired[d["rung"]][:, d["index"]]

    within_cov = tree.graph.graph.get("within_coverage", LinkConfig.within_coverage)

    def linkable(pn, cn):  # does some parent latent cover some child latent as much as link's rule needs?
        for c in cn:
            fc = col(c)
            for p in pn:
                rp, rc = order[g.nodes[p]["rung"]], order[g.nodes[c]["rung"]]
                need = min_cov if rp < rc else within_cov if rp == rc else None
                if need is not None and fc.nnz and fc.multiply(col(p)).nnz / fc.nnz >= need:
                    return True
        return False
    nodes_of: dict[int, list[str]] = {}
    for nid, f in m.items():
        nodes_of.setdefault(f, []).append(nid)
    predicted = predicted_pairs(tree, m)

    ancestors = planted.ancestors
    rows = []
    for P, C in sorted(planted.edges):
        pn, cn = nodes_of.get(P, []), nodes_of.get(C, [])
        row = {"parent": P, "child": C, "level": int(planted.level[C]), "in_other_parents": False,
               "tree_parent": None}
        if (P, C) in predicted:
            reason = "found"
        elif not pn:
            reason = "parent unrecovered"
        elif not cn:
            reason = "child unrecovered"
        elif min(order[g.nodes[n]["rung"]] for n in pn) > max(order[g.nodes[n]["rung"]] for n in cn):
            reason = "parent only in wider rungs"
        elif not linkable(pn, cn):
            reason = "parent silent on the child (absorbed)"
        else:
            c = min(cn, key=lambda n: (order[g.nodes[n]["rung"]], n))
            q = next(iter(g.predecessors(c)), None)
            while q is not None and m.get(q) == C:  # a "same" latent of the child one rung up
                c, q = q, next(iter(g.predecessors(q)), None)
            row["tree_parent"] = q
            row["in_other_parents"] = any(o in pn for o, _ in g.nodes[c].get("other_parents", []))
            if q is None or q == ROOT:
                reason = "no parent (novel)"
            elif q not in m:
                reason = "parent latent is a blend"
            elif m[q] in ancestors(C):
                reason = "linked to an ancestor"
            elif C in ancestors(m[q]):
                reason = "linked to a descendant"
            else:
                reason = "linked to another feature"
        rows.append({**row, "reason": reason})
    return pd.DataFrame(rows)


def link_by_cosine(saes, acts) -> FeatureTree:
    """Baseline: link every live feature to its argmax-decoder-cosine feature in the next narrower rung.

    The cheap proxy that absorption fools (FINDINGS.md); kept to measure how much co-activation adds.

    Parameters
    ----------
    saes : dict or list
        The ladder: {width or rung name: TopKSAE} (what `train_ladder` returns), or a list narrow to wide.
    acts : Activations or Tensor [n, d_model]
        Tokens that decide which features are live (as for `link`, without labels).

    Example:
        >>> from featuretree.train import train_ladder
        >>> x = torch.randn(2000, 8)
        >>> t = link_by_cosine(train_ladder(x, (8, 16), k=2, epochs=1, batch_size=500, progress=False), x)
        >>> t.graph.number_of_edges() > 0
        True
    """
    from featuretree.tree import link

    tree = link(saes, acts, labels=False)
    g = tree.graph
    g.remove_edges_from(list(g.edges))
    rungs = g.graph["rungs"]
    for narrow, wide in zip(rungs, rungs[1:]):
        Wn = torch.nn.functional.normalize(tree.saes[narrow].W_dec.detach(), dim=1)
        Ww = torch.nn.functional.normalize(tree.saes[wide].W_dec.detach(), dim=1)
        live_n = torch.tensor([f"{narrow}/{j}" in g for j in range(len(Wn))])
        sim = (Ww @ Wn.T).masked_fill(~live_n, -2.0)  # (w_wide, w_narrow)
        best = sim.argmax(1)
        for c in range(len(Ww)):
            if f"{wide}/{c}" in g:
                g.add_edge(f"{narrow}/{int(best[c])}", f"{wide}/{c}", cos=float(sim[c, best[c]]), kind="split")
    return tree


PLANTED_CONFIGS = {
    "forest-12x3x3": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64), widths=(16, 64, 256), k=6),
    "wide-8x5x2": dict(gen=dict(n_roots=8, branching=5, depth=2, d_model=48), widths=(12, 64), k=4),
    "close-children": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64, child_cos=0.75),
                           widths=(16, 64, 256), k=6),
    "correlated-siblings": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64, p_child=(0.8, 0.6),
                                         p_sibling=0.3), widths=(16, 64, 256), k=6),
    # the hard regime of issue 17: children at cosine 0.4-0.75 to their parent, Zipfian firing, co-firing
    # siblings, k from the true L0 (~5 and ~5.7) to 2x it
    "hard-cos": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64, child_cos=(0.4, 0.75)),
                     widths=(16, 64, 256), k=5),
    "hard-zipf": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64, child_cos=(0.4, 0.75), zipf=1.0),
                      widths=(16, 64, 256), k=5),
    **{f"hard-k{k}": dict(gen=dict(n_roots=12, branching=3, depth=3, d_model=64, child_cos=(0.4, 0.75), zipf=1.0,
                                   p_child=(0.8, 0.6), p_sibling=0.3), widths=(16, 64, 256), k=k) for k in (6, 9, 12)},
}
"""Planted configurations of `compare_rules` (docs/EVAL.md): generator settings, ladder widths and k."""


def compare_rules(configs=tuple(PLANTED_CONFIGS), seeds=(0, 1, 2), *, n_train: int = 60_000, n_eval: int = 20_000,
                  epochs: int = 6, progress: bool = False, nested: bool = False):
    """Parent-edge precision / recall of three linking rules on planted hierarchies, one row per run.

    Rules: "cos" (argmax decoder cosine in the next narrower rung), "coverage" (co-activation across
    rungs only), "combined" (featuretree's `link`: co-activation across rungs plus within-rung edges,
    the most specific covering parent, cosine recorded). One ladder is trained per (config, seed); with
    `nested`, also a nested (Matryoshka) ladder of the same widths, linked by the combined rule ("nested").
    Rows carry `edge_scores`, the planted L0 (`true_l0`) and, per reason of MISS_REASONS, how many true edges
    were missed for it (`miss: <reason>`, from `edge_misses`).

    Parameters
    ----------
    configs : sequence of str
        Names in PLANTED_CONFIGS (default: all of them).
    seeds : sequence of int
        Seeds of the planted data and of the ladder, one run each.
    n_train, n_eval : int
        Planted tokens to train the ladder on and to link and score on.
    epochs : int
        Training passes of each ladder.
    progress : bool
        Show training progress bars.
    nested : bool
        Also train and score a nested (Matryoshka) ladder.

    Example:
        >>> compare_rules(["wide-8x5x2"], seeds=[0]).groupby("rule").precision.mean()  # doctest: +SKIP
    """
    import pandas as pd

    from featuretree.train import train_ladder
    from featuretree.tree import link

    rows = []
    for name, seed, saes, train, held in planted_ladders(configs, seeds, n_train, n_eval, epochs, progress):
        trees = {"cos": link_by_cosine(saes, held.acts),
                 "coverage": link(saes, held.acts, within_coverage=2.0),  # > 1: no within-rung edges
                 "combined": link(saes, held.acts)}
        if nested:
            cfg = PLANTED_CONFIGS[name]
            nest = train_ladder(train.acts, cfg["widths"], k=cfg["k"], epochs=epochs, batch_size=512, seed=seed,
                                progress=progress, eval_acts=held.acts, nested=True)
            trees["nested"] = link(nest, held.acts)
        for rule, tree in trees.items():
            fired = rung_firing(tree, held)  # encoded once for both
            s = edge_scores(tree, held, fired=fired)
            why = edge_misses(tree, held, fired=fired).reason.value_counts()
            rows.append({"config": name, "seed": seed, "rule": rule, "true_l0": float(held.active.sum(1).mean()), **s,
                         **{f"miss: {r}": int(why.get(r, 0)) for r in MISS_REASONS[1:]}})
            log.info("%s seed %d %-8s precision %.3f recall %.3f", name, seed, rule, s["precision"], s["recall"])
    return pd.DataFrame(rows)


def planted_ladders(configs, seeds, n_train: int, n_eval: int, epochs: int, progress: bool):
    """(config name, seed, ladder, training Planted, held-out Planted) for every planted configuration and seed."""
    from featuretree.train import train_ladder

    unknown = sorted(set(configs) - set(PLANTED_CONFIGS))
    if unknown:
        raise FeatureTreeError(f"unknown planted configs {unknown}; choose from {sorted(PLANTED_CONFIGS)}")
    for name in configs:
        cfg = PLANTED_CONFIGS[name]
        for seed in seeds:
            planted = planted_hierarchy(**cfg["gen"], n_tokens=n_train + n_eval, seed=seed)
            train, held = planted.split(n_train)
            saes = train_ladder(train.acts, cfg["widths"], k=cfg["k"], epochs=epochs, batch_size=512, seed=seed,
                                progress=progress, eval_acts=held.acts)
            yield name, seed, saes, train, held


SWEEP_GRID = {
    "min_coverage": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "within_coverage": (0.8, 0.85, 0.9, 0.95, 2.0),
    "fire_rel": (0.0, 0.1, 0.25, 0.4, 0.6),
}
"""Values `sweep_thresholds` tries for each linking threshold (2.0 for within_coverage = no within-rung edges)."""


def sweep_thresholds(configs=tuple(PLANTED_CONFIGS), seeds=(0, 1, 2), grid=None, *, n_train: int = 60_000,
                     n_eval: int = 20_000, epochs: int = 6, progress: bool = False):
    """Precision / recall of `link` as each threshold moves around its Config default, one row per run.

    One ladder per (config, seed); for each threshold in `grid` ({name: values}, default SWEEP_GRID) and
    each value, `link` runs with that value and every other threshold at its Config default. Rows carry
    config, seed, threshold, value, is_default and the `edge_scores` metrics; docs/EVAL.md picks the
    defaults from the means.

    Parameters
    ----------
    configs : sequence of str
        Names in PLANTED_CONFIGS (default: all of them).
    seeds : sequence of int
        Seeds of the planted data and of the ladder, one run each.
    grid : dict of str to sequence, optional
        {threshold: values to try} for min_coverage, within_coverage, same_threshold or fire_rel
        (default SWEEP_GRID).
    n_train, n_eval : int
        Planted tokens to train the ladder on and to link and score on.
    epochs : int
        Training passes of each ladder.
    progress : bool
        Show training progress bars.

    Example:
        >>> sweep_thresholds(["wide-8x5x2"], seeds=[0], grid={"min_coverage": (0.4, 0.5)})  # doctest: +SKIP
    """
    import pandas as pd

    from featuretree.config import Config
    from featuretree.tree import link

    grid = dict(grid or SWEEP_GRID)
    bad = sorted(set(grid) - {"min_coverage", "within_coverage", "same_threshold", "fire_rel"})
    if bad:
        raise FeatureTreeError(f"cannot sweep {bad}: choose from min_coverage, within_coverage, same_threshold, fire_rel")
    rows = []
    for name, seed, saes, _, held in planted_ladders(configs, seeds, n_train, n_eval, epochs, progress):
        for threshold, values in grid.items():
            for value in values:
                s = edge_scores(link(saes, held.acts, labels=False, **{threshold: value}), held)
                rows.append({"config": name, "seed": seed, "threshold": threshold, "value": value,
                             "is_default": value == getattr(Config, threshold), **s})
                log.info("%s seed %d %s=%s precision %.3f recall %.3f", name, seed, threshold, value,
                         s["precision"], s["recall"])
    return pd.DataFrame(rows)


def label_purity(tree: FeatureTree, acts, labels, *, column: str = "lexname", min_tokens: int = 20,
                 max_tokens: int = 200_000):
    """Per node: the label that dominates its firing tokens' documents, and its share (purity).

    `labels` is a corpus labels DataFrame indexed by document id (`ft.load_corpus("wordnet").labels`);
    `column` holds one label per document ("lexname") or a list ("domains": a token counts for each
    domain of its document, and purity is the share of firing tokens whose document has the top domain).
    Firing tokens are the held-out tokens of the store, with the tree's own firing rule (refined rungs
    gated by the node they refine). Nodes firing on fewer than `min_tokens` tokens are left out.

    Parameters
    ----------
    tree : FeatureTree
        The tree whose nodes are scored.
    acts : Activations
        A store of the corpus `labels` describes (its held-out split, or all of it if nothing is held out).
    labels : pandas.DataFrame
        Labels per document id, e.g. `ft.load_corpus("wordnet").labels`.
    column : str
        The label column: "lexname" (one per document) or "domains" (a list per document).
    min_tokens : int
        Nodes firing on fewer tokens are left out.
    max_tokens : int
        Most tokens of the store read.

    Example:
        >>> label_purity(tree, acts, corpus.labels, column="lexname").head()  # doctest: +SKIP
    """
    import pandas as pd

    split = "heldout" if acts.n_rows("heldout") > 0 else "all"
    x = acts.load(split, max_tokens=max_tokens)
    doc_ids = acts.tokens(split, max_tokens=max_tokens)["doc_id"].to_numpy()
    per_token = labels[column].reindex(doc_ids).reset_index(drop=True)  # index = token position
    ex = per_token.explode()  # a list-valued label gives one row per label, the index repeating
    ex = ex[ex.notna() & (ex.astype(str) != "")]
    codes, names = pd.factorize(ex.astype(str))
    pos = ex.index.to_numpy()
    L = sp.csr_matrix((np.ones(len(codes), dtype=np.float32), (pos, codes)), shape=(len(doc_ids), len(names)))

    rows = []
    for rung, F in fire_rungs(tree, x).items():  # F (n, width)
        n_fire = np.asarray(F.sum(0)).ravel()
        counts = (F.T @ L).toarray()  # (width, n_labels)
        top = counts.argmax(1)
        for j in np.flatnonzero(n_fire >= min_tokens):
            nid = f"{rung}/{j}"
            if nid in tree.graph:
                labelled = counts[j, top[j]] > 0  # else none of its tokens' documents has a label
                rows.append({"node": nid, "rung": rung, "n_fire": int(n_fire[j]),
                             "top": names[top[j]] if labelled else None,
                             "purity": float(counts[j, top[j]] / n_fire[j])})
    return pd.DataFrame(rows).set_index("node", drop=False)


def purity_gain(tree: FeatureTree, purity) -> dict[str, float]:
    """For edges whose two ends are in `purity`: share where the child is purer, and the mean gain.

    Example:
        >>> purity_gain(tree, label_purity(tree, acts, labels))["child_purer"]  # doctest: +SKIP
        0.74
    """
    gains = [purity.at[c, "purity"] - purity.at[p, "purity"] for p, c in tree.graph.edges
             if p in purity.index and c in purity.index]
    return {"n_edges": len(gains), "child_purer": float(np.mean([g > 0 for g in gains])) if gains else 0.0,
            "mean_gain": float(np.mean(gains)) if gains else 0.0}


def refine_purity(tree: FeatureTree, acts, labels, nodes, *, widths=(32, 64), ks=(1, 2, 4, 8),
                  column: str = "lexname", min_tokens: int = 20, progress: bool = True, **refine_kw):
    """How much purer refined children are than the node they refine, per local width and k.

    For every node, width and k: `refine(tree, node, width=, k=)` (depth 1), then `label_purity` of the
    node and of its children on the store's held-out tokens. One row per setting: node, width, k, the
    parent's purity, the children's mean purity, the share of children purer than the parent, the number
    of children with >= `min_tokens` held-out tokens, and their summed `reverse` (1 = they divide the
    region; more = they overlap in it). `refine_kw` goes to `refine` (e.g. stream_tokens).

    Parameters
    ----------
    tree : FeatureTree
        The tree to refine (a copy is refined for each setting; `tree` is unchanged).
    acts : Activations
        A store of the corpus `labels` describes; `label_purity` scores on its held-out tokens.
    labels : pandas.DataFrame
        Labels per document id, e.g. `ft.load_corpus("wordnet").labels`.
    nodes : list of str
        Node ids to refine, e.g. ["w512/148"].
    widths, ks : sequence of int
        Local dictionary widths and k values to try (every pair).
    column : str
        The label column ("lexname" or "domains").
    min_tokens : int
        Children with fewer held-out firing tokens are not measured.
    progress : bool
        Show a progress bar over the settings.
    **refine_kw
        Passed to `refine` (e.g. stream_tokens, max_tokens).

    Example:
        >>> refine_purity(tree, acts, labels, ["w512/148"], widths=(64,), ks=(1, 8))  # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from featuretree.refine import refine

    settings = [(n, w, k) for n in nodes for w in widths for k in ks]
    rows = []
    for node, width, k in tqdm(settings, desc="refine purity", unit="setting", disable=not progress):
        deep = refine(tree, node, width=width, k=k, progress=False, **refine_kw)
        pur = label_purity(deep, acts, labels, column=column, min_tokens=min_tokens)
        kids = [c for c in deep.graph.successors(node) if deep.graph.nodes[c].get("refined")]
        measured = pur[pur.node.isin(kids)]
        p = float(pur.at[node, "purity"]) if node in pur.index else float("nan")
        rows.append({"node": node, "width": width, "k": k, "parent_purity": p,
                     "children_purity": float(measured.purity.mean()) if len(measured) else float("nan"),
                     "children_purer": float((measured.purity > p).mean()) if len(measured) else float("nan"),
                     "n_children": len(measured), "sum_reverse": float(sum(deep.graph.edges[node, c]["reverse"]
                                                                            for c in kids))})
    return pd.DataFrame(rows)


def _label_list(v) -> list:
    """A document's labels as a list: a list-valued label ("domains") as it is, a single one ("lexname") alone."""
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]


def _members(values, domain: str) -> np.ndarray:
    """Bool per document: `domain` is among its labels."""
    return np.array([domain in _label_list(v) for v in values])


def find_purity(tree: FeatureTree, corpus, *, column: str = "lexname", n_query: int = 20, n_pool: int = 3000,
                n_background: int = 300, min_docs: int = 30, domains=None, rungs=None, label_weight: float = 0.5,
                seed: int = 0, model=None, layer: int | None = None, progress: bool = True):
    """Does `find` given N glosses of a WordNet domain rank first a node that fires on that domain? Per domain
    and scoring level (token rates, documents): the top node's purity against the domain.

    For each domain with at least `min_docs` texts in a random pool of `n_pool` corpus texts, `n_query` other
    texts of the domain are the query. The pool is split: `n_background` texts are find's background (the
    document level's), the rest judge the top node: its purity is the share of those texts it fires in (on a
    content word) that belong to the domain; `base_rate` is the domain's share of them (what a node firing
    everywhere would score). The pool is run through the model once; each query once.

    Parameters
    ----------
    tree : FeatureTree
        Built on `corpus`.
    corpus : featuretree.corpus.Corpus
        Texts and labels (`ft.load_corpus("wordnet")`).
    column : str
        The label column: "lexname" (one per text) or "domains" (a list per text).
    n_query, n_pool, n_background, min_docs : int
        Sizes, as above.
    domains : list of str, optional
        The domains to test (default: every one with `min_docs` pool texts).
    rungs : list, optional
        Limit the ranking to these rungs, as in `find`.
    label_weight : float
        find's weight for query words in a node's label.
    seed : int
    model, layer : optional
        Default: the tree's config.
    progress : bool

    Returns
    -------
    DataFrame with columns column, domain, level, node, label, purity, fires_in, base_rate.

    Example:
        >>> df = find_purity(tree, ft.load_corpus("wordnet"), column="lexname")  # doctest: +SKIP
        >>> df.pivot(index="domain", columns="level", values="purity").mean()  # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from featuretree.find import node_scores, query_words, rung_filter
    from featuretree.firing import query_firing, tree_layer, tree_model

    if column not in corpus.labels.columns:
        raise FeatureTreeError(f"the corpus has no label column {column!r}: its columns are "
                               f"{list(corpus.labels.columns)} (build the run on the WordNet corpus)")
    model, layer = tree_model(tree, model), tree_layer(tree, layer)
    only = rung_filter(tree, rungs)
    rng = np.random.default_rng(seed)
    values = corpus.labels[column].tolist()
    pool = np.sort(rng.choice(len(corpus), size=min(n_pool, len(corpus)), replace=False))
    in_pool = np.zeros(len(corpus), bool)
    in_pool[pool] = True
    log.info("find purity: running %d pool texts through the model", len(pool))
    qp = query_firing(tree, [corpus.texts[i] for i in pool], model=model, layer=layer)
    order = rng.permutation(len(pool))
    bg_pos, judge_pos = np.sort(order[:n_background]), np.sort(order[n_background:])
    bg_rates = qp.subset(bg_pos).document_rates()
    judge = qp.subset(judge_pos)
    judge_values = [values[pool[i]] for i in judge_pos]
    if domains is None:
        counts = pd.Series([v for i in pool for v in _label_list(values[i]) if v]).value_counts()
        domains = sorted(str(d) for d in counts[counts >= min_docs].index)
    rows, judged = [], {}  # judged: {rung: (judging texts, width) firing}, made once per rung
    for dom in tqdm(domains, desc=f"find purity ({column})", unit="domain", disable=not progress):
        members = np.flatnonzero(_members(values, dom) & ~in_pool)
        if len(members) < n_query:
            log.info("find purity: %s has %d texts outside the pool, fewer than %d: skipped", dom, len(members), n_query)
            continue
        texts = [corpus.texts[i] for i in rng.choice(members, size=n_query, replace=False)]
        q = query_firing(tree, texts, model=model, layer=layer)
        words = {"token": query_words(texts), "document": query_words(texts, share=True)}  # as find weighs them
        is_dom = _members(judge_values, dom)
        for level in ("token", "document"):
            best = node_scores(tree, q, level=level, bg_rates=bg_rates, only=only, words=words[level],
                               label_weight=label_weight).iloc[0]
            d = tree.graph.nodes[best.node]
            rung = str(d["rung"])
            if rung not in judged:
                judged[rung] = judge.document_matrix(rung).tocsc()
            col = judged[rung][:, int(d["index"])]
            fires = np.asarray(col.todense()).ravel() > 0
            rows.append({"column": column, "domain": dom, "level": level, "node": best.node,
                         "label": best.label, "purity": float(is_dom[fires].mean()) if fires.any() else 0.0,
                         "fires_in": int(fires.sum()), "base_rate": float(is_dom.mean())})
    return pd.DataFrame(rows, columns=["column", "domain", "level", "node", "label", "purity", "fires_in",
                                       "base_rate"])


_QUERY_WORD = re.compile(r"^[a-z]{4,}$")


def search_queries(corpus, *, min_glosses: int = 3, max_glosses: int = 300, split: str = "held-out",
                   n: int | None = None, seed: int = 0):
    """Query nouns for `search_quality`, from the WordNet corpus's own labels: single lower-case words of 4+
    letters (no stop words) that name noun synsets of ONE lexicographer file, occurring as a whole word in
    `min_glosses` to `max_glosses` glosses of other synsets. Each word falls in a fixed half by a hash of its
    spelling ("tuning" or "held-out"), so nothing tuned on one half sees the other.

    Parameters
    ----------
    corpus : featuretree.corpus.Corpus
        The WordNet corpus (`ft.load_corpus("wordnet")`).
    min_glosses, max_glosses : int
        How many other synsets' glosses the word must occur in.
    split : "tuning", "held-out" or "all"
    n : int, optional
        Keep this many, drawn at random (seeded); None keeps every one.
    seed : int

    Returns
    -------
    DataFrame with columns word, lexname, domains (list), n_glosses, half.

    Example:
        >>> q = search_queries(ft.load_corpus("wordnet"), n=200)  # doctest: +SKIP
        >>> sorted(q.columns)  # doctest: +SKIP
        ['domains', 'half', 'lexname', 'n_glosses', 'word']
    """
    import zlib
    from collections import defaultdict

    import pandas as pd
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    if split not in ("tuning", "held-out", "all"):
        raise FeatureTreeError(f"split={split!r} is not one of 'tuning', 'held-out', 'all'")
    for col in ("pos", "lexname", "domains", "lemmas"):
        if col not in corpus.labels.columns:
            raise FeatureTreeError(f"the corpus has no {col!r} column: search queries come from the WordNet corpus "
                                   "(ft.load_corpus('wordnet'))")
    lab = corpus.labels
    lexnames: dict[str, set] = defaultdict(set)
    domains: dict[str, set] = defaultdict(set)
    own: dict[str, set] = defaultdict(set)
    for i, (pos, lex, doms, lemmas) in enumerate(zip(lab["pos"], lab["lexname"], lab["domains"], lab["lemmas"])):
        for w in lemmas:
            if pos == "n" and _QUERY_WORD.match(w) and w not in ENGLISH_STOP_WORDS:
                lexnames[w].add(lex)
                domains[w].update(_label_list(doms))
                own[w].add(i)
    docs: dict[str, int] = defaultdict(int)  # glosses of other synsets the word occurs in
    for i, text in enumerate(corpus.texts):
        gloss = text.split(": ", 1)[-1].lower()
        for w in set(re.findall(r"[a-z]+", gloss)) & lexnames.keys():
            if i not in own[w]:
                docs[w] += 1
    rows = [{"word": w, "lexname": next(iter(lexnames[w])), "domains": sorted(d for d in domains[w] if d),
             "n_glosses": docs[w], "half": "tuning" if zlib.crc32(w.encode()) % 2 == 0 else "held-out"}
            for w in sorted(docs) if len(lexnames[w]) == 1 and min_glosses <= docs[w] <= max_glosses]
    df = pd.DataFrame(rows, columns=["word", "lexname", "domains", "n_glosses", "half"])
    if split != "all":
        df = df[df.half == split].reset_index(drop=True)
    if n is not None and n < len(df):
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), size=n, replace=False))].reset_index(drop=True)
    return df


def _majority(weights: dict) -> str | None:
    return max(weights, key=weights.get) if weights else None


def _pool_firing(deep: FeatureTree, tree: FeatureTree, x: torch.Tensor, rung: str, cache: dict) -> sp.csr_matrix:
    """`rung`'s firing on the judging pool: kept in `cache` for the saved tree's own dictionaries (with
    their stored thresholds, so firing the pool alone equals firing it with the query), fired anew for a
    query's refinements."""
    if rung not in tree.saes or deep.saes.get(rung) is not tree.saes[rung]:
        return fire_rungs(deep, x, [rung])[rung]
    if rung not in cache:
        stored = all(d.get("fire_at") is not None for _, d in tree.graph.nodes(data=True) if d.get("rung") == rung)
        if not stored:  # thresholds measured on x: fire with the query as before, never cached
            return fire_rungs(deep, x, [rung])[rung]
        cache[rung] = fire_rungs(tree, x, [rung])[rung]
    return cache[rung]


def search_quality(tree: FeatureTree, corpus, queries=None, *, n_queries: int = 150, split: str = "held-out",
                   level: str = "concept", refine: bool = False, n_pool: int = 3000, n_background: int = 300,
                   context_weight: float | None = None, seed: int = 0, model=None, layer: int | None = None,
                   progress: bool = True, **search_kw):
    """How well `search` finds WordNet query nouns: per query, the path, and how its end node's firing
    matches the query word's occurrences and whether each node on the path is about the query's topic.

    Judged on a pool of `n_pool` corpus texts (apart from search's own background) plus the query's sampled
    contexts, each weighted by the corpus texts it stands for:
    - recall: the share of the query's occurrences (in its contexts) on whose span the end node fires;
    - precision: of the tokens where the end node fires (contexts and pool, weighted), the share inside the
      query word's spans;
    - coherent: per path node, whether the majority lexicographer file of the texts it fires in (weighted)
      is the query's; `path_coherent` when every node is; `domain_coherent` likewise for the topic domain
      (the majority among fired texts that have one), for queries that have one.

    Parameters
    ----------
    tree : FeatureTree
        Built on `corpus`.
    corpus : featuretree.corpus.Corpus
        The WordNet corpus.
    queries : DataFrame, optional
        From `search_queries` (default: `n_queries` of the `split` half).
    n_queries : int
    split : "tuning", "held-out" or "all"
    level : "concept" or "token"
        search's scoring ("token": the scorer before concepts, to compare with).
    refine : bool
        Let search refine leaves (slow: a local dictionary per query).
    n_pool, n_background : int
        Judging pool and search's background, in corpus texts.
    context_weight : float, optional
        Concept scoring's weight of tokens outside the query's span (default featuretree.find.CONTEXT_WEIGHT).
    seed : int
    model, layer : optional
        Default: the tree's config.
    progress : bool
    search_kw :
        Passed to `search` (e.g. label_weight, max_depth).

    Returns
    -------
    DataFrame with columns word, lexname, domains, path, end_node, end_label, depth, confidence, precision,
    recall, f1, coherent, path_coherent, domain_coherent.

    Example:
        >>> df = search_quality(tree, ft.load_corpus("wordnet"), n_queries=50)  # doctest: +SKIP
        >>> df[["precision", "recall", "coherent"]].mean()  # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from featuretree.find import background_texts, concept_query, sample_texts, search
    from featuretree.firing import tree_layer, tree_model

    if level not in ("concept", "token"):
        raise FeatureTreeError(f"level={level!r} is not one of 'concept', 'token'")
    queries = search_queries(corpus, split=split, n=n_queries, seed=seed) if queries is None else queries
    pool_fired: dict = {}  # the saved tree's rungs fire on the pool once, for every query
    model, layer = tree_model(tree, model), tree_layer(tree, layer)
    index = {t: i for i, t in enumerate(corpus.texts)}
    values = corpus.labels["lexname"].tolist()
    dom_values = corpus.labels["domains"].tolist()
    bg_texts = background_texts(tree, n_background, seed=seed)
    skip = set(bg_texts)
    rng = np.random.default_rng(seed + 1)
    pool_texts = [corpus.texts[i] for i in np.sort(rng.choice(len(corpus), size=min(n_pool + n_background,
                                                                                      len(corpus)), replace=False))
                  if corpus.texts[i] not in skip][:n_pool]
    log.info("search quality: %d queries; background %d texts, judging pool %d", len(queries), len(bg_texts),
             len(pool_texts))
    background = sample_texts(tree, bg_texts, model=model, layer=layer)
    pool = sample_texts(tree, pool_texts, model=model, layer=layer)
    pool_labels = [(values[index[t]], _label_list(dom_values[index[t]])) for t in pool.texts]
    rows = []
    for q in tqdm(queries.itertuples(), total=len(queries), desc=f"search quality ({level})", unit="query",
                  disable=not progress):
        cq = concept_query(tree, q.word, background=background, model=model, layer=layer, seed=seed,
                           **({"context_weight": context_weight} if context_weight is not None else {}))
        path = search(tree, cq if level == "concept" else q.word, level=level, refine_leaves=refine, model=model, layer=layer, progress=False,
                      background=background if level == "concept" else None, **search_kw)
        deep = path.attrs.pop("tree")
        if not len(path):
            rows.append({"word": q.word, "lexname": q.lexname, "domains": q.domains, "path": "", "end_node": None,
                         "end_label": None, "depth": 0, "confidence": float("nan"), "precision": 0.0, "recall": 0.0,
                         "f1": 0.0, "coherent": 0.0, "path_coherent": False, "domain_coherent": float("nan")})
            continue
        n_q = len(cq.query.tokens)
        F_all = {r: sp.vstack([Fq, _pool_firing(deep, tree, pool.x, r, pool_fired)]).tocsr()
                 for r, Fq in fire_rungs(deep, cq.query.x, sorted({str(deep.graph.nodes[n]["rung"])
                                                                   for n in path.node})).items()}
        w_pool = max(cq.n_corpus - cq.n_query_docs, 0) / max(len(pool.texts), 1)
        q_labels = [(values[index[t]], _label_list(dom_values[index[t]])) if t in index else (None, [])
                    for t in cq.query.texts]
        span = cq.occ >= 0
        coherent, dom_ok = [], []
        for node in path.node:
            d = deep.graph.nodes[node]
            col = np.asarray(F_all[str(d["rung"])][:, int(d["index"])].todense()).ravel() > 0
            fq, fp = col[:n_q], col[n_q:]
            lex_w: dict = {}
            dom_w: dict = {}
            for docs, labels, w in ((cq.query.doc[fq], q_labels, cq.w_q), (pool.doc[fp], pool_labels, w_pool)):
                for doc in set(docs.tolist()):
                    lex, doms = labels[doc]
                    if lex is not None:
                        lex_w[lex] = lex_w.get(lex, 0.0) + w
                    for dm in doms:
                        if dm:
                            dom_w[dm] = dom_w.get(dm, 0.0) + w
            coherent.append(_majority(lex_w) == q.lexname)
            if q.domains:
                dom_ok.append(_majority(dom_w) in q.domains)
        # the end node against the query word's spans
        end = deep.graph.nodes[path.node.iloc[-1]]
        col = np.asarray(F_all[str(end["rung"])][:, int(end["index"])].todense()).ravel() > 0
        fq, fp = col[:n_q], col[n_q:]
        in_span = float((fq & span).sum()) * cq.w_q
        fired = float(fq.sum()) * cq.w_q + float(fp.sum()) * w_pool
        occ_hit = set(cq.occ[fq & span].tolist())
        precision = in_span / fired if fired > 0 else 0.0
        recall = len(occ_hit) / max(cq.n_occ, 1)
        rows.append({"word": q.word, "lexname": q.lexname, "domains": q.domains,
                     "path": " > ".join(path.node), "end_node": path.node.iloc[-1],
                     "end_label": path.label.iloc[-1], "depth": len(path),
                     "confidence": float(path.confidence.iloc[-1]), "precision": precision, "recall": recall,
                     "f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
                     "coherent": float(np.mean(coherent)), "path_coherent": bool(all(coherent)),
                     "domain_coherent": float(np.mean(dom_ok)) if dom_ok else float("nan")})
    return pd.DataFrame(rows, columns=["word", "lexname", "domains", "path", "end_node", "end_label", "depth",
                                       "confidence", "precision", "recall", "f1", "coherent", "path_coherent",
                                       "domain_coherent"])
