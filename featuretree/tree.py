"""FeatureTree and link: join each rung's features to parents in narrower rungs by co-activation.

For a child feature c (wide rung) and a candidate parent p (a narrower rung), on held-out tokens:
    coverage(c, p) = P(p fires | c fires) = |fires(c) & fires(p)| / |fires(c)|
The primary parent is the one with the highest coverage (decoder cosine breaks ties); a child whose best
coverage in the rung just above is below `min_coverage` is tried against the rungs further up, and is
left without a feature parent ("novel") if none covers it. Decoder cosine is recorded but never decides
alone: a child that absorbed its parent has a decoder row as close to the parent as to itself (../FINDINGS).
A virtual node ROOT ("root", virtual=True) is the parent of the narrowest rung's features (edge kind "top")
and of every novel feature (edge kind "novel"), so the graph is one tree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from featuretree.activations import is_store
from featuretree.config import Config, FeatureTreeError, LinkConfig, settings
from featuretree.firing import fire
from featuretree.sae import TopKSAE
from featuretree.utils import rung_key

__all__ = ["add_virtual_root", "attach", "candidates", "coverage_matrix", "decoder_cos", "FeatureTree",
           "link", "node_id", "ROOT"]

log = logging.getLogger(__name__)

ROOT = "root"  # the virtual node above the narrowest rung and the novel features


@dataclass
class FeatureTree:
    """A feature hierarchy: `graph` (nx.DiGraph, edges parent -> child), the dictionaries, the config.

    Nodes are ids like "w1024/311" with attributes width, index, rung, freq, label, top_tokens,
    top_contexts; edges carry cos, coverage and kind. `saes` maps rung names ("w1024", and refined rungs
    like "w1024/311/r64") to TopKSAE. `path` is the run directory (set by `build(out=...)`, `save`, `load`):
    refinement finds the run's activation store through it.

    Example:
        >>> t = FeatureTree(nx.DiGraph(), {}, Config())
        >>> t.rungs
        []
    """

    graph: nx.DiGraph
    saes: dict[str, TopKSAE] = field(default_factory=dict)
    config: Config | None = None
    path: Path | None = field(default=None, compare=False)  # the run directory it was saved to / loaded from

    @property
    def rungs(self) -> list[str]:
        """Rung names from narrowest to widest, e.g. ["w128", "w512"].

        Example:
            >>> FeatureTree(nx.DiGraph(), {"w8": None, "w2": None}).rungs
            ['w2', 'w8']
        """
        return sorted(self.saes, key=rung_key)

    def roots(self) -> list[str]:
        """The top-level features: the virtual root's "top" children (graphs without a virtual root: the
        parentless nodes). Novel features are listed by `novel_features`.

        Example:
            >>> g = nx.DiGraph([("w2/0", "w8/1")])
            >>> FeatureTree(g).roots()
            ['w2/0']
        """
        g = self.graph
        if ROOT in g and g.nodes[ROOT].get("virtual"):
            return [n for n in g.successors(ROOT) if g.edges[ROOT, n].get("kind") == "top"]
        return [n for n in g.nodes if g.in_degree(n) == 0]

    def novel_features(self) -> list[str]:
        """Features no narrower feature covers (they hang under the virtual root with edge kind "novel").

        Example:
            >>> g = nx.DiGraph(); g.add_node("w8/3", novel=True); g.add_node("w2/0")
            >>> FeatureTree(g).novel_features()
            ['w8/3']
        """
        return [n for n, d in self.graph.nodes(data=True) if d.get("novel")]

    def node(self, node_id: str) -> dict:
        """Attributes of one node; an unknown id is an error that says how to find valid ones.

        Example:
            >>> g = nx.DiGraph(); g.add_node("w2/0", freq=0.5)
            >>> FeatureTree(g).node("w2/0")["freq"]
            0.5
        """
        if node_id not in self.graph:
            raise FeatureTreeError(f"unknown node {node_id!r}: ids look like 'w1024/311'; list them with ft.to_frame(tree)")
        return self.graph.nodes[node_id]


def node_id(rung: str, index: int) -> str:
    """The node id of feature `index` of rung `rung`.

    Example:
        >>> node_id("w1024", 311)
        'w1024/311'
    """
    return f"{rung}/{int(index)}"


def coverage_matrix(child: sp.csr_matrix, parent: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """coverage[c, p] = P(p fires | c fires) as a sparse (w_child, w_parent) matrix, plus both firing counts.

    Example:
        >>> c = sp.csr_matrix(np.array([[1.0], [1.0]])); p = sp.csr_matrix(np.array([[1.0, 0], [0, 1.0]]))
        >>> coverage_matrix(c, p)[0].toarray().tolist()
        [[0.5, 0.5]]
    """
    co = (child.T @ parent).tocsr()  # (w_child, w_parent) joint firing counts
    n_child = np.asarray(child.sum(0)).ravel()
    n_parent = np.asarray(parent.sum(0)).ravel()
    inv = sp.diags(1.0 / np.maximum(n_child, 1))
    return (inv @ co).tocsr(), n_child, n_parent


def decoder_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two decoder rows (recorded on every edge; never decides a parent alone).

    Example:
        >>> decoder_cos(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))  # doctest: +ELLIPSIS
        0.707...
    """
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def candidates(above: list[str], r: str, fires: dict, min_coverage: float,
                within_coverage: float) -> dict[int, list[tuple[str, int, float, float]]]:
    """Candidate parents of each live feature of rung `r`: (rung, index, coverage, reverse) tuples.

    Across rungs: the nearest narrower rung holding any parent with coverage >= min_coverage. Within
    rung `r` (the eval-HSAEs rule): P(p | c) >= within_coverage while P(c | p) < within_coverage, i.e. p
    covers c and fires more widely: a child the rung already resolves beside its parent.

    Parameters
    ----------
    above : list of str
        The narrower rungs, narrowest first.
    r : str
        The rung whose features get parents.
    fires : dict
        {rung: firing matrix (n, width)} on the same tokens.
    min_coverage, within_coverage : float
        LinkConfig's thresholds.

    Example:
        >>> F = {"w2": sp.csr_matrix(np.array([[1.0, 0], [1, 1]]))}
        >>> candidates([], "w2", F, 0.5, 0.9)
        {1: [('w2', 0, 1.0, 0.5)]}
    """
    out: dict[int, list[tuple[str, int, float, float]]] = {}
    n_live = np.asarray(fires[r].sum(0)).ravel()
    todo = set(np.flatnonzero(n_live > 0).tolist())
    for pr in reversed(above):
        if not todo:
            break
        cov, _, n_p = coverage_matrix(fires[r], fires[pr])
        for c in sorted(todo):
            row = cov.getrow(c)
            keep = row.data >= min_coverage
            if keep.any():
                ps, cs = row.indices[keep], row.data[keep]
                out[c] = [(pr, int(p), float(v), float(v * n_live[c] / max(n_p[p], 1))) for p, v in zip(ps, cs)]
                todo.discard(c)
    cov, n_c, _ = coverage_matrix(fires[r], fires[r])
    cov.setdiag(0)
    cov.eliminate_zeros()
    for c in np.flatnonzero(n_live > 0):
        row = cov.getrow(c)
        for p, v in zip(row.indices, row.data):
            rev = float(v * n_c[c] / max(n_c[p], 1))
            if v >= within_coverage and rev < within_coverage and n_c[p] > n_c[c]:
                out.setdefault(int(c), []).append((r, int(p), float(v), rev))
    return out


def link(saes, acts, config: LinkConfig | None = None, *, max_tokens: int = 200_000, n_contexts: int = 5,
         labels: bool = True, **overrides) -> FeatureTree:
    """Build a FeatureTree from a ladder of dictionaries and the activations to measure co-firing on.

    An edge p -> c gets `coverage` = P(p | c), `reverse` = P(c | p), decoder `cos`, and `kind` "same" (both
    coverages >= same_threshold) or "split". Other parents with coverage >= min_coverage are kept in the
    child's `other_parents`. A feature may also get a parent in its own rung (`within=True` on the edge)
    when that parent covers it at >= within_coverage but not the other way round: a child the rung
    resolves beside its parent.

    Parameters
    ----------
    saes : dict or list
        {width or rung name: TopKSAE}, or a list ordered narrow to wide.
    acts : Activations or Tensor
        A store (its held-out split is used, and labels come from its tokens) or a Tensor [n, d_model]
        (used whole; labels are then feature ids).
    config : LinkConfig or Config, optional
        min_coverage, within_coverage, same_threshold, fire_rel (see LinkConfig); `overrides` replace fields.
    max_tokens : int
        Most held-out tokens to measure co-activation on.
    n_contexts : int
        Contexts kept per node for labels.
    labels : bool
        Label the nodes (needs a store with tokens).

    Example:
        >>> from featuretree.train import train_ladder
        >>> x = torch.randn(3000, 8)
        >>> saes = train_ladder(x, (8, 16), k=2, epochs=1, batch_size=500, progress=False)
        >>> tree = link(saes, x)
        >>> sorted(tree.graph.nodes[n]["width"] for n in tree.roots())[0]
        8
    """
    cfg = settings(LinkConfig, config, **overrides)
    min_coverage, within_coverage, fire_rel = cfg.min_coverage, cfg.within_coverage, cfg.fire_rel
    same_threshold = cfg.same_threshold
    if isinstance(saes, (list, tuple)):
        saes = {f"w{s.width}": s for s in saes}
    saes = {(k if isinstance(k, str) else f"w{int(k)}"): v for k, v in saes.items()}
    if not saes:
        raise FeatureTreeError("no dictionaries to link: pass {width: TopKSAE} from ft.train_ladder")
    rungs = sorted(saes, key=lambda r: (saes[r].width, r))
    d_models = {saes[r].d_model for r in rungs}
    if len(d_models) != 1:
        raise FeatureTreeError(f"dictionaries disagree on d_model {sorted(d_models)}: link rungs trained on the same layer")
    split = "heldout" if is_store(acts) and acts.n_rows("heldout") > 0 else "all"
    if is_store(acts):
        x_eval = acts.load(split, max_tokens=max_tokens)
    else:
        x_eval = torch.as_tensor(acts)[:max_tokens]
    if x_eval.ndim != 2 or x_eval.shape[-1] != next(iter(d_models)):
        raise FeatureTreeError(f"activations have shape {tuple(x_eval.shape)} but the dictionaries expect "
                               f"[n, {next(iter(d_models))}]: pass the layer's activations the ladder was trained on")
    if not torch.isfinite(x_eval).all():
        raise FeatureTreeError("the activations to link on contain NaN or Inf: check the model's dtype or drop the "
                               "bad rows")
    n = x_eval.shape[0]
    if n == 0:
        raise FeatureTreeError("no held-out tokens to link on: collect more tokens or pass a larger tensor")

    codes, fires = {}, {}
    g = nx.DiGraph(rungs=rungs, n_tokens=int(n), min_coverage=min_coverage, fire_rel=fire_rel)
    if is_store(acts):  # where refine finds the tokens again (build makes it relative to the run)
        g.graph["acts"] = str(Path(acts.path).resolve())
    for r in rungs:
        sae = saes[r]
        v, i, fires[r], at = fire(sae, x_eval, fire_rel, with_thresholds=True)
        codes[r] = (v, i)
        counts = np.asarray(fires[r].sum(0)).ravel()
        for j in np.flatnonzero(counts):
            g.add_node(node_id(r, j), rung=r, width=sae.width, index=int(j), freq=float(counts[j] / n),
                       fire_at=float(at[j]), label=node_id(r, j), top_tokens=[], top_contexts=[])
        log.info("rung %s: %d of %d features fire on %d held-out tokens", r, len(np.flatnonzero(counts)), sae.width, n)

    n_novel = 0
    for i, r in enumerate(rungs):
        cands = candidates(rungs[:i], r, fires, min_coverage, within_coverage)
        for c, pool in cands.items():
            attach(g, saes, r, c, pool, same_threshold)
        if i > 0:
            live = np.flatnonzero(np.asarray(fires[r].sum(0)).ravel() > 0)
            novel = [c for c in live if c not in cands]
            for c in novel:
                g.nodes[node_id(r, c)]["novel"] = True
            n_novel += len(novel)
    if n_novel:
        log.info("%d features have no parent covering them >= %.2f (marked novel)", n_novel, min_coverage)
    add_virtual_root(g, rungs[0])

    tree = FeatureTree(g, dict(saes), None)
    if labels and is_store(acts):
        from featuretree.label import annotate

        annotate(tree, codes, acts.tokens(split, max_tokens=max_tokens), acts, n_contexts=n_contexts)
    return tree


def attach(g: nx.DiGraph, saes: dict, r: str, c: int, pool: list[tuple[str, int, float, float]],
           same_threshold: float = LinkConfig.same_threshold) -> None:
    """Add the edge from the primary parent among `pool` (rung, index, coverage, reverse) to feature c of rung r;
    the other candidates go to the child's `other_parents`.

    Among parents that cover the child about equally, the most specific one (highest P(child | parent)) is
    the direct parent: an ancestor covers the child as well but fires more widely.

    Example:
        >>> g = nx.DiGraph(); s = {"w2": TopKSAE(4, 2, 1), "w4": TopKSAE(4, 4, 1)}
        >>> attach(g, s, "w4", 3, [("w2", 0, 0.95, 0.5), ("w2", 1, 0.6, 0.2)])
        >>> list(g.edges), g.nodes["w4/3"]["other_parents"]
        ([('w2/0', 'w4/3')], [['w2/1', 0.6]])
    """
    best_cov = max(v for _, _, v, _ in pool)
    tied = [t for t in pool if t[2] >= best_cov - 0.05]
    pr, p, cov, rev = max(tied, key=lambda t: (t[3], t[0] == r))
    kind = "same" if cov >= same_threshold and rev >= same_threshold else "split"
    g.add_edge(node_id(pr, p), node_id(r, c), coverage=cov, reverse=rev,
               cos=decoder_cos(saes[r].W_dec.detach()[c], saes[pr].W_dec.detach()[p]), kind=kind, within=pr == r)
    others = sorted((t for t in pool if t[:2] != (pr, p)), key=lambda t: -t[2])[:8]
    g.nodes[node_id(r, c)]["other_parents"] = [[node_id(q, j), round(v, 4)] for q, j, v, _ in others]


def add_virtual_root(g: nx.DiGraph, top_rung: str) -> None:
    """Hang every parentless feature under the virtual node ROOT: kind "top" for `top_rung`'s features,
    "novel" (and node flag novel=True) for the others. Edge coverage is 1 (the root "fires" everywhere),
    reverse is the feature's firing rate, cos 0.

    Example:
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5); g.add_node("w8/1", rung="w8", freq=0.1)
        >>> add_virtual_root(g, "w2")
        >>> g.edges[ROOT, "w2/0"]["kind"], g.edges[ROOT, "w8/1"]["kind"], g.nodes["w8/1"]["novel"]
        ('top', 'novel', True)
    """
    tops = [n for n in g if g.in_degree(n) == 0 and n != ROOT]
    g.add_node(ROOT, rung=ROOT, width=0, index=-1, freq=1.0, label="(all tokens)", virtual=True, top_tokens=[],
               top_contexts=[])
    for n in tops:
        d = g.nodes[n]
        kind = "top" if d.get("rung") == top_rung else "novel"
        if kind == "novel":
            d["novel"] = True
        g.add_edge(ROOT, n, coverage=1.0, reverse=float(d.get("freq") or 0.0), cos=0.0, kind=kind, within=False)
