"""How true is a tree: a planted-hierarchy generator and parent-edge precision / recall against it.

Planted forest: `n_roots` root directions; each node has `branching` children down to `depth` levels,
whose directions sit at cosine `child_cos` to their parent's. A token fires each root with probability
`p_root`; a firing node fires exactly one of its children with probability `p_child`. Every firing
feature adds coefficient * direction, so a parent's direction is present whenever a child fires: the
hard case where a child latent can absorb its parent. Learned latents are matched to true features by
their firing sets (Jaccard), which is reliable where decoder directions are ambiguous (FINDINGS.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from featuretree.train import iter_batches
from featuretree.tree import FeatureTree, drop_weak, encode_all, firing_matrix

log = logging.getLogger(__name__)


@dataclass
class Planted:
    """A planted hierarchy: activations and the truth that made them.

    acts (n, d_model) float32; directions (n_features, d_model) unit rows; parent[i] is the index of
    feature i's parent (-1 for roots); level[i] its depth (0 = root); active (n, n_features) bool CSR.
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

    @property
    def edges(self) -> set[tuple[int, int]]:
        """True (parent, child) feature-index pairs.

        Example:
            >>> len(planted_hierarchy(n_roots=2, branching=3, depth=2, n_tokens=10).edges)
            6
        """
        return {(int(p), int(c)) for c, p in enumerate(self.parent) if p >= 0}


def planted_hierarchy(n_roots: int = 12, branching: int = 3, depth: int = 3, *, d_model: int = 64,
                      n_tokens: int = 100_000, p_root: float | None = None, p_child: float = 0.8,
                      child_cos: float = 0.55, coef: tuple[float, float] = (0.5, 1.5), noise: float = 0.01,
                      seed: int = 0) -> Planted:
    """Sample activations from a planted forest of features (see the module docstring).

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
    dirs = np.zeros((n_feat, d_model))
    for i in range(n_feat):
        v = rng.standard_normal(d_model)
        if parent[i] >= 0:
            pd_ = dirs[parent[i]]
            v -= v @ pd_ * pd_
            v = child_cos * pd_ + np.sqrt(1 - child_cos**2) * v / np.linalg.norm(v)
        dirs[i] = v / np.linalg.norm(v)
    children = {i: np.flatnonzero(parent_a == i) for i in range(n_feat)}
    p_root = p_root if p_root is not None else min(0.5, 2.0 / n_roots)

    rows, cols = [], []
    for r in range(n_roots):
        on = np.flatnonzero(rng.random(n_tokens) < p_root)
        stack = [(r, on)]
        while stack:
            f, toks = stack.pop()
            rows.append(toks)
            cols.append(np.full(len(toks), f))
            kids = children[f]
            if len(kids) and len(toks):
                go = toks[rng.random(len(toks)) < p_child]
                pick = kids[rng.integers(0, len(kids), len(go))]
                for kid in kids:
                    stack.append((kid, go[pick == kid]))
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    active = sp.csr_matrix((np.ones(len(rows_a), dtype=bool), (rows_a, cols_a)), shape=(n_tokens, n_feat))
    coefs = sp.csr_matrix((rng.uniform(*coef, len(rows_a)), (rows_a, cols_a)), shape=(n_tokens, n_feat))
    x = coefs @ dirs + noise * rng.standard_normal((n_tokens, d_model))
    return Planted(torch.tensor(x, dtype=torch.float32), torch.tensor(dirs, dtype=torch.float32), parent_a, level_a,
                   active)


def jaccard(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Dense (n_cols_a, n_cols_b) Jaccard similarity of the columns' firing sets.

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


def match_features(tree: FeatureTree, planted: Planted, *, min_jaccard: float = 0.5) -> dict[str, int]:
    """Map each tree node to the true feature whose firing set it best matches (Jaccard >= min_jaccard).

    Example:
        >>> match_features(tree, planted)["w64/3"]  # doctest: +SKIP
        17
    """
    out: dict[str, int] = {}
    for rung, sae in tree.saes.items():
        v, i = encode_all(sae, iter_batches(planted.acts, 8192, shuffle=False))
        v = drop_weak(v, i, sae.width, tree.graph.graph.get("fire_rel", 0.25))
        jac = jaccard(firing_matrix(v, i, sae.width), planted.active)  # (width, n_true)
        best = jac.argmax(1)
        for j in range(sae.width):
            nid = f"{rung}/{j}"
            if nid in tree.graph and jac[j, best[j]] >= min_jaccard:
                out[nid] = int(best[j])
    return out


def edge_scores(tree: FeatureTree, planted: Planted, *, min_jaccard: float = 0.5) -> dict[str, float]:
    """Parent-edge precision and recall of `tree` against the planted truth, and feature recovery.

    Each tree edge p -> c whose ends match different true features predicts the pair (T(p), T(c));
    precision = share of predicted pairs that are true parent edges; recall = share of true edges,
    among those whose two ends were both recovered, that some tree edge predicts. `recovered` is the
    share of true features matched by at least one node.

    Example:
        >>> edge_scores(tree, planted)["precision"]  # doctest: +SKIP
        0.97
    """
    m = match_features(tree, planted, min_jaccard=min_jaccard)
    truth = planted.edges
    predicted = {(m[p], m[c]) for p, c in tree.graph.edges if p in m and c in m and m[p] != m[c]}
    recovered = set(m.values())
    reachable = {(p, c) for p, c in truth if p in recovered and c in recovered}
    tp = len(predicted & truth)
    return {
        "precision": tp / len(predicted) if predicted else 0.0,
        "recall": len(predicted & reachable) / len(reachable) if reachable else 0.0,
        "recall_all": tp / len(truth) if truth else 0.0,
        "recovered": len(recovered) / len(planted.parent),
        "n_predicted": len(predicted),
        "n_true": len(truth),
        "n_reachable": len(reachable),
    }
